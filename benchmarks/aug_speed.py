#!/usr/bin/env python
"""Per-image cost of the per-sample augmentation pipeline vs the batched backend, on this machine's CPU.

    python benchmarks/aug_speed.py                        # multicrop 2 x 224 + 6 x 96 from 256-px images, batch 64
    python benchmarks/aug_speed.py --threads 2 --reps 7 --json aug.json
    python benchmarks/aug_speed.py --quick                # a few seconds (smoke test)

Both paths start from the same PIL images (synthetic, ``--source`` px square RGB) and end with the same list of
normalised float views of one batch:

* ``per_sample``: what a loader worker does -- :func:`~ssl_vision.data.views.build_multiview` applied image by
  image under the per-sample seed (as :class:`~ssl_vision.data.sampling.SeededViews`), then the views stacked
  into batches (``default_collate``);
* ``batched``: :class:`~ssl_vision.data.batched.RawImages` + :func:`~ssl_vision.data.batched.collate_raw` (uint8
  tensors), then :class:`~ssl_vision.data.batched.BatchedViews` on the whole batch (here on the CPU; in training
  it runs on the model's device). ``batched_views_only`` is that last call alone.

Repetitions alternate between the two paths (a busy spell of the machine hits both alike); each number is the
median over ``--reps`` of (time for one batch) / batch size. ``--threads`` sets torch's intra-op threads for both
paths (default 1: a loader worker is one core, so per-core cost is the fair comparison). Prints a table, then one
JSON line (also written to ``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from PIL import Image
from torch.utils.data import default_collate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ssl_vision.data.batched import BatchedViews, RawImages, collate_raw  # noqa: E402
from ssl_vision.data.sampling import SeededViews  # noqa: E402
from ssl_vision.data.views import ViewSpec, build_multiview, view_specs  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _views(name: str) -> dict:
    """conf/augment/<name>.yaml's views merged onto those of the preset it aliases (``defaults: [<other>, _self_]``)."""
    cfg = yaml.safe_load((ROOT / "conf" / "augment" / f"{name}.yaml").read_text())
    views: dict = {}
    for base in cfg.get("defaults", []):
        if isinstance(base, str) and base != "_self_" and not base.startswith("/"):
            views = _views(base)
    for key, view in (cfg.get("views") or {}).items():
        views[key] = {**views.get(key, {}), **view}
    return views


def preset(name: str) -> list[ViewSpec]:
    """The preset's views in order (each states what differs from ``ViewSpec``'s defaults; ViT crops, i.e. without a
    backbone family's crops from conf/augment_recipe/)."""
    return view_specs(_views(name))


def synthetic_images(n: int, side: int, seed: int = 0) -> list[tuple[Image.Image, int]]:
    """Smooth random colour fields plus noise (closer to photos than pure noise for the colour ops)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        low = torch.rand(3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(side, side), mode="bicubic", align_corners=False)[0]
        img = (img + 0.1 * torch.randn(3, side, side, generator=g)).clamp(0, 1)
        out.append((Image.fromarray((img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()), i % 10))
    return out


def measure(
    preset_name: str, image_size: int, source: int, batch: int, reps: int, threads: int, subsets: bool = False
) -> dict:
    torch.set_num_threads(threads)
    views = preset(preset_name)
    data = synthetic_images(batch, source)
    per_sample = SeededViews(data, build_multiview(views, image_size, 3, MEAN, STD), seed=0)
    raw = RawImages(data, 3, max_short=max(source, image_size))
    batched = BatchedViews(views, image_size, 3, MEAN, STD, seed=0)
    # the accelerator strategy on the whole batch (what the CPU ran before the grouped strategy existed)
    plain = BatchedViews(views, image_size, 3, MEAN, STD, seed=0, strategy="subsets", chunk=batch)
    keys = [(i, 0) for i in range(batch)]

    def run_per_sample() -> list[torch.Tensor]:
        return default_collate([per_sample[k] for k in keys])[0]

    def run_batched() -> tuple[list[torch.Tensor], float]:
        b = collate_raw([raw[k] for k in keys])
        t0 = time.perf_counter()
        out = batched(b)[0]
        return out, time.perf_counter() - t0

    a, (b, _) = run_per_sample(), run_batched()  # warm-up, and the two paths must agree on shapes
    assert [tuple(v.shape) for v in a] == [tuple(v.shape) for v in b], "paths disagree on view shapes"
    times: dict[str, list[float]] = {"per_sample": [], "batched": [], "batched_views_only": []}
    if subsets:
        times["subsets_views_only"] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_per_sample()
        times["per_sample"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _, inner = run_batched()
        times["batched"].append(time.perf_counter() - t0)
        times["batched_views_only"].append(inner)
        if subsets:
            b = collate_raw([raw[k] for k in keys])
            t0 = time.perf_counter()
            plain(b)
            times["subsets_views_only"].append(time.perf_counter() - t0)
    ms = {k: 1e3 * statistics.median(v) / batch for k, v in times.items()}
    sides = sorted({int(v.shape[-1]) for v in a}, reverse=True)
    counts = [sum(int(v.shape[-1]) == s for v in a) for s in sides]
    return {
        "preset": preset_name,
        "views": " + ".join(f"{c}x{s}" for c, s in zip(counts, sides)),
        "source_px": source,
        "batch": batch,
        "reps": reps,
        "threads": threads,
        **{f"{k}_ms_per_image": round(v, 3) for k, v in ms.items()},
        "speedup": round(ms["per_sample"] / ms["batched"], 2),
        "speedup_views_only": round(ms["per_sample"] / ms["batched_views_only"], 2),
        **({"speedup_subsets_views_only": round(ms["per_sample"] / ms["subsets_views_only"], 2)} if subsets else {}),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="multicrop", help="conf/augment preset (default multicrop: 2x224 + 6x96)")
    ap.add_argument("--image-size", type=int, default=224, help="global crop side (data.image_size)")
    ap.add_argument("--source", type=int, default=256, help="side of the synthetic source images")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both paths")
    ap.add_argument(
        "--subsets",
        action="store_true",
        help="also time strategy=subsets on the whole batch (the GPU strategy; the CPU's before 12-01)",
    )
    ap.add_argument("--quick", action="store_true", help="batch 8, 2 reps, 64-px images (smoke test)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.image_size, args.source = 8, 2, 56, 64
    res = measure(args.preset, args.image_size, args.source, args.batch, args.reps, args.threads, args.subsets)
    print(
        f"{res['preset']} ({res['views']}) from {res['source_px']}-px images, batch {res['batch']}, "
        f"{res['threads']} thread(s), median of {res['reps']} alternating reps, load avg {res['loadavg_1min']}"
    )
    for k in ("per_sample", "batched", "batched_views_only", "subsets_views_only"):
        if f"{k}_ms_per_image" in res:
            print(f"  {k:<20}{res[f'{k}_ms_per_image']:>9.2f} ms/image")
    print(f"  speedup (per_sample / batched)      {res['speedup']:.2f}x")
    print(f"  speedup (per_sample / views only)   {res['speedup_views_only']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
