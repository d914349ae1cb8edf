"""The registry against a real `mlflow server` (SQLite in a temporary folder, started through mlflow/server.sh):
gate promotions, the promote / rollback / approve commands and their audit records, two promotions racing, and a
server that stops answering half-way through a registration.

Versions are registered directly through `pipeline.registry` with a small saved LoRA (no training), each test under
its own model name on one shared server.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from flows.cli import main as sdft
from pipeline import registry
from tests.mlflow_server import MlflowServer, client_env, free_port, save_test_adapter

GATE_MD = "**Gate: PROMOTE** (candidate vs base model (untuned)). Promoted: improves val_loss.\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), workers=2).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    return save_test_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def name(server: MlflowServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """This test's registered model name, with the environment pointing at the shared server."""
    for key, value in client_env(server.uri).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SDFT_USER", "alice")
    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:60]


def new_version(name: str, adapter: Path, base: Path, expected: str | None, approval: str = "auto") -> str:
    run_id = registry.start_run("test", {}, {})
    registry.log_metrics(run_id, {"eval.val_loss": 0.25})
    return registry.register(
        run_id, adapter, str(base), name, expected, GATE_MD, {"sdft.decision": "promote"}, approval, "beat the base"
    )


def logged_run(adapter: Path, base: Path) -> tuple[str, str, str]:
    """A run with the adapter logged in it (what `register` does before creating the version): (run, uri, model)."""
    import mlflow.diffusers

    run_id = registry.start_run("claimant", {}, {})
    info = mlflow.diffusers.log_model(str(adapter), base_model=str(base), name="model", run_id=run_id)
    return run_id, info.model_uri, info.model_id


def aliases(name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in registry.client().get_registered_model(name).aliases.items()}


def tags(name: str, version: str) -> dict[str, str]:
    return dict(registry.client().get_model_version(name, version).tags)


def test_gate_promotions_move_champion_keep_previous_and_audit(name: str, adapter: Path, tiny_model: Path) -> None:
    assert registry.champion(name) is None
    assert new_version(name, adapter, tiny_model, None) == "1"
    assert aliases(name) == {"champion": "1"}
    assert new_version(name, adapter, tiny_model, "1") == "2"
    assert aliases(name) == {"champion": "2", "previous-champion": "1"}
    version = registry.client().get_model_version(name, "2")
    assert version.description == GATE_MD  # the gate report travels with the version
    assert version.tags["sdft.promotion"] == "promoted" and version.tags["sdft.expected_champion"] == "1"

    (record,) = registry.audit_trail(name, "2")
    assert record["action"] == "promote" and record["by"] == "gate" and record["who"] == "alice"
    assert record["why"] == "beat the base" and record["previous"] == "1" and record["version"] == "2"
    assert datetime.fromisoformat(record["when"]).tzinfo is not None  # UTC, ISO 8601
    assert [r["version"] for r in registry.audit_trail(name)] == ["1", "2"]

    # Compared with version 1, but the champion is 2 now: refused before anything is written.
    with pytest.raises(registry.StaleBaseline, match="changed from version 1 to version 2"):
        new_version(name, adapter, tiny_model, "1")
    assert len(registry.client().search_model_versions(f"name='{name}'")) == 2


def test_promote_rollback_and_models_commands(name: str, adapter: Path, tiny_model: Path, capsys) -> None:  # noqa: ANN001
    new_version(name, adapter, tiny_model, None)
    new_version(name, adapter, tiny_model, "1")

    assert sdft(["promote", "1", "--reason", "v2 draws blotches", "--name", name]) == 0
    assert aliases(name) == {"champion": "1", "previous-champion": "2"}
    last = registry.audit_trail(name, "1")[-1]
    assert (last["action"], last["by"], last["who"], last["why"]) == (
        "promote",
        "manual override",
        "alice",
        "v2 draws blotches",
    )
    assert last["previous"] == "2"
    assert registry.audit_trail(name, "2")[-1] == last  # on both versions involved

    assert sdft(["rollback", "--reason", "the override was wrong", "--name", name]) == 0
    assert aliases(name) == {"champion": "2"}
    assert tags(name, "1")["sdft.promotion"] == "rolled-back"
    assert registry.audit_trail(name)[-1]["action"] == "rollback"
    capsys.readouterr()

    # Nothing left to roll back to: a clear error, and nothing moves.
    assert sdft(["rollback", "--name", name]) == 1
    assert "no 'previous-champion' alias" in capsys.readouterr().err
    assert sdft(["promote", "7", "--reason", "x", "--name", name]) == 1
    assert "has no version '7' (versions: 1, 2)" in capsys.readouterr().err
    assert sdft(["promote", "2", "--reason", "x", "--name", name]) == 1
    assert "already the champion" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a manual override always says why
        sdft(["promote", "1", "--name", name])
    assert aliases(name) == {"champion": "2"}

    assert sdft(["models", "--name", name]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.strip().startswith("2 "))
    assert "champion" in row and "promoted" in row and "0.25" in row and "rollback by alice" in row


