"""A retrain killed during training (every process of it, SIGKILL, as when a machine or pod dies) and run again
resumes: DVC skips the stage that completed, the train stage resumes from its newest checkpoint, and the run
finishes and promotes. About one and a half retrains (2-4 minutes on 2 busy cores)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.checkpoint import step_dirs
from tests.conftest import new_project, run_sdft, sdft_env
from tests.test_retrain_e2e import FAST

pytestmark = pytest.mark.slow


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once: no handler, hook or `finally` runs."""
    parent = psutil.Process(pid)
    tree = [*parent.children(recursive=True), parent]
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(tree, timeout=30)


def test_killed_retrain_resumes_training_from_its_last_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    overrides = FAST | {"train.max_steps": 100, "train.checkpoint_every": 20, "train.validation_every": 20}
    project = new_project(tmp_path / "project", tiny_model, overrides)
    checkpoints = project / "models" / "checkpoints"
    log = open(tmp_path / "killed.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "run"],
        cwd=project,
        env=sdft_env(project),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 900
        while not any(step >= 40 for step, _ in step_dirs(checkpoints)):
            assert first.poll() is None, (
                "the retrain ended before it could be killed:\n" + ((tmp_path / "killed.log").read_text()[-3000:])
            )
            assert time.monotonic() < deadline, "no checkpoint at step 40 within 900 s"
            time.sleep(0.5)
    finally:
        kill_tree(first.pid)
        log.close()
    killed_at = max(step for step, _ in step_dirs(checkpoints))
    assert 40 <= killed_at < 100
    assert not (project / "reports" / "metrics.json").exists()  # killed before evaluate

    second = run_sdft(project, "run", timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "PROMOTED" in second.stdout
    logs = project / ".sdft" / "logs"
    assert "Stage 'prepare' didn't change, skipping" in (logs / "prepare.out").read_text()
    train_log = (logs / "train.out").read_text()
    resumed = re.search(r"resumed from \S*step-(\d+) \(step (\d+)\)", train_log)
    assert resumed, train_log[-3000:]
    assert int(resumed.group(2)) == killed_at  # the newest complete checkpoint, not step 0
    assert "starting fresh" not in train_log
    summary = json.loads((project / "reports" / "train" / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at
    history = [json.loads(line) for line in (project / ".sdft" / "history.jsonl").read_text().splitlines()]
    assert [h["outcome"] for h in history] == ["promoted"]  # the killed run could record nothing
