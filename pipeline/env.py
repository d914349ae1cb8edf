"""The one place that decides where things live and how the stack behaves offline.

Every entry point (stage CLIs, the `sdft` command, the Prefect flow, the tests) calls `configure()` first, so no
library phones home and every tool agrees on the tracking store.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Switches that keep the whole stack quiet and offline. `setdefault`: a user who wants the hub (to download real
# SD weights on their own machine) exports HF_HUB_OFFLINE=0 and it wins.
OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DIFFUSERS_NO_ADVISORY_WARNINGS": "1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # The temporary server gets 20 s to start by default, which a busy 2-core machine can exceed.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_UI_ENABLED": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "TOKENIZERS_PARALLELISM": "false",
}

EXPERIMENT_NAME = "sdft"


def project_root() -> Path:
    """The folder that holds `params.yaml` and `dvc.yaml`: `SDFT_ROOT`, else the current directory."""
    return Path(os.environ.get("SDFT_ROOT", os.getcwd())).resolve()


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store under `mlflow/` (kept apart from Prefect's database)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(root or project_root()) / 'mlflow' / 'mlflow.db'}"


# `scheme://user:password@` (or `scheme://token@`): the user-info part of any URI, wherever it appears in a text.
_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]+@")


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it removed (`http://user:pw@host` -> `http://host`).

    Use it wherever a URI is shown or stored: messages, logs, reports, tags, artifacts, printed commands.
    """
    return _CREDENTIALS.sub(r"\1", text)


def artifact_root(root: Path | None = None) -> str:
    """Where a local store keeps artifacts; without it MLflow writes `./mlruns` wherever it happens to run."""
    return ((root or project_root()) / "mlflow" / "artifacts").as_uri()


def exit_on_sigterm() -> None:
    """Make SIGTERM end this process like Ctrl-C does: a SystemExit (status 143) raised in the main thread, so
    `finally` blocks, context managers and atexit handlers run and stop what the process started (Prefect's
    temporary server, worker processes). Python's default for SIGTERM ends the process at once and orphans them."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def nothing_written(out: Path, stage: str) -> str:
    """A failed stage wrote nothing to `out`; but DVC deletes a stage's outputs before running it: say how to get the
    last good ones back."""
    return (
        f"Nothing was written to {out}. Run by `dvc repro`, the earlier {out} was removed before this stage started: "
        f"`sdft run` restores it, by hand run `dvc checkout {stage}`."
    )


def threads_per_process() -> int:
    """CPU threads for torch in this process: `OMP_NUM_THREADS` when set, else the cores this process may use divided
    by the training processes on this machine (`LOCAL_WORLD_SIZE`, which accelerate launch and torchrun set).

    torch's default is every core in every process: N processes on one machine then run N x cores threads that fight
    for the cores (seen: a training step about 40x slower with several trainings on one machine).
    """
    configured = os.environ.get("OMP_NUM_THREADS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // (int(local) if local.isdigit() and int(local) > 0 else 1))


def configure() -> None:
    """Apply the offline switches and point MLflow at the project's store (idempotent); in a process that uses torch
    (the stages), set its CPU threads (`threads_per_process`)."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    torch = sys.modules.get("torch")  # not imported here: `sdft` and the flow need no torch
    if torch is not None:
        torch.set_num_threads(threads_per_process())
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    _credentials_out_of_uri()


def _credentials_out_of_uri() -> None:
    """`http(s)://user:password@host` -> MLFLOW_TRACKING_USERNAME / _PASSWORD and `http(s)://host`.

    MLflow puts the tracking URI in its own messages ("View run ... at: <uri>", "API request to <uri>/... failed"),
    which end up on stdout, in Prefect's logs and in flow states; with the credentials in environment variables (which
    MLflow sends as basic auth, the same as from the URI) no message can carry them. Variables already set win.
    """
    uri = os.environ["MLFLOW_TRACKING_URI"]
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or redact(uri) == uri:
        return  # another scheme (e.g. a database URL) needs its credentials in the URI: shown only through redact()
    if parts.username:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    os.environ["MLFLOW_TRACKING_URI"] = redact(uri)
