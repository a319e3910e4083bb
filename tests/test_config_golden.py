"""Golden test: every named experiment and every method with its paper backbone composes to the values it had before
the configuration moved onto the typed schema (ssl_vision/config_schema.py) and the (method, backbone family)
recipes (conf/recipe/).

``tests/fixtures/config_golden.json`` was written by ``python -m tests.config_snapshot`` from the tree before that
change and is never rewritten to make this test pass. The deliberate differences are mapped here, in the test, one by
one (``expected``):

* ``augment.views`` is a mapping name -> view (``global``, ``local``, ``view1`` ...) instead of a list: the test
  compares the mapping's values, in order, with the old list;
* the EMA keys of BYOL and DINO are ``momentum`` / ``momentum_end`` like every EMA method (BYOL ``base_momentum``,
  DINO ``momentum_teacher`` before; both cosine to 1.0, now stated as ``momentum_end: 1.0``);
* ``method.optim`` is an ``OptimSpec``: a key a method file used to leave out (SimCLR's ``weight_decay_end``) now
  has the schema's default, which is what the code used for it before too;
* ``data.knn_train_subset``: the online kNN bank default of the data sets (null -> 10 000 labelled images) changed
  with the online evaluation, not with the configuration layout; compared where the old value was set;
* ``data.eval_root`` (null): a key every data config has since ``data=folder`` (unlabeled images) takes its labelled
  evaluation set from it.
* ``data.device_prefetch`` (true): the next train batch is copied to the GPU on a side stream (CUDA only).
* ``backbone.timm_kwargs`` ({}): further ``timm.create_model`` arguments (e.g. ``depth``), empty unless set.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from ssl_vision.config_schema import OptimSpec
from tests.config_snapshot import FIXTURE, cases, compose_cfg, snapshot

GOLDEN = json.loads(FIXTURE.read_text())
CASES = cases()

#: method -> (old kwarg name, new name, the end value the old code cosined to)
EMA_RENAMES = {"byol": ("base_momentum", "momentum", 1.0), "dino": ("momentum_teacher", "momentum", 1.0)}


def _optim(values: dict) -> OptimSpec:
    values = dict(values)
    values["betas"] = tuple(values.get("betas", OptimSpec.betas))
    return OptimSpec(**values)


def expected(old: dict, new: dict) -> dict:
    """The old snapshot with the documented mapping applied (module docstring)."""
    exp = copy.deepcopy(old)
    method = exp["method"]
    rename = EMA_RENAMES.get(method["name"])
    if rename is not None:
        before, after, end = rename
        if before in method["kwargs"] and before not in new["method"]["kwargs"]:
            method["kwargs"][after] = method["kwargs"].pop(before)
            method["kwargs"].setdefault(f"{after}_end", end)
    method["optim"] = dataclasses.asdict(_optim(method["optim"]))
    if old["data"].get("knn_train_subset") is None:
        exp["data"]["knn_train_subset"] = new["data"].get("knn_train_subset")
    if "eval_root" not in old["data"]:
        exp["data"]["eval_root"] = None
    if "device_prefetch" not in old["data"]:
        exp["data"]["device_prefetch"] = True
    if "timm_kwargs" not in old["backbone"]:
        exp["backbone"]["timm_kwargs"] = {}
    return exp


def actual(new: dict) -> dict:
    got = copy.deepcopy(new)
    views = got["augment"]["views"]
    assert isinstance(views, dict), "augment.views must be a mapping name -> view"
    got["augment"]["views"] = list(views.values())
    got["method"]["optim"] = dataclasses.asdict(_optim(got["method"]["optim"]))
    return got


def test_fixture_covers_every_experiment_and_method():
    assert set(GOLDEN) == set(CASES), (
        "a new experiment needs its golden values: python -m tests.config_snapshot "
        "on the tree before the change, then keep the fixture"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_composes_to_golden_values(case):
    new = snapshot(compose_cfg(CASES[case]))
    old = GOLDEN[case]
    exp, got = expected(old, new), actual(new)
    for part in ("method", "augment", "backbone", "data", "trainer", "eval"):
        assert got[part] == exp[part], f"{case}: {part} changed"
