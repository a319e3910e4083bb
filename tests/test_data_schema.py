"""The data config's typed schema (``DataSpec``, ``schema/data``) and the data set files that merge onto it.

``DataSpec`` is the keyword arguments of ``SSLDataModule`` (besides ``views`` and ``seed``) with their defaults;
``conf/data/*.yaml`` start from ``/schema/data@_here_`` and state only what differs from it. These tests keep the two
in step, keep the files minimal, and check that every data set composes to the values it had when each file still
spelt out every key (``tests/fixtures/data_configs.json``, written from ``tools/pretrain.py --cfg job data=<name>``
before the schema; never rewritten to make a test pass).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ssl_vision.config_schema import DataSpec
from ssl_vision.data.datamodule import SSLDataModule
from tests.config_snapshot import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = sorted((ROOT / "conf" / "data").glob("*.yaml"))
BEFORE = json.loads((Path(__file__).resolve().parent / "fixtures" / "data_configs.json").read_text())
#: arguments of SSLDataModule that come from other config nodes: augment.views and the top-level seed
NOT_DATA = {"self", "views", "seed"}
SCHEMA_HEAD = ["/schema/data@_here_", "_self_"]


def _schema_defaults() -> dict[str, typing.Any]:
    return {f.name: f.default for f in dataclasses.fields(DataSpec)}


def _stated(path: Path) -> dict[str, typing.Any]:
    """The keys a data file states itself (its ``defaults`` list left out), as plain values."""
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    return raw


def _norm(tp: typing.Any) -> typing.Any:
    """A type hint in a comparable form: unions as sets, ``Sequence[X]`` as ``list[X]`` (OmegaConf's list node)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return frozenset(_norm(a) for a in typing.get_args(tp))
    if origin is collections.abc.Sequence:
        origin = list
    if origin is not None:
        return (origin, tuple(_norm(a) for a in typing.get_args(tp)))
    return tp


def test_there_are_the_documented_data_sets():
    names = {p.stem for p in DATA_FILES}
    assert names >= {"fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "imagefolder", "folder", "synthetic"}
    assert names == set(BEFORE), "a new data set needs its values in tests/fixtures/data_configs.json"


def test_schema_types_are_the_datamodule_argument_types():
    """Names and defaults: tests/data/test_datamodule.py; here the annotations (``Sequence[float]`` arguments are
    ``list[float]`` fields: OmegaConf's list node)."""
    params = set(inspect.signature(SSLDataModule.__init__).parameters) - NOT_DATA
    fields = set(_schema_defaults())
    assert fields == params, (
        f"DataSpec fields and SSLDataModule arguments differ: only in DataSpec {sorted(fields - params)}, "
        f"only in SSLDataModule {sorted(params - fields)}"
    )
    hints = typing.get_type_hints(SSLDataModule.__init__)
    schema_hints = typing.get_type_hints(DataSpec)
    wrong = {n: (schema_hints[n], hints[n]) for n in sorted(params) if _norm(schema_hints[n]) != _norm(hints[n])}
    assert not wrong, f"(DataSpec type, SSLDataModule type) differ: {wrong}"


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.stem)
def test_data_file_starts_from_the_schema_and_states_only_what_differs(path):
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    assert raw.get("defaults") == SCHEMA_HEAD, f"{path.name}: defaults must be {SCHEMA_HEAD}"
    defaults = _schema_defaults()
    stated = _stated(path)
    unknown = sorted(set(stated) - set(defaults))
    assert not unknown, f"{path.name}: keys {unknown} are not DataSpec fields"
    same = sorted(k for k, v in stated.items() if v == defaults[k])
    assert not same, f"{path.name} states {same} with the schema's default value: remove them"


@pytest.mark.parametrize("path", DATA_FILES, ids=lambda p: p.stem)
def test_data_set_composes_to_the_schema_with_its_keys_in_schema_order(path):
    got = compose_cfg([f"data={path.stem}"]).data
    expected = {**_schema_defaults(), **_stated(path)}  # the reference merge, by hand
    assert OmegaConf.to_container(got, resolve=False) == expected
    assert list(got.keys()) == [f.name for f in dataclasses.fields(DataSpec)]  # --cfg job prints in this order


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_data_set_values_are_those_it_had_before_the_schema(name):
    got = OmegaConf.to_container(compose_cfg([f"data={name}"]).data, resolve=False)
    before = BEFORE[name]
    assert {k: got[k] for k in before} == before
    for type_key in ("image_size", "batch_size", "eval_crop_ratio"):  # 1.0 stays a float, 256 an int
        assert type(got[type_key]) is type(before[type_key]) or before[type_key] == "???", type_key
    added = {k: v for k, v in got.items() if k not in before}
    defaults = _schema_defaults()
    assert added == {k: defaults[k] for k in added}, "a key added since has its schema default"


@pytest.mark.parametrize(
    "override,names",
    [
        ("data.batchsize=1", ["data.batchsize"]),  # misspelt key: struct mode
        ("data.batch_size=abc", ["data.batch_size", "'abc'", "Integer"]),  # wrong type, at composition
        ("data.pin_memory=maybe", ["data.pin_memory", "'maybe'", "bool"]),
        ("data.mean=abc", ["data.mean"]),
    ],
)
def test_bad_data_override_is_refused_when_composed_naming_the_key(override, names):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(["data=cifar10", override])
    text = f"{err.value}\n{err.value.__cause__}"
    for name in names:
        assert name in text, f"{name!r} not in {text!r}"


def test_command_line_values_take_the_schema_types():
    data = compose_cfg(["data=cifar10", "data.eval_crop_ratio=1", "data.root=5", "data.train_subset=null"]).data
    assert data.eval_crop_ratio == 1.0 and isinstance(data.eval_crop_ratio, float)
    assert data.root == "5" and data.train_subset is None
