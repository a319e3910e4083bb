#!/usr/bin/env python
"""kNN evaluation speed: :func:`ssl_vision.eval.knn.knn_classify` vs this machine's plain matmul rate.

    python benchmarks/knn_bench.py                          # ImageNet scale: 1.28M x 512 bank, 50k queries, k=200
    python benchmarks/knn_bench.py --bank 131072 --queries 8192 --threads 2 --json knn.json
    python benchmarks/knn_bench.py --quick                   # seconds (smoke test)

The bank (``--bank`` x ``--dim``, random unit vectors with ``--classes`` random labels) is searched by the real
``knn_classify`` (exact faiss ``IndexFlatIP`` search, one call per ``--chunk`` queries, then the weighted vote); its
time is turned into GFLOP/s of the similarity matmul alone, ``2 * queries * bank * dim`` FLOPs, which dominates.
The reference is ``torch.mm`` on the same shapes -- a ``(chunk, dim)`` query block times the bank, in bank blocks
whose output fits ``--mm-block-mb`` -- timed on up to ``--baseline-queries`` queries before and after the kNN run
(their mean is the reference; both are printed). ``efficiency = knn rate / matmul rate``, target >= 70%.

Memory: the bank itself (N x D float32), faiss' copy of it and the normalised copy made by ``knn_classify``, plus
one chunk's ``(chunk, k)`` results: about ``3 * N * D * 4`` bytes (7.9 GB at the default size) and nothing that
grows with the number of queries. The default size takes ~20 min on 2 cores; shrink ``--bank`` / ``--queries``
for a quick look (the rates hardly depend on them once the bank is far larger than a block).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ssl_vision.eval.knn import knn_classify  # noqa: E402


def matmul_rate(queries: torch.Tensor, bank: torch.Tensor, chunk: int, block_mb: float) -> tuple[float, float]:
    """GFLOP/s and seconds of ``queries @ bank.T`` by ``torch.mm`` in (chunk x bank block) pieces, one out buffer."""
    rows = max(1, int(block_mb * 2**20 / 4 / min(chunk, queries.shape[0])))
    out = torch.empty(min(chunk, queries.shape[0]), min(rows, bank.shape[0]))
    flops, t0 = 0.0, time.perf_counter()
    for s in range(0, queries.shape[0], chunk):
        q = queries[s : s + chunk]
        for b in range(0, bank.shape[0], rows):
            blk = bank[b : b + rows]
            torch.mm(q, blk.T, out=out[: q.shape[0], : blk.shape[0]])
            flops += 2.0 * q.shape[0] * blk.shape[0] * bank.shape[1]
    seconds = time.perf_counter() - t0
    return flops / seconds / 1e9, seconds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank", type=int, default=1_281_167, help="bank size N (ImageNet train: 1,281,167)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=200)
    ap.add_argument("--chunk", type=int, default=4096, help="knn_classify chunk_size (queries per faiss call)")
    ap.add_argument("--baseline-queries", type=int, default=8192, help="queries timed for the matmul reference")
    ap.add_argument("--mm-block-mb", type=float, default=256.0, help="largest torch.mm output block, MiB")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and faiss (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="bank 20000, 1000 queries (smoke test)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.bank, args.queries, args.baseline_queries, args.classes = 20_000, 1_000, 1_000, 100
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.bank, args.dim, generator=g), dim=1)
    labels = torch.randint(0, args.classes, (args.bank,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=g), dim=1)
    base_q = queries[: min(args.queries, args.baseline_queries)]
    matmul_rate(base_q[: min(256, len(base_q))], bank[: min(65536, len(bank))], args.chunk, args.mm_block_mb)  # warm
    before, _ = matmul_rate(base_q, bank, args.chunk, args.mm_block_mb)
    t0 = time.perf_counter()
    scores = knn_classify(bank, labels, queries, args.classes, ks=(args.k,), temperature=0.1, chunk_size=args.chunk)
    knn_s = time.perf_counter() - t0
    after, _ = matmul_rate(base_q, bank, args.chunk, args.mm_block_mb)
    assert scores[args.k].shape == (args.queries, args.classes)
    flops = 2.0 * args.queries * args.bank * args.dim
    knn_rate, mm = flops / knn_s / 1e9, (before + after) / 2
    res = {
        "bank": args.bank,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "chunk": args.chunk,
        "threads": threads,
        "knn_s": round(knn_s, 2),
        "knn_gflops": round(knn_rate, 1),
        "matmul_gflops_before": round(before, 1),
        "matmul_gflops_after": round(after, 1),
        "efficiency": round(knn_rate / mm, 3),
        "queries_per_s": round(args.queries / knn_s, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(
        f"kNN: bank {args.bank} x {args.dim}, {args.queries} queries, k={args.k}, chunk {args.chunk}, "
        f"{threads} threads, load avg {res['loadavg_1min']}"
    )
    print(
        f"  knn_classify        {knn_s:9.2f} s   {knn_rate:8.1f} GFLOP/s (similarity matmul FLOPs)  "
        f"{res['queries_per_s']:.0f} queries/s"
    )
    print(f"  torch.mm reference  {before:8.1f} GFLOP/s before, {after:.1f} after")
    print(f"  efficiency          {100 * res['efficiency']:8.1f} %  (target >= 70%)   peak RSS {res['peak_rss_gb']} GB")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    main()
