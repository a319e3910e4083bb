#!/usr/bin/env python
"""A/B of the batched backend's CPU implementations (``BatchedViews(strategy=..., chunk=...)``) and of two kernels.

    python benchmarks/aug_ab.py                                   # multicrop 2x224 + 6x96, batch 64, 4 variants
    python benchmarks/aug_ab.py --preset simclr --image-size 32 --source 32 --batch 256 \
        --variants subsets:256 auto:256
    python benchmarks/aug_ab.py --kernels                         # also: 4-D vs 2-D index_select
    python benchmarks/aug_ab.py --quick                           # smoke test

Variants are ``strategy:chunk`` (``chunk`` 0 = automatic). All variants are built on the same batch, must give the
same views (checked, 1e-5), and are timed in alternating rounds in one process (a busy spell hits all alike);
ms/image = median over ``--reps`` of one call / batch size, 1 torch thread. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from aug_speed import MEAN, STD, preset, synthetic_images  # noqa: E402
from throughput import emit  # noqa: E402

from ssl_vision.data.batched import BatchedViews, RawImages, collate_raw  # noqa: E402


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(reps: int) -> dict:
    """The row gather behind ``_take``: 32 of 64 224-px RGB images, 4-D vs 2-D ``index_select`` (ms per call)."""
    x = torch.rand(64, 3, 224, 224)
    rows = torch.randperm(64)[:32]
    flat = x.reshape(64, -1)
    out = {"index_select_4d_ms": timed(lambda: x.index_select(0, rows), reps),
           "index_select_2d_ms": timed(lambda: flat.index_select(0, rows), reps)}
    return {k: round(1e3 * v, 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="multicrop")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--source", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["subsets:64", "subsets:8", "auto:0", "grouped:8"])
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 reps, 56-px crops from 64-px images")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.image_size, args.source = 8, 2, 56, 64
    torch.set_num_threads(1)
    views = preset(args.preset)
    data = synthetic_images(args.batch, args.source)
    raw = RawImages(data, 3, max_short=max(args.source, args.image_size))
    batch = collate_raw([raw[(i, 0)] for i in range(args.batch)])
    built = {}
    for v in args.variants:
        strategy, _, chunk = v.partition(":")
        built[v] = BatchedViews(views, args.image_size, 3, MEAN, STD, seed=0, strategy=strategy,
                                chunk=int(chunk) or None if chunk else None)
    ref = None
    for v, bv in built.items():
        got = bv(batch)[0]
        ref = ref or got
        worst = max(float((a - b).abs().max()) for a, b in zip(got, ref))
        if worst > 1e-5:
            raise SystemExit(f"variant {v} gives other views than {args.variants[0]} (max diff {worst:.2e})")
    times: dict[str, list[float]] = {v: [] for v in built}
    for _ in range(args.reps):
        for v, bv in built.items():
            t0 = time.perf_counter()
            bv(batch)
            times[v].append(time.perf_counter() - t0)
    rows = [{"variant": v, "ms_per_image": round(1e3 * statistics.median(t) / args.batch, 2)}
            for v, t in times.items()]
    res = {"preset": args.preset, "image_size": args.image_size, "source_px": args.source, "batch": args.batch,
           "reps": args.reps, "rows": rows}
    print(f"{args.preset} at {args.image_size} px from {args.source}-px images, batch {args.batch}, 1 thread, "
          f"median of {args.reps} alternating rounds")
    for r in rows:
        print(f"  {r['variant']:<14}{r['ms_per_image']:>9.2f} ms/image")
    if args.kernels:
        res["kernels"] = kernels(args.reps)
        for k, v in res["kernels"].items():
            print(f"  {k:<22}{v:>9.2f}")
    return emit(res, args.json)


if __name__ == "__main__":
    main()
