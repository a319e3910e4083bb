#!/usr/bin/env python
"""Run the CPU Fashion-MNIST recipes (``conf/experiment/fmnist_<method>.yaml``) one after another and tabulate.

    python benchmarks/recipes.py simclr byol moco_v2 ...   [--out benchmarks/recipes.json] [-- extra overrides]

Each recipe runs ``tools/pretrain.py experiment=fmnist_<method>`` in a subprocess (so runs do not share state),
reads the results line it prints, and appends a row: method, backbone, steps, kNN top-1 at random init and after
training, online probe, wall time, images/s. The JSON file is rewritten atomically after every run, so a long
sweep that is interrupted keeps what it finished. Prints a Markdown table for benchmarks/RESULTS.md at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssl_vision.run_record import write_json_atomic  # noqa: E402


def run_recipe(method: str, extra: list[str], output_root: Path) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "tools/pretrain.py"),
        f"experiment=fmnist_{method}",
        f"paths.output_root={output_root}",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr[-2000:], "command": " ".join(cmd[1:])}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(
        command="python " + " ".join(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd[1:]),
        process_s=round(total, 1),
    )
    return res


def markdown(rows: list[dict]) -> str:
    head = (
        "| method | backbone | steps | kNN top-1 init | kNN top-1 trained | online probe | train wall s | "
        "images/s | whole command s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: see recipes.json | | | | | | | |")
            continue
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {r['method']} | {r['backbone']} | {r['steps']} | {fmt(r['knn_top1_init'])} | "
            f"{fmt(r['knn_top1'])} | {fmt(r['probe_top1'])} | {r['wall_s']:.0f} | {r['images_per_s']:.0f} | "
            f"{r['process_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "recipes.json")
    ap.add_argument("--output-root", type=Path, default=ROOT / "outputs" / "recipes")
    args, extra = ap.parse_known_args()
    extra = [e for e in extra if e != "--"]
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    machine = f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores"
    for method in args.methods:
        print(f"[recipes] {method} ...", flush=True)
        row = run_recipe(method, extra, args.output_root)
        rows = [r for r in rows if r.get("method") != method] + [row]
        write_json_atomic(args.out, {"machine": machine, "rows": rows})
        print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
        if "error" in row:
            print(row["error"], file=sys.stderr)
    print(markdown(rows))


if __name__ == "__main__":
    main()
