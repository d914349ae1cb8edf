"""The scheduled retrain against a real `prefect server start` on 127.0.0.1 (SQLite, PREFECT_HOME in tmp).

- `prefect deploy --all` registers prefect.yaml's deployment with its schedules, parameters and work pool;
- `sdft serve` (in a background process) serves it: a run triggered through the API completes and promotes, a data
  trigger with unchanged data completes as Skipped, two simultaneous triggers never hold the workspace together, and
  a stage that outruns its timeout is stopped (no process left) and reported through the failure hook;
- notifications arrive at a webhook on 127.0.0.1, directly and through a Prefect notification block.
Costs one full retrain (about 1-4 minutes on 2 busy cores) plus a few short runs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from flows.serve import free_port, local_server
from flows.trigger import data_identity, history, record, workspace_name
from tests.conftest import new_project, sdft_env, set_params
from tests.test_flow_trigger import Receiver
from tests.test_retrain_e2e import FAST, MODEL, runs

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "retrain/scheduled"
LOCKED_TASKS = ("check data", "dvc repro", "dvc push", "log reports", "gate", "register")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server on a free loopback port, for this module."""
    home = tmp_path_factory.mktemp("prefect-home")
    with local_server(home, free_port(0), home / "server.log") as url:
        yield url


@contextmanager
def client(url: str) -> Iterator[Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as c:
        yield c


def project_with_prefect_yaml(path: Path, tiny_model: Path, overrides: dict[str, Any], active: bool) -> Path:
    project = new_project(path, tiny_model, overrides)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for schedule in spec["deployments"][0]["schedules"]:
        schedule["active"] = active  # a real 6-hourly tick must not start a run in the middle of a test
    (project / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return project


def test_prefect_deploy_registers_the_deployment_and_a_process_worker_runs_it(
    api: str, tmp_path: Path, tiny_model: Path
) -> None:
    project = project_with_prefect_yaml(tmp_path / "project", tiny_model, {}, active=True)
    env = sdft_env(project) | {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "home")}
    prefect = [str(Path(sys.executable).parent / "prefect"), "--no-prompt"]
    for command in (["work-pool", "create", "sdft-process", "--type", "process"], ["deploy", "--all"]):
        done = subprocess.run([*prefect, *command], cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    with client(api) as c:
        deployment = c.read_deployment_by_name(DEPLOYMENT)
    assert deployment.work_pool_name == "sdft-process" and deployment.entrypoint == "flows/retrain.py:retrain"
    assert deployment.parameters == {"project": ".", "dry_run": False, "trigger": "schedule"}
    crons = {s.schedule.cron: (s.parameters, s.active) for s in deployment.schedules}
    assert crons == {"0 3 * * 1": ({"trigger": "schedule"}, True), "0 */6 * * *": ({"trigger": "data"}, True)}
    # A process worker starts the flow in the project folder `prefect deploy` ran in.
    (step,) = deployment.pull_steps
    assert step["prefect.deployments.steps.set_working_directory"]["directory"] == str(project)
    assert set(deployment.parameter_openapi_schema["properties"]) == {"project", "dry_run", "trigger"}

    # A process worker picks a run up and starts the flow there: a data trigger on data the (seeded) last retrain
    # saw, so it finishes as Skipped in seconds instead of retraining.
    seen = data_identity(project / "data" / "demo")
    record(project, {"outcome": "promoted", "data_identity": seen, "reason": "seeded by the test"})
    run = trigger(api, wait=False, trigger="data")
    worker = subprocess.Popen(
        [*prefect, "worker", "start", "--pool", "sdft-process", "--run-once"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        done = wait_final(api, run.id, timeout_s=300)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert done.state.name == "Skipped" and "data unchanged" in done.state.message, done.state
    assert history(project)[-1]["flow_run"] == str(run.id)
    # A worker deployment and a served one of the same name do not mix on one server (the served one would inherit
    # this one's pull steps): remove it before the tests that serve.
    with client(api) as c:
        c.delete_deployment(deployment.id)


@pytest.fixture(scope="module")
def served(api: str, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[dict[str, Any]]:
    """A project served by `sdft serve` against the module's server; webhook and block messages to one receiver."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    receiver = Receiver()
    with temporary_settings({PREFECT_API_URL: api}):
        CustomWebhookNotificationBlock(
            name="sdft-test", url=receiver.url, json_data={"text": "{{body}}", "via": "block", "subject": "{{subject}}"}
        ).save("sdft-test", overwrite=True)
    overrides = FAST | {
        "notify.webhook_url": receiver.url,
        "notify.block": "custom-webhook/sdft-test",
        "notify.events": ["promoted", "rejected", "failed", "skipped"],
    }
    project = project_with_prefect_yaml(tmp_path_factory.mktemp("served") / "project", tiny_model, overrides, False)
    env = sdft_env(project) | {"PREFECT_API_URL": api}
    log = open(project.parent / "serve.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "serve"],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (project.parent / "serve.log").read_text()[-3000:]
            try:
                with client(api) as c:
                    deployment = c.read_deployment_by_name(DEPLOYMENT)
                if deployment.parameters.get("project") == str(project):
                    break
            except Exception:  # noqa: BLE001 - not there yet (or still the prefect deploy one)
                pass
            assert time.monotonic() < deadline, "sdft serve did not create the deployment within 180 s"
            time.sleep(2)
        yield {"project": project, "receiver": receiver, "deployment": deployment, "log": project.parent / "serve.log"}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        receiver.close()


def trigger(api: str, wait: bool = True, **parameters: Any) -> Any:
    """Start a run of the served deployment through the API; with `wait`, return it in its final state."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        return run_deployment(DEPLOYMENT, parameters=parameters, timeout=900 if wait else 0, poll_interval=3)


def wait_final(api: str, flow_run_id: Any, timeout_s: float = 900) -> Any:
    deadline = time.monotonic() + timeout_s
    with client(api) as c:
        while True:
            run = c.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name} after {timeout_s} s"
            time.sleep(3)


def task_runs(api: str, flow_run_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client(api) as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def artifacts(api: str, flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with client(api) as c:
        found = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def messages(receiver: Receiver, flow_run_id: Any) -> list[dict[str, Any]]:
    """Webhook bodies about one flow run (direct ones carry the history entry; block ones only the text)."""
    run_id = str(flow_run_id)
    return [b for b in receiver.bodies if b.get("flow_run") == run_id or run_id in b.get("text", "")]


def mlflow(project: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def test_served_schedules_are_visible_through_the_api(api: str, served: dict[str, Any]) -> None:
    deployment = served["deployment"]
    assert {s.schedule.cron: s.parameters for s in deployment.schedules} == {
        "0 3 * * 1": {"trigger": "schedule"},
        "0 */6 * * *": {"trigger": "data"},
    }
    assert deployment.parameters == {"project": str(served["project"]), "dry_run": False, "trigger": "schedule"}


def test_api_run_promotes_then_unchanged_data_is_skipped(
    api: str, served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    project, receiver = served["project"], served["receiver"]
    first = trigger(api, trigger="data")  # no retrain recorded yet: the data is new
    assert first.state.is_completed() and first.state.name == "Completed", served["log"].read_text()[-4000:]

    c = mlflow(project, monkeypatch)
    champion = c.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    (run,) = runs(c)
    assert run.data.tags["sdft.trigger"] == "data" and run.data.tags["sdft.data_identity"]
    found = artifacts(api, first.id)
    report = found["gate-report"].data
    assert "PROMOTE" in report and f"/runs/{run.info.run_id})" in report
    assert f"/#/models/{MODEL}/versions/1)" in report
    history = found["retrain-history"]
    assert history.type == "table" and json.loads(history.data)[0]["outcome"] == "promoted"
    direct = [m for m in messages(receiver, first.id) if m.get("event")]
    assert [(m["event"], m["model_version"]) for m in direct] == [("promoted", "1")]
    assert any(m.get("via") == "block" and "promoted" in m["text"] for m in receiver.bodies)

    second = trigger(api, trigger="data")
    assert second.state.is_completed() and second.state.name == "Skipped"
    assert second.state.message.startswith("skipped: data unchanged since the retrain of")
    assert [t.name for t in task_runs(api, second.id) if t.name.startswith("dvc repro")] == []
    assert "retrain-skipped" in artifacts(api, second.id)
    assert [m["event"] for m in messages(receiver, second.id) if m.get("event")] == ["skipped"]
    assert len(runs(c)) == 1  # a skipped run opens no MLflow run


def _locked_interval(api: str, flow_run_id: Any) -> tuple[Any, Any]:
    held = [t for t in task_runs(api, flow_run_id) if t.name.startswith(LOCKED_TASKS)]
    assert held, "no task ran while the workspace was held"
    return min(t.start_time for t in held), max(t.end_time for t in held)


def test_simultaneous_triggers_hold_the_workspace_one_at_a_time(api: str, served: dict[str, Any]) -> None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    started = [trigger(api, wait=False, trigger="manual") for _ in range(2)]
    done = [wait_final(api, run.id) for run in started]
    assert all(run.state.is_completed() and run.state.name == "Completed" for run in done), [r.state for r in done]
    (a_start, a_end), (b_start, b_end) = (_locked_interval(api, run.id) for run in done)
    assert a_end <= b_start or b_end <= a_start, "two retrains ran DVC stages in the same workspace at once"
    with client(api) as c:
        limit = c.read_global_concurrency_limit_by_name(workspace_name(served["project"]))
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in done])))
    assert limit.limit == 1 and limit.active_slots == 0
    assert len(logs) > 0


def _stage_processes(project: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["cwd"] == str(project) and ("pipeline.train" in cmdline or "dvc repro" in cmdline):
            found.append(proc)
    return found


def test_stage_timeout_stops_the_stage_and_notifies_failure(
    api: str, served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    project, receiver = served["project"], served["receiver"]
    # A long training run with a 15-second limit: the stage must be stopped, the run fail, the champion stay.
    set_params(project, {"train.max_steps": 100_000, "orchestration.stage_timeout_minutes": {"train": 0.25}})
    started = time.monotonic()
    run = trigger(api, trigger="manual")
    assert run.state.is_failed(), run.state
    assert time.monotonic() - started < 300
    (train,) = [t for t in task_runs(api, run.id) if t.name == "dvc repro train"]
    assert train.state.name == "TimedOut" and "timeout" in (train.state.message or "").lower()
    time.sleep(2)
    assert _stage_processes(project) == [], "the timed-out stage left processes running"

    failures = [m for m in messages(receiver, run.id) if m.get("event") == "failed"]
    assert len(failures) == 1 and run.name in failures[0]["text"]
    assert any(m.get("via") == "block" and "failed" in m["text"] and run.name in m["text"] for m in receiver.bodies)
    last = json.loads((project / ".sdft" / "history.jsonl").read_text().splitlines()[-1])
    assert last["outcome"] == "failed" and last["flow_run"] == str(run.id)
    c = mlflow(project, monkeypatch)
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert runs(c, "FAILED")


def test_sdft_serve_starts_a_local_server_when_none_is_set(tmp_path: Path, tiny_model: Path) -> None:
    """`make serve` on a laptop: no PREFECT_API_URL, so a server starts on loopback and stops with it."""
    project = project_with_prefect_yaml(tmp_path / "project", tiny_model, {}, active=False)
    port = free_port(0)
    env = sdft_env(project)
    assert "PREFECT_API_URL" not in env
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "serve", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        lines = []
        deadline = time.monotonic() + 240
        while not any("Prefect UI: http://127.0.0.1:" in line for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        assert f"Prefect UI: http://127.0.0.1:{port}" in "".join(lines)
        assert (project / ".prefect").is_dir()  # its database lives in the project's PREFECT_HOME
        deadline = time.monotonic() + 120
        while True:
            try:
                with client(url) as c:
                    deployment = c.read_deployment_by_name(DEPLOYMENT)
                break
            except Exception:  # noqa: BLE001 - serve registers it right after printing
                assert time.monotonic() < deadline
                time.sleep(2)
        assert {s.schedule.cron for s in deployment.schedules} == {"0 3 * * 1", "0 */6 * * *"}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=90)
    with pytest.raises(OSError):  # the server it started stopped with it
        import urllib.request

        urllib.request.urlopen(f"{url}/health", timeout=5)
