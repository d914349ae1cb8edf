"""Fast tests of what decides when a retrain runs: the data identity, the history, the workspace lock, the stage
timeouts' params, notifications (to a real HTTP server on 127.0.0.1) and prefect.yaml as `sdft serve` reads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from flows import notify, serve, trigger
from pipeline.config import NotifyParams, ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


# --- data identity --------------------------------------------------------------------------------------------------


def _source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    (source / "images" / "a.png").write_bytes(b"aaaa")
    (source / "images" / "b.png").write_bytes(b"bbbb")
    (source / "metadata.jsonl").write_text('{"file_name": "images/a.png", "text": "a"}\n')
    return source


def test_data_identity_follows_content_not_timestamps(tmp_path: Path) -> None:
    source = _source(tmp_path)
    cache = tmp_path / "digests.json"
    first = trigger.data_identity(source, cache)
    assert trigger.data_identity(source, cache) == first
    assert trigger.data_identity(source) == first  # the cache only saves reading: same answer without it

    # Touched (same bytes, new mtime) or copied elsewhere (a fresh clone): not new data.
    os.utime(source / "images" / "a.png", (1, 1))
    assert trigger.data_identity(source, cache) == first
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(source), str(copy)], check=True)
    assert trigger.data_identity(copy) == first

    # Same size, other bytes; a new file; a renamed file; a caption edit: each is new data.
    (source / "images" / "b.png").write_bytes(b"BBBB")
    changed = trigger.data_identity(source, cache)
    assert changed != first
    (source / "images" / "c.png").write_bytes(b"cccc")
    added = trigger.data_identity(source, cache)
    assert added not in (first, changed)
    (source / "images" / "c.png").rename(source / "images" / "d.png")
    assert trigger.data_identity(source, cache) not in (first, changed, added)
    with pytest.raises(FileNotFoundError, match="data.source"):
        trigger.data_identity(tmp_path / "missing")


def test_data_identity_reads_only_new_or_modified_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _source(tmp_path)
    cache = tmp_path / "digests.json"
    trigger.data_identity(source, cache)
    read: list[str] = []
    real = trigger._sha256
    monkeypatch.setattr(trigger, "_sha256", lambda path: read.append(path.name) or real(path))
    trigger.data_identity(source, cache)
    assert read == []
    (source / "images" / "new.png").write_bytes(b"new")
    trigger.data_identity(source, cache)
    assert read == ["new.png"]


def test_history_and_last_success(tmp_path: Path) -> None:
    assert trigger.history(tmp_path) == [] and trigger.last_success(tmp_path) is None
    trigger.record(tmp_path, {"outcome": "promoted", "data_identity": "d1"})
    trigger.record(tmp_path, {"outcome": "skipped", "data_identity": "d1"})
    trigger.record(tmp_path, {"outcome": "failed", "data_identity": "d2"})
    with open(tmp_path / trigger.HISTORY, "a") as handle:
        handle.write('{"outcome": "rejec')  # a writer killed mid-line
    assert [e["outcome"] for e in trigger.history(tmp_path)] == ["promoted", "skipped", "failed"]
    assert trigger.last_success(tmp_path)["data_identity"] == "d1"
    assert all("at" in e for e in trigger.history(tmp_path))


# --- one retrain at a time ------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from flows.trigger import workspace_lock
with workspace_lock(Path(sys.argv[1]), 0, {"flow_run_name": "first-run"}):
    print("held", flush=True)
    time.sleep(600)
"""


def test_workspace_lock_waits_names_the_holder_and_survives_a_killed_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        waited: list[str] = []
        started = time.monotonic()
        with (
            pytest.raises(trigger.WorkspaceBusy, match="first-run"),
            trigger.workspace_lock(tmp_path, 2, {}, on_wait=waited.append),
        ):
            pass
        assert time.monotonic() - started >= 2
        assert len(waited) == 1 and "first-run" in waited[0] and str(holder.pid) in waited[0]
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel must release the lock
        holder.wait()
    started = time.monotonic()
    with trigger.workspace_lock(tmp_path, 30, {"flow_run_name": "second-run"}):
        assert time.monotonic() - started < 5
        assert json.loads((tmp_path / trigger.LOCK).read_text())["flow_run_name"] == "second-run"
    assert (tmp_path / trigger.LOCK).read_text() == ""


def test_workspace_lock_serialises_threads(tmp_path: Path) -> None:
    inside, overlaps = [], []

    def work() -> None:
        with trigger.workspace_lock(tmp_path, 30, {}):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.3)
            inside.pop()

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []


def test_workspace_name_is_per_folder(tmp_path: Path) -> None:
    a, b = trigger.workspace_name(tmp_path / "a"), trigger.workspace_name(tmp_path / "b")
    assert a != b and a == trigger.workspace_name(tmp_path / "a") and a.startswith("sdft-retrain-a-")


# --- params -------------------------------------------------------------------------------------------------------


