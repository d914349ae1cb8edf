"""The one module that talks to MLflow's tracking store and model registry.

Runs: one per retrain, opened by the flow, with the params, reports and lineage tags.
Registry: a LoRA is logged with the native `mlflow.diffusers` flavor (adapter + base-model reference); a full
fine-tune, or a LoRA trained for another prediction type than its base scheduler's, with a small pyfunc model
(`pipeline.pyfunc_model`: the train output folder + base-model reference), which the diffusers flavor cannot log.
Both load with `mlflow.pyfunc.load_model` and predict from the same input and params. The serving model is the
version behind the `champion` alias, the one it replaced keeps `previous-champion`. With `registry.approval: manual`
the gate's winner gets `challenger` instead, and a person moves `champion` (`approve`).

Every alias move leaves an audit record (who, why, when, from, to) as a JSON tag `sdft.audit.<n>` on the versions
involved and on the registered model, so the registry itself answers "who made this the champion, and why".

Version tags written here: `sdft.promotion` (pending | promoted | challenger | superseded | stale | failed |
rolled-back), `sdft.expected_champion` (the champion the candidate was compared with, "none" on the first run),
`sdft.claim` (a token per registration attempt) and, for refusals, `sdft.stale_reason`.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pipeline import candidate, env

CHAMPION = "champion"
PREVIOUS = "previous-champion"
CHALLENGER = "challenger"
PROMOTION = "sdft.promotion"
EXPECTED = "sdft.expected_champion"
CLAIM = "sdft.claim"
AUDIT = "sdft.audit."
# A pending registration older than this (by the server's clock) no longer blocks others: its process is presumed
# dead. The path from creating a version to moving the alias is a handful of requests (under a second without
# retries; minutes with MLflow's own HTTP retries on a flaky server), so 10 minutes is beyond any live registration.
CLAIM_LEASE_S = 600
T = TypeVar("T")


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out as asked (the message says why and what to do)."""


class StaleBaseline(RegistryError):
    """The champion moved between the comparison and the promotion: the decision no longer holds."""


class RegistryUnavailable(RuntimeError):
    """The tracking server did not answer, after retries."""


def client() -> Any:
    from mlflow.tracking import MlflowClient

    env.configure()
    return MlflowClient()


def server() -> str:
    """The tracking URI, without any user:password part, for messages."""
    return env.redact(env.tracking_uri())


def with_retries(call: Callable[[], T], what: str, attempts: int | None = None, first_wait: float | None = None) -> T:
    """Retry a call that crosses the network with exponential backoff; raise RegistryUnavailable when it stays down.

    Attempts and the first wait default to `SDFT_REGISTRY_ATTEMPTS` (4) and `SDFT_REGISTRY_BACKOFF_S` (1 s, doubled
    each time: 1 + 2 + 4 = 7 s before giving up). MLflow retries each HTTP request on its own as well
    (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `MLFLOW_HTTP_REQUEST_TIMEOUT`); the two multiply.
    """
    from mlflow.exceptions import MlflowException

    attempts = attempts or int(os.environ.get("SDFT_REGISTRY_ATTEMPTS", "4"))
    wait = float(os.environ.get("SDFT_REGISTRY_BACKOFF_S", "1.0")) if first_wait is None else first_wait
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except MlflowException as exc:
            # Only transient failures are retried; a missing resource, a bad request or a refused permission is an
            # answer, not an outage. (A refused connection reaches us as INTERNAL_ERROR from MLflow's HTTP client.)
            if exc.error_code not in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
                raise
            error: Exception = exc
        except (ConnectionError, OSError) as exc:
            error = exc
        if attempt == attempts:
            raise RegistryUnavailable(
                f"{what}: the MLflow tracking server at {server()} did not answer after {attempts} attempts "
                f"({_first_line(error)}). Start it (mlflow/server.sh) or point MLFLOW_TRACKING_URI at a running one; "
                "nothing was changed by this request."
            ) from error
        time.sleep(wait)
        wait *= 2
    raise AssertionError("unreachable")


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return env.redact(text[0] if text else type(error).__name__)[:300]


# --------------------------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------------------------


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


