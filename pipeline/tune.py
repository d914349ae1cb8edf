"""Hyperparameter search over `train` keys: an Optuna study whose trials run the train stage's own core.

Core: `run_study(params, prepared, workdir, ...) -> StudyOutcome`: each trial calls `pipeline.train.train` with the
trial's values of `tune.space` set in `params.train`, and reports the held-out validation loss of every validation
check to Optuna, which prunes a trial that falls behind (early stopping still applies inside a trial). A trial that
fails (non-finite loss, out of memory, values the config or trainer refuses) is recorded as failed with its reason,
and the study goes on. Trials are selected on the `validation` split only.
CLI: `python -m pipeline.tune --params params.yaml --prepared data/prepared [--encoded data/encoded]
--workdir .sdft/tune --report reports/tune [--apply]` (or `sdft tune`).

Resume and many workers: the study lives in Optuna storage (SQLite under `--workdir` by default, a database URL in
`tune.storage` for several machines). Running the command again continues the study; N processes on one study pull
its trials until `tune.n_trials` (the study's total) or a budget is spent. A trial whose worker died (no heartbeat for
2 x `tune.heartbeat_seconds`) is failed and run once more with the same values. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import html
import io
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import env
from pipeline.config import Params, ParamsError, TrainParams, TuneParams, load_params, resolve_model, with_key

STUDY_DB = "optuna.db"
# User attributes that take a trial out of the study's count: it never ran (raced past n_trials) or was interrupted.
NOT_COUNTED = "not_counted"


class TuneError(RuntimeError):
    """The study cannot run as configured; the message says why and what to change."""


class TrialFailed(Exception):
    """A trial that could not finish (recorded as FAIL with this reason; the study goes on)."""


class OverBudget(Exception):
    """This worker's new trial raced past the study's n_trials: it is dropped without running."""


@dataclass
class StudyOutcome:
    study_name: str
    storage: str
    best: dict[str, Any] | None  # number, value, params of the best complete trial
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per counted trial (trials.csv)
    stop_reason: str = ""
    mlflow_run_id: str | None = None
    study: Any = None  # the optuna.Study, for reports


# --- the study ---------------------------------------------------------------------------------------------------


def default_storage(workdir: Path) -> str:
    return f"sqlite:///{(workdir / STUDY_DB).resolve()}"


def make_storage(url: str, heartbeat_seconds: int) -> Any:
    """RDB storage with heartbeats: a trial whose worker is silent for 2 x heartbeat is failed and retried once."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}  # workers wait for SQLite's lock
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module prints one line per trial
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
                return RDBStorage(
                    url,
                    engine_kwargs=engine,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=2 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )
        except (IntegrityError, OperationalError):  # workers starting together on a new database race to create it
            if attempt == 2:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def study_fingerprint(params: Params, tune: TuneParams, data_digest: str) -> str:
    """What the trials' losses depend on besides the tuned values: the same fingerprint, the same study."""
    untuned = params.train.model_dump()
    for key in tune.space:
        *parents, leaf = key.split(".")
        node = untuned
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    what = {
        "space": {k: v.model_dump() for k, v in tune.space.items()},
        "objective": tune.objective,
        "base": f"{params.base.model}@{params.base.revision}",
        "random_flip": params.data.random_flip,
        "train": untuned,
        "data": data_digest,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def make_sampler(tune: TuneParams, seed: int) -> Any:
    import optuna

    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "grid":
        return optuna.samplers.GridSampler({k: d.candidates() for k, d in tune.space.items()}, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(tune.startup_trials, 1))


def make_pruner(tune: TuneParams, train: TrainParams) -> Any:
    """The pruner compares trials at equal training steps; warmup_checks is enforced by the trial itself."""
    import optuna

    min_resource = max(tune.warmup_checks, 1) * train.validation_every
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials, n_warmup_steps=0)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=min_resource, max_resource=max(train.max_steps, min_resource), reduction_factor=3
        )
    if tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource, reduction_factor=3)
    return optuna.pruners.NopPruner()


def suggest(trial: Any, tune: TuneParams) -> dict[str, Any]:
    values = {}
    for key, dim in tune.space.items():
        if dim.type == "float":
            values[key] = trial.suggest_float(key, float(dim.low), float(dim.high), log=dim.log)
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), step=dim.step or 1, log=dim.log)
        else:
            values[key] = trial.suggest_categorical(key, dim.values)
    return values


