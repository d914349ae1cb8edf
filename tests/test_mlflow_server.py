"""The retrain flow against a real tracking server over HTTP (`mlflow/server.sh` on loopback, SQLite and artifacts in
a temporary folder), in a real git repo with DVC, on the tiny model. One full retrain; the tests below share it and
run in this order:

1. the promoted version carries its lineage, the gate report (description and run artifacts) and the dataset input;
2. `sdft lineage` prints commands that, run as printed in a fresh clone, rebuild the same adapter tensors;
3. a person rolls the champion back while a second retrain registers: the retrain ends as a clear `stale` rejection;
4. the server stops: the next retrain fails, naming the server, and nothing in the store changed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import lineage, promotion, registry
from tests.conftest import FAST, MODEL, new_project, sdft_env
from tests.mlflow_server import MlflowServer, Tap, client_env

pytestmark = pytest.mark.slow


def sdft(project: Path, uri: str, *args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = sdft_env(project) | {"MLFLOW_TRACKING_URI": uri, "SDFT_USER": "ci-bot"} | (extra or {})
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", str(project), *args],
        cwd=project,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):  # noqa: ANN201
    """A project whose first retrain ran against the server over HTTP: (server, project, stdout)."""
    root = tmp_path_factory.mktemp("served")
    server = MlflowServer(root / "server").start()
    project = new_project(root / "project", tiny_model, FAST)
    # A remote, so the lineage's `git clone` line is runnable as printed (here: the project folder itself).
    subprocess.run(["git", "remote", "add", "origin", str(project)], cwd=project, check=True)
    first = sdft(project, server.uri, "run")
    assert first.returncode == 0, first.stderr[-3000:]
    yield server, project, first.stdout
    server.stop()


@pytest.fixture
def http(served, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    server, project, _ = served
    for key, value in client_env(server.uri).items():
        monkeypatch.setenv(key, value)
    return registry.client()


def test_flow_over_http_registers_lineage_gate_report_and_dataset(served, http) -> None:  # noqa: ANN001
    server, project, stdout = served
    assert "PROMOTED: registered as version 1" in stdout
    assert "mlflow ui" not in stdout  # a server is configured: no local-store hint
    champion = http.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    tags = champion.tags
    run = http.get_run(champion.run_id)

    # Lineage: code, stages, data, params, base model, runs, evaluation set, adapter.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["sdft.git.dirty"] == "false"
    assert tags["sdft.git.remote"] == str(project)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    for stage in ("prepare", "train", "evaluate"):
        outs = lock["stages"][stage]["outs"]
        assert tags[f"sdft.dvc.{stage}.outs"] == ",".join(f"{o['path']}:{o['md5']}" for o in outs)
    identity = json.loads((project / "reports" / "data_validation.json").read_text())["identity"]
    assert tags["sdft.data.source_digest"] == identity["source_digest"]
    assert tags["sdft.data.prepared_digest"] == identity["prepared_digest"]
    assert tags["sdft.params_hash"] == lineage.file_sha256(project / "params.yaml")
    assert (tags["sdft.base_model"], tags["sdft.base_model_revision"]) == ("models/tiny-sd", "")
    assert tags["sdft.run_id"] == champion.run_id
    # The Prefect flow run: a UUID, the same one the MLflow run was tagged with when it opened.
    assert re.fullmatch(r"[0-9a-f-]{36}", tags["sdft.prefect_flow_run_id"])
    assert tags["sdft.prefect_flow_run_id"] == run.data.tags["sdft.prefect_flow_run_id"]
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert tags["sdft.eval_set_hash"] == metrics["evaluation"]["eval_set_hash"]
    assert {k: tags[k] for k in lineage.adapter_digests(project / "models" / "adapter")} == lineage.adapter_digests(
        project / "models" / "adapter"
    )
    assert (tags["sdft.expected_champion"], tags["sdft.promotion"], tags["sdft.approval"]) == (
        "none",
        "promoted",
        "auto",
    )
    (audit,) = registry.audit_trail(MODEL, "1")
    assert (audit["action"], audit["by"], audit["who"]) == ("promote", "gate", "ci-bot")

    # The gate report: the version's description, and gate.md + gate.json on the run, with matching run tags.
    gate_md = (project / "reports" / "gate.md").read_text()
    gate = json.loads((project / "reports" / "gate.json").read_text())
    assert champion.description == gate_md and gate_md.startswith("**Gate: PROMOTE**")
    assert "| val_loss | primary |" in gate_md
    artifacts = http.download_artifacts(champion.run_id, "gate", str(project / ".sdft" / "downloaded"))
    assert Path(artifacts, "gate.md").read_text() == gate_md
    assert json.loads(Path(artifacts, "gate.json").read_text()) == gate
    assert gate["promote"] is True and gate["baseline_kind"] == "base" and gate["champion_version"] is None
    assert run.data.tags["sdft.decision"] == "promote" and run.data.tags["sdft.model_version"] == "1"
    assert run.data.tags["sdft.baseline"] == gate["baseline_source"]
    assert run.info.status == "FINISHED"

    # The prepared data, as the run's dataset input.
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "demo"
    assert dataset_input.dataset.digest == identity["prepared_digest"][:10]
    assert json.loads(dataset_input.dataset.profile)["prepared_digest"] == identity["prepared_digest"]
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"

    listing = sdft(project, server.uri, "models")
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"^\s+1\s+champion\s+promoted\s+none\s+\d", listing.stdout, re.M), listing.stdout


def test_lineage_commands_rebuild_the_same_adapter(served, http, tmp_path: Path) -> None:  # noqa: ANN001
    server, project, _ = served
    shown = sdft(project, server.uri, "lineage", f"models:/{MODEL}/1")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    tags = http.get_model_version(MODEL, "1").tags
    assert tags["sdft.prefect_flow_run_id"] in text and tags["mlflow.source.git.commit"] in text
    commands = [line[2:] for line in text.split("Reproduce (in a shell, from any folder):\n")[1].splitlines()]
    assert commands[1] == f"git checkout {tags['mlflow.source.git.commit']}"
    assert any(c.startswith("dvc repro") for c in commands)

    # Exactly the printed commands, in a shell, from an empty folder. One line more: this project was trained from
    # the random tiny model built in code, not the shipped base `sdft init` installs, so the same base is brought in
    # first (a real user has their base.model folder or hub id already).
    environment = sdft_env(tmp_path) | {"MLFLOW_TRACKING_URI": server.uri}
    commands = [*commands[:2], f"mkdir -p models && cp -r {project / 'models' / 'tiny-sd'} models/", *commands[2:]]
    script = "set -euo pipefail\n" + "\n".join(commands) + "\n"
    rebuilt = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1200
    )
    assert rebuilt.returncode == 0, rebuilt.stdout[-3000:] + rebuilt.stderr[-3000:]
    assert "REPRODUCED" in rebuilt.stdout, rebuilt.stdout
    # Training on CPU is bitwise deterministic: the tensors are identical, not merely close.
    clone = tmp_path / "sdft-v1"
    again = lineage.adapter_digests(clone / "models" / "adapter")
    assert again["sdft.adapter_tensors_sha256"] == tags["sdft.adapter_tensors_sha256"]
    # The file bytes may differ only in the safetensors header (metadata order); report what happened.
    print("adapter file sha256 equal:", again["sdft.adapter_sha256"] == tags["sdft.adapter_sha256"])


def test_champion_moved_during_registration_ends_as_a_stale_rejection(served, http) -> None:  # noqa: ANN001
    server, project, _ = served
    # Version 2 becomes champion; the gate's cache says it measures like the untuned base model (run 1's numbers),
    # so the next retrain's candidate (run 1's adapter again: DVC has nothing to redo) beats it.
    run_id = registry.start_run("manual registration", {}, {})
    adapter, base = project / "models" / "adapter", str(project / "models" / "tiny-sd")
    assert registry.register(run_id, adapter, base, MODEL, "1", "by hand", {}, "auto", "test setup") == "2"
    registry.end_run(run_id)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    samples = json.loads((project / "reports" / "eval" / "samples.json").read_text())
    eval_hash = metrics["evaluation"]["eval_set_hash"]
    champion = registry.champion(MODEL)
    assert champion is not None and champion.version == "2"
    promotion.write_baseline_cache(project, MODEL, champion, eval_hash, metrics["base"], samples["base"])

    # A person rolls back to version 1 at the moment the retrain creates its version (after its checks passed).
    tap = Tap(server.port, b"/model-versions/create", lambda: registry.rollback(MODEL, "v2 misbehaves in prod"))
    second = sdft(project, tap.uri, "run")
    tap.close()
    assert tap.fired.is_set() and not tap.errors, tap.errors
    assert second.returncode == 0, second.stderr[-3000:]
    assert "REJECTED: version 3 was registered but not promoted: the champion moved from version 2 to version 1" in (
        second.stdout
    )
    aliases = {a: str(v) for a, v in http.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"champion": "1"}  # the rollback stands; nothing points to version 3
    v3 = http.get_model_version(MODEL, "3")
    assert v3.tags["sdft.promotion"] == "stale" and "champion moved" in v3.tags["sdft.stale_reason"]
    run = http.get_run(v3.run_id)
    assert run.data.tags["sdft.decision"] == "stale" and run.data.tags["sdft.model_version"] == ""
    assert "champion moved" in run.data.tags["sdft.stale_reason"] and run.info.status == "FINISHED"
    assert registry.audit_trail(MODEL)[-1]["action"] == "rollback"


def test_stopped_server_fails_the_retrain_and_changes_nothing(served) -> None:  # noqa: ANN001
    from mlflow.tracking import MlflowClient

    server, project, _ = served
    store = MlflowClient(f"sqlite:///{server.root / 'mlflow.db'}")  # the server's own database, read directly

    def state() -> tuple:
        model = store.get_registered_model(MODEL)
        versions = store.search_model_versions(f"name='{MODEL}'")
        runs = store.search_runs([store.get_experiment_by_name("sdft").experiment_id])
        return dict(model.aliases), sorted((v.version, v.tags.get("sdft.promotion")) for v in versions), len(runs)

    server.stop()
    before = state()
    gate_json = (project / "reports" / "gate.json").read_bytes()
    quick = {k: v for k, v in client_env(server.uri).items() if k != "MLFLOW_TRACKING_URI"}
    failed = sdft(project, server.uri, "run", extra=quick)
    assert failed.returncode == 1
    assert "nothing was promoted" in failed.stderr
    assert f"tracking server at {server.uri} did not answer" in failed.stderr, failed.stderr[-2000:]
    assert state() == before
    assert (project / "reports" / "gate.json").read_bytes() == gate_json  # it stopped before the gate