def log_dataset(run_id: str, name: str, digest: str, source: str, profile: dict[str, Any], context: str) -> None:
    """Link the prepared data to the run as an MLflow dataset input (metadata only: name, digest, source, profile).

    The arguments are what `pipeline.prepare.dataset_for_mlflow` returns. MLflow keeps one dataset per (experiment,
    name, digest): logging the same data again links the same entry.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    class PreparedImages(MetaDataset):
        """A metadata-only dataset with a profile (MetaDataset keeps none)."""

        @property
        def profile(self) -> dict[str, Any]:
            return profile

        def to_dict(self) -> dict[str, str]:
            return super().to_dict() | {"profile": json.dumps(profile, sort_keys=True)}

    dataset = PreparedImages(source=resolve_dataset_source(source), name=name, digest=digest)
    entry = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    with_retries(lambda: client().log_inputs(run_id, datasets=[entry]), "log dataset")


def end_run(run_id: str, status: str = "FINISHED") -> None:
    with_retries(lambda: client().set_terminated(run_id, status), "end run")


# --------------------------------------------------------------------------------------------------------------------
# Reading the registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str
    source: str
    adapter_sha256: str = ""  # the version's `sdft.adapter_sha256` tag (lineage), "" when it has none


def _missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _by_alias(model_name: str, alias: str) -> Any | None:
    """The ModelVersion behind `alias`, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        return with_retries(lambda: c.get_model_version_by_alias(model_name, alias), f"read alias {alias}")
    except MlflowException as exc:
        if _missing(exc):
            return None
        # Basic auth answers 403, not 404, for an alias of a model that does not exist yet (the first run).
        if exc.error_code == "PERMISSION_DENIED" and not _model_exists(c, model_name):
            return None
        raise


