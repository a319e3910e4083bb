"""Every command and code snippet README.md shows must work as written.

* Each ``python tools/<tool>.py ...`` (or ``ssl-<tool> ...``) line of a ```bash block is composed with the tool's
  Hydra config and these overrides (sweeps ``a=1,2`` expanded, ``hydra/...`` overrides applied), every value of the
  job config resolved: a misspelt key, an unknown option or a missing required value fails here. Nothing is trained;
  lines whose data the test machine lacks (``data.root=/data/imagenet``) still compose. ``tools/compare.py`` lines
  go through its argument parser.
* Each ```python block is executed as written in a folder holding the files it names (a backbone export:
  ``last.backbone.safetensors`` + ``last.backbone.json``), once for a stock torchvision ResNet and once for a timm
  ViT.

``SSL_VISION_README=<path>`` checks another copy of the README (e.g. one with proposed edits).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import ssl_vision  # noqa: F401  (registers the config schema the conf/ files merge onto)
from ssl_vision.console import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("SSL_VISION_README", ROOT / "README.md"))
TOOL_CONFIGS = {tool: config for tool, config in COMMANDS.values()}  # tools/<tool>.py -> its conf/<config>.yaml
CONSOLE = {command: tool for command, (tool, _) in COMMANDS.items()}  # ssl-<x> -> tools/<tool>.py
#: Hydra command-line flags that are not overrides (with the number of values they take)
HYDRA_FLAGS = {
    "-m": 0,
    "--multirun": 0,
    "--cfg": 1,
    "-c": 1,
    "--package": 1,
    "-p": 1,
    "--resolve": 0,
    "--help": 0,
    "-h": 0,
    "--hydra-help": 0,
    "--info": 0,
    "-i": 0,
}


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def tool_commands(text: str) -> list[tuple[str, list[str], str]]:
    """``(tool, arguments, line)`` for every line of the ```bash blocks that runs a tools/ script or a console
    command (continuation lines joined, comments dropped, ``$VARS`` expanded)."""
    found = []
    for block in fenced_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(os.path.expandvars(line), comments=True)
            for i, word in enumerate(words):
                m = re.fullmatch(r"(?:\./)?tools/(\w+)\.py", word)
                if m and i > 0 and re.search(r"python[\d.]*$", words[i - 1]):
                    found.append((m.group(1), words[i + 1 :], line.strip()))
                    break
                if i == 0 and word in CONSOLE:
                    found.append((CONSOLE[word], words[1:], line.strip()))
                    break
    return found


def hydra_overrides(args: list[str]) -> list[str]:
    out, skip = [], 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in HYDRA_FLAGS:
            skip = HYDRA_FLAGS[arg]
        else:
            out.append(arg)
    return out


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """Every job of a multirun: the cartesian product of the sweep overrides' values (Hydra's basic sweeper)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(job) for job in itertools.product(*choices)]


def compose_job(config_name: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # hydra.run.dir would create a directory
    return cfg, OmegaConf.to_container(job, resolve=True, throw_on_missing=True)


def _load_compare():
    spec = importlib.util.spec_from_file_location("readme_compare_tool", ROOT / "tools" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMAND_LINES = tool_commands(README.read_text()) if README.is_file() else []


def test_readme_has_commands_and_snippets():
    assert README.is_file(), README
    tools = {tool for tool, _, _ in COMMAND_LINES}
    assert {"pretrain", "knn_eval", "linear_probe", "export", "compare", "embed_plot"} <= tools, tools
    assert fenced_blocks(README.read_text(), "python")


@pytest.mark.parametrize("tool,args,line", COMMAND_LINES, ids=[f"{i}-{t}" for i, (t, _, _) in enumerate(COMMAND_LINES)])
def test_readme_command_composes(tool, args, line, tmp_path, monkeypatch):
    assert tool in TOOL_CONFIGS, f"README runs tools/{tool}.py, which is not a known tool: {line}"
    config_name = TOOL_CONFIGS[tool]
    if config_name is None:  # tools/compare.py: argparse; the run folders it names are made here
        monkeypatch.chdir(tmp_path)
        for arg in args:
            if not arg.startswith("-") and "/" in arg:
                (tmp_path / arg).mkdir(parents=True, exist_ok=True)
        parsed = _load_compare().parse_args(args)
        assert parsed.paths and parsed.out, line
        return
    overrides = hydra_overrides(args)
    for job in expand_sweeps(overrides):
        try:
            cfg, resolved = compose_job(config_name, job)
        except Exception as err:  # the README line and the failing job in the message
            raise AssertionError(f"README command does not compose: {line!r} (job {job}): {err}") from err
        assert resolved, line
        if tool == "pretrain":  # the values checked before a run builds anything
            from ssl_vision.config_checks import check_pretrain_config

            check_pretrain_config(cfg)


# ------------------------------------------------------------------------------------------- python snippets
def _write_export(folder: Path, backbone: str, image_size: int) -> dict:
    """``last.backbone.safetensors`` + ``.json`` as tools/export.py writes them, for a randomly initialised
    backbone (the export format does not depend on training)."""
    from ssl_vision.backbones import create_backbone
    from ssl_vision.eval.checkpoints import create_kwargs
    from ssl_vision.eval.export import write_backbone_files

    data = {"name": "synthetic", "image_size": image_size, "in_chans": 3, "num_classes": 10}
    bcfg = {
        "name": backbone,
        "width": 1.0,
        "channels": None,
        "small_stem": "auto",
        "zero_init_residual": False,
        "patch_size": "auto",
        "drop_path_rate": 0.0,
    }
    kw = create_kwargs(bcfg, data)
    torch.manual_seed(0)
    model, dim = create_backbone(**kw)
    info = {
        "backbone": backbone,
        "create_kwargs": kw,
        "method": "simclr",
        "weights": "student",
        "weights_prefix": "backbone.",
        "data": data,
        "global_step": 0,
        "epoch": 0,
    }
    return write_backbone_files(folder / "last.backbone.safetensors", model, dim, info, folder / "last.ckpt")


PYTHON_BLOCKS = fenced_blocks(README.read_text(), "python") if README.is_file() else []


@pytest.mark.parametrize("backbone,image_size", [("resnet18", 224), ("vit_tiny", 32)])
@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_snippet_runs(index, backbone, image_size, tmp_path, monkeypatch):
    meta = _write_export(tmp_path, backbone, image_size)
    assert meta["stock"]["loads_into_stock"], meta["stock"]["stock_note"]  # both branches of a stock-model snippet
    monkeypatch.chdir(tmp_path)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "readme_snippet"}
    try:
        exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(before)  # later in-process runs compare with subprocesses that use the default
