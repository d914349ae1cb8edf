"""A failing stage under `sdft run`: one clear error line with the stage's own exit status and its log (not DVC's
255, no traceback), the stage's own message once, and its last good outputs put back (`dvc checkout`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_dvc, sdft_env, set_params


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_stage_exit_status_is_read_from_dvcs_message() -> None:
    from flows.retrain import stage_exit_code

    dvc_err = "ERROR: failed to reproduce 'prepare': failed to run: python -m pipeline.prepare ..., exited with 2\n"
    assert stage_exit_code(dvc_err, 255) == 2
    assert stage_exit_code("ERROR: you are not inside of a DVC repository\n", 253) == 253  # DVC's own failure


@pytest.mark.slow  # a real flow on a temporary Prefect server, and the prepare stage twice
def test_a_failed_stage_is_reported_once_with_its_exit_status_and_its_outputs_restored(make_project) -> None:
    project = make_project()
    assert run_dvc(project, "init", "-q").returncode == 0  # as the flow's first run does
    done = run_dvc(project, "repro", "prepare")
    assert done.returncode == 0, done.stderr[-3000:]
    before = files(project / "data" / "prepared")

    (project / "data" / "demo" / "images" / "broken.png").write_bytes(b"not a png")
    with open(project / "data" / "demo" / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "images/broken.png", "text": "a broken file"}) + "\n")
    set_params(project, {"data.on_invalid": "fail"})
    failed = subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "run"],
        cwd=project,
        env=sdft_env(project) | {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"},  # a busy test machine
        capture_output=True,
        text=True,
        timeout=1200,
    )

    assert failed.returncode == 1
    logs = project / ".sdft" / "logs"
    said = failed.stdout + failed.stderr
    assert (
        f"error: the retrain failed, nothing was promoted: stage 'prepare' failed (exit 1); its output: "
        f"{logs / 'prepare.out'} and {logs / 'prepare.err'}"
    ) in failed.stderr, said[-4000:]
    assert "Traceback" not in said and "exit 255" not in said
    assert said.count("data.on_invalid is 'fail'") == 1  # the stage's own message, once
    assert files(project / "data" / "prepared") == before  # DVC had removed it; the flow checked it out again
