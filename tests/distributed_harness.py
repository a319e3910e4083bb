"""Run a function on W CPU processes (gloo) and collect what each returns — for 1-vs-2-process tests."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn, args, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_on_processes(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns the list of per-rank results (torch-saveable)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(
            _worker, args=(world, _free_port(), fn, args, d), nprocs=world, join=True, start_method="spawn"
        )
        return [torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def average_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What DDP does: average every gradient over ranks; returns them by name."""
    grads = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad.detach().clone()
            dist.all_reduce(g)
            grads[name] = g / dist.get_world_size()
    return grads