def retried_numbers(trials: list[Any]) -> set[int]:
    """Trials whose worker died and which were run again under a new number."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", []) if n != t.number}


def counted(trials: list[Any]) -> list[Any]:
    """The trials n_trials counts: not those run again after their worker died, nor dropped or interrupted ones."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.number not in retried and not t.user_attrs.get(NOT_COUNTED)]


def spent(trials: list[Any]) -> tuple[float, int]:
    """Seconds and training steps the study's finished trials used."""
    done = [t for t in trials if t.state.is_finished()]
    return sum(t.user_attrs.get("seconds", 0.0) for t in done), sum(t.user_attrs.get("steps", 0) for t in done)


def budget_left(trials: list[Any], tune: TuneParams, total: int) -> str | None:
    """None while the study may start a trial, else why not."""
    mine = counted(trials)
    if len(mine) >= total:
        return f"the study has its {total} trials"
    seconds, steps = spent(mine)
    if tune.max_minutes is not None and seconds >= tune.max_minutes * 60:
        return f"tune.max_minutes={tune.max_minutes} spent ({seconds / 60:.1f} trial-minutes)"
    if tune.max_total_steps is not None and steps >= tune.max_total_steps:
        return f"tune.max_total_steps={tune.max_total_steps} spent ({steps} steps)"
    return None


def study_total(tune: TuneParams) -> int:
    if tune.sampler == "grid":
        return min(tune.n_trials, math.prod(len(d.candidates()) for d in tune.space.values()))
    return tune.n_trials


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def failure_reason(exc: BaseException) -> str | None:
    """A one-line reason when `exc` is how a trial fails (bad values, divergence, memory); None for a bug."""
    from pydantic import ValidationError

    from pipeline.train import NonFiniteLoss

    if isinstance(exc, NonFiniteLoss):
        return f"non-finite loss: {exc}"
    if is_out_of_memory(exc):
        return f"out of memory: {str(exc).splitlines()[0][:300]}"
    if isinstance(exc, ValidationError):
        return "refused by the config: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
        )
    if isinstance(exc, ParamsError):
        return f"refused by the trainer: {exc}"
    return None


# --- one trial -----------------------------------------------------------------------------------------------------


@dataclass
class TrialContext:
    """What every trial of a worker shares: the data read once, the base model's location, the tracker."""

    params: Params
    tune: TuneParams
    model: str
    splits: tuple[Any, Any]
    precomputed: Any
    folder: Path  # the study's folder: one trial_<n>/ per trial
    total: int
    tracker: Tracker
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)


def trial_params(train: TrainParams, values: dict[str, Any]) -> TrainParams:
    """The train section with the trial's values; no sample grids or checkpoints (a killed trial starts over)."""
    dumped = train.model_dump()
    for key, value in values.items():
        dumped = with_key(dumped, key, value)
    dumped |= {"sample_every": 0, "checkpoint_every": 0}
    return TrainParams.model_validate(dumped)  # a refused combination raises ValidationError: the trial fails


