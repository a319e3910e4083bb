"""Hydra's submitit launcher: a real local multirun of two jobs; the SLURM launcher config (conf/hydra/launcher/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ssl_vision.resume import find_resume_checkpoint
from tests.conftest import CONF

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data=synthetic",
    "data.synthetic_size=32",
    "data.batch_size=16",
    "trainer.max_steps=1",
    "trainer.limit_val_batches=0",
    "trainer.enable_progress_bar=false",
    "eval.final_eval=false",
    "logger=none",
    "backbone.width=0.125",
    "method.kwargs.proj_hidden_dim=64",
]


def test_submitit_local_multirun_writes_each_jobs_results(tmp_path):
    """``-m hydra/launcher=submitit_local method=simclr,byol``: both jobs run (as submitit subprocesses), each writes
    results.json into its own job dir under ``<output_root>/multirun/<time>/<num>-<method>-<backbone>-<data>``, and
    ``resume=auto`` finds their checkpoints there."""
    cmd = [
        sys.executable,
        str(ROOT / "tools/pretrain.py"),
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "method=simclr,byol",
        *TINY,
        f"paths.output_root={tmp_path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    sweeps = list((tmp_path / "multirun").iterdir())
    assert len(sweeps) == 1 and (sweeps[0] / "multirun.yaml").is_file() and (sweeps[0] / ".submitit").is_dir()
    for num, method in enumerate(("simclr", "byol")):
        job_dir = sweeps[0] / f"{num}-{method}-resnet18-synthetic"
        res = json.loads((job_dir / "results.json").read_text())
        assert res["method"] == method and res["steps"] == 1 and res["images_seen"] == 16
        assert Path(res["run_dir"]) == job_dir.resolve() and Path(res["checkpoint"]).is_file()
        assert (
            find_resume_checkpoint("auto", tmp_path, f"{method}-resnet18-synthetic")
            == job_dir / "checkpoints" / "last.ckpt"
        )
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun.yaml").exists()


def _launcher_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("pretrain", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    GlobalHydra.instance().clear()
    return cfg


def test_slurm_launcher_config_sizes_the_allocation_from_the_trainer():
    """hydra/launcher=slurm: one SLURM task per device and nodes = trainer.num_nodes; the sbatch script submitit
    would submit (rendered with submitit's own function, nothing is submitted) says so."""
    cfg = _launcher_cfg(
        [
            "trainer=ddp_gpu",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=600",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.submitit_folder.endswith("/.submitit/%j")
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    generic = {k: launcher[k] for k in ("timeout_min", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task")}
    native = {SlurmExecutor._equivalence_dict()[k]: v for k, v in generic.items()}
    sbatch = _make_sbatch_string(
        command="python -u -m submitit.core._submit /x",
        folder="/tmp/x",
        job_name="pretrain",
        partition=launcher.partition,
        signal_delay_s=launcher.signal_delay_s,
        **native,
    )
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --time=600",
    ):
        assert line in sbatch, line
    default = _launcher_cfg([]).hydra.launcher  # trainer=cpu: 1 device, 1 node, the cluster's default partition
    assert (default.tasks_per_node, default.nodes, default.partition, default.max_num_timeout) == (1, 1, None, 0)
