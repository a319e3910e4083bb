"""Packaging: dependency ranges + tested pins, console commands that run from any directory, a wheel that carries
the configs and tools they need."""

from __future__ import annotations

import configparser
import importlib
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ssl_vision import console

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_names(requirements: list[str]) -> dict[str, str]:
    """name (normalised) -> the requirement's version part."""
    out = {}
    for req in requirements:
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)", req)
        out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3).split(";")[0].strip()
    return out


def test_dependencies_are_ranges_and_constraints_pin_them():
    deps = _requirement_names(PYPROJECT["project"]["dependencies"])
    for name in ("torch", "torchvision"):
        assert deps[name].startswith(">="), f"{name} must be a range in pyproject.toml, got {deps[name]!r}"
    assert not [n for n, v in deps.items() if v.startswith("==")], deps  # exact pins live in constraints.txt
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    extras = [r for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs]
    missing = sorted((set(deps) | set(_requirement_names(extras))) - set(pins))
    assert not missing, f"constraints.txt pins no version for {missing}"
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup_sh


def test_console_scripts_match_the_commands():
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == set(console.COMMANDS), (sorted(scripts), sorted(console.COMMANDS))
    for command, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        tool = console.COMMANDS[command][0]
        assert (ROOT / "tools" / f"{tool}.py").is_file(), command


@pytest.mark.parametrize(
    "command,func,args,expect",
    [
        (
            "ssl-pretrain",
            "pretrain",
            ["--cfg", "job", "data=folder", "data.root=imgs", "seed=7"],
            ["name: folder", "seed: 7"],
        ),
        ("ssl-knn", "knn_eval", ["--cfg", "job", "checkpoint=run/last.ckpt", "ks=[5]"], ["checkpoint: run/last.ckpt"]),
        (
            "ssl-linear",
            "linear_probe",
            ["--cfg", "job", "checkpoint=a.ckpt", "protocol=lars_bn"],
            ["protocol: lars_bn"],
        ),
        ("ssl-export", "export", ["--cfg", "job", "checkpoint=a.ckpt"], ["checkpoint: a.ckpt"]),
        ("ssl-embed", "embed_plot", ["--cfg", "job", "checkpoint=a.ckpt", "num_samples=10"], ["num_samples: 10"]),
    ],
)
def test_console_command_composes_from_another_directory(command, func, args, expect, tmp_path, monkeypatch, capsys):
    """Run from an empty folder (where a relative ``../conf`` would not exist): the config is found and composed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [command, *args])
    getattr(console, func)()
    out = capsys.readouterr().out
    for text in expect:
        assert text in out, (text, out[-2000:])
    assert not any(tmp_path.iterdir())  # --cfg job writes nothing


def test_compare_command_parses_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ssl-compare", "--help"])
    with pytest.raises(SystemExit) as done:
        console.compare()
    assert done.value.code == 0 and "--evaluate" in capsys.readouterr().out


def test_wheel_carries_configs_tools_and_entry_points(tmp_path):
    """Build the wheel (no dependencies, no network) from a copy of the sources and read what it holds."""
    pip = [sys.executable, "-m", "pip"]
    pytest.importorskip("setuptools")  # the build backend, used from this environment (no network)
    if subprocess.run([*pip, "--version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("pip is not available")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("ssl_vision", "conf", "tools"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    done = subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("ssl_vision-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        parser = configparser.ConfigParser()
        parser.read_string(z.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == PYPROJECT["project"]["scripts"]
    confs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"ssl_vision/_resources/{c}" for c in confs} <= names, sorted(
        c for c in confs if f"ssl_vision/_resources/{c}" not in names
    )
    tools = {f"ssl_vision/_resources/tools/{p.name}" for p in (ROOT / "tools").glob("*.py")}
    assert tools <= names, sorted(tools - names)
    modules = {
        f"{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "ssl_vision").rglob("*.py") if "__pycache__" not in p.parts
    }
    assert modules <= names, sorted(modules - names)