def objective(trial: Any, ctx: TrialContext) -> float:
    import optuna

    from pipeline.diffusion import load_components
    from pipeline.train import train

    study = trial.study
    before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(before) >= ctx.total:
        trial.set_user_attr(NOT_COUNTED, "over budget: another worker took the study's last trial")
        raise OverBudget()
    values = suggest(trial, ctx.tune)
    folder = ctx.folder / f"trial_{trial.number:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(values, indent=2) + "\n")
    with open(folder / "starts.log", "a") as handle:  # one line per time this trial number started
        handle.write(f"{time.time():.3f} pid {os.getpid()}\n")
    # A retried trial inherits the dead one's attributes: start clean.
    for key in ("reason", "seconds", "steps", "curve", "mlflow_run_id", NOT_COUNTED):
        trial.set_user_attr(key, None)
    trial.set_user_attr("folder", str(folder))
    run_id = ctx.tracker.start_trial(trial.number, values)
    trial.set_user_attr("mlflow_run_id", run_id)
    curve: list[list[float]] = []
    t0 = time.perf_counter()

    def on_validation(step: int, val_loss: float) -> None:
        curve.append([step, val_loss])
        trial.report(val_loss, step)
        checks = len(curve) - 1  # step 0 (the untrained adapter) is not a check of this trial's values
        if step > 0 and checks > ctx.tune.warmup_checks and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: validation loss {val_loss:.5f} behind the others")

    def finish(state: str, value: float | None, reason: str = "") -> None:
        seconds = round(time.perf_counter() - t0, 3)
        steps = int(curve[-1][0]) if curve else 0
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("steps", steps)
        trial.set_user_attr("curve", curve)
        if reason:
            trial.set_user_attr("reason", reason)
            (folder / "reason.txt").write_text(reason + "\n")
        write_curve(folder / "curve.csv", curve)
        ctx.tracker.finish_trial(run_id, state, curve, value, seconds, steps, reason)

    try:
        params = trial_params(ctx.params.train, values)
        components = load_components(ctx.model, ctx.params.base.revision)  # fresh: train adds LoRA layers in place
        result = train(
            components,
            *ctx.splits,
            params,
            random_flip=ctx.params.data.random_flip,
            precomputed=ctx.precomputed,
            on_validation=on_validation,
        )
    except optuna.TrialPruned as exc:
        finish("pruned", None, str(exc))
        raise
    except KeyboardInterrupt:
        finish("failed", None, "interrupted")
        trial.set_user_attr(NOT_COUNTED, "interrupted")
        raise
    except Exception as exc:
        reason = failure_reason(exc)
        (folder / "error.txt").write_text(traceback.format_exc())
        finish("failed", None, reason or f"error: {type(exc).__name__}: {exc}")
        if reason is None:
            raise  # a bug, not a bad combination: stop the study rather than fail every trial alike
        raise TrialFailed(reason) from exc
    value = result.best_val_loss if ctx.tune.objective == "best_val_loss" else curve[-1][1]
    if not math.isfinite(value):
        finish("failed", None, f"non-finite validation loss {value}")
        raise TrialFailed(f"non-finite validation loss {value}")
    trial.set_user_attr("stop_reason", result.stop_reason)
    trial.set_user_attr("best_step", result.best_step)
    (folder / "summary.json").write_text(
        json.dumps({"value": value, "best_step": result.best_step, "stop_reason": result.stop_reason}, indent=2)
    )
    finish("complete", value)
    return value


def write_curve(path: Path, curve: list[list[float]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "val_loss"])
        writer.writerows(curve)
    tmp.replace(path)


# --- tracking and progress -----------------------------------------------------------------------------------------


