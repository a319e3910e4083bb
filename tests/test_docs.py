"""The documentation is self-contained: every ``docs/reference.md §N`` cited in code, configs, tools, benchmarks,
tests and the README names a section that exists, and nothing cites a methods file outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"
SEARCHED = ["ssl_vision", "conf", "tools", "benchmarks", "tests", "scripts", "README.md"]
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".toml"}
CITATION = re.compile(r"docs/reference\.md((?:(?:,\s*|\s+and\s+|\s*/\s*|\s+)§\d+(?:\.\d+)?)+)")
SECTION = re.compile(r"§(\d+(?:\.\d+)?)")


def _files() -> list[Path]:
    out: list[Path] = []
    for name in SEARCHED:
        path = ROOT / name
        if path.is_file():
            out.append(path)
        elif path.is_dir():
            out += [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
            ]
    return out


def _reference_sections(text: str) -> set[str]:
    """Section numbers of the reference's headings: ``## 8. DINO`` -> "8", ``### 10.2 Linear probe`` -> "10.2"."""
    sections = set(re.findall(r"^## (\d+)\. ", text, flags=re.M))
    sections |= set(re.findall(r"^### (\d+\.\d+) ", text, flags=re.M))
    return sections


def test_reference_has_every_numbered_section():
    sections = _reference_sections(REFERENCE.read_text(encoding="utf-8"))
    expected = {str(n) for n in range(12)} | {"0.1", "0.2", "0.3", "0.4", "0.5", "10.1", "10.2", "10.3"}
    missing = expected - sections
    assert not missing, f"docs/reference.md lacks the section headings {sorted(missing)}"


def test_every_citation_names_an_existing_section():
    sections = _reference_sections(REFERENCE.read_text(encoding="utf-8"))
    cited: dict[str, list[str]] = {}
    for path in _files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8", errors="replace")):
            for number in SECTION.findall(match.group(1)):
                cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    assert len(cited) >= 10, f"expected citations of docs/reference.md across the code, found {sorted(cited)}"
    dangling = {n: files for n, files in cited.items() if n not in sections}
    assert not dangling, f"citations of sections that docs/reference.md does not have: {dangling}"


def test_nothing_cites_documents_outside_the_repository():
    outside = re.compile("methods" + r"\.md|shared/docs|\.\./shared")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in _files()
        if p != Path(__file__).resolve()
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, f"references to documents outside the repository (cite docs/reference.md §N instead): {hits}"


def test_readme_links_the_reference():
    assert "](docs/reference.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
