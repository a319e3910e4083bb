"""Loggers: the CSV record always, trackers (wandb, TensorBoard) as logger= selects, one or several; every logger
gets the composed config and the throughput; a resumed run continues its wandb run; a sweep's jobs share a group;
MAE's reconstruction picture is enlarged, labelled and logged to the trackers that take images."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hydra.types import RunMode
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import open_dict, read_write
from PIL import Image

import ssl_vision.loggers as loggers_mod
from ssl_vision.launch import run_pretraining
from ssl_vision.loggers import TRACKERS_FILE, build_loggers, finish_tracking
from ssl_vision.run_record import RunCSVLogger
from tests.conftest import FAST

BASE = [
    "method=simclr",
    "backbone=resnet18",
    "backbone.width=0.125",
    *FAST,
    "eval.final_eval=false",
    "trainer.limit_val_batches=0",
]
PREFIX = "simclr-resnet18-synthetic"


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """wandb offline, every directory it writes (runs, cache, settings) under tmp_path, no API key."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))


class FakeRun:
    """What Lightning's WandbLogger uses of a wandb run, recording what it is given."""

    def __init__(self, **init):
        self.init, self.id, self.name = init, init.get("id") or "generated", init.get("name")
        self.config, self.logged, self.finished = {}, [], None

    def log(self, data, **kwargs):
        self.logged.append(dict(data))

    def finish(self, exit_code=None):
        self.finished = exit_code or 0


@pytest.fixture
def fake_wandb(monkeypatch, wandb_offline):
    """``wandb.init`` replaced: returns FakeRun objects, listed here in call order."""
    import wandb

    runs: list[FakeRun] = []

    def init(**kwargs):
        runs.append(FakeRun(**kwargs))
        runs[-1].config = SimpleNamespace(
            data={}, update=lambda d, allow_val_change=False: runs[-1].config.data.update(d)
        )
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(loggers_mod, "_open_wandb_runs", [])
    return runs


