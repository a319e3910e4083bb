#!/usr/bin/env python
"""What ``data.persistent_workers`` saves: the train loader's time to its first batch at each epoch boundary.

    python benchmarks/loader_epochs.py experiment=fmnist_simclr data.train_subset=4096 --epochs 4 --rounds 2

Positional overrides are those of ``tools/pretrain.py``. For ``persistent_workers`` false and true in turn
(``--rounds`` alternations), the train loader of the composed config (its ``data.num_workers`` workers, the
method's views) is iterated for ``--epochs`` epochs; per epoch it records the wait for the first batch (worker
start-up plus the first batch's augmentation, or the latter alone with persistent workers after the first epoch)
and the whole epoch's time. No model runs. Prints a table and one JSON line (also ``--json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.throughput import compose_cfg, emit  # noqa: E402
from ssl_vision.launch import build_datamodule  # noqa: E402


def epochs(overrides: list[str], n: int) -> list[dict[str, float]]:
    dm = build_datamodule(compose_cfg(overrides))
    dm.setup("fit")
    loader = dm.train_dataloader()
    out = []
    for epoch in range(n):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        for _ in it:
            pass
        out.append({"first_batch_s": first, "epoch_s": time.perf_counter() - t0})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args, base = parser.parse_known_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be >= 2 (the saving is at epoch boundaries) and --rounds >= 1")
    cfg = compose_cfg(base)
    if int(cfg.data.num_workers) < 1:
        parser.error("persistent workers need data.num_workers >= 1")
    runs: dict[str, list[list[dict[str, float]]]] = {"false": [], "true": []}
    for _ in range(args.rounds):
        for flag in runs:
            runs[flag].append(epochs([*base, f"data.persistent_workers={flag}"], args.epochs))
    rows = []
    for flag, per_round in runs.items():
        later_first = [e["first_batch_s"] for r in per_round for e in r[1:]]
        later_epoch = [e["epoch_s"] for r in per_round for e in r[1:]]
        rows.append(
            {
                "persistent_workers": flag == "true",
                "first_epoch_first_batch_s": round(statistics.median(r[0]["first_batch_s"] for r in per_round), 3),
                "later_epochs_first_batch_s": round(statistics.median(later_first), 3),
                "later_epochs_epoch_s": round(statistics.median(later_epoch), 3),
            }
        )
    res = {
        "data": cfg.data.name,
        "train_subset": cfg.data.train_subset,
        "batch_size": int(cfg.data.batch_size),
        "num_workers": int(cfg.data.num_workers),
        "epochs": args.epochs,
        "rounds": args.rounds,
        "overrides": base,
        "rows": rows,
        "saved_per_epoch_s": round(rows[0]["later_epochs_epoch_s"] - rows[1]["later_epochs_epoch_s"], 3),
    }
    print(
        f"{res['data']} subset {res['train_subset']} batch {res['batch_size']} workers {res['num_workers']}, "
        f"{args.epochs} epochs x {args.rounds} rounds (medians, s)"
    )
    print(f"  {'persistent':<12}{'1st epoch wait':>16}{'later waits':>13}{'later epochs':>14}")
    for r in rows:
        print(
            f"  {str(r['persistent_workers']):<12}{r['first_epoch_first_batch_s']:>16.3f}"
            f"{r['later_epochs_first_batch_s']:>13.3f}{r['later_epochs_epoch_s']:>14.3f}"
        )
    return emit(res, args.json)


if __name__ == "__main__":
    main()