def _model_exists(c: Any, model_name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        with_retries(lambda: c.get_registered_model(model_name), "read model")
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def alias_version(model_name: str, alias: str) -> str | None:
    """The version behind `alias`, or None (no registered model or no such alias)."""
    mv = _by_alias(model_name, alias)
    return str(mv.version) if mv else None


def champion(model_name: str) -> Champion | None:
    """The version behind `@champion`, or None on the first run (no registered model or no alias yet)."""
    mv = _by_alias(model_name, CHAMPION)
    if mv is None:
        return None
    return Champion(str(mv.version), mv.run_id or "", mv.source or "", (mv.tags or {}).get("sdft.adapter_sha256", ""))


def get_version(model_name: str, version: str) -> Any:
    """The ModelVersion, or RegistryError naming the versions that exist."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        return with_retries(lambda: c.get_model_version(model_name, str(version)), "read version")
    except MlflowException as exc:
        if not _missing(exc):
            raise
    versions = [str(mv.version) for mv in _versions(c, model_name)]
    raise RegistryError(
        f"{model_name!r} has no version {version!r}"
        + (f" (versions: {', '.join(sorted(versions, key=int))})." if versions else " (it has no versions yet).")
    )


def _versions(c: Any, model_name: str, extra_filter: str = "") -> list[Any]:
    query = f"name='{model_name}'" + (f" and {extra_filter}" if extra_filter else "")
    return list(with_retries(lambda: c.search_model_versions(query), "list versions"))


def download_adapter(model_name: str, version: str, dst: Path) -> tuple[Path, str]:
    """Fetch a registered version's train output folder (LoRA or full fine-tune); return it and the base model it
    references. Both kinds of logged model (see `_log_model`) give a folder that `pipeline.evaluate` reads."""
    import mlflow.artifacts
    from mlflow.models import Model

    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        with_retries(
            lambda: mlflow.artifacts.download_artifacts(f"models:/{model_name}/{version}", dst_path=str(dst)),
            "download model",
        )
    )
    flavors = Model.load(str(local)).flavors
    if "diffusers" in flavors:
        conf = flavors["diffusers"]
        return local / conf["adapter_weights"], conf["base_model"]
    pyfunc = flavors.get("python_function", {})
    artifact = (pyfunc.get("artifacts") or {}).get(TRAIN_OUTPUT_ARTIFACT)
    config = pyfunc.get("config") or {}
    if artifact is None or "base_model" not in config:
        raise RegistryError(
            f"version {version} of {model_name!r} holds neither a diffusers adapter nor an sdft train output "
            f"(flavors: {', '.join(flavors)}): it was not registered by sdft."
        )
    return local / artifact["path"], config["base_model"]


# --------------------------------------------------------------------------------------------------------------------
# Audit records
# --------------------------------------------------------------------------------------------------------------------


def actor() -> str:
    """Who is acting: `SDFT_USER` when set (e.g. a service account's human), else the operating-system user."""
    return os.environ.get("SDFT_USER") or getpass.getuser()


def audit_record(action: str, reason: str, **fields: Any) -> dict[str, Any]:
    return {
        "action": action,
        "who": actor(),
        "why": reason[:2000],
        "when": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        **{k: v for k, v in fields.items() if v is not None},
    }


def _write_audit(c: Any, model_name: str, versions: list[str], record: dict[str, Any]) -> None:
    """One JSON tag per event, on each version involved and on the registered model (the model's whole history).

    The key `sdft.audit.<UTC time>-<random>` sorts by time and cannot collide between two concurrent writers, and a
    single tag write is atomic: no record is ever half-written.
    """
    key = AUDIT + record["when"].replace(":", "").replace("-", "") + "-" + secrets.token_hex(3)
    value = json.dumps(record, sort_keys=True)
    for version in dict.fromkeys(v for v in versions if v):
        with_retries(lambda v=version: c.set_model_version_tag(model_name, v, key, value), "write audit record")
    with_retries(lambda: c.set_registered_model_tag(model_name, key, value), "write audit record")


def _audit_entries(tags: dict[str, str]) -> list[dict[str, Any]]:
    entries = []
    for key in sorted(k for k in tags if k.startswith(AUDIT)):
        try:
            entries.append(json.loads(tags[key]))
        except json.JSONDecodeError:
            entries.append({"action": "unreadable", "raw": tags[key]})
    return entries


def audit_trail(model_name: str, version: str | None = None) -> list[dict[str, Any]]:
    """Audit records, oldest first: of one version, or of the whole registered model."""
    c = client()
    if version is not None:
        return _audit_entries(dict(get_version(model_name, version).tags or {}))
    model = with_retries(lambda: c.get_registered_model(model_name), "read model")
    return _audit_entries(dict(model.tags or {}))


# --------------------------------------------------------------------------------------------------------------------
# Registering a gate winner
# --------------------------------------------------------------------------------------------------------------------


def register(
    run_id: str,
    adapter_dir: Path,
    base_model: str,
    model_name: str,
    expected_champion: str | None,
    description: str,
    version_tags: dict[str, str],
    approval: str = "auto",
    reason: str = "passed the promotion gate",
) -> str:
    """Log the adapter with the diffusers flavor, register it and move `champion` to it (approval "auto") or
    `challenger` (approval "manual"); return the version.

    Refuses with StaleBaseline, and tags the version `sdft.promotion=stale` without any alias, when the champion is no
    longer `expected_champion` (the one the candidate was compared with), or when another registration against the
    same champion got there first.

    Why that is race-free: MLflow has no compare-and-set for aliases, but it numbers versions atomically (one SQL
    transaction per version, with a unique (name, version) key), and a version's tags are written in that same
    transaction. Each registration records the champion it expects in `sdft.expected_champion`; after creating its
    version it lists the versions that expect the same champion, and only the lowest-numbered live one may move the
    alias. Any two contenders see each other's tags (the later-numbered one was created after the earlier one was
    committed) and agree on who is lowest, so at most one wins, whatever the timing. A rival that died after creating
    its version (its run ended, or CLAIM_LEASE_S passed) stops counting, so a crash blocks no one for long.

    Remaining window: between the winner's final "is the champion still the expected one" read and its alias write, a
    *manual* move (`sdft promote`, `rollback`, `approve`) could land; those are not contenders. A registration that
    stalls for longer than CLAIM_LEASE_S between its version and its alias is treated as dead, and another may win;
    the stalled one then finds the champion moved and stops. Both need a person or a frozen process at exactly the
    wrong moment; the audit trail on the model shows it if it ever happens.
    """
    if approval not in ("auto", "manual"):
        raise ValueError(f"approval must be 'auto' or 'manual', not {approval!r}")
    expected = str(expected_champion) if expected_champion else None
    now = _current(model_name)
    if now != expected:
        raise StaleBaseline(
            f"the champion of {model_name!r} changed from {_v(expected)} to {_v(now)} while this candidate was "
            "evaluated; its comparison is stale. Re-run the retrain to compare with the new champion. Nothing was "
            "registered."
        )
    env.configure()
    c = client()
    info = with_retries(lambda: _log_model(c, run_id, adapter_dir, base_model), "log model")
    _ensure_registered_model(c, model_name)
    claim = secrets.token_hex(8)
    status = "pending" if approval == "auto" else CHALLENGER
    tags = version_tags | {EXPECTED: expected or "none", CLAIM: claim, PROMOTION: status}
    mv = with_retries(
        # model_id too: a tracking server (unlike a local store) refuses a models:/ source without it.
        lambda: c.create_model_version(
            model_name, info.model_uri, run_id=run_id, tags=tags, description=description, model_id=info.model_id
        ),
        "create version",
    )
    version = str(mv.version)
    try:
        if approval == "manual":
            _make_challenger(c, model_name, version, expected, reason)
        else:
            claim_and_promote(c, model_name, mv, expected, claim, reason)
    except StaleBaseline as exc:
        _tag_quietly(c, model_name, version, {PROMOTION: "stale", "sdft.stale_reason": str(exc)[:5000]})
        raise
    except BaseException:
        # The server may be down: one quick try to mark the version, so it never looks like a live candidate (unless
        # the failure came after the alias moved: then it is the champion, whatever its tags say).
        alias = CHALLENGER if approval == "manual" else CHAMPION
        try:
            moved = str(c.get_model_version_by_alias(model_name, alias).version) == version
        except Exception:  # noqa: BLE001 - no such alias (or no server: the tag below then fails quietly)
            moved = False
        if not moved:
            _tag_quietly(c, model_name, version, {PROMOTION: "failed"})
        raise
    return version


_LOG_MODEL = threading.Lock()


TRAIN_OUTPUT_ARTIFACT = "train_output"  # pipeline.pyfunc_model.ARTIFACT (not imported here: it imports mlflow)
# The diffusers flavor's signature (mlflow/diffusers/__init__.py), so both kinds of version take the same input.
GENERATION_PARAMS = (
    ("num_inference_steps", "integer", 30),
    ("guidance_scale", "double", 7.5),
    ("height", "integer", 512),
    ("width", "integer", 512),
    ("negative_prompt", "string", ""),
)


def needs_pyfunc(output: candidate.TrainOutput, base_prediction_type: str) -> str:
    """Why `mlflow.diffusers` cannot log this train output ("" when it can).

    That flavor logs LoRA adapters only, and its pyfunc samples with the base scheduler's prediction type."""
    if output.method != "lora":
        return f"method {output.method} (mlflow.diffusers logs LoRA adapters only)"
    from pipeline.diffusion import stock_text_encoder_lora

    if any(name.startswith("text_encoder") for name in output.trained) and not stock_text_encoder_lora():
        return (
            "text-encoder LoRA, which diffusers' load_lora_weights (what mlflow.diffusers' pyfunc calls) cannot load "
            "with this transformers and peft (pipeline.diffusion.load_lora can)"
        )
    if output.prediction_type and output.prediction_type != base_prediction_type:
        return (
            f"trained for {output.prediction_type} on a {base_prediction_type} base (mlflow.diffusers' pyfunc samples "
            "with the base scheduler)"
        )
    return ""


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(type=DataType.string, name="prompt")]),
        outputs=Schema([ColSpec(type=DataType.binary, name="image")]),
        params=ParamSchema([ParamSpec(n, getattr(DataType, t), d) for n, t, d in GENERATION_PARAMS]),
    )


