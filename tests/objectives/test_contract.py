"""The contract every registered objective keeps, checked for each name in ``OBJECTIVES`` (what ``build_objective``
and ``method=<name>`` use): adding an objective adds it to every test below, with no test file to edit.

What an objective must provide to be covered (all on its class, see ``ssl_vision/objectives/base.py``):

* ``@register("<name>")`` and ``conf/method/<name>.yaml`` (its ``kwargs`` are the starting point here);
* ``tiny_kwargs()`` (classmethod): the ``method.kwargs`` overrides that make it CPU-test sized while every stateful
  path is still used within a few steps of batch 8-16 (queues filled and read, freezes and warm-ups crossing an
  epoch); the default ``{}`` keeps the config's values;
* ``supported_families``: the backbone families it trains (``"resnet"``, ``"vit"``); any other family must be
  refused with a ``ValueError`` when the run is built;
* ``num_views``: how many leading views it takes (``None``: any number; it is then run with 2 views and with
  2 global + 2 local crops);
* ``world_size_invariant``: False only when it draws random numbers per process (then its own test file checks
  the W-process case with the randomness fixed);
* ``per_process_row_buffers``: buffers holding one block of rows per process (SwAV's queue), compared with 1
  process up to their row order;
* the protocol ``bind`` / ``forward`` / ``before_optimizer_step`` / ``after_optimizer_step``, with every piece of
  training state (queues, banks, centres, EMA copies, step counters) in its ``state_dict``; an objective that needs
  the training-set size takes ``num_samples`` and reads ``StepInfo.indices``.

The contract, per registered name:

1. one optimizer step through the real pipeline (``tools/pretrain.py``'s ``run_pretraining``, the method's config
   and augmentation preset) on a tiny ResNet and a tiny ViT: a finite loss, a kNN accuracy; an unsupported family
   is refused with an error naming the objective;
2. the global batch split over 2 processes (gloo) gives the loss, the DDP-averaged gradients and, after 3 steps
   (queues filled and read), every parameter and buffer of 1 process, identical on both processes;
3. N steps straight == N/2 steps, state saved to a file, fresh objects (other seed) loaded, N/2 steps: every
   parameter and buffer, the optimizer state and the losses of the second half; buffers left out of the
   ``state_dict`` are only those ``bind`` recomputes;
4. a NaN image stops training with the non-finite-loss guard's ``FloatingPointError``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from ssl_vision.objectives import OBJECTIVES, StepInfo, build_objective
from tests.conftest import FAST
from tests.distributed_harness import run_on_processes

# End-to-end helpers (ssl_vision.launch, ssl_vision.module, Lightning) are imported inside the tests that use them,
# so the gloo worker processes, which import this module, do not pay for their start-up.

CONF = Path(__file__).resolve().parents[2] / "conf"
NAMES = sorted(OBJECTIVES)
FAMILIES = ("resnet", "vit")
IMAGE, LOCAL = 16, 8  # global and local crop sizes of the objective-level tests
BATCH = 8  # global batch of the objective-level tests
NUM_SAMPLES = 32  # training-set size for objectives with one state row per image (InstDisc's bank)
STEPS_PER_EPOCH = 2


# ------------------------------------------------------------------------------------------ building blocks
def method_kwargs(name: str) -> dict:
    """``conf/method/<name>.yaml: kwargs`` (``${seed}`` = 0) with the objective's ``tiny_kwargs()`` on top."""
    cfg = OmegaConf.create({"seed": 0, "method": OmegaConf.load(CONF / "method" / f"{name}.yaml")})
    kwargs = OmegaConf.to_container(cfg.method.get("kwargs") or {}, resolve=True)
    return {**kwargs, **OBJECTIVES[name].tiny_kwargs()}


def make_backbone(family: str) -> tuple[nn.Module, int]:
    """The factory's backbones at CPU-test size: a ResNet-18 at 1/8 width, a 2-block ViT-Tiny with 8-px patches."""
    from ssl_vision.backbones import create_backbone

    if family == "resnet":
        return create_backbone("resnet18", image_size=IMAGE, width=0.125)
    return create_backbone("vit_tiny", image_size=IMAGE, patch_size=8, timm_kwargs={"depth": 2})


