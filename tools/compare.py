#!/usr/bin/env python
"""Compare pretraining runs: ``python tools/compare.py multirun/2025-01-01_12-00-00 [more run dirs] [--out DIR]``.

Finds every run (a directory with ``results.json``) below the given paths and writes ``comparison.md``,
``comparison.csv``, ``accuracy.png`` and ``curves.png`` into ``--out`` (default: the one directory given).
``--evaluate`` runs tools/knn_eval.py (with the run's own k and T, or ``--knn-k`` / ``--knn-temperature``) for
runs without a kNN number; ``--linear`` runs tools/linear_probe.py for runs without a linear-probe number. Both
write their JSON beside the checkpoint and are reused next time. ``--knn-override`` / ``--linear-override``
pass ``key=value`` overrides to those tools' configs (conf/knn.yaml, conf/linear.yaml), e.g.
``--linear-override epochs=10 --linear-override device=cpu``.

Plain argparse rather than Hydra: the inputs are a list of directories and the outputs go beside them, so a
Hydra run directory, logging and ``key=value`` grammar would only be in the way; the evaluation defaults still
come from conf/knn.yaml and conf/linear.yaml, composed with Hydra's compose API.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ssl_vision.cli import fail  # noqa: E402
from ssl_vision.eval.compare import compare  # noqa: E402


def _tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"ssl_vision_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


def knn_runner(overrides: list[str]):
    tool = _tool("knn_eval")

    def run(checkpoint: Path, k: int | None, temperature: float | None) -> dict:
        cfg = _compose("knn", overrides)
        cfg.checkpoint = str(checkpoint)  # set after composing: any path, no override-grammar quoting
        if k is not None:
            cfg.ks = [int(k)]
        if temperature is not None:
            cfg.temperature = float(temperature)
        return tool.run(cfg)

    return run


def linear_runner(overrides: list[str]):
    tool = _tool("linear_probe")

    def run(checkpoint: Path) -> dict:
        cfg = _compose("linear", overrides)
        cfg.checkpoint = str(checkpoint)
        return tool.run(cfg)

    return run


DESCRIPTION = """Compare pretraining runs: one table (comparison.md, comparison.csv) and two figures (accuracy.png: kNN,
linear and online-probe top-1 per run, one bar series per protocol, the random-init kNN as a black tick;
curves.png: training loss per objective and online kNN, over steps or images seen) from the files the runs left
(results.json, .hydra/config.yaml, logs/metrics.csv, <checkpoint>.knn.json / .linear.json). Sweep jobs without
results are listed as failed (or running)."""

EPILOG = """examples:
  python tools/compare.py outputs/multirun/2026-01-01_12-00-00
      every run of a sweep; writes comparison.md/.csv, accuracy.png, curves.png into that directory
  python tools/compare.py outputs/simclr-resnet18-cifar10/2026-01-01_12-00-00 \\
      outputs/byol-resnet18-cifar10/2026-01-02_09-30-00 --out reports/simclr_vs_byol \\
      --evaluate --linear --linear-override epochs=10
      two runs, with the offline kNN and linear probe run where a number is missing"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own: the usage block, then the message)
        fail(f"{message} (e.g. python tools/compare.py outputs/multirun/<time>; --help for more)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _Parser(
        prog="tools/compare.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", help="a multirun directory, run directories, or any folder above them")
    p.add_argument("--out", help="where the table and figures go (default: the single directory given)")
    p.add_argument("--evaluate", action="store_true", help="run the offline kNN for runs that have no kNN number")
    p.add_argument("--linear", action="store_true", help="run the linear probe for runs that have no linear number")
    p.add_argument("--knn-k", type=int, help="k for offline kNN numbers (default: the run's eval.knn_k[0])")
    p.add_argument("--knn-temperature", type=float, help="T for offline kNN numbers (default: the run's)")
    p.add_argument(
        "--knn-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for conf/knn.yaml (repeatable)",
    )
    p.add_argument(
        "--linear-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for conf/linear.yaml (repeatable)",
    )
    args = p.parse_args(argv)
    missing = [path for path in args.paths if not Path(path).exists()]
    if missing:
        fail(
            f"{', '.join(missing)} does not exist{'' if len(missing) == 1 else ' (none of these exist)'}: give a "
            f"sweep directory (e.g. outputs/multirun/<time>), run directories, or any folder above them"
        )
    if args.out is None:
        if len(args.paths) != 1 or not Path(args.paths[0]).is_dir():
            fail("several paths (or a file) given: say where the comparison goes with --out DIR")
        args.out = args.paths[0]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        res = compare(
            args.paths,
            args.out,
            knn_runner(args.knn_override) if args.evaluate else None,
            linear_runner(args.linear_override) if args.linear else None,
            args.knn_k,
            args.knn_temperature,
        )
    except FileNotFoundError as exc:
        fail(str(exc))
    print(Path(res["files"]["comparison.md"]).read_text())
    print("[ssl_vision] wrote " + ", ".join(res["files"].values()))
    return res


if __name__ == "__main__":
    main()
