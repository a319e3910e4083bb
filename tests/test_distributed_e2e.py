"""Two processes (``trainer=ddp_cpu``: Lightning DDP over gloo) == one process, end to end, for every method.

For each method a few optimizer steps run through the real stack -- Hydra config, data module and sampler, SSLModule,
objective, optimizer and schedule, Lightning's DDP -- once on 2 processes with per-process batch B/2, once on 1
process with batch B, same seed and data. What is compared, and why it is a valid check:

* **the loss of every step** (the mean over processes of each process's loss; each is a mean over equally many
  samples, so this is the global mean the 1-process run computes) and **every trained weight** after the last step
  (backbone and objective; not the online probe, which is off the loss path, and not BatchNorm running statistics,
  which are per process under DDP and unused by training-mode forwards). A wrong gather, a missing all-reduce, a
  per-process queue or centre, a wrong data split or a learning rate from the per-process batch shows up here.
* **what must legitimately differ is made equal in the 1-process run, not in the code under test:**
  - *BatchNorm statistics are per process* (torch has no CPU SyncBN). The backbone is a ViT (LayerNorm only), and
    the BatchNorm layers of the heads (SimCLR, BYOL, SimSiam, SwAV, MoCo v3 projectors and predictors) run, in the
    1-process reference only, as "per-rank BN": their input, a stack of per-view global batches whose rows are in
    rank order (the sampler gives rank r rows [r·B/2, (r+1)·B/2) of every global batch), is cut into blocks of B/2
    rows and block j is normalised together with the other blocks of rank j mod 2 -- exactly the rows process
    j mod 2 normalises together under DDP. (MoCo v1/v2 shuffle-BN needs no mimic: with a ViT and BN-free v1/v2 heads
    the key path has no BN; its permutation is global and seeded by the step on any process count.)
  - *MAE masks are drawn per rank* (docs/reference.md §9): the reference draws rank r's rows of the masking noise
  with the
    same function, rank set to r.
  Every other source of randomness (data order, augmentation, MoCo shuffles, InstDisc noise, initialisation) is
  keyed by seed, epoch, step or index, never by process, so nothing else is mimicked.
* **the learning rate** is scaled by the true global batch devices × nodes × per-device batch × accumulation:
  checked on the 2-process runs, with and without gradient accumulation, against the formula.

The 2-process runs of all methods share one Lightning launch (this file is also the script it runs: see
``__main__``), which keeps the whole test near two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from ssl_vision import distributed as dist  # noqa: E402

pytestmark = pytest.mark.distributed

B, WORLD, STEPS = 16, 2, 3
METHODS = ["simclr", "instdisc", "moco_v1", "moco_v2", "moco_v3", "byol", "simsiam", "swav", "dino", "mae"]
HEADS = {  # small heads; the structure (BN or not, layers) is the method's own
    "simclr": ["method.kwargs.proj_hidden_dim=64", "method.kwargs.proj_out_dim=32"],
    "instdisc": ["method.kwargs.embed_dim=32", "method.kwargs.nce_k=16"],
    "moco_v1": ["method.kwargs.queue_size=64", "method.kwargs.embed_dim=32"],
    "moco_v2": ["method.kwargs.queue_size=64", "method.kwargs.embed_dim=32", "method.kwargs.proj_hidden_dim=64"],
    # SGD-type steps (LARS) instead of the ViT recipe's AdamW: through the projector's BatchNorm the ViT's final-norm
    # bias (and every key bias, through the softmax) has an analytically zero gradient, and Adam turns the
    # rounding noise of such a gradient into a full lr-sized step whose sign differs between 1 and 2 processes
    "moco_v3": [
        "method.kwargs.proj_hidden_dim=64",
        "method.kwargs.proj_out_dim=32",
        "method.kwargs.pred_hidden_dim=64",
        "method.optim.name=lars",
    ],
    "byol": ["method.kwargs.proj_hidden_dim=64", "method.kwargs.proj_out_dim=32", "method.kwargs.pred_hidden_dim=64"],
    "simsiam": [
        "method.kwargs.proj_hidden_dim=64",
        "method.kwargs.proj_out_dim=64",
        "method.kwargs.pred_hidden_dim=16",
    ],
    "swav": [
        "method.kwargs.num_prototypes=16",
        "method.kwargs.proj_hidden_dim=64",
        "method.kwargs.proj_out_dim=32",
        "method.kwargs.queue_length=0",
        "method.kwargs.freeze_prototypes_niters=1",
    ],
    "dino": ["method.kwargs.out_dim=128", "method.kwargs.hidden_dim=64", "method.kwargs.bottleneck_dim=32"],
    "mae": ["method.kwargs.decoder_dim=32", "method.kwargs.decoder_depth=1", "method.kwargs.decoder_heads=2"],
}
COMMON = [
    "backbone=vit_tiny",
    "backbone.name=test_vit",
    "backbone.patch_size=8",  # timm's 6-block, 64-d test ViT
    "data=synthetic",
    f"data.synthetic_size={B * STEPS}",
    "data.num_workers=0",
    "data.eval_batch_size=64",
    f"trainer.max_steps={STEPS}",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "eval.final_eval=false",
    "eval.knn_k=[5]",
    "logger=none",
    "method.optim.warmup_epochs=0",
]  # no warmup: every step moves the weights at the full rate
ACCUM = "simclr_accum2"  # an extra 2-process job: 1 step of 2 accumulated micro-batches


def overrides(job: str, world: int) -> list[str]:
    method = "simclr" if job == ACCUM else job
    extra = ["trainer.accumulate_grad_batches=2", "trainer.max_steps=1"] if job == ACCUM else []
    return [
        f"method={method}",
        *COMMON,
        *HEADS[method],
        f"data.batch_size={B // world}",
        f"trainer={'ddp_cpu' if world > 1 else 'cpu'}",
        *extra,
    ]


class LossRecorder(L.Callback):
    """Global mean loss of every batch and the learning rate the optimizer started from -> ``path`` (rank 0)."""

    def __init__(self, path: Path):
        self.path, self.losses, self.initial_lr = Path(path), [], None

    def on_train_start(self, trainer, pl_module):
        self.initial_lr = float(trainer.optimizers[0].param_groups[0]["initial_lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(dist.all_reduce_mean(pl_module.last_train_loss.detach().float())))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.write_text(
                json.dumps({"losses": self.losses, "initial_lr": self.initial_lr, "world_size": trainer.world_size})
            )


def compose_cfg(job: str, world: int, out: Path, cwd: Path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "pretrain",
            overrides=[f"paths.output_root={out / 'outputs'}", *overrides(job, world)],
            return_hydra_config=True,
        )
    GlobalHydra.instance().clear()
    run_dir = out / f"{job}-w{world}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(cwd)  # Lightning starts the other process from here
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_job(job: str, world: int, out: Path, cwd: Path) -> dict:
    from ssl_vision.launch import run_pretraining

    recorder = LossRecorder(out / f"{job}-w{world}.json")
    res = run_pretraining(compose_cfg(job, world, out, cwd), extra_callbacks=[recorder])
    return {"checkpoint": res["checkpoint"], "steps": res["steps"]}


# ------------------------------------------------------------------------------------------------ 1-process mimics
@contextmanager
def per_rank_batchnorm(world: int, n: int):
    """Training-mode BatchNorm normalises the rows each DDP process would hold together (see the module doc)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    original = _BatchNorm.forward

    def forward(self, x):
        rows = x.shape[0]
        if not self.training or rows % (n * world):
            return original(self, x)
        blocks = list(x.split(n))
        out = [None] * len(blocks)
        for r in range(world):
            mine = list(range(r, len(blocks), world))
            y = original(self, torch.cat([blocks[i] for i in mine])).split(n)
            for k, i in enumerate(mine):
                out[i] = y[k]
        return torch.cat(out)

    with mock.patch.object(_BatchNorm, "forward", forward):
        yield