class Tracker:
    """One MLflow parent run per study, a nested child run per trial (params, validation curve, state, cost)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.parent: str | None = None

    def open_study(self, study: Any, name: str, tune: TuneParams, created: bool) -> str | None:
        if not self.enabled:
            return None
        from pipeline import registry

        parent = study.user_attrs.get("mlflow_run_id")
        if parent is None and not created:
            # The worker that created the study opens the run (and, the first time, the tracking database, whose
            # creation two processes must not race): wait for its id, then take over if it died in between.
            for _ in range(240):
                time.sleep(0.5)
                parent = study.user_attrs.get("mlflow_run_id")  # user_attrs reads the storage each time
                if parent:
                    break
        c = registry.client()
        if parent is None:
            params = {
                "space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in tune.space.items()}),
                **{k: getattr(tune, k) for k in ("n_trials", "sampler", "pruner", "warmup_checks", "objective")},
                **{k: getattr(tune, k) for k in ("startup_trials", "max_minutes", "max_total_steps", "seed")},
            }
            tags = {"sdft.tune.study": name, "sdft.kind": "tune-study"}
            parent = registry.start_run(f"tune {name}", params, tags)
            study.set_user_attr("mlflow_run_id", parent)
        else:
            registry.with_retries(lambda: c.update_run(parent, status="RUNNING"), "reopen study run")
        self.parent = parent
        return parent

    def start_trial(self, number: int, values: dict[str, Any]) -> str | None:
        if not self.parent:
            return None
        from mlflow.entities import Param

        from pipeline import registry

        c = registry.client()
        tags = {"mlflow.parentRunId": self.parent, "sdft.tune.trial": str(number), "sdft.kind": "tune-trial"}
        run = registry.with_retries(
            lambda: c.create_run(registry.experiment_id(), run_name=f"trial {number}", tags=tags), "create trial run"
        )
        items = [Param(f"train.{k}", str(v)) for k, v in values.items()]
        registry.with_retries(lambda: c.log_batch(run.info.run_id, params=items), "log trial params")
        return run.info.run_id

    def finish_trial(
        self, run_id: str | None, state: str, curve: list[list[float]], value: float | None, seconds: float,
        steps: int, reason: str,
    ) -> None:  # fmt: skip
        if not run_id:
            return
        from mlflow.entities import Metric

        from pipeline import registry

        c = registry.client()
        now = int(time.time() * 1000)
        metrics = [Metric("val_loss", float(v), now, int(s)) for s, v in curve if math.isfinite(v)]
        metrics += [Metric("seconds", seconds, now, 0), Metric("steps", float(steps), now, 0)]
        if value is not None:
            metrics.append(Metric("objective", float(value), now, 0))
        tags = {"sdft.tune.state": state, "sdft.tune.reason": reason[:5000]}
        registry.with_retries(lambda: c.log_batch(run_id, metrics=metrics), "log trial metrics")
        for key, tag in tags.items():
            registry.with_retries(lambda k=key, t=tag: c.set_tag(run_id, k, t), "tag trial")
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
        registry.with_retries(lambda: c.set_terminated(run_id, status), "end trial run")

    def close_study(self, best: dict[str, Any] | None, report: Path | None, finished: bool) -> None:
        if not self.parent:
            return
        from pipeline import registry

        if best is not None:
            registry.log_metrics(self.parent, {"best_objective": best["value"], "best_trial": best["number"]})
            registry.set_tags(self.parent, {"sdft.tune.best_params": json.dumps(best["params"])})
        if report is not None and report.is_dir():
            registry.log_artifacts(self.parent, [report], "tune")
        if finished:
            registry.end_run(self.parent)


def progress_line(study: Any, frozen: Any, total: int) -> str:
    """trial n/N, params, val_loss, state, best so far, ETA."""
    trials = counted(study.get_trials(deepcopy=False))
    done = [t for t in trials if t.state.is_finished()]
    running = sum(1 for t in trials if t.state.name == "RUNNING")
    seconds = [t.user_attrs.get("seconds") or 0.0 for t in done]
    left = max(total - len(done), 0)
    eta = (sum(seconds) / len(seconds)) * left / max(running, 1) if seconds and left else 0.0
    values = ", ".join(f"{k}={_short(v)}" for k, v in frozen.params.items())
    curve = frozen.user_attrs.get("curve") or []
    loss = f"{frozen.value:.5f}" if frozen.value is not None else (f"{curve[-1][1]:.5f}" if curve else "-")
    state = frozen.state.name.lower()
    if frozen.state.name == "PRUNED":
        state += f" at step {frozen.user_attrs.get('steps')}"
    elif frozen.state.name == "FAIL":
        state += f" ({frozen.user_attrs.get('reason') or 'error'})"
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    best_text = f"{best.value:.5f} (trial {best.number})" if best else "-"
    return (
        f"trial {len(done)}/{total} (#{frozen.number}): {values} | val_loss {loss} | {state} | "
        f"best {best_text} | ETA {_duration(eta)}"
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


# --- the worker loop -----------------------------------------------------------------------------------------------


def open_study(
    tune: TuneParams, storage: Any, name: str, fingerprint: str, baseline: dict[str, Any] | None
) -> tuple[Any, bool]:
    """Create the study (the first worker) or load it; returns (study, created)."""
    import optuna

    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        created = False
    if created:
        study.set_user_attr("fingerprint", fingerprint)
        if baseline is not None:  # the current values first, so "better than what we have" is measured, not assumed
            study.enqueue_trial(baseline, user_attrs={"baseline": True})
    else:
        seen = study.user_attrs.get("fingerprint")
        for _ in range(20):  # its creator writes the fingerprint just after creating it
            if seen is not None:
                break
            time.sleep(0.5)
            seen = study.user_attrs.get("fingerprint")
        if seen not in (None, fingerprint):
            raise TuneError(
                f"study '{name}' in the storage was run with other data, base model, untuned train keys or space: "
                "its trials are not comparable with these. Set tune.study_name to a new name (or null: named after "
                "what the trials depend on), or delete the study."
            )
    return study, created


def current_values(train: TrainParams, tune: TuneParams) -> dict[str, Any] | None:
    """The train section's own values of the tuned keys, when every one lies in the space."""
    dumped = train.model_dump()
    values = {}
    for key, dim in tune.space.items():
        value: Any = dumped
        for part in key.split("."):
            value = value[part]
        if dim.type == "choice":
            inside = value in (dim.values or [])
        else:  # a null (e.g. snr_gamma: null) or other non-number is outside any range
            inside = isinstance(value, int | float) and not isinstance(value, bool) and dim.low <= value <= dim.high
        if dim.type == "int" and inside:
            inside = (value - dim.low) % (dim.step or 1) == 0
        if not inside:
            return None
        values[key] = value
    return values