def build(name: str, family: str, kwargs: dict, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Backbone and bound objective, as ``SSLModule`` makes them; ``seed`` decides every random initial value."""
    torch.manual_seed(seed)
    backbone, dim = make_backbone(family)
    obj = build_objective(name, dim, num_samples=NUM_SAMPLES, **kwargs)
    obj.bind(backbone)
    backbone.feature_dim = dim
    return backbone, obj


def layouts(name: str) -> list[str]:
    """View layouts to run: ``num_views`` equal crops, or for ``num_views=None`` 2 crops and 2 global + 2 local."""
    return ["2crops", "multicrop"] if OBJECTIVES[name].num_views is None else [f"{OBJECTIVES[name].num_views}crops"]


def make_batches(layout: str, steps: int, seed: int = 1) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """``steps`` global batches of (views, dataset indices): global crops first, then the smaller local ones."""
    g = torch.Generator().manual_seed(seed)
    n_global, n_local = (2, 2) if layout == "multicrop" else (int(layout[0]), 0)
    out = []
    for _ in range(steps):
        views = [torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g) for _ in range(n_global)]
        views += [torch.randn(BATCH, 3, LOCAL, LOCAL, generator=g) for _ in range(n_local)]
        out.append((views, torch.randperm(NUM_SAMPLES, generator=g)[:BATCH]))
    return out


def step_info(k: int, total: int, indices: torch.Tensor | None) -> StepInfo:
    return StepInfo(
        global_step=k,
        total_steps=total,
        epoch=k // STEPS_PER_EPOCH,
        max_epochs=total // STEPS_PER_EPOCH,
        steps_per_epoch=STEPS_PER_EPOCH,
        indices=indices,
    )


def trainable(backbone: nn.Module, obj: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(f"backbone.{n}", p) for n, p in backbone.named_parameters() if p.requires_grad] + [
        (f"objective.{n}", p) for n, p in obj.named_parameters() if p.requires_grad
    ]


def train_step(backbone, obj, opt, batch, k: int, total: int, part: slice = slice(None), reduce_grads=None):
    """One optimizer step in ``SSLModule``'s hook order (docs/reference.md §12): forward on this process's part of
    the batch, backward, (DDP's gradient average), ``before_optimizer_step``, the step, ``after_optimizer_step``
    with the count of steps taken. Returns the loss."""
    views, indices = batch
    views = [v[part] for v in views]
    info = step_info(k, total, indices[part])
    opt.zero_grad(set_to_none=True)
    out = obj(views, backbone, info)
    out.loss.backward()
    if reduce_grads is not None:
        reduce_grads()
    obj.before_optimizer_step(info)
    opt.step()
    obj.after_optimizer_step(backbone, replace(info, global_step=k + 1))
    return out.loss.detach()


def full_state(backbone: nn.Module, obj: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of backbone and objective, as checkpoints hold them, copied."""
    return {
        **{f"backbone.{k}": v.detach().clone() for k, v in backbone.state_dict().items()},
        **{f"objective.{k}": v.detach().clone() for k, v in obj.state_dict().items()},
    }


def assert_states_equal(got: dict, want: dict, rtol: float, atol: float, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(got.keys() ^ want.keys())}"
    for k, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[k], value, rtol=rtol, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")
        else:
            assert torch.equal(got[k], value), f"{what} {k}: {got[k]} != {value}"


# ------------------------------------------------------------------------------------------ 1. one step, each family
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_one_step_smoke(make_cfg, name, family):
    from ssl_vision.launch import run_pretraining

    backbone = (
        ["backbone=resnet18", "backbone.width=0.125"]
        if family == "resnet"
        else ["backbone=vit_tiny", "backbone.patch_size=8"]
    )
    tiny = [f"method.kwargs.{k}={v}" for k, v in OBJECTIVES[name].tiny_kwargs().items()]
    cfg = make_cfg([f"method={name}", *backbone, *FAST, *tiny, "trainer.max_steps=1"])
    if family not in OBJECTIVES[name].supported_families:
        with pytest.raises(ValueError, match=OBJECTIVES[name].__name__):
            run_pretraining(cfg)
        return
    res = run_pretraining(cfg)
    assert res["steps"] == 1 and res["images_seen"] == 16
    assert res["train_loss"] is not None and math.isfinite(res["train_loss"])
    assert 0.0 <= res["knn_top1"] <= 100.0


# ------------------------------------------------------------------------------------------ 2. 1 process == 2 processes
TWO_PROC_STEPS = 3
TWO_PROC_CASES = [(n, lay) for n in NAMES if OBJECTIVES[n].world_size_invariant for lay in layouts(n)]


def _two_proc_run(name: str, layout: str, kwargs: dict, rank: int, world: int) -> dict:
    """``TWO_PROC_STEPS`` SGD steps of one objective on this process's part of the global batches, with BatchNorm
    on running statistics (per-process BN vs SyncBN is torch's business; CPUs have no SyncBN): what is left to
    differ is the objective's own communication. Gradients are averaged over processes as DDP does."""
    family = OBJECTIVES[name].supported_families[0]
    backbone, obj = build(name, family, kwargs)
    backbone.eval()
    obj.eval()
    params = trainable(backbone, obj)
    opt = torch.optim.SGD([p for _, p in params], lr=0.1)
    n = BATCH // world
    part = slice(rank * n, (rank + 1) * n)
    first_grads = {}

    def reduce_grads():
        for _, p in params:
            if p.grad is not None and world > 1:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        if not first_grads:
            first_grads.update({k: p.grad.clone() for k, p in params if p.grad is not None})

    losses = []
    for k, (views, idx) in enumerate(make_batches(layout, TWO_PROC_STEPS)):
        loss = train_step(backbone, obj, opt, (views, idx), k, TWO_PROC_STEPS, part, reduce_grads)
        if world > 1:
            torch.distributed.all_reduce(loss)  # the global mean loss: mean of per-process means (equal parts)
        losses.append(loss / world)
    return {"losses": torch.stack(losses), "grads": first_grads, "state": full_state(backbone, obj)}


def _two_proc_worker(rank: int, world: int, cases: list) -> dict:
    """Every case in one spawn (starting gloo workers is the slow part); a failing case reports its error."""
    import traceback

    out = {}
    for name, layout, kwargs in cases:
        try:
            out[(name, layout)] = _two_proc_run(name, layout, kwargs, rank, world)
        except Exception:  # noqa: BLE001  (reported per case by the test)
            out[(name, layout)] = traceback.format_exc()
    return out


def rows_sorted(name: str, state: dict) -> dict:
    """``per_process_row_buffers`` with their rows (dim -2) in one canonical order: with W processes they hold W
    blocks of each process's own rows, so only their content can equal the 1-process buffer's."""
    state = dict(state)
    for buf in OBJECTIVES[name].per_process_row_buffers:
        t = state[f"objective.{buf}"]
        state[f"objective.{buf}"] = t.gather(-2, t[..., :1].argsort(dim=-2).expand_as(t))
    return state


@pytest.fixture(scope="module")
def two_process_results():
    return run_on_processes(_two_proc_worker, 2, [(n, lay, method_kwargs(n)) for n, lay in TWO_PROC_CASES])


@pytest.mark.parametrize("name,layout", TWO_PROC_CASES, ids=[f"{n}-{lay}" for n, lay in TWO_PROC_CASES])
def test_two_processes_equal_one_process(two_process_results, name, layout):
    ref = _two_proc_run(name, layout, method_kwargs(name), rank=0, world=1)
    ranks = [r[(name, layout)] for r in two_process_results]
    for rank, got in enumerate(ranks):
        assert not isinstance(got, str), f"rank {rank} failed:\n{got}"
        # float32 summation order differs between 1 and 2 processes; a real mismatch (a local instead of a global
        # normalisation, a wrong rank offset) is of the order of the values themselves
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert_states_equal(
            rows_sorted(name, got["state"]),
            rows_sorted(name, ref["state"]),
            1e-4,
            1e-6,
            f"after {TWO_PROC_STEPS} steps",
        )
    assert_states_equal(ranks[1]["state"], ranks[0]["state"], 0, 0, "rank 1 vs rank 0")  # bit for bit
    assert any(g.abs().sum() > 0 for g in ref["grads"].values())


# ------------------------------------------------------------------------------------------ 3. resume and state
RESUME_STEPS = 4  # two epochs of 2 steps: the interruption is at the epoch boundary
RESUME_CASES = [(n, f, layouts(n)[-1]) for n in NAMES for f in OBJECTIVES[n].supported_families[:1]]


def _sgd(backbone, obj):
    return torch.optim.SGD([p for _, p in trainable(backbone, obj)], lr=0.05, momentum=0.9)


@pytest.mark.parametrize("name,family,layout", RESUME_CASES, ids=[n for n, _, _ in RESUME_CASES])
def test_resume_equals_uninterrupted(tmp_path, name, family, layout):
    """Train mode (BN statistics are state too), SGD with momentum (its buffers are state too)."""
    kwargs, batches, half = method_kwargs(name), make_batches(layout, RESUME_STEPS), RESUME_STEPS // 2
    backbone, obj = build(name, family, kwargs)
    opt = _sgd(backbone, obj)
    straight = [train_step(backbone, obj, opt, batches[k], k, RESUME_STEPS) for k in range(RESUME_STEPS)]
    want = full_state(backbone, obj)

    backbone, obj = build(name, family, kwargs)
    opt = _sgd(backbone, obj)
    for k in range(half):
        train_step(backbone, obj, opt, batches[k], k, RESUME_STEPS)
    at_half = full_state(backbone, obj)
    torch.save(
        {"backbone": backbone.state_dict(), "objective": obj.state_dict(), "optimizer": opt.state_dict()},
        tmp_path / "state.pt",
    )

    backbone, obj = build(name, family, kwargs, seed=1)  # other initial values: the load must restore them
    opt = _sgd(backbone, obj)
    assert any(not torch.equal(v, at_half[k]) for k, v in full_state(backbone, obj).items())
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    backbone.load_state_dict(saved["backbone"])
    obj.load_state_dict(saved["objective"])
    opt.load_state_dict(saved["optimizer"])
    resumed = [train_step(backbone, obj, opt, batches[k], k, RESUME_STEPS) for k in range(half, RESUME_STEPS)]

    torch.testing.assert_close(torch.stack(resumed), torch.stack(straight[half:]), rtol=1e-6, atol=1e-7)
    assert_states_equal(full_state(backbone, obj), want, 1e-6, 1e-7, "resumed vs uninterrupted")
    assert any(not torch.equal(want[k], at_half[k]) for k in want if k.startswith("objective."))  # it trained on


@pytest.mark.parametrize("name", NAMES)
def test_buffers_outside_the_state_dict_are_recomputed_by_bind(name):
    """A buffer the checkpoint does not hold must be one ``bind`` rebuilds: equal in an untrained objective."""
    family = OBJECTIVES[name].supported_families[0]
    kwargs = method_kwargs(name)
    backbone, obj = build(name, family, kwargs)
    opt = _sgd(backbone, obj)
    for k, batch in enumerate(make_batches(layouts(name)[-1], 2)):
        train_step(backbone, obj, opt, batch, k, 2)
    saved = obj.state_dict()
    params = {n for n, _ in obj.named_parameters()}
    assert params <= saved.keys(), f"parameters missing from the state_dict: {sorted(params - saved.keys())}"
    _, fresh = build(name, family, kwargs, seed=1)
    fresh_buffers = dict(fresh.named_buffers())
    for n, buf in obj.named_buffers():
        if n not in saved:
            torch.testing.assert_close(buf, fresh_buffers[n], msg=lambda m, n=n: f"non-persistent buffer {n}: {m}")


# ------------------------------------------------------------------------------------------ 4. non-finite loss guard
@pytest.mark.parametrize("name", NAMES)
def test_nan_input_stops_training_with_the_guard(name):
    """One NaN pixel in one image: the objective's loss is not finite, and ``SSLModule`` stops the run at that
    step with the guard's error instead of training on (a loss that hid the NaN would train on garbage)."""
    import lightning as L

    from ssl_vision.module import OptimSpec, SSLModule

    family = OBJECTIVES[name].supported_families[0]
    backbone, obj = build(name, family, method_kwargs(name))
    module = SSLModule(backbone, backbone.feature_dim, obj, num_classes=2, optim=OptimSpec())
    views, indices = make_batches(layouts(name)[-1], 1)[0]
    views[0][0, 0, 0, 0] = float("nan")
    batch = (views, torch.zeros(BATCH, dtype=torch.long), indices)

    class OneBatch(L.LightningDataModule):
        batch_size = BATCH

        def train_dataloader(self):
            return DataLoader([batch], batch_size=None)

    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with pytest.raises(FloatingPointError, match="non-finite loss nan at global step 0"):
        trainer.fit(module, datamodule=OneBatch())