def test_manual_approval_mode(name: str, adapter: Path, tiny_model: Path, capsys) -> None:  # noqa: ANN001
    new_version(name, adapter, tiny_model, None)
    assert new_version(name, adapter, tiny_model, "1", approval="manual") == "2"
    assert aliases(name) == {"champion": "1", "challenger": "2"}  # the gate did not move champion
    assert registry.audit_trail(name, "2")[-1]["action"] == "challenge"

    assert sdft(["approve", "--reason", "samples look right", "--name", name]) == 0
    assert aliases(name) == {"champion": "2", "previous-champion": "1"}
    assert registry.audit_trail(name, "2")[-1]["action"] == "approve"
    assert sdft(["approve", "--reason", "again", "--name", name]) == 1
    assert "no 'challenger'" in capsys.readouterr().err

    # A challenger compared with version 2; then a person moves the champion: approving it is refused.
    new_version(name, adapter, tiny_model, "2", approval="manual")
    assert sdft(["promote", "1", "--reason", "hotfix", "--name", name]) == 0
    assert sdft(["approve", "3", "--reason", "ok", "--name", name]) == 1
    err = capsys.readouterr().err
    assert "compared with version 2, but the champion is now version 1" in err
    assert aliases(name) == {"champion": "1", "previous-champion": "2", "challenger": "3"}
    # Only a challenger can be approved; anything else is a manual override.
    assert sdft(["approve", "2", "--reason", "ok", "--name", name]) == 1
    assert "is not a challenger" in capsys.readouterr().err


def test_two_racing_promotions_exactly_one_wins(name: str, adapter: Path, tiny_model: Path) -> None:
    new_version(name, adapter, tiny_model, None)
    runs = [registry.start_run("racer", {}, {}) for _ in range(2)]
    start = threading.Barrier(2)
    results: dict[int, str | Exception] = {}

    def race(i: int) -> None:
        start.wait()
        try:
            results[i] = registry.register(runs[i], adapter, str(tiny_model), name, "1", GATE_MD, {}, "auto", "race")
        except Exception as exc:  # noqa: BLE001 - collected and checked below
            results[i] = exc

    threads = [threading.Thread(target=race, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    won = [r for r in results.values() if isinstance(r, str)]
    lost = [r for r in results.values() if isinstance(r, Exception)]
    assert len(won) == 1 and len(lost) == 1, results
    assert isinstance(lost[0], registry.StaleBaseline), lost[0]
    assert "registered but not promoted" in str(lost[0])
    loser = ({"2", "3"} - set(won)).pop()
    assert aliases(name) == {"champion": won[0], "previous-champion": "1"}
    assert tags(name, loser)["sdft.promotion"] == "stale"
    assert "not promoted" in tags(name, loser)["sdft.stale_reason"]


def test_claim_goes_to_the_first_registered_whatever_the_timing(name: str, adapter: Path, tiny_model: Path) -> None:
    """Both versions exist before either claims, and the later one claims first, while the champion is still the
    one both expect: a check-then-move would promote it. The lower version must win instead."""
    new_version(name, adapter, tiny_model, None)
    c = registry.client()
    created = []
    for claim in ("first", "second"):
        run_id, source, model_id = logged_run(adapter, tiny_model)
        tags_ = {"sdft.expected_champion": "1", "sdft.claim": claim, "sdft.promotion": "pending"}
        created.append(c.create_model_version(name, source, run_id=run_id, tags=tags_, model_id=model_id))
    first, second = created
    with pytest.raises(registry.StaleBaseline, match=f"version {first.version} was registered first"):
        registry.claim_and_promote(c, name, second, "1", "second", "test")
    assert aliases(name) == {"champion": "1"}
    registry.claim_and_promote(c, name, first, "1", "first", "test")
    assert aliases(name) == {"champion": str(first.version), "previous-champion": "1"}

    # A registration that died after creating its version (its run ended) blocks nobody.
    dead_run, source, model_id = logged_run(adapter, tiny_model)
    tags_ = {"sdft.expected_champion": str(first.version), "sdft.claim": "dead", "sdft.promotion": "pending"}
    c.create_model_version(name, source, run_id=dead_run, tags=tags_, model_id=model_id)
    registry.end_run(dead_run, "FAILED")
    winner = new_version(name, adapter, tiny_model, str(first.version))
    assert aliases(name)["champion"] == winner


def test_unreachable_server_retries_then_names_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for key, value in client_env(uri).items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(registry.RegistryUnavailable) as error:
        registry.champion("anything")
    assert time.monotonic() - started >= 0.2 + 0.4  # backoff 0.2 s, then 0.4 s, between the 3 attempts
    assert f"tracking server at {uri} did not answer after 3 attempts" in str(error.value)
    assert sdft(["rollback", "--name", "anything"]) == 1
    assert uri in capsys.readouterr().err


class Plug:
    """A TCP forwarder in front of the server that is pulled right after MLflow answers the version-creation
    request: from then on every connection is cut and new ones are refused, as when a server dies half-way."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.created = threading.Event()
        self.pulled = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.pulled.is_set():
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [downstream, upstream]
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.created.is_set() and re.match(rb"(GET|POST|PATCH|DELETE) ", data):
                    self.pull()  # the next request after the version was created never reaches the server
                    return
                if from_client and b"/model-versions/create" in data:
                    self.created.set()
                sink.sendall(data)
        except OSError:
            return

    def pull(self) -> None:
        self.pulled.set()
        for s in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_server_dying_mid_registration_moves_no_alias(
    name: str, server: MlflowServer, adapter: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_version(name, adapter, tiny_model, None)
    run_id = registry.start_run("interrupted", {}, {})
    plug = Plug(server.port)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{plug.port}")
    with pytest.raises(registry.RegistryUnavailable, match=f"tracking server at http://127.0.0.1:{plug.port}"):
        registry.register(run_id, adapter, str(tiny_model), name, "1", GATE_MD, {}, "auto", "interrupted")
    assert plug.pulled.is_set()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # the server is back
    assert aliases(name) == {"champion": "1"}  # nothing moved
    assert tags(name, "2")["sdft.promotion"] == "pending"  # created, never promoted, no alias
    # The flow ends an interrupted run as FAILED; from then on the dead registration blocks no one.
    registry.end_run(run_id, "FAILED")
    assert new_version(name, adapter, tiny_model, "1") == "3"
    assert aliases(name) == {"champion": "3", "previous-champion": "1"}