# ------------------------------------------------------------------------------------- the config reaches every logger
def test_every_logger_gets_the_config_and_the_throughput(make_cfg, tmp_path, wandb_offline):
    """logger=[wandb,tensorboard], 2 steps: TensorBoard's and the CSV logger's hparams.yaml hold the composed config
    (a value set on the command line included), the wandb offline run file holds it too, and the run's throughput
    (results.json) is in metrics.csv and in TensorBoard's scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    res = run_pretraining(
        make_cfg([*BASE, "trainer.max_steps=2", "method.optim.base_lr=0.123", "logger=[wandb,tensorboard]"], run_dir)
    )
    assert res["steps"] == 2
    for hparams in (run_dir / "tb" / "hparams.yaml", run_dir / "logs" / "hparams.yaml"):
        cfg = yaml.safe_load(hparams.read_text())
        assert cfg["method"]["name"] == "simclr", hparams
        assert cfg["method"]["optim"]["base_lr"] == 0.123, hparams
        assert cfg["data"]["batch_size"] == 16 and cfg["trainer"]["max_steps"] == 2, hparams
        assert "method.optim.base_lr=0.123" in cfg["overrides"], hparams
        assert "hydra" not in cfg

    # wandb: the offline run of the id kept in trackers.json, its config records holding the composed values
    wid = json.loads((run_dir / TRACKERS_FILE).read_text())["wandb"]["id"]
    (record,) = (run_dir / "wandb").glob(f"offline-run-*-{wid}/run-{wid}.wandb")
    raw = record.read_bytes()
    assert b'"base_lr":0.123' in raw and b'{"name":"simclr"' in raw

    # throughput: the results' numbers in the CSV record and in TensorBoard
    with open(run_dir / "logs" / "metrics.csv") as f:
        import csv

        rows = [r for r in csv.DictReader(f) if r.get("throughput/wall_s")]
    assert len(rows) == 1 and int(rows[0]["step"]) == 1, "at the last batch's step, as Lightning's epoch-end rows"
    assert float(rows[0]["throughput/images_per_s"]) == pytest.approx(res["images_per_s"])
    assert float(rows[0]["throughput/train_s"]) == pytest.approx(res["train_s"])
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    assert ea.Scalars("throughput/images_per_s")[-1].value == pytest.approx(res["images_per_s"], rel=1e-6)
    assert ea.Scalars("throughput/train_s")[-1].step == 1
    assert ea.Scalars("hp/train_loss")[-1].value == pytest.approx(res["train_loss"], rel=1e-6)


@pytest.mark.parametrize(
    "choice, trackers",
    [
        ("csv", []),
        ("none", []),
        ("wandb", [WandbLogger]),
        ("tensorboard", [TensorBoardLogger]),
        ("[wandb,tensorboard]", [WandbLogger, TensorBoardLogger]),
    ],
)
def test_csv_record_with_any_choice_plus_the_trackers(make_cfg, tmp_path, wandb_offline, choice, trackers):
    """Every choice keeps the CSV record (logs/metrics.csv, which tools/compare.py and resumes read), and adds the
    trackers it names, several at once with a list; none is started (no wandb.init) before the run."""
    run_dir = tmp_path / "run"
    built = build_loggers(make_cfg([*BASE, f"logger={choice}"], run_dir), run_dir)
    assert isinstance(built[0], RunCSVLogger) and Path(built[0].log_dir) == run_dir / "logs"
    assert [type(lg) for lg in built[1:]] == trackers
    for lg in built[1:]:
        assert Path(lg.save_dir) == run_dir
        assert lg._experiment is None


def test_wandb_options_are_under_their_name(make_cfg, tmp_path):
    cfg = make_cfg([*BASE, "logger=[wandb,tensorboard]", "logger.wandb.offline=false", "logger.wandb.project=p"])
    assert cfg.logger.wandb.offline is False and cfg.logger.tensorboard.name == "tb"
    with pytest.raises(Exception, match="logger.wandb.ofline"):
        make_cfg([*BASE, "logger=wandb", "logger.wandb.ofline=false"])


def test_logger_node_without_target_is_named(make_cfg, tmp_path):
    cfg = make_cfg([*BASE, "logger=tensorboard"])
    with open_dict(cfg):
        cfg.logger.mine = {"save_dir": None}
    with pytest.raises(ValueError, match="logger.mine is not a logger config .*_target_"):
        build_loggers(cfg, tmp_path / "run")
    with open_dict(cfg):
        cfg.logger.mine = {"_target_": "lightning.pytorch.loggers.NoSuchLogger"}
    with pytest.raises(ValueError, match="logger.mine._target_='lightning.pytorch.loggers.NoSuchLogger' is not"):
        build_loggers(cfg, tmp_path / "run")


# --------------------------------------------------------------------------------------- resume: the same wandb run
def test_resumed_run_continues_the_same_wandb_run(make_cfg, tmp_path, fake_wandb, capsys):
    runs = tmp_path / "outputs" / PREFIX
    first = run_pretraining(make_cfg([*BASE, "trainer.max_steps=1", "logger=wandb"], runs / "t1"))
    second = run_pretraining(make_cfg([*BASE, "trainer.max_steps=2", "logger=wandb", "resume=auto"], runs / "t2"))
    assert second["run_dir"] == first["run_dir"] and second["steps"] == 2
    one, two = fake_wandb
    assert one.init["id"] and two.init["id"] == one.init["id"], "the resumed leg continues the first leg's wandb run"
    assert two.init["resume"] == "allow" and two.init["name"] == one.init["name"]
    assert json.loads((Path(first["run_dir"]) / TRACKERS_FILE).read_text())["wandb"]["id"] == one.init["id"]
    # the composed config (this leg's: resume=auto, 2 steps) and the throughput reached each leg's run
    assert one.config.data["method"]["name"] == "simclr" and two.config.data["trainer"]["max_steps"] == 2
    assert two.config.data["resume"] == "auto"
    final = [d for d in two.logged if "throughput/images_per_s" in d][-1]
    assert final["throughput/images_per_s"] == pytest.approx(second["images_per_s"])
    assert final["trainer/global_step"] == 1
    # the first leg's summary rows (at step 0, before the checkpoint at step 1) stay in the CSV record
    assert "dropped" not in capsys.readouterr().out
    with open(Path(first["run_dir"]) / "logs" / "metrics.csv") as f:
        import csv

        walls = [
            (int(r["step"]), float(r["throughput/wall_s"])) for r in csv.DictReader(f) if r.get("throughput/wall_s")
        ]
    assert walls == [(0, first["wall_s"]), (1, second["wall_s"])]
    assert one.finished == 0 and two.finished == 0, "each leg finishes its wandb run (the next one starts its own)"


def test_unreadable_trackers_file_gives_a_new_id(make_cfg, tmp_path, capsys, wandb_offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / TRACKERS_FILE).write_text("{not json")
    built = build_loggers(make_cfg([*BASE, "logger=wandb"], run_dir), run_dir)
    assert "cannot read" in capsys.readouterr().out
    new_id = built[1]._wandb_init["id"]
    assert len(new_id) == 8 and json.loads((run_dir / TRACKERS_FILE).read_text())["wandb"]["id"] == new_id


# -------------------------------------------------------------------------------------------- sweeps: one wandb group
def _sweep_job(make_cfg, sweep: Path, num: int, mode=RunMode.MULTIRUN, extra=()):
    job = sweep / f"{num}-{PREFIX}"
    cfg = make_cfg([*BASE, "logger=[wandb,tensorboard]", *extra], job)
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.job.num = num
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    return cfg, job


def test_multirun_jobs_share_a_wandb_group_and_a_tensorboard_root(make_cfg, tmp_path, wandb_offline):
    sweep = tmp_path / "outputs" / "multirun" / "2026-01-02_03-04-05"
    idents, tb_dirs = [], []
    for num in (0, 1):
        cfg, job = _sweep_job(make_cfg, sweep, num)
        wb, tb = build_loggers(cfg, job)[1:]
        idents.append(wb._wandb_init)
        tb_dirs.append(Path(tb.log_dir))
    assert [i["group"] for i in idents] == ["2026-01-02_03-04-05"] * 2
    assert idents[0]["id"] != idents[1]["id"]
    assert [i["name"] for i in idents] == [f"0-{PREFIX}", f"1-{PREFIX}"]
    assert all(d.is_relative_to(sweep) for d in tb_dirs) and tb_dirs[0] != tb_dirs[1], (
        "tensorboard --logdir <sweep dir> shows every job"
    )
    # a job of the sweep resumed later, as a single run, stays in its group with its id
    cfg, job = _sweep_job(make_cfg, sweep, 1, mode=RunMode.RUN, extra=["resume=auto"])
    again = build_loggers(cfg, job)[1]._wandb_init
    assert (again["id"], again["group"]) == (idents[1]["id"], "2026-01-02_03-04-05")
    # a single run has no group
    single = tmp_path / "outputs" / PREFIX / "2026-01-02_03-04-06"
    cfg = make_cfg([*BASE, "logger=wandb"], single)
    assert build_loggers(cfg, single)[1]._wandb_init["group"] is None


# --------------------------------------------------------------------------------- a tracker failing, a stale run
def test_tracker_failing_at_the_end_does_not_fail_the_run(capsys):
    class Broken(RunCSVLogger):
        def log_metrics(self, metrics, step=None):
            raise OSError(28, "No space left on device")

    trainer = SimpleNamespace(loggers=[Broken(save_dir="/nonexistent")], is_global_zero=True, global_step=3)
    finish_tracking(trainer, {"steps": 3, "images_per_s": 10.0})
    assert "Broken could not record the end of the run: OSError" in capsys.readouterr().out


def test_stale_wandb_run_of_a_failed_run_is_finished_first(make_cfg, tmp_path, fake_wandb):
    stale = FakeRun(id="stale")
    loggers_mod._open_wandb_runs.append(stale)  # a run that raised before finish_tracking
    build_loggers(make_cfg([*BASE, "logger=wandb"], tmp_path / "run"), tmp_path / "run")
    assert stale.finished == 1 and loggers_mod._open_wandb_runs == []


# ------------------------------------------------------------------------------------------------- MAE picture
def test_mae_grid_is_enlarged_and_labelled():
    from ssl_vision.mae_viz import ROW_LABELS, grid_image

    rows = torch.rand(4, 3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    plain, labelled = grid_image(rows, labels=None), grid_image(rows)
    s = 4  # 28 px -> at least 96 px: ×4 = 112
    assert plain.size == (3 * (28 * s + 2) + 2, 4 * (28 * s + 2) + 2)
    # nearest-neighbour enlargement: every pixel of an image becomes an s×s block of its grey value
    px = np.asarray(plain)
    tile = px[2 : 2 + 28 * s, 2 : 2 + 28 * s, 0]
    expect = np.floor(rows[0, 0, 0].numpy() * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(tile, np.kron(expect, np.ones((s, s), dtype=np.uint8)))

    margin = labelled.width - plain.width
    assert margin > 0 and labelled.height == plain.height
    lab = np.asarray(labelled)
    assert np.array_equal(lab[:, margin:], px), "the labels only add a margin"
    row_h = 28 * s + 2
    bands = [lab[2 + r * row_h : (r + 1) * row_h, :margin] for r in range(len(ROW_LABELS))]
    for r, band in enumerate(bands):
        assert (band < 128).sum() > 20, f"row {r} ({ROW_LABELS[r]}) has its label drawn"
    assert len({band.tobytes() for band in bands}) == len(ROW_LABELS), "each row its own label"
    assert (lab[:2, :margin] == 255).all(), "nothing drawn above the first row"


def test_mae_picture_goes_to_the_loggers_that_take_images(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssl_vision.mae_viz import grid_image, log_image_to_loggers

    path = tmp_path / "grid.png"
    grid_image(torch.rand(4, 2, 3, 32, 32)).save(path)
    size = Image.open(path).size
    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="")
    wb = WandbLogger(experiment=FakeRun(id="x"))
    csv_logger = RunCSVLogger(save_dir=str(tmp_path), name="logs", version="")
    assert log_image_to_loggers([csv_logger, tb, wb], "mae/reconstructions", path, step=7) == [
        "TensorBoardLogger",
        "WandbLogger",
    ]
    tb.experiment.flush()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    (event,) = ea.Images("mae/reconstructions")
    assert (event.step, event.width, event.height) == (7, *size)
    (logged,) = wb.experiment.logged
    assert logged["trainer/global_step"] == 7
    (image,) = logged["mae/reconstructions"]
    assert (image._width, image._height) == size
