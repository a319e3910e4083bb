"""The tools as a user meets them on the command line: ``--help``, a missing required argument, the console output
of a short pretraining run (each Lightning INFO line once, no faiss loader lines, a progress bar whose total stops
at ``trainer.max_steps``), and the offline tools' progress bars (on stderr when asked for, quiet otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("pretrain", "knn_eval", "linear_probe", "export", "embed_plot", "compare")
NEEDS_CHECKPOINT = ("knn_eval", "linear_probe", "export", "embed_plot")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_help_says_what_each_tool_does_with_two_examples_and_a_missing_checkpoint_is_one_line(tmp_path):
    # all at once (each start-up is seconds of imports); cwd elsewhere: nothing may be written into the checkout
    helps = {t: _start([str(ROOT / "tools" / f"{t}.py"), "--help"], tmp_path) for t in TOOLS}
    missing = {t: _start([str(ROOT / "tools" / f"{t}.py")], tmp_path) for t in (*NEEDS_CHECKPOINT, "compare")}
    for tool, proc in helps.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (tool, err[-2000:])
        assert "Traceback" not in out + err, tool
        examples = [ln for ln in out.splitlines() if ln.strip().startswith(f"python tools/{tool}.py ")]
        assert len(examples) >= 2, (tool, out)
        assert re.search(r"^examples?:", out, re.IGNORECASE | re.MULTILINE), (tool, out)
        first = out.strip().splitlines()[0]
        assert f"tools/{tool}.py" in first and len(first.split(":", 1)[-1].split()) >= 4, (tool, first)  # says what
        assert "is powered by Hydra" not in out, tool  # our template, not Hydra's default
    for tool, proc in missing.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (tool, proc.returncode, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1, (tool, err)
        if tool == "compare":
            assert lines[0].startswith("[ssl_vision] error: the following arguments are required: paths (e.g. ")
        else:
            assert lines[0].startswith("[ssl_vision] error: checkpoint= is required: "), lines[0]
            assert "(e.g. checkpoint=outputs/" in lines[0] and lines[0].endswith("last.ckpt)"), lines[0]
        assert "Traceback" not in out + err
    assert not list(tmp_path.iterdir()), "--help or an error wrote files"


def test_tiny_pretrain_console_lightning_lines_once_no_faiss_bar_stops_at_max_steps(tmp_path):
    """4 batches per epoch (64 images / 16), trainer.max_steps=2: the bar counts to 2, not to the epoch's 4."""
    args = [
        str(ROOT / "tools" / "pretrain.py"),
        "method=simclr",
        "backbone=resnet18",
        "backbone.width=0.125",
        "data=synthetic",
        "data.synthetic_size=64",
        "data.batch_size=16",
        "data.eval_batch_size=64",
        "trainer.max_epochs=1",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
        "eval.knn_k=[5]",
        "logger=csv",
        "eval.final_eval=false",
        "eval.knn_at_init=true",  # init.ckpt: a non-empty checkpoints/
        f"paths.output_root={tmp_path / 'outputs'}",
    ]
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    assert out.count("GPU available") == 1, out[:3000]
    assert out.count("`Trainer.fit` stopped: `max_steps=2` reached") == 1, out[-3000:]
    assert "faiss" not in out.lower(), out[:3000]
    assert "Tip:" not in out
    assert "Checkpoint directory" not in out and "exists and is not empty" not in out
    assert next((tmp_path / "outputs").rglob("init.ckpt")).is_file()
    totals = {int(m) for m in re.findall(r"Epoch 0:\s+\d+%\|[^|]*\|\s*\d+/(\d+)", out)}
    assert totals == {2}, totals
    log = next((tmp_path / "outputs").rglob("pretrain.log"))  # Hydra's job log file keeps the INFO lines, once
    text = log.read_text()
    assert text.count("GPU available") == 1 and "faiss" not in text.lower()


def _bound_bar(**trainer):
    from ssl_vision.progress import StepBoundedProgressBar

    bar = StepBoundedProgressBar()
    defaults = dict(max_epochs=10, max_steps=-1, global_step=0, accumulate_grad_batches=1, num_training_batches=10)
    bar._trainer = types.SimpleNamespace(**{**defaults, **trainer})
    return bar


def test_progress_bar_total_counts_the_batches_max_steps_leaves():
    assert _bound_bar().total_train_batches == 10  # no step limit: the epoch
    assert _bound_bar(max_steps=25, global_step=20).total_train_batches == 5  # the last, partial epoch
    assert _bound_bar(max_steps=25, global_step=0).total_train_batches == 10  # a whole epoch before it
    # 2 optimizer steps left with 3 batches accumulated per step: 6 batches
    assert _bound_bar(max_steps=12, global_step=10, accumulate_grad_batches=3).total_train_batches == 6
    assert _bound_bar(max_steps=4, global_step=4).total_train_batches == 0


