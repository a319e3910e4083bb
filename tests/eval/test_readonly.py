"""Evaluating a checkpoint that lies in a read-only directory.

Every tool computes its result, prints it (the JSON line), and only then fails on the write, with an error that
names the file and ``output_dir=``; with ``output_dir=<folder>`` everything it writes goes there.

The directory is made read-only with chmod 0o555. Where that does not stop writes (the tests run as root), the
kernel's answer is reproduced instead: every attempt to create, open for writing or rename a file inside that
directory raises ``PermissionError(EACCES)``, and ``os.access`` reports it unwritable, exactly what a non-root user
gets from a 0o555 directory.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ssl_vision.eval.outputs import OutputNotWritable
from tests.eval.test_features import tiny_backbone, write_checkpoint
from tests.eval.test_tools import ROOT, compose_cfg, load_tool

#: the same simulation, for a tool run as a subprocess (its real CLI: Hydra, exit status, stdout / stderr)
SIMULATE = textwrap.dedent('''
    import builtins, errno, os, sys
    ro = os.path.realpath(os.environ["SSL_VISION_TEST_READONLY"])
    def _inside(p):
        return os.path.dirname(os.path.realpath(os.fspath(p))) == ro
    def _deny(p):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(p))
    _open, _replace, _access = builtins.open, os.replace, os.access
    def _guarded_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _inside(file):
            _deny(file)
        return _open(file, mode, *a, **k)
    def _guarded_replace(src, dst, *a, **k):
        if _inside(dst) or _inside(src):
            _deny(dst)
        return _replace(src, dst, *a, **k)
    def _guarded_access(path, mode, *a, **k):
        if mode & os.W_OK and os.path.realpath(os.fspath(path)) == ro:
            return False
        return _access(path, mode, *a, **k)
    builtins.open, os.replace, os.access = _guarded_open, _guarded_replace, _guarded_access
''')


def _chmod_blocks_writes(folder: Path) -> bool:
    probe = folder / ".write-probe"
    try:
        probe.touch()
    except PermissionError:
        return True
    probe.unlink()
    return False


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """``read_only(folder)`` makes ``folder`` read-only for this process (see the module docstring); returns
    whether it had to be simulated."""
    made: list[Path] = []

    def make(folder: Path) -> bool:
        folder.chmod(0o555)
        made.append(folder)
        if _chmod_blocks_writes(folder):
            return False
        namespace: dict = {}
        monkeypatch.setenv("SSL_VISION_TEST_READONLY", str(folder))
        saved = builtins.open, os.replace, os.access
        exec(SIMULATE, namespace)  # installs the guards process-wide ...
        patched = builtins.open, os.replace, os.access
        builtins.open, os.replace, os.access = saved  # ... and hands them to monkeypatch, which undoes them
        monkeypatch.setattr(builtins, "open", patched[0])
        monkeypatch.setattr(os, "replace", patched[1])
        monkeypatch.setattr(os, "access", patched[2])
        return True

    yield make
    for folder in made:
        folder.chmod(0o755)


def _checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    store.mkdir()
    return write_checkpoint(store / "last.ckpt", tiny_backbone()[0]), store


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _assert_names_output_dir(err: pytest.ExceptionInfo, store: Path) -> None:
    text = str(err.value)
    assert str(store) in text and "output_dir=" in text and "not writable" in text, text


def test_knn_on_a_read_only_checkpoint_prints_the_result_then_says_where_to_write(tmp_path, read_only, capsys):
    ckpt, store = _checkpoint(tmp_path)
    knn = load_tool("knn_eval")
    base = [f"checkpoint={ckpt}", "ks=[1,5]", "num_workers=0", "device=cpu"]
    read_only(store)
    with pytest.raises(OutputNotWritable) as err:
        knn.run(compose_cfg("knn", base))
    _assert_names_output_dir(err, store)
    assert "last.knn.json" in str(err.value)
    printed = _last_json(capsys.readouterr().out)
    assert sorted(p.name for p in store.iterdir()) == ["last.ckpt"]  # nothing half-written, no temporary files

    out_dir = tmp_path / "results" / "knn"  # created on demand
    written = knn.run(compose_cfg("knn", [*base, f"output_dir={out_dir}"]))
    assert _last_json(capsys.readouterr().out) == written
    assert json.loads((out_dir / "last.knn.json").read_text()) == written
    timing = ("extract_s", "knn_s")
    assert {k: v for k, v in printed.items() if k not in timing} == {
        k: v for k, v in written.items() if k not in timing
    }
    assert sorted(p.name for p in store.iterdir()) == ["last.ckpt"]


def test_linear_probe_skips_the_feature_cache_and_prints_the_result(tmp_path, read_only, capsys):
    ckpt, store = _checkpoint(tmp_path)
    probe = load_tool("linear_probe")
    base = [f"checkpoint={ckpt}", "epochs=2", "batch_size=32", "num_workers=0", "device=cpu", "extract_batch_size=64"]
    read_only(store)
    with pytest.raises(OutputNotWritable) as err:
        probe.run(compose_cfg("linear", base))
    _assert_names_output_dir(err, store)
    out = capsys.readouterr().out
    printed = _last_json(out)
    assert printed["feature_cache"] == {"test": "not written", "train": "not written"}
    assert "feature cache" in out and "output_dir=" in out
    assert sorted(p.name for p in store.iterdir()) == ["last.ckpt"]

    out_dir = tmp_path / "probe"
    written = probe.run(compose_cfg("linear", [*base, f"output_dir={out_dir}"]))
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "last.features.test.pt",
        "last.features.train.pt",
        "last.linear.json",
    ]
    assert written["feature_cache"] == {"test": "written", "train": "written"}
    assert (written["top1"], written["top5"]) == (printed["top1"], printed["top5"])
    again = probe.run(compose_cfg("linear", [*base, f"output_dir={out_dir}"]))
    assert again["feature_cache"] == {"test": "hit", "train": "hit"} and again["top1"] == written["top1"]


def test_finetuning_refuses_before_training_when_its_weights_could_not_be_saved(tmp_path, read_only, monkeypatch):
    ckpt, store = _checkpoint(tmp_path)
    probe = load_tool("linear_probe")
    monkeypatch.setattr(
        probe, "finetune_backbone", lambda *a, **k: pytest.fail("trained although nothing could be saved")
    )
    read_only(store)
    with pytest.raises(OutputNotWritable, match=r"set output_dir=<a writable folder>, or save_finetuned=false"):
        probe.run(compose_cfg("linear", [f"checkpoint={ckpt}", "finetune=true", "num_workers=0"]))


def test_finetuning_a_read_only_checkpoint_with_output_dir(tmp_path, read_only):
    ckpt, store = _checkpoint(tmp_path)
    probe = load_tool("linear_probe")
    read_only(store)
    out_dir = tmp_path / "tuned"
    res = probe.run(
        compose_cfg(
            "linear",
            [
                f"checkpoint={ckpt}",
                "finetune=true",
                "epochs=1",
                "batch_size=8",
                "train_subset=16",
                "finetuning.warmup_epochs=0",
                "num_workers=0",
                "extract_batch_size=32",
                "device=cpu",
                f"output_dir={out_dir}",
            ],
        )
    )
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "last.finetune.json",
        "last.finetuned.backbone.json",
        "last.finetuned.backbone.safetensors",
        "last.finetuned.head.safetensors",
    ]
    assert res["saved"]["head"] == str((out_dir / "last.finetuned.head.safetensors").resolve())
    assert json.loads((out_dir / "last.finetune.json").read_text()) == res
    assert sorted(p.name for p in store.iterdir()) == ["last.ckpt"]


def test_export_of_a_read_only_checkpoint(tmp_path, read_only, capsys):
    ckpt, store = _checkpoint(tmp_path)
    export = load_tool("export")
    read_only(store)
    with pytest.raises(OutputNotWritable) as err:
        export.run(compose_cfg("export", [f"checkpoint={ckpt}"]))
    _assert_names_output_dir(err, store)
    printed = _last_json(capsys.readouterr().out)
    assert printed["weights_path"] == str(store / "last.backbone.safetensors")
    assert sorted(p.name for p in store.iterdir()) == ["last.ckpt"]

    meta = export.run(compose_cfg("export", [f"checkpoint={ckpt}", f"output_dir={tmp_path / 'exports'}"]))
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [
        "last.backbone.json",
        "last.backbone.safetensors",
    ]
    assert _last_json(capsys.readouterr().out) == meta
    assert {k: v for k, v in meta.items() if not k.endswith("_path")} == {
        k: v for k, v in printed.items() if not k.endswith("_path")
    }
    old_name = export.run(compose_cfg("export", [f"checkpoint={ckpt}", f"out_dir={tmp_path / 'older'}"]))
    assert Path(old_name["weights_path"]).parent == (tmp_path / "older").resolve()
    with pytest.raises(ValueError, match="out_dir is the older name of output_dir"):
        export.run(compose_cfg("export", [f"checkpoint={ckpt}", "out_dir=a", "output_dir=b"]))


def test_embedding_plot_of_a_read_only_checkpoint(tmp_path, read_only, capsys):
    ckpt, store = _checkpoint(tmp_path)
    embed = load_tool("embed_plot")
    base = [f"checkpoint={ckpt}", "num_samples=20", "num_workers=0", "device=cpu", "threads=1"]
    read_only(store)
    with pytest.raises(OutputNotWritable) as err:
        embed.run(compose_cfg("embed", base))
    _assert_names_output_dir(err, store)
    printed = _last_json(capsys.readouterr().out)
    assert printed["num_points"] == 20 and sorted(p.name for p in store.iterdir()) == ["last.ckpt"]

    res = embed.run(compose_cfg("embed", [*base, f"output_dir={tmp_path / 'figs'}"]))
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["last.tsne.json", "last.tsne.png"]
    assert json.loads((tmp_path / "figs" / "last.tsne.json").read_text()) == res
    assert res["num_points"] == printed["num_points"] and res["png"] == str((tmp_path / "figs" / "last.tsne.png"))


def test_knn_cli_prints_the_json_and_exits_non_zero(tmp_path, read_only):
    """The real entry point: the JSON is the last stdout line, the error on stderr names output_dir, exit != 0."""
    ckpt, store = _checkpoint(tmp_path)
    simulated = read_only(store)
    runner = (SIMULATE if simulated else "import sys\n") + textwrap.dedent(f'''
        import runpy
        sys.argv = ["knn_eval.py", "checkpoint={ckpt}", "ks=[1]", "num_workers=0", "device=cpu"]
        runpy.run_path({str(ROOT / "tools" / "knn_eval.py")!r}, run_name="__main__")
    ''')
    env = {**os.environ, "SSL_VISION_TEST_READONLY": str(store), "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run(
        [sys.executable, "-c", runner], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode != 0
    assert _last_json(out.stdout)["ks"] == [1]
    assert "cannot write" in out.stderr and str(store / "last.knn.json") in out.stderr and "output_dir=" in out.stderr
    assert sorted(p.name for p in store.iterdir()) == ["last.ckpt"]
