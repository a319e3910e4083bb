#!/usr/bin/env python
"""A/B timing of speed options on one method's training step, in one process, alternating.

    python benchmarks/options_ab.py experiment=fmnist_simclr --variant compile=perf.compile=true
    python benchmarks/options_ab.py experiment=fmnist_simclr --variant nhwc=perf.channels_last=true \\
        --variant nhwc+compile=perf.channels_last=true,perf.compile=true --steps 5 --rounds 3 --json ab.json

Positional overrides are those of ``tools/pretrain.py`` and define the baseline; each ``--variant NAME=OVR[,OVR]``
adds overrides on top of it. Every variant is built like the baseline (same seed: same initial weights, same first
batch of views) with :func:`benchmarks.throughput.build_stepper`, i.e. the plain-loop step that
``benchmarks/throughput.py`` times (objective forward, backward, the method's optimizer and its hooks; no
augmentation: one pre-made batch reused). ``first_steps_s`` is the wall time of the ``--warmup`` untimed steps,
where ``torch.compile`` pays its compilation. Then ``--rounds`` rounds each time ``--steps`` steps of every variant
in turn, so a change in the machine's load hits all alike; ``model_step`` = batch / median step time, and also
``bare_fwd_bwd`` (backbone forward + backward of the same views, one pass per view). ``vs_base`` = the variant's
``model_step`` over the baseline's. Prints a table and one JSON line (also ``--json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from benchmarks.throughput import build_stepper, compose_cfg, device_name, emit  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or not overrides:
        raise argparse.ArgumentTypeError(
            f"--variant wants NAME=override[,override...], e.g. compile=perf.compile=true; got {text!r}"
        )
    return name, [o for o in overrides.split(",") if o]


def timed(fn, n: int, sync) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        help="NAME=override[,override...] on top of the baseline (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation happens here)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result object here")
    args, base = parser.parse_known_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    names = [n for n, _ in args.variant]
    if len(set(names)) != len(names) or "base" in names:
        parser.error(f"variant names must be distinct and not 'base', got {names}")
    variants = [("base", [])] + args.variant
    total = args.warmup * 2 + args.rounds * args.steps * 2 + 1
    steppers, fixed, first = {}, {}, {}
    base_cfg = compose_cfg(base)
    for name, extra in variants:
        st = build_stepper(compose_cfg([*base, *extra]) if extra else base_cfg, total_steps=total)
        steppers[name] = st
        fixed[name] = st.to_device(next(iter(st.dm.train_dataloader())))
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            st.train_step(*fixed[name])
        for _ in range(args.warmup):
            st.bare_step(fixed[name][0])
        first[name] = time.perf_counter() - t0
        print(f"[{name}] built; {args.warmup} + {args.warmup} warm-up steps took {first[name]:.1f} s", flush=True)
    ref = next(iter(fixed.values()))
    for name, (views, _) in fixed.items():  # same seed -> the same first batch; else the comparison is void
        if any(not torch.equal(a.cpu(), b.cpu()) for a, b in zip(views, ref[0], strict=True)):
            raise RuntimeError(
                f"variant {name} got another first batch than the baseline; its overrides must not "
                "change the data or views"
            )
    step_t = {n: [] for n in steppers}
    bare_t = {n: [] for n in steppers}
    for r in range(args.rounds):
        for name, st in steppers.items():
            sync = torch.cuda.synchronize if st.device.type == "cuda" else (lambda: None)
            step_t[name] += timed(lambda st=st, name=name: st.train_step(*fixed[name]), args.steps, sync)
            bare_t[name] += timed(lambda st=st, name=name: st.bare_step(fixed[name][0]), args.steps, sync)
        print(
            f"round {r + 1}/{args.rounds}: "
            + "  ".join(
                f"{n} {steppers[n].batch_size / statistics.median(step_t[n][-args.steps :]):.1f}" for n in steppers
            )
            + " img/s",
            flush=True,
        )
    st0 = steppers["base"]
    rows = []
    for name, extra in variants:
        bs = steppers[name].batch_size
        rows.append(
            {
                "variant": name,
                "overrides": extra,
                "first_steps_s": round(first[name], 2),
                "model_step": round(bs / statistics.median(step_t[name]), 2),
                "bare_fwd_bwd": round(bs / statistics.median(bare_t[name]), 2),
            }
        )
    for row in rows:
        row["vs_base"] = round(row["model_step"] / rows[0]["model_step"], 3)
    res = {
        "method": base_cfg.method.name,
        "backbone": base_cfg.backbone.name,
        "data": base_cfg.data.name,
        "batch_size": st0.batch_size,
        "device": device_name(st0.device),
        "steps": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "baseline": base,
        "rows": rows,
    }
    print(
        f"{res['method']} / {res['backbone']} / {res['data']}  batch {res['batch_size']}  {res['device']}  "
        f"{args.rounds} rounds x {args.steps} steps (images/s, medians)"
    )
    print(f"  {'variant':<24}{'first steps s':>14}{'model_step':>12}{'bare_fwd_bwd':>14}{'vs base':>9}")
    for row in rows:
        print(
            f"  {row['variant']:<24}{row['first_steps_s']:>14.1f}{row['model_step']:>12.1f}"
            f"{row['bare_fwd_bwd']:>14.1f}{row['vs_base']:>9.3f}"
        )
    return emit(res, args.json)


if __name__ == "__main__":
    main()
