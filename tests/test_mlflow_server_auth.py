"""MLflow's basic auth in front of the registry (`MLFLOW_AUTH=1 mlflow/server.sh`, mlflow/basic_auth.ini): the
pipeline authenticates with MLFLOW_TRACKING_USERNAME / PASSWORD, and a user with READ on the registered model can
look at the champion but cannot move it (403). Versions are registered directly through `pipeline.registry`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from flows.cli import main as sdft
from pipeline import registry
from tests.mlflow_server import MlflowServer, client_env, save_test_adapter

ADMIN_PASSWORD = "admin-password-for-tests"
USERS = {"pipeline": "pipeline-password-1", "viewer": "viewer-password-12"}
MODEL = "guarded"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    srv = MlflowServer(tmp_path_factory.mktemp("auth-server"), auth_admin_password=ADMIN_PASSWORD).start()
    yield srv
    srv.stop()


def login(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None = None) -> None:
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def test_pipeline_user_promotes_and_a_reader_cannot_move_the_champion(
    server: MlflowServer, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # noqa: ANN001
    from mlflow.server import get_app_client

    for key, value in client_env(server.uri).items():
        monkeypatch.setenv(key, value)
    adapter = save_test_adapter(tiny_model, tmp_path / "adapter")

    login(monkeypatch, "admin", ADMIN_PASSWORD)
    auth = get_app_client("basic-auth", tracking_uri=server.uri)
    for user, password in USERS.items():
        auth.create_user(user, password)

    # The pipeline, as its own user: creates the experiment and the model (so it manages them) and promotes twice.
    login(monkeypatch, "pipeline", USERS["pipeline"])
    for expected in (None, "1"):
        run_id = registry.start_run("retrain", {}, {})
        registry.register(run_id, adapter, str(tiny_model), MODEL, expected, "gate", {}, "auto", "passed the gate")
    assert registry.champion(MODEL).version == "2"
    assert registry.audit_trail(MODEL, "2")[-1]["who"]  # the OS user (SDFT_USER unset), not the MLflow login

    login(monkeypatch, "admin", ADMIN_PASSWORD)
    auth.grant_user_permission("viewer", "registered_model", MODEL, "READ")

    # The reader sees the champion, and is refused when moving it: by the server, with nothing changed.
    login(monkeypatch, "viewer", USERS["viewer"])
    assert registry.champion(MODEL).version == "2"
    with pytest.raises(MlflowException) as refused:
        registry.promote_version(MODEL, "1", "I prefer the old one")
    assert refused.value.error_code == "PERMISSION_DENIED" and refused.value.get_http_status_code() == 403
    assert sdft(["rollback", "--reason", "no", "--name", MODEL]) == 1
    assert "refused (PERMISSION_DENIED)" in capsys.readouterr().err

    # Without credentials, or with a wrong password, nothing can be read either.
    for user, password in ((None, None), ("pipeline", "not-the-password")):
        login(monkeypatch, user, password)
        with pytest.raises(MlflowException) as anonymous:
            registry.champion(MODEL)
        assert anonymous.value.get_http_status_code() == 401

    login(monkeypatch, "pipeline", USERS["pipeline"])
    aliases = {a: str(v) for a, v in registry.client().get_registered_model(MODEL).aliases.items()}
    assert aliases == {"champion": "2", "previous-champion": "1"}
    assert [r["action"] for r in registry.audit_trail(MODEL)] == ["promote", "promote"]
