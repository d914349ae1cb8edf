"""A stopped command takes its helpers with it: SIGTERM to `sdft run` during start-up stops Prefect's temporary
server, and SIGTERM to the prepare stage stops its worker processes. Real processes: start, SIGTERM, then check
that no child of the stopped process is still alive."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.conftest import sdft_env

pytestmark = pytest.mark.slow  # each starts real process trees: 10-60 s on 2 busy cores


def stop_and_check(command: list[str], cwd: Path, env: dict[str, str], ready: Callable[[list], bool]) -> None:
    """Start `command`, wait until `ready(its descendants)`, SIGTERM it alone, and assert no descendant survives."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    parent = psutil.Process(process.pid)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            children = parent.children(recursive=True)
            if ready(children):
                break
            time.sleep(0.2)
        assert process.poll() is None and ready(children), process.stdout.read().decode()[-3000:]
        time.sleep(1)
        children = parent.children(recursive=True)  # all of them, just before the signal
        process.send_signal(signal.SIGTERM)  # to the parent only, as a supervisor or `kill <pid>` does
        process.wait(timeout=120)
        _, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], [" ".join(p.cmdline()) for p in alive]
    finally:
        for proc in children:  # never leave them to other tests
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_sigterm_to_sdft_run_during_start_up_stops_the_temporary_prefect_server(make_project) -> None:
    project = make_project()
    stop_and_check(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "run"],
        project,
        sdft_env(project),
        lambda children: any("uvicorn" in cmdline(c) for c in children),
    )


def test_sigterm_to_prepare_stops_its_workers(tmp_path: Path) -> None:
    source = tmp_path / "raw"
    source.mkdir()
    rows = []
    for i in range(400):
        pixels = np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(source / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (source / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    repo = Path(__file__).resolve().parents[1]
    command = [
        sys.executable, "-m", "pipeline.prepare", "--params", str(repo / "params.yaml"), "--source", str(source),
        "--out", str(tmp_path / "prepared"), "--report", str(tmp_path / "report.json"),
        "--cache", str(tmp_path / "cache"), "--workers", "2",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(repo)}
    stop_and_check(command, tmp_path, env, lambda children: sum("spawn_main" in cmdline(c) for c in children) >= 2)
