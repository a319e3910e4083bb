#!/usr/bin/env python
"""A/B of the batched backend's CPU implementations (``BatchedViews(strategy=..., chunk=...)``) and of two kernels.

    python benchmarks/aug_ab.py                                   # multicrop 2x224 + 6x96, batch 64, 4 variants
    python benchmarks/aug_ab.py --preset simclr --image-size 32 --source 32 --batch 256 \
        --variants subsets:256 auto:256
    python benchmarks/aug_ab.py --kernels                         # also: the kernel choices (see kernels())
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
    """The CPU kernel choices behind ``ssl_vision/data/batched.py``, each beside what it replaced (ms per call, on 8
    RGB 224-px crops -- 1.2M floats -- unless named otherwise):

    * row gathers / scatters: 4-D vs 2-D ``index_select`` (32 of 64 rows); ``index_copy_`` vs a loop of row copies
      (8 of 64 rows, 224 and 96 px);
    * per-pixel selection: ``torch.where`` on a random boolean mask vs ``torch.minimum`` (solarize) and vs float
      arithmetic; ``remainder`` vs ``floor`` (hue's wrap-around);
    * normalisation: ``addcmul`` with (C, 1, 1) operands vs a multiply and an add;
    * grayscale, Gaussian blur (kernel 23, per-row sigma): kornia's vs ours (when kornia is installed);
    * saturation: the multiply-add blend vs one ``lerp_``.
    """
    from ssl_vision.data.batched import _gray, gaussian_blur

    def ms(fn) -> float:
        fn()  # warm-up
        return round(1e3 * timed(fn, max(reps, 5)), 3)

    g = torch.Generator().manual_seed(0)
    big = torch.rand(64, 3, 224, 224, generator=g)
    rows = torch.randperm(64, generator=g)[:32]
    flat = big.reshape(64, -1)
    out = {
        "index_select_4d": ms(lambda: big.index_select(0, rows)),
        "index_select_2d": ms(lambda: flat.index_select(0, rows)),
    }
    for side in (224, 96):
        dst = torch.rand(64, 3 * side * side, generator=g)
        src, put = torch.rand(8, 3 * side * side, generator=g), torch.randperm(64, generator=g)[:8]

        def loop(dst=dst, src=src, put=put) -> None:
            for i, r in enumerate(put.tolist()):
                dst[r].copy_(src[i])

        out[f"index_copy_{side}px"] = ms(lambda dst=dst, src=src, put=put: dst.index_copy_(0, put, src))
        out[f"row_copy_loop_{side}px"] = ms(loop)
    x = torch.rand(8, 3, 224, 224, generator=g)
    y, o = torch.rand_like(x), torch.empty_like(x)
    mask = x > 0.5
    out["where_bool_mask"] = ms(lambda: torch.where(mask, y, x))
    out["minimum"] = ms(lambda: torch.minimum(x, y))
    out["sub_mul_float_ops"] = ms(lambda: (x - y).mul_(x))
    out["remainder"] = ms(lambda: torch.remainder(x, 0.3))
    out["floor"] = ms(lambda: torch.floor(x))
    scale, shift = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    out["addcmul_c11"] = ms(lambda: torch.addcmul(shift, x, scale, out=o))
    out["mul_then_add_c11"] = ms(lambda: torch.mul(x, scale, out=o).add_(shift))
    f = torch.rand(8, 1, 1, 1, generator=g)
    gray = _gray(x)
    out["saturation_mul_add"] = ms(lambda: o.copy_(x).mul_(f).add_(gray * (1 - f)))
    out["saturation_lerp"] = ms(lambda: o.copy_(x).lerp_(gray, 1 - f))
    out["gray_ours"] = ms(lambda: _gray(x))
    sigma = 0.1 + 1.9 * torch.rand(8, generator=g)
    out["blur_k23_ours"] = ms(lambda: gaussian_blur(x, 23, sigma))
    try:
        import kornia
    except ImportError:
        return out
    out["gray_kornia"] = ms(lambda: kornia.color.rgb_to_grayscale(x))
    sig2 = sigma[:, None].expand(-1, 2).contiguous()
    out["blur_k23_kornia"] = ms(lambda: kornia.filters.gaussian_blur2d(x, 23, sig2, border_type="reflect"))
    return out


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
        built[v] = BatchedViews(
            views, args.image_size, 3, MEAN, STD, seed=0, strategy=strategy, chunk=int(chunk) or None if chunk else None
        )
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
    rows = [{"variant": v, "ms_per_image": round(1e3 * statistics.median(t) / args.batch, 2)} for v, t in times.items()]
    res = {
        "preset": args.preset,
        "image_size": args.image_size,
        "source_px": args.source,
        "batch": args.batch,
        "reps": args.reps,
        "rows": rows,
    }
    print(
        f"{args.preset} at {args.image_size} px from {args.source}-px images, batch {args.batch}, 1 thread, "
        f"median of {args.reps} alternating rounds"
    )
    for r in rows:
        print(f"  {r['variant']:<14}{r['ms_per_image']:>9.2f} ms/image")
    if args.kernels:
        res["kernels"] = kernels(args.reps)
        print("  kernels, ms per call:")
        for k, v in res["kernels"].items():
            print(f"  {k:<24}{v:>9.3f}")
    return emit(res, args.json)


if __name__ == "__main__":
    main()
