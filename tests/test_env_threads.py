"""torch's CPU threads per process: OMP_NUM_THREADS when set, else the cores divided by the processes on the machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import env

CORES = len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("omp", "local_world_size", "expected"),
    [
        ("3", "2", 3),  # the user's setting wins
        (None, None, CORES),
        (None, "2", max(1, CORES // 2)),  # accelerate launch with 2 processes
        (None, str(CORES * 4), 1),  # never 0
        ("", "bad", CORES),  # unusable values are ignored
    ],
)
def test_threads_per_process(
    monkeypatch: pytest.MonkeyPatch, omp: str | None, local_world_size: str | None, expected: int
) -> None:
    for key, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local_world_size)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert env.threads_per_process() == expected


def test_a_stage_process_gets_its_share_of_the_cores() -> None:
    script = "import torch; from pipeline import env; env.configure(); print(torch.get_num_threads())"
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "MKL_NUM_THREADS")}
    clean["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    for extra, expected in (({"LOCAL_WORLD_SIZE": str(CORES)}, 1), ({"OMP_NUM_THREADS": "1"}, 1), ({}, CORES)):
        done = subprocess.run([sys.executable, "-c", script], env=clean | extra, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert int(done.stdout.split()[-1]) == expected, extra