def _code_package(folder: Path) -> Path:
    """A `pipeline` package holding only what the pyfunc model imports, for `code_paths`: a serving machine imports
    `pipeline.pyfunc_model` from the logged model, with no sdft checkout."""
    package = folder / "pipeline"
    package.mkdir(parents=True)
    here = Path(__file__).parent
    (package / "__init__.py").write_text('"""sdft: the modules a logged sdft model needs to load."""\n')
    for name in ("candidate.py", "pyfunc_model.py", "diffusion.py"):
        shutil.copy2(here / name, package / name)
    return package


def _log_model(c: Any, run_id: str, adapter_dir: Path, base_model: str) -> Any:
    """Log the train output into `run_id`: `mlflow.diffusers.log_model` for a LoRA, else the pyfunc model of
    `pipeline.pyfunc_model` (see `needs_pyfunc`). Without `mlflow.start_run` (which would end the run on exit: the
    run must stay RUNNING until the flow ends it, see claim_and_promote).

    Given only a run id, MLflow files the LoggedModel under the *active* experiment (the Default one, where a
    basic-auth user may not create anything), so the run's experiment is made active for the call, under a lock
    because that setting is process-wide.
    """
    import mlflow.diffusers
    from diffusers import DDPMScheduler

    output = candidate.read_output(adapter_dir)
    revision = output.base_revision
    base_prediction = DDPMScheduler.load_config(base_model, subfolder="scheduler", revision=revision)
    why = needs_pyfunc(output, base_prediction.get("prediction_type", "epsilon"))
    experiment = with_retries(lambda: c.get_run(run_id), "read run").info.experiment_id
    with _LOG_MODEL:
        before = os.environ.get("MLFLOW_EXPERIMENT_ID")
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment
        try:
            if not why:
                return mlflow.diffusers.log_model(str(adapter_dir), base_model=base_model, name="model", run_id=run_id)
            return _log_pyfunc(run_id, output, base_model, why)
        finally:
            if before is None:
                os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
            else:
                os.environ["MLFLOW_EXPERIMENT_ID"] = before