def run_study(
    params: Params,
    prepared: Path,
    workdir: Path,
    *,
    encoded_dir: Path | None = None,
    root: Path | None = None,
    tracking: bool = True,
    log: Callable[[str], None] = print,
) -> StudyOutcome:
    """Run (or continue) the study of `params.tune` until its trials or budget are spent; return its outcome."""
    import optuna

    from pipeline import encoded
    from pipeline.diffusion import load_components, read_split

    tune = params.tune
    root = root or Path.cwd()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TuneError(
            "a tuning worker is one process (its trials train on one device): start one worker per GPU, e.g. "
            "CUDA_VISIBLE_DEVICES=1 sdft tune --no-repro, not a multi-process launch (docs/tuning.md)"
        )
    model = resolve_model(params, root)
    splits = read_split(prepared / "train"), read_split(prepared / "validation")
    digest = encoded.split_digest(prepared / "train") + encoded.split_digest(prepared / "validation")
    fingerprint = study_fingerprint(params, tune, digest)
    name = tune.study_name or f"sdft-{fingerprint[:12]}"
    url = tune.storage or default_storage(workdir)
    storage = make_storage(url, tune.heartbeat_seconds)
    study, created = open_study(tune, storage, name, fingerprint, current_values(params.train, tune))
    # Each worker samples from its own seed: workers sharing one would propose the same values at the same time.
    seed = tune.seed if created else tune.seed + os.getpid()
    study.sampler, study.pruner = make_sampler(tune, seed), make_pruner(tune, params.train)
    tracker = Tracker(tracking)
    parent = tracker.open_study(study, name, tune, created)
    total = study_total(tune)
    log(f"study '{name}' ({url.split('://')[0]}): {total} trials, sampler {tune.sampler}, pruner {tune.pruner}")

    components = load_components(model, params.base.revision)
    precomputed = read_inputs(components, prepared, encoded_dir, params)
    del components
    ctx = TrialContext(params, tune, model, splits, precomputed, workdir / name, total, tracker, log)

    def after_trial(study: Any, frozen: Any) -> None:
        if not frozen.user_attrs.get(NOT_COUNTED):
            log(progress_line(study, frozen, total))

    stop = None
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state.name == "WAITING" for t in trials)
        stop = None if waiting else budget_left(trials, tune, total)
        if stop is not None:
            running = [t for t in counted(trials) if t.state.name == "RUNNING"]
            if not running:
                break
            time.sleep(min(5.0, tune.heartbeat_seconds))  # another worker's trial: it completes, or dies and returns
            continue
        study.optimize(
            lambda trial: objective(trial, ctx), n_trials=1, catch=(TrialFailed, OverBudget), callbacks=[after_trial]
        )
    outcome = summarise(study, name, url, stop or "", parent)
    log(f"study '{name}' done: {outcome.stop_reason}")
    return outcome


def read_inputs(components: Any, prepared: Path, encoded_dir: Path | None, params: Params) -> Any:
    """Latents and text conditioning for every trial: the encode stage's when they match, else encoded once here."""
    from pipeline.encode import WorkCache, encode_splits
    from pipeline.train import load_precomputed

    with_text = not params.train.train_text_encoder
    if encoded_dir is not None:
        found = load_precomputed(encoded_dir, prepared, components, params.data.random_flip, with_text)
        if found is not None:
            return found
    splits = encode_splits(components, prepared, params.data.random_flip, WorkCache(None, ""))
    return splits["train"], splits["validation"]


