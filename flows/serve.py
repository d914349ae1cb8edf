"""`sdft serve`: serve the retrain deployment of `prefect.yaml` with its schedules from this process.

prefect.yaml is the one place that names the deployment, its schedules and its parameters; `prefect deploy --all`
reads it for a worker, this module reads it for `flow.serve`. Schedules need a real Prefect server: when none is
configured (no PREFECT_API_URL), a local one is started on 127.0.0.1 (its database in PREFECT_HOME) and stopped on
exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

ENTRYPOINT = "flows/retrain.py:retrain"
SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "active", "parameters", "day_or", "slug", "anchor_date"}


def deployment_spec(root: Path) -> dict[str, Any]:
    """The deployment of `prefect.yaml` whose entrypoint is the retrain flow."""
    path = root / "prefect.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: it defines the scheduled retrain (see docs/scheduling.md)")
    found = [d for d in yaml.safe_load(path.read_text()).get("deployments") or [] if d.get("entrypoint") == ENTRYPOINT]
    if len(found) != 1:
        raise ValueError(f"{path}: expected one deployment with entrypoint {ENTRYPOINT}, found {len(found)}")
    return found[0]


def schedules(spec: dict[str, Any]) -> list[Any]:
    """prefect.yaml's `schedules:` entries as Prefect schedules (cron, interval in seconds, or rrule)."""
    from prefect.schedules import Schedule

    out = []
    for i, entry in enumerate(spec.get("schedules") or []):
        unknown = set(entry) - SCHEDULE_KEYS
        if unknown:
            raise ValueError(f"prefect.yaml: schedule {i + 1} has unknown key(s) {sorted(unknown)}")
        entry = dict(entry)
        if "interval" in entry:
            entry["interval"] = timedelta(seconds=float(entry["interval"]))
        out.append(Schedule(**entry))
    return out


def build_deployment(root: Path, spec: dict[str, Any]) -> Any:
    """The retrain flow as a served deployment: prefect.yaml's name, schedules, parameters; `project` is this root."""
    from flows.retrain import retrain

    return retrain.to_deployment(
        name=spec["name"],
        schedules=schedules(spec),
        parameters=(spec.get("parameters") or {}) | {"project": str(root)},
        description=spec.get("description"),
        tags=spec.get("tags"),
    )


def free_port(preferred: int = 4200) -> int:
    """`preferred` when it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def wait_healthy(api_url: str, process: subprocess.Popen | None = None, timeout_s: float = 180) -> None:
    """Poll `<api>/health` until the server answers; fail early when its process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Prefect server at {api_url} did not answer within {timeout_s:.0f} s")


@contextmanager
def local_server(home: Path, port: int, log: Path) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:`port` with its state in `home`; yield its API URL, stop it on exit."""
    prefect = Path(sys.executable).parent / "prefect"
    environment = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    environment.pop("PREFECT_API_URL", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
        process = subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(api, process)
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def serve(root: Path, port: int | None = None) -> None:
    """Serve the retrain deployment until interrupted; start a local server first when none is configured."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    spec = deployment_spec(root)
    schedules(spec)  # a malformed schedule fails before a server starts
    with ExitStack() as stack:
        api = get_current_settings().api.url
        if not api:
            home = Path(os.environ.get("PREFECT_HOME") or root / ".prefect")
            port = port or free_port()
            print(f"No Prefect server configured (PREFECT_API_URL): starting one on 127.0.0.1:{port} ...", flush=True)
            api = stack.enter_context(local_server(home, port, root / ".sdft" / "logs" / "prefect-server.log"))
            os.environ["PREFECT_API_URL"] = api  # for the flow-run processes the runner starts
            stack.enter_context(temporary_settings({PREFECT_API_URL: api}))
        deployment = build_deployment(root, spec)
        print(f"Prefect UI: {api.removesuffix('/api')}  (deployment retrain/{spec['name']})", flush=True)
        for schedule in spec.get("schedules") or []:
            when = schedule.get("cron") or schedule.get("rrule") or f"every {schedule.get('interval')} s"
            print(f"  schedule: {when} {schedule.get('timezone', '')} {schedule.get('parameters') or {}}", flush=True)
        prefect_serve(deployment)