def _log_pyfunc(run_id: str, output: candidate.TrainOutput, base_model: str, why: str) -> Any:
    import mlflow.diffusers
    import mlflow.pyfunc
    from mlflow.models import Model

    from pipeline.pyfunc_model import TrainedPipeline

    with tempfile.TemporaryDirectory() as tmp:
        # Model.log rather than mlflow.pyfunc.log_model: only it takes a run id (no start_run, see _log_model).
        return Model.log(
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=TrainedPipeline(),
            artifacts={TRAIN_OUTPUT_ARTIFACT: str(output.folder)},
            model_config={"base_model": base_model, "base_revision": output.base_revision},
            code_paths=[str(_code_package(Path(tmp)))],
            signature=_signature(),
            # Explicit: otherwise MLflow infers them by loading the model in a subprocess.
            pip_requirements=mlflow.diffusers.get_default_pip_requirements(),
            metadata={"sdft": output.describe() | {"why_pyfunc": why}},
        )


def claim_and_promote(c: Any, model_name: str, mv: Any, expected: str | None, claim: str, reason: str) -> None:
    """Move `champion` to the new version `mv` if it is the first live registration against `expected`.

    A lower-numbered version expecting the same champion is a rival while it is `pending` or `promoted`, unless it
    is dead: its run was ended (the flow ends the run only after `register` returns) or it is older than
    CLAIM_LEASE_S. Raises StaleBaseline when a rival exists or the champion is no longer `expected`.
    """
    version = str(mv.version)
    rivals = [
        other
        for other in _versions(c, model_name, f"tags.`{EXPECTED}` = '{expected or 'none'}'")
        if int(other.version) < int(version)
        and other.tags.get(CLAIM) != claim
        and other.tags.get(PROMOTION) in ("pending", "promoted")
        and mv.creation_timestamp - other.creation_timestamp < CLAIM_LEASE_S * 1000
    ]
    rivals = [other for other in rivals if other.tags.get(PROMOTION) == "promoted" or _run_alive(c, other.run_id)]
    if rivals:
        first = min(rivals, key=lambda o: int(o.version))
        raise StaleBaseline(
            f"version {version} was registered but not promoted: version {first.version} was registered first "
            f"against the same champion ({_v(expected)}) and takes its place; this candidate was never compared "
            f"with it. Re-run the retrain to compare with the new champion."
        )
    now = _current(model_name)
    if now != expected:
        raise StaleBaseline(
            f"version {version} was registered but not promoted: the champion moved from {_v(expected)} to {_v(now)} "
            "while it was being registered. Re-run the retrain to compare with the new champion."
        )
    # previous-champion first: a crash in between leaves both aliases on the old champion, which is harmless.
    if expected:
        with_retries(lambda: c.set_registered_model_alias(model_name, PREVIOUS, expected), "move alias")
    with_retries(lambda: c.set_registered_model_alias(model_name, CHAMPION, version), "move alias")
    with_retries(lambda: c.set_model_version_tag(model_name, version, PROMOTION, "promoted"), "tag version")
    record = audit_record("promote", reason, by="gate", version=version, previous=expected, alias=CHAMPION)
    _write_audit(c, model_name, [version], record)


