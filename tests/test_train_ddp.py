"""Data parallelism: two gloo processes with half the batch each train the same adapter as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_train import REPO, adapter_tensors, assert_same_training, curve, prepared, write_params  # noqa: F401


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:  # noqa: F811
    settings = {"max_steps": 3, "learning_rate": 1e-3, "validation_every": 3, "validation_timesteps": 1}
    runs = {}
    for name, processes in (("single", 1), ("ddp", 2)):
        params = write_params(tmp_path / name, tiny_model, prepared, batch_size=4 // processes, **settings)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        cmd = [*torchrun, "--master_port", str(_free_port()), "-m", "pipeline.train", "--params", str(params)]
        cmd += ["--prepared", str(prepared), "--out", str(tmp_path / name / "adapter")]
        cmd += ["--report", str(tmp_path / name / "report")]
        # ACCELERATE_USE_CPU: accelerate sets up gloo data parallelism on CPU only when asked to.
        env = os.environ | {"PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = tmp_path / name
    summary = yaml.safe_load((runs["ddp"] / "report" / "summary.json").read_text())
    assert summary["cost"]["processes"] == 2 and summary["cost"]["effective_batch_size"] == 4
    single, ddp = curve(runs["single"] / "report"), curve(runs["ddp"] / "report")
    for x, y in zip(single, ddp, strict=True):
        for column in ("train_loss", "val_loss"):
            assert (x[column] == "") == (y[column] == "")
            if x[column]:
                assert float(y[column]) == pytest.approx(float(x[column]), rel=1e-5)
    a, b = adapter_tensors(runs["single"] / "adapter"), adapter_tensors(runs["ddp"] / "adapter")
    assert_same_training(b, a, lr=settings["learning_rate"], steps=settings["max_steps"])