@contextmanager
def per_rank_mae_masks(world: int, n: int):
    """MAE's masking noise for a global batch = rank r's draw for rows [r·n, (r+1)·n), from MAE's own function."""
    from ssl_vision.objectives import mae as mae_module

    original = mae_module.MAE.masking_noise

    def masking_noise(self, imgs, step):
        if imgs.shape[0] != world * n:
            return original(self, imgs, step)
        before, parts = self._micro, []
        for r in range(world):
            self._micro = before
            with mock.patch.object(mae_module.dist, "rank", lambda r=r: r):
                parts.append(original(self, imgs[r * n : (r + 1) * n], step))
        return torch.cat(parts)

    with mock.patch.object(mae_module.MAE, "masking_noise", masking_noise):
        yield


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Start the one Lightning DDP launch that runs every job on 2 processes; tests wait for it when they need it."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "SSLV_E2E_OUT": str(out), "SSLV_E2E_JOBS": ",".join([*METHODS, ACCUM])}
    log = open(out / "ddp.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())], cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT
    )

    def wait() -> Path:
        if proc.poll() is None:
            proc.wait(timeout=600)
        log.flush()
        assert proc.returncode == 0, (out / "ddp.log").read_text()[-4000:]
        return out

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def _trained_state(path: str) -> dict[str, torch.Tensor]:
    from ssl_vision.checkpoint_io import load_checkpoint

    return {
        k: v
        for k, v in load_checkpoint(Path(path))["state_dict"].items()
        if not k.startswith("online_probe.") and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_match_one_process(method, two_process_runs, tmp_path):
    n = B // WORLD
    with per_rank_batchnorm(WORLD, n), per_rank_mae_masks(WORLD, n):
        ref = run_job(method, 1, tmp_path, tmp_path)
    assert ref["steps"] == STEPS
    out = two_process_runs()
    one = json.loads((tmp_path / f"{method}-w1.json").read_text())
    two = json.loads((out / f"{method}-w2.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1 and len(one["losses"]) == len(two["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-4, atol=1e-5)
    assert len(set(one["losses"])) == STEPS, "the loss must change from step to step (the weights are trained)"
    # the same learning rate: scaled by the global batch B, not by the per-process B/2
    assert two["initial_lr"] == pytest.approx(one["initial_lr"], rel=1e-12)
    ckpt2 = json.loads((out / f"{method}-w2.result.json").read_text())["checkpoint"]
    a, b = _trained_state(ref["checkpoint"]), _trained_state(ckpt2)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_lr_uses_the_true_global_batch_under_ddp(two_process_runs):
    """lr = base × devices × nodes × per-device batch × accumulation / 256 (lr_scaling=linear), on 2 processes."""
    from omegaconf import OmegaConf

    out = two_process_runs()
    base = OmegaConf.load(ROOT / "conf/method/simclr.yaml").optim.base_lr
    plain = json.loads((out / "simclr-w2.json").read_text())
    accum = json.loads((out / f"{ACCUM}-w2.json").read_text())
    assert plain["initial_lr"] == pytest.approx(base * (2 * (B // 2)) / 256, rel=1e-12)
    assert accum["initial_lr"] == pytest.approx(base * (2 * (B // 2) * 2) / 256, rel=1e-12)


if __name__ == "__main__":  # the 2-process side: every job in one Lightning DDP launch (the other rank re-runs this)
    target = Path(os.environ["SSLV_E2E_OUT"])
    for job in os.environ["SSLV_E2E_JOBS"].split(","):
        result = run_job(job, WORLD, target, target)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            (target / f"{job}-w{WORLD}.result.json").write_text(json.dumps(result))