def _run_alive(c: Any, run_id: str | None) -> bool:
    if not run_id:
        return False
    run = with_retries(lambda: c.get_run(run_id), "read run")
    return run.info.status in ("RUNNING", "SCHEDULED")


def _make_challenger(c: Any, model_name: str, version: str, expected: str | None, reason: str) -> None:
    """Manual approval: the gate's winner waits behind `challenger`; a newer winner supersedes an older one."""
    older = alias_version(model_name, CHALLENGER)
    with_retries(lambda: c.set_registered_model_alias(model_name, CHALLENGER, version), "move alias")
    if older and older != version:
        _tag_quietly(c, model_name, older, {PROMOTION: "superseded"})
    record = audit_record("challenge", reason, by="gate", version=version, compared_with=expected, alias=CHALLENGER)
    _write_audit(c, model_name, [version], record)


def _ensure_registered_model(c: Any, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    if _model_exists(c, model_name):
        return
    try:
        with_retries(lambda: c.create_registered_model(model_name), "create model")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another first registration created it meanwhile
            raise


def _tag_quietly(c: Any, model_name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        try:
            with_retries(lambda k=key, v=value: c.set_model_version_tag(model_name, version, k, v), "tag", attempts=1)
        except Exception:  # noqa: BLE001 - best effort on the way out of a failure; the original error is raised
            return


def _current(model_name: str) -> str | None:
    found = champion(model_name)
    return found.version if found else None


def _v(version: str | None) -> str:
    return f"version {version}" if version else "none (the base model)"


# --------------------------------------------------------------------------------------------------------------------
# Moves by a person: promote (override), rollback, approve
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    model_name: str
    version: str  # the new champion
    previous: str | None  # the champion it replaced
    record: dict[str, Any]


def promote_version(model_name: str, version: str, reason: str) -> Move:
    """Manual override: make `version` the champion, whatever the gate said; the old one keeps previous-champion."""
    _require_reason(reason, "promote")
    mv = get_version(model_name, version)
    version = str(mv.version)
    current = _current(model_name)
    if current == version:
        raise RegistryError(f"version {version} of {model_name!r} is already the champion; nothing to do.")
    return _move_champion(model_name, version, current, audit_record("promote", reason, by="manual override"))


def rollback(model_name: str, reason: str = "") -> Move:
    """Put `previous-champion` back behind `champion`. The rolled-back version is tagged and previous-champion is
    cleared, so a second rollback stops with an error instead of flipping back to the version just removed."""
    current, previous = _current(model_name), alias_version(model_name, PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"{model_name!r} has no {PREVIOUS!r} alias, so there is nothing to roll back to (the champion is "
            f"{_v(current)}). Choose a version explicitly: `sdft promote <version> --reason ...` (see `sdft models`)."
        )
    if current == previous:
        raise RegistryError(f"{PREVIOUS!r} and {CHAMPION!r} both point to version {current}; nothing to roll back.")
    record = audit_record("rollback", reason or "(no reason given)", rolled_back=current)
    move = _move_champion(model_name, previous, current, record, keep_previous=False)
    if current:
        _tag_quietly(client(), model_name, current, {PROMOTION: "rolled-back"})
    return move


def approve(model_name: str, version: str | None, reason: str) -> Move:
    """Promote the challenger (or `version`), refusing when the champion moved since it was compared."""
    _require_reason(reason, "approve")
    if version is None:
        version = alias_version(model_name, CHALLENGER)
        if version is None:
            raise RegistryError(
                f"{model_name!r} has no {CHALLENGER!r}: no candidate is waiting for approval (with registry.approval: "
                "manual, a retrain whose candidate passes the gate sets it)."
            )
    mv = get_version(model_name, version)
    version, tags = str(mv.version), dict(mv.tags or {})
    if tags.get(PROMOTION) != CHALLENGER:
        raise RegistryError(
            f"version {version} is not a challenger (its sdft.promotion tag is {tags.get(PROMOTION)!r}); only a "
            "version the gate passed in manual-approval mode can be approved. To promote it anyway: "
            f"`sdft promote {version} --reason ...`."
        )
    compared = tags.get(EXPECTED)
    compared = None if compared in (None, "", "none") else compared
    current = _current(model_name)
    if current != compared:
        raise StaleBaseline(
            f"refusing to approve version {version}: it was compared with {_v(compared)}, but the champion is now "
            f"{_v(current)}, so its gate decision no longer holds. Re-run the retrain to compare with the current "
            f"champion, or override with `sdft promote {version} --reason ...`."
        )
    return _move_champion(model_name, version, current, audit_record("approve", reason, compared_with=compared))


def _move_champion(
    model_name: str, version: str, expected: str | None, record: dict[str, Any], keep_previous: bool = True
) -> Move:
    """champion -> `version`; previous-champion -> the old champion (or cleared); challenger cleared if it was this.

    The champion is read again right before the move and must still be `expected`. The remaining window (between
    that read and the alias write) is a few milliseconds of two people acting on the same model at once; MLflow has
    no conditional alias update to close it. The audit trail shows both moves if it ever happens.
    """
    c = client()
    now = _current(model_name)
    if now != expected:
        raise StaleBaseline(f"the champion of {model_name!r} moved to {_v(now)} meanwhile; nothing was changed.")
    # Ordered so that a failure between two writes never loses a pointer: at worst both aliases name one version.
    if keep_previous and expected:
        with_retries(lambda: c.set_registered_model_alias(model_name, PREVIOUS, expected), "move alias")
    with_retries(lambda: c.set_registered_model_alias(model_name, CHAMPION, version), "move alias")
    if not keep_previous:
        with_retries(lambda: _delete_alias(c, model_name, PREVIOUS), "move alias")
    if alias_version(model_name, CHALLENGER) == version:
        with_retries(lambda: _delete_alias(c, model_name, CHALLENGER), "move alias")
    with_retries(lambda: c.set_model_version_tag(model_name, version, PROMOTION, "promoted"), "tag version")
    record = record | {"version": version, "previous": expected, "alias": CHAMPION}
    _write_audit(c, model_name, [version, expected or ""], record)
    return Move(model_name, version, expected, record)


def _delete_alias(c: Any, model_name: str, alias: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.delete_registered_model_alias(model_name, alias)
    except MlflowException as exc:
        if not _missing(exc):
            raise


def _require_reason(reason: str, action: str) -> None:
    if not reason or not reason.strip():
        raise RegistryError(f"`{action}` needs a reason (--reason '...'): it is kept in the audit record.")


# --------------------------------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------------------------------


def model_exists(model_name: str) -> bool:
    """Whether a registered model of that name exists in the tracking store."""
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        with_retries(lambda: c.get_registered_model(model_name), "read model")
    except MlflowException as exc:
        if _missing(exc):
            return False
        raise
    return True


def version_summary(model_name: str, metric_names: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """The newest versions (all, or `limit`) with their aliases, status, decision, key metrics and last audit record.

    `metric_names` picks run metrics (e.g. the gate's metrics as `eval.<name>`); None keeps them all.
    """
    from mlflow.exceptions import MlflowException

    c = client()
    try:
        model = with_retries(lambda: c.get_registered_model(model_name), "read model")
    except MlflowException as exc:
        if _missing(exc):
            return []
        raise
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = sorted(_versions(c, model_name), key=lambda mv: int(mv.version), reverse=True)[:limit]
    rows = []
    for mv in versions:
        run = with_retries(lambda m=mv: c.get_run(m.run_id), "read run") if mv.run_id else None
        metrics = dict(run.data.metrics) if run else {}
        if metric_names is not None:
            metrics = {k: metrics[k] for k in metric_names if k in metrics}
        tags = dict(mv.tags or {})
        audit = _audit_entries(tags)
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "promotion": tags.get(PROMOTION, ""),
                "decision": tags.get("sdft.decision", ""),
                "compared_with": tags.get(EXPECTED, ""),
                "eval_set": tags.get("sdft.eval_set_hash", ""),
                "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
                "run_id": mv.run_id,
                "metrics": metrics,
                "last_audit": audit[-1] if audit else None,
            }
        )
    return rows