def trial_rows(study: Any) -> list[dict[str, Any]]:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    rows = []
    for t in counted(trials) + [t for t in trials if t.number in retried]:
        if t.state.name in ("RUNNING", "WAITING"):
            continue
        reason = t.user_attrs.get("reason") or ""
        if t.number in retried:
            reason = "its worker stopped (no heartbeat); run again under a new number"
        row = {
            "trial": t.number,
            "state": {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[t.state.name],
            "objective": t.value,
            "steps": t.user_attrs.get("steps"),
            "seconds": t.user_attrs.get("seconds"),
            "baseline": bool(t.user_attrs.get("baseline")),
            "counted": t.number not in retried,
            "reason": reason,
        }
        rows.append(row | {f"train.{k}": v for k, v in t.params.items()})
    return sorted(rows, key=lambda r: r["trial"])


def summarise(study: Any, name: str, url: str, stop_reason: str, parent: str | None) -> StudyOutcome:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    best_row = (
        {"number": best.number, "value": best.value, "params": dict(best.params), "steps": best.user_attrs.get("steps")}
        if best
        else None
    )
    return StudyOutcome(name, url, best_row, trial_rows(study), stop_reason, parent, study)


# --- reports -------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


def write_reports(study: Any, outcome: StudyOutcome, train: TrainParams, out: Path) -> None:
    """reports/tune: trials.csv, best_params.json, history/importance/curves PNGs and a self-contained report.html."""
    out.mkdir(parents=True, exist_ok=True)
    rows = outcome.trials
    columns = list(dict.fromkeys(k for row in rows for k in row)) or ["trial"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(out / "trials.csv", buffer.getvalue())
    baseline = next((r for r in rows if r["baseline"] and r["state"] == "complete"), None)
    best = {
        "study": outcome.study_name,
        "best_trial": outcome.best["number"] if outcome.best else None,
        "objective": outcome.best["value"] if outcome.best else None,
        "train": outcome.best["params"] if outcome.best else {},
        "current_values_objective": baseline["objective"] if baseline else None,
        "stop_reason": outcome.stop_reason,
        "mlflow_run_id": outcome.mlflow_run_id,
    }
    _write_atomic(out / "best_params.json", json.dumps(best, indent=2) + "\n")
    images = plots(study, rows)
    for name, png in images.items():
        _write_atomic(out / f"{name}.png", png)
    _write_atomic(out / "report.html", html_report(outcome, rows, images, importance_of(study)))


def importance_of(study: Any) -> dict[str, float]:
    """optuna.importance (fANOVA) over the complete trials; empty until two of them differ."""
    import optuna

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. a parameter that took one value in every complete trial
        return {}


def plots(study: Any, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig: Any) -> bytes:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        return buffer.getvalue()

    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    images = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    done = [r for r in rows if r["counted"]]
    best, xs, ys = math.inf, [], []
    for r in done:
        if r["state"] == "complete":
            best = min(best, r["objective"])
        xs.append(r["trial"])
        ys.append(best if math.isfinite(best) else None)
    styles = {"complete": ("o", "tab:blue"), "pruned": ("x", "tab:red"), "failed": ("s", "grey")}
    for state, (marker, colour) in styles.items():
        points = [(r["trial"], _last_loss(by_number[r["trial"]])) for r in done if r["state"] == state]
        points = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
        if points:
            label = "complete (objective)" if state == "complete" else f"{state} (loss at its last check)"
            ax.scatter(*zip(*points, strict=True), marker=marker, color=colour, label=label)
    ax.plot(xs, ys, color="black", drawstyle="steps-post", label="best so far")
    ax.set(xlabel="trial", ylabel="validation loss", title="Optimisation history")
    ax.legend(fontsize=8)
    images["history"] = png(fig)

    importance = importance_of(study)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * max(len(importance), 1)))
    if importance:
        names = list(importance)[::-1]
        ax.barh(names, [importance[n] for n in names], color="tab:blue")
        ax.set(xlabel="importance (fANOVA share of the objective's variance)", title="Parameter importance")
    else:
        ax.text(0.5, 0.5, "needs two complete trials with different losses", ha="center", va="center")
        ax.set_axis_off()
    images["importance"] = png(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    complete = [r for r in done if r["state"] == "complete"]
    best_number = min(complete, key=lambda r: r["objective"])["trial"] if complete else None
    for r in done:
        curve = by_number[r["trial"]].user_attrs.get("curve") or []
        if not curve:
            continue
        steps, losses = zip(*curve, strict=True)
        if r["state"] == "pruned":
            ax.plot(steps, losses, color="tab:red", alpha=0.6, linestyle="--")
            ax.scatter([steps[-1]], [losses[-1]], marker="x", color="tab:red")
        elif r["state"] == "failed":
            ax.plot(steps, losses, color="grey", alpha=0.5, linestyle=":")
        elif best_number is not None and r["trial"] == best_number:
            ax.plot(steps, losses, color="black", linewidth=2, label=f"best (trial {best_number})")
        else:
            ax.plot(steps, losses, color="tab:blue", alpha=0.7)
    if best_number is not None:
        ax.legend(fontsize=8)
    ax.set(xlabel="training step", ylabel="validation loss", title="Validation curves (red dashed, x: pruned)")
    images["curves"] = png(fig)
    return images


def _last_loss(trial: Any) -> float | None:
    if trial.value is not None:
        return trial.value
    curve = trial.user_attrs.get("curve") or []
    return curve[-1][1] if curve else None


def html_report(outcome: StudyOutcome, rows: list[dict[str, Any]], images: dict[str, bytes], imp: dict) -> str:
    def img(name: str) -> str:
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(images[name]).decode()}">'

    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f'<tr class="{r["state"]}">' + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in columns) + "</tr>"
        for r in rows
    )
    best = outcome.best
    best_text = (
        f"trial {best['number']}: objective {best['value']:.5f} with "
        + ", ".join(f"<code>train.{html.escape(k)}: {html.escape(_cell(v))}</code>" for k, v in best["params"].items())
        if best
        else "no complete trial yet"
    )
    importance = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in imp.items()) or "not enough complete trials"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sdft tuning: {html.escape(outcome.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px}}