def _params_with(tmp_path: Path, section: str, value: object) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw[section] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_notify_and_orchestration_params_are_checked(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml", paths=False)
    assert params.notify.webhook_url is None and params.notify.block is None
    assert set(params.orchestration.stage_timeout_minutes) <= set(
        yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    )
    with pytest.raises(ParamsError, match="notify.webhook_url"):
        load_params(_params_with(tmp_path, "notify", {"webhook_url": "hooks.example/x"}), paths=False)
    with pytest.raises(ParamsError, match="notify.block"):
        load_params(_params_with(tmp_path, "notify", {"block": "just-a-name"}), paths=False)
    with pytest.raises(ParamsError, match="notify.events"):
        load_params(_params_with(tmp_path, "notify", {"events": ["promoted", "exploded"]}), paths=False)
    with pytest.raises(ParamsError, match="lock_wait_minutes"):
        load_params(_params_with(tmp_path, "orchestration", {"lock_wait_minutes": -1}), paths=False)


def test_stage_timeouts_must_name_dvc_stages(tmp_path: Path) -> None:
    from flows.retrain import stage_timeouts

    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    ok = load_params(_params_with(tmp_path, "orchestration", {"stage_timeout_minutes": {"train": 0.5}}), paths=False)
    assert stage_timeouts(tmp_path, ok) == {"train": 30.0}
    bad = load_params(_params_with(tmp_path, "orchestration", {"stage_timeout_minutes": {"trian": 5}}), paths=False)
    with pytest.raises(ValueError, match="trian.*prepare, encode, train, evaluate"):
        stage_timeouts(tmp_path, bad)


# --- notifications --------------------------------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records JSON bodies; `fail_first` answers 503 that many times."""

    def __init__(self, fail_first: int = 0, status: int = 200) -> None:
        self.bodies: list[dict] = []
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                outer.hits += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                code = 503 if outer.hits <= fail_first else status
                if code == 200:
                    outer.bodies.append(json.loads(body))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhook_message_retried_on_5xx_and_filtered_by_event() -> None:
    receiver = Receiver(fail_first=2)
    try:
        settings = NotifyParams(webhook_url=receiver.url)
        assert notify.send(settings, "promoted", "sdft retrain promoted: v3", {"model_version": "3"}) == []
        assert receiver.hits == 3
        assert receiver.bodies == [{"text": "sdft retrain promoted: v3", "event": "promoted", "model_version": "3"}]
        assert notify.send(settings, "skipped", "not wanted", {}) == []  # not in the default events
        assert receiver.hits == 3
    finally:
        receiver.close()


def test_undeliverable_message_is_logged_not_raised() -> None:
    receiver = Receiver(status=404)
    logged: list[str] = []
    try:
        settings = NotifyParams(webhook_url=receiver.url)
        assert notify.send(settings, "failed", "x", {}, log=logged.append) == ["webhook"]
        assert receiver.hits == 1  # a 4xx is an answer: not retried
        assert "404" in logged[0]
    finally:
        receiver.close()
    down = NotifyParams(webhook_url=receiver.url)  # nothing listens any more
    started = time.monotonic()
    assert notify.send(down, "failed", "x", {}, log=logged.append) == ["webhook"]
    assert 3 <= time.monotonic() - started < 10  # refused at once, three times, with 1 s + 2 s of backoff


def test_failure_settings_survive_a_broken_params_file(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("notify:\n  webhook_url: http://127.0.0.1:9/x\ntrain: {max_grad_nrom: 1}\n")
    assert notify.settings_of(tmp_path).webhook_url == "http://127.0.0.1:9/x"
    (tmp_path / "params.yaml").write_text("notify: [not, a, mapping")
    assert notify.settings_of(tmp_path).events == []


# --- prefect.yaml, as sdft serve reads it ---------------------------------------------------------------------------


def test_prefect_yaml_schedules_and_parameters_fit_the_flow(tmp_path: Path) -> None:
    import inspect
    import typing

    from flows.retrain import Trigger, retrain

    spec = serve.deployment_spec(REPO)
    assert spec["work_pool"]["name"] == "sdft-process"
    signature = inspect.signature(retrain.fn)
    allowed = set(typing.get_args(Trigger))
    assert set(spec["parameters"]) <= set(signature.parameters)
    schedules = serve.schedules(spec)
    assert [s.cron for s in schedules] == ["0 3 * * 1", "0 */6 * * *"]
    assert [s.parameters["trigger"] for s in schedules] == ["schedule", "data"]
    assert all(s.parameters["trigger"] in allowed for s in schedules)

    deployment = serve.build_deployment(tmp_path, spec)
    assert deployment.name == "scheduled" and deployment.entrypoint.endswith("retrain.py:retrain")
    assert deployment.parameters["project"] == str(tmp_path)  # the served project, not prefect.yaml's "."
    assert deployment.parameters["trigger"] == "schedule"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1", "0 */6 * * *"]


def test_malformed_prefect_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prefect.yaml"):
        serve.deployment_spec(tmp_path)
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    spec["deployments"][0]["schedules"][0]["crom"] = "0 3 * * 1"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="unknown key.*crom"):
        serve.schedules(serve.deployment_spec(tmp_path))
    spec["deployments"][0]["entrypoint"] = "flows/other.py:other"
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="found 0"):
        serve.deployment_spec(tmp_path)
