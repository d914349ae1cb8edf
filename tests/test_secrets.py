"""Credentials in a URI (`http://user:password@host`) never reach what sdft shows or stores: messages, logs, reports,
tags, artifacts, printed commands. Fast checks of the one helper (`env.redact`) and of `env.configure`, then a full
retrain against a real MLflow server with basic auth, its password in MLFLOW_TRACKING_URI, after which no file of the
project, the Prefect database or the tracking server, and nothing printed, holds the password."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import env, lineage, registry
from tests.conftest import FAST, new_project, sdft_env
from tests.mlflow_server import MlflowServer

SECRET = "s3cret-Pa55word"
SLOW_START = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}  # a busy shared test machine


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://alice:pw@host:5000/x", "http://host:5000/x"),
        ("https://token@host", "https://host"),
        ("postgresql://u:p@db/mlflow and http://a:b@c", "postgresql://db/mlflow and http://c"),
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("see http://host/a@b", "see http://host/a@b"),  # an @ in the path is not user info
        ("no uri, mail@example.com", "no uri, mail@example.com"),
    ],
)
def test_redact_strips_user_info_only(text: str, shown: str) -> None:
    assert env.redact(text) == shown


def test_configure_moves_uri_credentials_to_mlflow_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://pipeline:{SECRET}%40x@127.0.0.1:5999")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # set by configure: undone after the test
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    env.configure()
    assert env.tracking_uri() == "http://127.0.0.1:5999"
    assert (env.os.environ["MLFLOW_TRACKING_USERNAME"], env.os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "pipeline",
        f"{SECRET}@x",
    )
    assert SECRET not in registry.server()


def test_lineage_git_remote_has_no_token(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    url = f"https://ci:{SECRET}@git.example.com:8443/team/project.git"
    subprocess.run(["git", "remote", "add", "origin", url], cwd=tmp_path, check=True)
    assert lineage.git_remote(tmp_path) == "https://git.example.com:8443/team/project.git"


@pytest.mark.slow
def test_retrain_with_password_in_tracking_uri_leaks_it_nowhere(tmp_path: Path, tiny_model: Path) -> None:
    from mlflow.server import get_app_client

    server = MlflowServer(tmp_path / "server", auth_admin_password="admin-password-for-tests").start()
    try:
        admin = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "admin-password-for-tests"}
        with pytest.MonkeyPatch.context() as mp:
            for key, value in admin.items():
                mp.setenv(key, value)
            get_app_client("basic-auth", tracking_uri=server.uri).create_user("pipeline", SECRET)
        quick = FAST | {"train.max_steps": 2, "train.validation_every": 1, "evaluate.num_inference_steps": 2}
        project = new_project(tmp_path / "project", tiny_model, quick)
        uri = f"http://pipeline:{SECRET}@127.0.0.1:{server.port}"
        run = subprocess.run(
            [sys.executable, "-m", "flows.cli", "--project", str(project), "run"],
            cwd=project,
            env=sdft_env(project) | {"MLFLOW_TRACKING_URI": uri, "SDFT_USER": "ci-bot"} | SLOW_START,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "MLflow run: " in run.stdout  # it authenticated with the URI's credentials (a 401 fails the run)
        assert "PROMOTED" in run.stdout or "REJECTED" in run.stdout  # either: 4 steps may not beat the base
        assert SECRET not in run.stdout and SECRET not in run.stderr
        prefect_db = b"".join(p.read_bytes() for p in (project / ".prefect").glob("prefect.db*"))  # with its WAL
        assert f"http://127.0.0.1:{server.port}/#/experiments/".encode() in prefect_db  # the gate report's links
    finally:
        server.stop()
    leaks = [
        path
        for folder in (project, server.root)
        for path in folder.rglob("*")
        if path.is_file() and SECRET.encode() in path.read_bytes()
    ]
    assert leaks == []