tr.pruned{{color:#b22}}tr.failed{{color:#777}}img{{max-width:100%}}</style>
</head><body>
<h1>Hyperparameter study <code>{html.escape(outcome.study_name)}</code></h1>
<p>Objective: held-out validation loss (the <code>validation</code> split), lower is better.
Best: {best_text}. {html.escape(outcome.stop_reason)}</p>
<p>Apply it with <code>sdft tune --apply</code> (changes only the tuned keys of params.yaml); the normal pipeline then
trains that candidate and the gate judges it.</p>
<h2>Optimisation history</h2>{img("history")}
<h2>Parameter importance</h2><p>{importance}</p>{img("importance")}
<h2>Validation curves</h2>{img("curves")}
<h2>Trials</h2><table><tr>{head}</tr>{body}</table>
</body></html>
"""


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --- applying the best values to params.yaml -----------------------------------------------------------------------


def yaml_scalar(value: Any) -> str:
    """`value` as a YAML flow scalar that reads back equal."""
    text = yaml.safe_dump([value], default_flow_style=True, width=10_000).strip()
    return text[1:-1]


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """Index after the block of the key at `start`: the first later key line indented no deeper than it."""
    for i in range(start + 1, len(lines)):
        stripped = lines[i].strip()
        if stripped and not stripped.startswith("#") and len(lines[i]) - len(lines[i].lstrip(" ")) <= indent:
            return i
    return len(lines)


def find_key_line(lines: list[str], path: list[str]) -> int:
    """Index of the line that holds the block-mapping key `path` (e.g. ["train", "learning_rate"])."""
    lo, hi, indent = 0, len(lines), -1
    found = -1
    for part in path:
        child_indent = None
        found = -1
        for i in range(lo, hi):
            stripped = lines[i].strip()
            if not stripped or stripped.startswith("#"):
                continue
            this = len(lines[i]) - len(lines[i].lstrip(" "))
            if this <= indent:
                break
            if child_indent is None:
                child_indent = this
            if this == child_indent and (stripped.startswith(f"{part}:") or stripped == f"{part}:"):
                found = i
                break
        if found < 0:
            raise KeyError(".".join(path))
        lo, hi, indent = found + 1, _block_end(lines, found, child_indent or 0), child_indent or 0
    return found


def set_value_line(line: str, key: str, new: str) -> str:
    """`line` ("  key: old   # comment") with its value replaced, the comment kept at its column when it fits."""
    head, _, rest = line.partition(f"{key}:")
    newline = "\n" if rest.endswith("\n") else ""
    rest = rest.rstrip("\n")
    value_part, hash_, comment = rest.partition(" #")
    if not value_part.strip():
        raise ValueError(f"'{key}' holds a nested block, not a value")
    prefix = f"{head}{key}: {new}"
    if not hash_:
        return prefix + newline
    column = len(head) + len(key) + 1 + len(value_part) + 1  # where the '#' was
    return f"{prefix}{' ' * max(column - len(prefix), 1)}#{comment}{newline}"


def apply_values(text: str, values: dict[str, Any]) -> str:
    """params.yaml text with `train.<key>` set to each of `values`; every other byte is kept (comments, layout).

    Checked by parsing: the result differs from the input in exactly these keys.
    """
    lines = text.splitlines(keepends=True)
    for key, value in values.items():
        parts = ["train", *key.split(".")]
        try:
            i = find_key_line(lines, parts)
        except KeyError:
            raise TuneError(f"params.yaml has no line for train.{key} to set; add it to the train section") from None
        lines[i] = set_value_line(lines[i], parts[-1], yaml_scalar(value))
    new = "".join(lines)
    expected = yaml.safe_load(text)
    for key, value in values.items():
        expected["train"] = with_key(expected["train"], key, value)
    if yaml.safe_load(new) != expected:
        raise TuneError("editing params.yaml line by line would change more than the tuned keys; set them by hand")
    return new


def apply_best(params_path: Path, best: dict[str, Any]) -> dict[str, Any]:
    """Write the best trial's values into params.yaml; return {key: (old, new)} for the keys that changed."""
    text = params_path.read_text()
    current = yaml.safe_load(text)["train"]
    changed = {}
    for key, value in best.items():
        old: Any = current
        for part in key.split("."):
            old = old.get(part) if isinstance(old, dict) else None
        if old != value:
            changed[key] = (old, value)
    if changed:
        new = apply_values(text, {k: v for k, (_, v) in changed.items()})
        tmp = params_path.with_name(f".{params_path.name}.partial")
        tmp.write_text(new)
        tmp.replace(params_path)
    return changed


# --- CLI -----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, type=Path, help="output folder of the prepare stage")
    parser.add_argument("--encoded", type=Path, help="output folder of the encode stage (optional)")
    parser.add_argument("--workdir", default=Path(".sdft/tune"), type=Path, help="study database and trial folders")
    parser.add_argument("--report", default=Path("reports/tune"), type=Path, help="folder for the study's report")
    parser.add_argument("--apply", action="store_true", help="write the best values into params.yaml afterwards")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the study to MLflow")
    args = parser.parse_args(argv)
    env.configure()
    try:
        params = load_params(args.params)
        root = Path(args.params).resolve().parent
        outcome = run_study(
            params, args.prepared, args.workdir, encoded_dir=args.encoded, root=root, tracking=not args.no_mlflow
        )
    except (ParamsError, TuneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_reports(outcome.study, outcome, params.train, args.report)
    tracker = Tracker(not args.no_mlflow)
    tracker.parent = outcome.mlflow_run_id
    tracker.close_study(outcome.best, args.report, finished=True)
    print(f"report: {args.report / 'report.html'}")
    if outcome.best is None:
        print("no complete trial: nothing to apply", file=sys.stderr)
        return 1 if args.apply else 0
    print(f"best: trial {outcome.best['number']}, objective {outcome.best['value']:.5f}, {outcome.best['params']}")
    if args.apply:
        try:
            changed = apply_best(Path(args.params), outcome.best["params"])
        except TuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for key, (old, new) in changed.items():
            print(f"params.yaml: train.{key}: {old} -> {new}")
        if not changed:
            print("params.yaml already holds the best values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
