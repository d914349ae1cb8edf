"""The `sdft` command line as a user meets it: help texts, a closed pipe, a missing model, the UI command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, run_sdft, sdft_env


def sdft(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_sdft(project, *args, timeout=300)


def test_every_command_and_argument_has_help(tmp_path: Path) -> None:
    top = sdft(tmp_path, "--help").stdout
    for command in ("init", "run", "models", "promote", "rollback", "approve", "lineage", "ui", "serve"):
        assert command in top
    promote = sdft(tmp_path, "promote", "--help").stdout
    assert "version" in promote and "registered version number" in promote
    run = sdft(tmp_path, "run", "--help").stdout
    assert "manual" in run and "schedule" in run and "data" in run and "skipped" in run
    assert "base model" in sdft(tmp_path, "init", "--help").stdout
    assert "MLflow UI" in sdft(tmp_path, "ui", "--help").stdout


def test_models_of_a_missing_name_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    result = sdft(tmp_path, "models", "--name", "nope")
    assert result.returncode == 1
    assert "no registered model named 'nope'" in result.stderr


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    # `sdft ... | head` once head has left: every write to stdout fails with EPIPE.
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", str(tmp_path), "ui"],
        stdout=write,
        stderr=subprocess.PIPE,
        env=sdft_env(tmp_path),
        text=True,
        timeout=120,
    )
    os.close(write)
    assert result.returncode == 141
    assert result.stderr == ""


def test_ui_command_is_sized_for_the_machine(tmp_path: Path) -> None:
    out = sdft(tmp_path, "ui").stdout.strip()
    assert out.startswith("env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui ")
    assert "--workers " in out and str(tmp_path) in out
