#!/usr/bin/env python
"""What MAE's masking saves: encoder forward time and FLOPs at mask ratio 0.75 vs 0 on the same batch.

    python benchmarks/mae_masking.py                      # vit_tiny / vit_small, 224 px (patch 16) and 28 px (patch 4)
    python benchmarks/mae_masking.py --reps 10 --threads 2 --json mae_masking.json

The encoder is :meth:`ssl_vision.objectives.mae.MAE.encode` on the backbone factory's timm ViT (patch embedding,
pos-embed, masking, cls, blocks, final norm), under ``no_grad``, batch ``--batch`` (8). Ratio 0 runs the very same
code with every patch kept, i.e. the cost of the whole image. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; a multiply-add counts 2). Time is the median
of ``--reps`` timed forwards per ratio (ratios alternated) after two warm-ups. Prints a table, then one JSON line
(also written to ``--json``). On a shared machine the times are noisy; the FLOP ratio is exact.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ssl_vision.backbones import create_backbone  # noqa: E402
from ssl_vision.objectives import build_objective  # noqa: E402

#: (backbone, image size, patch size, channels)
CASES = [("vit_tiny", 224, 16, 3), ("vit_small", 224, 16, 3), ("vit_tiny", 28, 4, 1), ("vit_small", 28, 4, 1)]
RATIOS = (0.75, 0.0)


def measure(name: str, image: int, patch: int, chans: int, batch: int, reps: int) -> list[dict]:
    torch.manual_seed(0)
    backbone, dim = create_backbone(name, in_chans=chans, image_size=image, patch_size=patch)
    obj = build_objective("mae", dim, decoder_dim=32, decoder_depth=1, decoder_heads=4)  # decoder not measured
    obj.bind(backbone)
    backbone.eval()
    x = torch.randn(batch, chans, image, image)
    length = (image // patch) ** 2
    noise = torch.rand(batch, length)
    times: dict[float, list[float]] = {r: [] for r in RATIOS}
    with torch.no_grad():
        for ratio in RATIOS:  # two warm-ups per ratio (first calls allocate and pick kernels)
            for _ in range(2):
                obj.encode(x, backbone, noise, mask_ratio=ratio)
        for _ in range(reps):  # alternate the ratios so a busy spell of the machine hits both alike
            for ratio in RATIOS:
                t0 = time.perf_counter()
                obj.encode(x, backbone, noise, mask_ratio=ratio)
                times[ratio].append(time.perf_counter() - t0)
        rows = []
        for ratio in RATIOS:
            with FlopCounterMode(display=False) as counter:
                latent = obj.encode(x, backbone, noise, mask_ratio=ratio)[0]
            rows.append(
                dict(
                    backbone=name,
                    image=image,
                    patch=patch,
                    patches=length,
                    mask_ratio=ratio,
                    tokens=int(latent.shape[1]),
                    ms=1e3 * statistics.median(times[ratio]),
                    gflops=counter.get_total_flops() / 1e9,
                )
            )
    for r in rows:  # speed-up of the masked pass over the whole image
        full = rows[-1]
        r["time_vs_full"] = round(r["ms"] / full["ms"], 3)
        r["flops_vs_full"] = round(r["gflops"] / full["gflops"], 3)
        r["ms"], r["gflops"] = round(r["ms"], 2), round(r["gflops"], 4)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for case in CASES for r in measure(*case, batch=args.batch, reps=args.reps)]
    head = (
        f"{'backbone':<10} {'img':>4} {'p':>3} {'L':>4} {'ratio':>5} {'tokens':>6} {'ms':>9} {'GFLOPs':>9} "
        f"{'t/full':>7} {'F/full':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['backbone']:<10} {r['image']:>4} {r['patch']:>3} {r['patches']:>4} {r['mask_ratio']:>5} "
            f"{r['tokens']:>6} {r['ms']:>9.2f} {r['gflops']:>9.4f} {r['time_vs_full']:>7} {r['flops_vs_full']:>7}"
        )
    result = {"batch": args.batch, "reps": args.reps, "threads": torch.get_num_threads(), "device": "cpu", "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
