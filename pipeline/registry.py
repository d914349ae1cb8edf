"""The one module that talks to MLflow's tracking store and model registry.

Runs: one per retrain, opened by the flow, with the params, reports and lineage tags.
Registry: versions logged with the native `mlflow.diffusers` flavor (adapter + base-model reference); the serving
model is the version behind the `champion` alias, the one it replaced keeps `previous-champion`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline import env

CHAMPION = "champion"
PREVIOUS = "previous-champion"
T = TypeVar("T")


class StaleBaseline(RuntimeError):
    """The champion moved between the comparison and the promotion: the decision no longer holds."""


def client() -> Any:
    from mlflow.tracking import MlflowClient

    env.configure()
    return MlflowClient()


def with_retries(call: Callable[[], T], what: str, attempts: int = 4, first_wait: float = 1.0) -> T:
    """Retry a call that crosses the network with exponential backoff; re-raise with context when it stays down."""
    from mlflow.exceptions import MlflowException

    wait = first_wait
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MlflowException as exc:
            # Only transient failures are retried; a missing resource or a bad request is an answer, not an outage.
            if exc.error_code not in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
                raise
            error: Exception = exc
        except (ConnectionError, OSError) as exc:
            error = exc
        if attempt == attempts:
            raise RuntimeError(f"{what}: tracking server unavailable after {attempts} attempts: {error}") from error
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def experiment_id(name: str = env.EXPERIMENT_NAME) -> str:
    """Get or create the experiment; a local store gets an explicit artifact root under `mlflow/`."""
    c = client()
    found = with_retries(lambda: c.get_experiment_by_name(name), "get experiment")
    if found:
        return found.experiment_id
    local = env.tracking_uri().startswith("sqlite:")
    return with_retries(
        lambda: c.create_experiment(name, artifact_location=env.artifact_root() if local else None),
        "create experiment",
    )


def start_run(run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Open a run for one retrain; return its id (stages log into it through `MLFLOW_RUN_ID`)."""
    from mlflow.entities import Param

    c = client()
    run = with_retries(lambda: c.create_run(experiment_id(), run_name=run_name, tags=tags), "create run")
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        with_retries(lambda s=start: c.log_batch(run.info.run_id, params=items[s : s + 100]), "log params")
    return run.info.run_id


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        with_retries(lambda k=key, v=value: c.set_tag(run_id, k, str(v)), "set tag")


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    with_retries(lambda: client().log_batch(run_id, metrics=batch), "log metrics")


def log_artifacts(run_id: str, paths: list[Path], artifact_path: str | None = None) -> None:
    c = client()
    for path in paths:
        if path.is_dir():
            with_retries(lambda p=path: c.log_artifacts(run_id, str(p), artifact_path), f"log {path}")
        elif path.is_file():
            with_retries(lambda p=path: c.log_artifact(run_id, str(p), artifact_path), f"log {path}")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    with_retries(lambda: client().set_terminated(run_id, status), "end run")


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    source: str


def champion(model_name: str) -> Champion | None:
    """The version behind `@champion`, or None on the first run (no registered model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        mv = with_retries(lambda: c.get_model_version_by_alias(model_name, CHAMPION), "read champion alias")
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    return Champion(version=str(mv.version), run_id=mv.run_id, source=mv.source)


def download_adapter(model_name: str, version: str, dst: Path) -> tuple[Path, str]:
    """Fetch a registered version's adapter folder; return it and the base model it references."""
    import mlflow.diffusers

    dst.mkdir(parents=True, exist_ok=True)
    model = with_retries(
        lambda: mlflow.diffusers.load_model(f"models:/{model_name}/{version}", dst_path=str(dst)), "download model"
    )
    return Path(model.adapter_path), model.base_model


def register(
    run_id: str,
    adapter_dir: Path,
    base_model: str,
    model_name: str,
    expected_champion: str | None,
    description: str,
    version_tags: dict[str, str],
) -> str:
    """Log the adapter with the diffusers flavor, register it and move `champion` to it; return the version.

    Refuses (StaleBaseline) when the champion is no longer the one the candidate was compared with. The alias moves
    last, so a failure anywhere before leaves the serving model untouched.
    """
    import mlflow.diffusers

    import mlflow

    def current() -> str | None:
        found = champion(model_name)
        return found.version if found else None

    if current() != expected_champion:
        raise StaleBaseline(
            f"the champion of {model_name!r} changed from {expected_champion or 'none'} to {current()} while this "
            "candidate was evaluated; its comparison is stale. Re-run the retrain to compare with the new champion."
        )
    env.configure()
    with mlflow.start_run(run_id=run_id):
        info = with_retries(
            lambda: mlflow.diffusers.log_model(str(adapter_dir), base_model=base_model, name="model"), "log model"
        )
    c = client()
    with_retries(lambda: c.create_registered_model(model_name) if not _exists(c, model_name) else None, "create model")
    mv = with_retries(
        lambda: c.create_model_version(
            model_name, info.model_uri, run_id=run_id, tags=version_tags, description=description
        ),
        "create version",
    )
    # Check again right before moving the alias: another retrain may have promoted meanwhile.
    now = current()
    if now != expected_champion:
        with_retries(lambda: c.set_model_version_tag(model_name, mv.version, "sdft.promotion", "stale"), "tag")
        raise StaleBaseline(
            f"version {mv.version} was registered but not promoted: the champion moved to {now} while it was "
            f"being registered (it was compared with {expected_champion or 'the base model'})."
        )
    if expected_champion:
        with_retries(lambda: c.set_registered_model_alias(model_name, PREVIOUS, expected_champion), "alias")
    with_retries(lambda: c.set_registered_model_alias(model_name, CHAMPION, mv.version), "alias")
    with_retries(lambda: c.set_model_version_tag(model_name, mv.version, "sdft.promotion", "promoted"), "tag")
    return str(mv.version)


def _exists(c: Any, model_name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(model_name)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def version_summary(model_name: str) -> list[dict[str, Any]]:
    """Every version with its aliases, decision tag and run metrics, newest first."""
    c = client()
    model = with_retries(lambda: c.get_registered_model(model_name), "read model")
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in with_retries(lambda: c.search_model_versions(f"name='{model_name}'"), "list versions"):
        run = with_retries(lambda m=mv: c.get_run(m.run_id), "read run") if mv.run_id else None
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "promotion": mv.tags.get("sdft.promotion", ""),
                "run_id": mv.run_id,
                "metrics": dict(run.data.metrics) if run else {},
            }
        )
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