def test_progress_bar_after_a_mid_epoch_resume_has_a_total(capsys):
    """Lightning skips on_train_epoch_start when it resumes mid-epoch: the bar gets its total at train start, the
    batches already run in the epoch plus those max_steps leaves."""
    current = types.SimpleNamespace(ready=3, completed=2)  # as restored from a checkpoint of on_train_batch_end
    progress = types.SimpleNamespace(current=current)
    loop = types.SimpleNamespace(restarted_mid_epoch=True, epoch_loop=types.SimpleNamespace(batch_progress=progress))
    bar = _bound_bar(max_steps=5, global_step=3, current_epoch=1, fit_loop=loop)
    bar.on_train_start(bar.trainer, None)
    assert (bar.train_progress_bar.total, bar.train_progress_bar.n) == (5, 3)
    assert bar.train_progress_bar.desc.startswith("Epoch 1")
    bar.train_progress_bar.close()
    capsys.readouterr()


# --------------------------------------------------------------------------------------- offline tools' progress
def test_progress_enabled_follows_the_option_and_the_terminal(monkeypatch):
    from ssl_vision.progress import progress_enabled

    class Stream:
        def __init__(self, tty: bool):
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

        def write(self, s):  # pragma: no cover - not written to here
            return len(s)

    monkeypatch.setattr(sys, "stderr", Stream(False))
    assert progress_enabled(None) is False and progress_enabled("auto") is False
    assert progress_enabled(True) is True and progress_enabled("true") is True
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert progress_enabled(None) is True and progress_enabled("auto") is True
    assert progress_enabled(False) is False and progress_enabled("false") is False
    with pytest.raises(ValueError, match="progress must be true, false or auto"):
        progress_enabled("sometimes")


def _tiny_loader(n: int = 24, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 4, 4, generator=g), torch.arange(n) % 3
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_feature_extraction_and_probe_epochs_show_bars_on_stderr_only_when_asked(capsys):
    from ssl_vision.eval.features import extract_features
    from ssl_vision.eval.linear import ProbeSpec, train_linear_probe

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    quiet_f, quiet_y = extract_features(net, _tiny_loader(), "cpu", progress="auto", desc="features train")
    assert capsys.readouterr() == ("", "")  # stderr is not a terminal under pytest: quiet
    f, y = extract_features(net, _tiny_loader(), "cpu", progress=True, desc="features train")
    out, err = capsys.readouterr()
    assert out == "" and "features train" in err and "3/3" in err
    assert torch.equal(f, quiet_f) and torch.equal(y, quiet_y)  # the bar changes nothing computed
    with torch.no_grad():
        ref = net(torch.cat([b[0] for b in _tiny_loader()]))
    torch.testing.assert_close(f, ref)

    spec = ProbeSpec(protocol="sgd_cosine", optimizer="sgd", lr=0.1, schedule="cosine", epochs=3, batch_size=8)
    quiet = train_linear_probe(f, y, f, y, 3, spec, progress=False)
    assert capsys.readouterr() == ("", "")
    shown = train_linear_probe(f, y, f, y, 3, spec, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "linear probe" in err and "3/3" in err and "loss=" in err
    assert shown == quiet


def test_help_examples_compose(tmp_path):
    """Every example the Hydra tools' --help shows composes with that tool's config (no misspelt key or option);
    the placeholder ``<time>`` / ``...`` paths are only strings here."""
    import shlex

    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import ssl_vision  # noqa: F401  (registers what conf/pretrain.yaml needs)
    from ssl_vision.run_lock import register_resolvers

    register_resolvers()
    configs = {
        "pretrain": "pretrain",
        "knn_eval": "knn",
        "linear_probe": "linear",
        "export": "export",
        "embed_plot": "embed",
    }
    for tool, config in configs.items():
        template = yaml.safe_load((ROOT / "conf" / "hydra" / "help" / f"{tool}.yaml").read_text())["template"]
        lines = [ln.strip() for ln in template.splitlines() if ln.strip().startswith(f"python tools/{tool}.py ")]
        assert len(lines) >= 2, tool
        for line in lines:
            words = [w for w in shlex.split(line)[2:] if w not in ("-m", "--multirun")]
            overrides = [w.split(",")[0] if "=" in w and "[" not in w else w for w in words]  # a sweep's first job
            if tool == "pretrain":
                overrides.append(f"paths.output_root={tmp_path}")
            GlobalHydra.instance().clear()
            try:
                with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                    cfg = compose(config, overrides=overrides)
                OmegaConf.to_container(cfg, resolve=True, throw_on_missing=tool != "pretrain")
            finally:
                GlobalHydra.instance().clear()


def test_a_config_value_the_user_can_fix_is_one_line_and_exit_2(tmp_path):
    """A bad value (type/range checks, or another method's kwargs from an experiment) stops tools/pretrain.py with
    one ``[ssl_vision] error:`` line naming the key, and status 2, before anything trains: no traceback."""
    for args, expected in [
        (["data.batch_size=0"], "data.batch_size must be a positive integer"),
        (["method=byol", "experiment=fmnist_simclr"], "unknown method.kwargs for byol: proj_layers, temperature"),
    ]:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools/pretrain.py"), *args, f"paths.output_root={tmp_path}"],
            capture_output=True,
            text=True,
            env=_env(),
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("[ssl_vision] error:")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
