"""Bad input gets an error that names what is wrong and what would be right.

* objective values that used to train "successfully" (SwAV with 0 prototypes at loss 0.0, a temperature of 1e-9
  at loss 4e8) are refused when the objective is built, naming ``method.kwargs.<key>`` and the accepted range;
* typed config fields (``seed=abc``, ``data.batch_size=0`` ...) are refused before anything is built (a value of
  the wrong type in a schema node, ``data.batch_size=abc``, already when composed: tests/test_data_schema.py);
* a MoCo queue that does not fit the global batch suggests two distinct valid sizes;
* a checkpoint whose weights do not fit its backbone config lists the mismatching tensors (at most 5), not pages;
* a broken export sidecar or a truncated safetensors file names the file;
* exported weights get the same file mode as their sidecar (the umask's), not safetensors' 0600.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from ssl_vision.backbones import create_backbone
from ssl_vision.config_checks import ConfigValueError
from ssl_vision.eval.checkpoints import load_backbone
from ssl_vision.eval.export import export_backbone
from ssl_vision.launch import run_pretraining
from ssl_vision.nn.memory import KeyQueue, valid_queue_sizes
from ssl_vision.objectives import build_objective
from tests.conftest import FAST
from tests.eval.test_features import TINY_BACKBONE_CFG, tiny_backbone, write_checkpoint

BASE = ["method=simclr", "backbone=resnet18", "backbone.width=0.125", *FAST, "eval.final_eval=false"]

#: small heads, so that the cases that are (rightly) accepted build in milliseconds
SMALL = {
    "simclr": dict(proj_hidden_dim=8, proj_out_dim=4),
    "swav": dict(proj_hidden_dim=8, proj_out_dim=4, num_prototypes=6, queue_length=0),
    "byol": dict(proj_hidden_dim=8, proj_out_dim=4, pred_hidden_dim=8),
    "simsiam": dict(proj_hidden_dim=8, proj_out_dim=4, pred_hidden_dim=8),
    "dino": dict(out_dim=8, hidden_dim=8, bottleneck_dim=4),
    "moco_v1": dict(embed_dim=4, queue_size=16),
    "moco_v2": dict(embed_dim=4, proj_hidden_dim=8, queue_size=16),
    "moco_v3": dict(proj_hidden_dim=8, proj_out_dim=4, pred_hidden_dim=8),
    "instdisc": dict(embed_dim=4),
    "mae": dict(decoder_dim=8, decoder_depth=1, decoder_heads=2),
}

INT_RANGE = r"must be an integer >= {}, got {}"
TEMP = r"must be a number >= 0\.001 \(logits are divided by it; {}\), got {}"
INTERVAL = r"must be a number in {}, got {}"

# (method, bad kwargs, expected message: the key, the accepted range, the value given, what the papers use)
CASES = [
    ("swav", {"num_prototypes": 0}, "method.kwargs.num_prototypes " + INT_RANGE.format(1, 0)),
    ("swav", {"num_prototypes": -3}, "method.kwargs.num_prototypes " + INT_RANGE.format(1, -3)),
    ("swav", {"num_prototypes": 2.5}, "method.kwargs.num_prototypes " + INT_RANGE.format(1, 2.5)),
    ("swav", {"temperature": 1e-9}, "method.kwargs.temperature " + TEMP.format("SwAV uses 0.1", "1e-09")),
    ("swav", {"sinkhorn_epsilon": 0.0}, "method.kwargs.sinkhorn_epsilon " + TEMP.format("SwAV uses 0.05.*", "0.0")),
    ("swav", {"sinkhorn_iterations": 0}, "method.kwargs.sinkhorn_iterations " + INT_RANGE.format(1, 0)),
    ("swav", {"queue_length": -256}, "method.kwargs.queue_length " + INT_RANGE.format(0, -256)),
    ("swav", {"crops_for_assign": [0, 0]}, r"method.kwargs.crops_for_assign must list distinct crop indices"),
    ("simclr", {"temperature": 1e-9}, "method.kwargs.temperature " + TEMP.format("SimCLR uses 0.1-0.5.*", "1e-09")),
    ("simclr", {"temperature": 0.0}, "method.kwargs.temperature " + TEMP.format("SimCLR uses 0.1-0.5.*", "0.0")),
    ("simclr", {"proj_out_dim": 0}, "method.kwargs.proj_out_dim " + INT_RANGE.format(1, 0)),
    ("instdisc", {"temperature": 1e-9}, "method.kwargs.temperature " + TEMP.format("InstDisc uses 0.07", "1e-09")),
    ("instdisc", {"nce_k": -1}, "method.kwargs.nce_k " + INT_RANGE.format(0, -1)),
    ("instdisc", {"bank_momentum": 1.0}, "method.kwargs.bank_momentum " + INTERVAL.format(r"\[0, 1\)", "1.0")),
    ("instdisc", {"embed_dim": 0}, "method.kwargs.embed_dim " + INT_RANGE.format(1, 0)),
    (
        "moco_v1",
        {"temperature": 1e-4},
        "method.kwargs.temperature " + TEMP.format(r"MoCo uses 0\.07 \(v1\).*", "0.0001"),
    ),
    ("moco_v1", {"queue_size": 0}, "method.kwargs.queue_size " + INT_RANGE.format(1, 0)),
    ("moco_v2", {"momentum": 1.5}, "method.kwargs.momentum " + INTERVAL.format(r"\[0, 1\]", "1.5")),
    ("moco_v2", {"shuffle_bn_splits": 0}, "method.kwargs.shuffle_bn_splits " + INT_RANGE.format(1, 0)),
    ("moco_v3", {"temperature": -1.0}, "method.kwargs.temperature " + TEMP.format("MoCo v3 uses 0.2.*", "-1.0")),
    ("moco_v3", {"pred_layers": 0}, "method.kwargs.pred_layers " + INT_RANGE.format(1, 0)),
    ("moco_v3", {"momentum_end": -0.1}, "method.kwargs.momentum_end " + INTERVAL.format(r"\[0, 1\]", "-0.1")),
    ("byol", {"momentum": 1.5}, "method.kwargs.momentum " + INTERVAL.format(r"\[0, 1\]", "1.5")),
    ("byol", {"proj_out_dim": 0}, "method.kwargs.proj_out_dim " + INT_RANGE.format(1, 0)),
    ("simsiam", {"pred_hidden_dim": -1}, "method.kwargs.pred_hidden_dim " + INT_RANGE.format(1, -1)),
    ("simsiam", {"proj_layers": True}, "method.kwargs.proj_layers " + INT_RANGE.format(1, True)),
    ("dino", {"student_temp": 1e-9}, "method.kwargs.student_temp " + TEMP.format("DINO's student uses 0.1", "1e-09")),
    (
        "dino",
        {"teacher_temp": 1e-6},
        "method.kwargs.teacher_temp " + TEMP.format("DINO's teacher uses 0.04-0.07", "1e-06"),
    ),
    ("dino", {"out_dim": 0}, "method.kwargs.out_dim " + INT_RANGE.format(1, 0)),
    ("dino", {"momentum": 2.0}, "method.kwargs.momentum " + INTERVAL.format(r"\[0, 1\]", "2.0")),
    ("mae", {"mask_ratio": 0.0}, "method.kwargs.mask_ratio " + INTERVAL.format(r"\(0, 1\)", "0.0")),
    ("mae", {"mask_ratio": 1.0}, "method.kwargs.mask_ratio " + INTERVAL.format(r"\(0, 1\)", "1.0")),
    ("mae", {"decoder_depth": 0}, "method.kwargs.decoder_depth " + INT_RANGE.format(1, 0)),
]


@pytest.mark.parametrize(
    "method,bad,message", CASES, ids=[f"{m}-{next(iter(b))}={next(iter(b.values()))}" for m, b, _ in CASES]
)
def test_objective_values_are_checked_when_built(method, bad, message):
    with pytest.raises(ValueError, match=message):
        build_objective(method, 16, num_samples=64, **{**SMALL[method], **bad})


@pytest.mark.parametrize(
    "method,edge",
    [
        ("simclr", {"temperature": 1e-3}),
        ("moco_v2", {"momentum": 1.0}),
        ("byol", {"momentum": 0.0}),
        ("mae", {"mask_ratio": 0.95}),
        ("swav", {"queue_length": 0}),
        ("instdisc", {"nce_k": 0}),
        ("dino", {"teacher_temp": 0.04, "student_temp": 0.1}),
    ],
)
def test_values_at_the_edges_of_the_ranges_are_accepted(method, edge):
    objective = build_objective(method, 16, num_samples=64, **{**SMALL[method], **edge})
    for key, value in edge.items():  # the value the objective keeps is the one given
        kept = {"queue_length": "queue_length", "nce_k": "num_noise"}.get(key, key)
        if hasattr(objective, kept):
            assert getattr(objective, kept) == value


def test_swav_without_prototypes_fails_before_training(make_cfg):
    """It used to train to a loss of exactly 0.0 and report success."""
    cfg = make_cfg(
        [
            *BASE,
            "method=swav",
            "augment=simclr",
            "method.kwargs.num_prototypes=0",
            "method.kwargs.queue_length=0",
            "method.kwargs.proj_hidden_dim=16",
            "trainer.max_steps=1",
        ]
    )
    with pytest.raises(ValueError, match=r"method\.kwargs\.num_prototypes must be an integer >= 1, got 0"):
        run_pretraining(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=0", r"data\.batch_size must be a positive integer .*, got 0 \(int\)"),
        ("data.num_workers=-1", r"data\.num_workers must be an integer >= 0 .*, got -1"),
        ("seed=abc", r"seed must be an integer in \[0, 2\*\*32 - 1\], got 'abc' \(str\)"),
        ("seed=1.5", r"seed must be an integer .*, got 1\.5 \(float\)"),
        ("trainer.max_steps=abc", r"trainer\.max_steps must be an integer >= 1 \(or -1: no step limit\), got 'abc'"),
        ("trainer.max_epochs=2.5", r"trainer\.max_epochs must be an integer >= 1 .*, got 2\.5 \(float\)"),
        ("checkpoint.every_n_epochs=abc", r"checkpoint\.every_n_epochs must be an integer >= 0 .*, got 'abc'"),
        ("checkpoint.every_n_steps=ten", r"checkpoint\.every_n_steps must be a positive number .*, got 'ten'"),
        ("checkpoint.save_top_k=all", r"checkpoint\.save_top_k must be an integer >= -1 .*, got 'all'"),
        ("checkpoint.save_init=maybe", r"checkpoint\.save_init must be true or false, got 'maybe'"),
        ("eval.knn_k=[0]", r"eval\.knn_k must be a list of positive integers.*, got \[0\]"),
        ("augment.views.global.count=0", r"augment\.views\.global\.count must be a positive integer .*, got 0 \(int\)"),
    ],
)
def test_typed_config_fields_are_named(make_cfg, override, message):
    with pytest.raises(ConfigValueError, match=message):
        run_pretraining(make_cfg([*BASE, override]))


def _nearest_multiples(size: int, batch: int) -> tuple[int, int]:
    """Reference: every multiple of ``batch`` from 1x to well past ``size``, the two nearest to ``size`` with one
    at or below it when there is one (ties toward the lower)."""
    multiples = [batch * i for i in range(1, size // batch + 3)]
    below = [m for m in multiples if m <= size]
    if not below:
        return multiples[0], multiples[1]
    return below[-1], below[-1] + batch


@pytest.mark.parametrize("size,batch", [(8, 16), (100, 16), (65536, 3000), (15, 16), (17, 16), (1, 7), (40, 16)])
def test_queue_size_suggestions_are_distinct_valid_sizes(size, batch):
    a, b = valid_queue_sizes(size, batch)
    assert (a, b) == _nearest_multiples(size, batch)
    assert a != b and a % batch == 0 and b % batch == 0 and max(a, b) >= batch and min(a, b) >= batch


def test_moco_queue_smaller_than_the_batch_suggests_real_sizes():
    queue = KeyQueue(4, 8)
    with pytest.raises(ValueError, match=r"K=8 is not a multiple of the global batch B=16.*\(e\.g\. 16 or 32\)"):
        queue.enqueue(torch.randn(16, 4))


def test_shape_mismatch_lists_at_most_five_tensors_with_the_config(tmp_path):
    model, _ = tiny_backbone()  # width 0.125
    claimed = {**TINY_BACKBONE_CFG, "width": 0.25}  # ... but the run_info says 0.25
    ckpt = write_checkpoint(tmp_path / "last.ckpt", model, backbone_cfg=claimed)
    built, _ = create_backbone("resnet18", in_chans=3, image_size=16, width=0.25)
    stored, own = model.state_dict(), built.state_dict()
    differ = [k for k in stored if tuple(stored[k].shape) != tuple(own[k].shape)]
    assert len(differ) > 5  # the point of the limit
    with pytest.raises(ValueError) as err:
        load_backbone(ckpt)
    text = str(err.value)
    lines = [ln for ln in text.splitlines() if ln.startswith("  ") and ": stored (" in ln]
    assert len(lines) == 5 and f"  ... and {len(differ) - 5} more" in text
    for ln, key in zip(lines, differ[:5]):
        assert ln == f"  {key}: stored {tuple(stored[key].shape)}, built {tuple(own[key].shape)}"
    assert f"{len(differ)} of {len(stored)} stored tensors" in text and "width=0.25" in text
    assert "size mismatch" not in text and len(text.splitlines()) <= 8


def test_broken_export_files_name_the_file(tmp_path):
    ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    meta = export_backbone(ckpt)
    weights, sidecar = meta["weights_path"], meta["json_path"]
    good_json = open(sidecar).read()

    with open(sidecar, "w") as f:
        f.write(good_json[: len(good_json) // 2])  # cut mid-way
    with pytest.raises(
        ValueError,
        match=re.escape(sidecar) + r": the export's sidecar is not valid JSON .*re-run "
        r"tools/export\.py",
    ):
        load_backbone(weights)
    with open(sidecar, "w") as f:
        json.dump({**json.loads(good_json), "create_kwargs": None}, f)
    with pytest.raises(ValueError, match=re.escape(sidecar) + r": no 'create_kwargs'"):
        load_backbone(weights)

    with open(sidecar, "w") as f:
        f.write(good_json)
    blob = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(blob[: len(blob) // 2])  # a copy that stopped half-way
    with pytest.raises(ValueError, match=re.escape(weights) + r": cannot read the safetensors weights .*truncated"):
        load_backbone(weights)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_exported_weights_follow_the_umask_like_the_sidecar(tmp_path, umask):
    ckpt = write_checkpoint(tmp_path / "last.ckpt", tiny_backbone()[0])
    old = os.umask(umask)
    try:
        meta = export_backbone(ckpt)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask  # what open() gives a new file
    assert oct(os.stat(meta["weights_path"]).st_mode & 0o777) == oct(expected)
    assert oct(os.stat(meta["json_path"]).st_mode & 0o777) == oct(expected)


def test_another_methods_recipe_names_the_keys_and_the_recipe_to_use(make_cfg):
    """``method=byol experiment=fmnist_simclr``: the SimCLR recipe's kwargs (temperature, proj_layers) reach BYOL.
    The error names them, BYOL's valid keys and the recipe of BYOL's own, instead of a TypeError."""
    from ssl_vision.launch import build_module

    cfg = make_cfg(["method=byol", "experiment=fmnist_simclr"])
    assert cfg.method.name == "byol" and "temperature" in cfg.method.kwargs
    with pytest.raises(ValueError) as err:
        build_module(cfg)
    msg = str(err.value)
    assert "unknown method.kwargs for byol: proj_layers, temperature" in msg
    assert "valid: momentum, momentum_end, pred_hidden_dim" in msg and "experiment=fmnist_byol" in msg
