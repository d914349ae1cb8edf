"""The retrain flow: DVC stages (prepare -> encode -> train -> evaluate), then gate, then register.

The stage graph lives in `dvc.yaml` alone; each stage runs as a task through `dvc repro <stage>`, so DVC skips what is
up to date. Gate and registration depend on the registry, which DVC cannot track, so they run here, with what a
scheduled run needs around them: one retrain at a time per workspace, a data-arrival check (`trigger="data"`),
stage timeouts, a history, artifacts and notifications (docs/scheduling.md).

    python -m flows.retrain            # or: sdft run; scheduled: sdft serve (prefect.yaml)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows import console, notify
from flows.trigger import WorkspaceBusy, data_identity, history, last_success, record, workspace_lock, workspace_name
from pipeline import env, promotion, registry
from pipeline.config import Params, load_params

REPORTS = Path("reports")
LOGS = Path(".sdft") / "logs"
Trigger = Literal["schedule", "data", "manual"]


@dataclass
class RetrainResult:
    promoted: bool
    version: str | None
    run_id: str
    reason: str
    gate_report: str
    skipped: bool = False


def _flat(prefix: str, value: object) -> dict[str, object]:
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for key, item in value.items():
            out |= _flat(f"{prefix}.{key}" if prefix else str(key), item)
        return out
    return {prefix: value}


def stage_names(root: Path) -> list[str]:
    """The stages of `dvc.yaml`, in the order they are declared there (each after its dependencies)."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def data_stages(root: Path) -> list[str]:
    """The stages before `train` (prepare, encode): what a hyperparameter study needs up to date."""
    stages = stage_names(root)
    return stages[: stages.index("train")] if "train" in stages else []


def ensure_workspace(root: Path) -> None:
    """Make `root` usable by DVC: `git init` and `dvc init` only where missing; never commits anything."""
    if subprocess.run(["git", "rev-parse", "--git-dir"], cwd=root, capture_output=True).returncode != 0:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    if not (root / ".dvc").is_dir():
        subprocess.run([_tool("dvc"), "init", "-q"], cwd=root, check=True)


def _tool(name: str) -> str:
    """A console script from this interpreter's environment, even when it is not on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


@task(name="validate params")
def validate(root: Path) -> Params:
    """Stop before any work when params.yaml is malformed."""
    return load_params(root / "params.yaml")


@task(name="open MLflow run", retries=3, retry_delay_seconds=[2, 5, 10])
def open_run(root: Path) -> str:
    """One MLflow run per retrain, tagged with the Prefect flow run."""
    raw = yaml.safe_load(env.redact((root / "params.yaml").read_text()))  # e.g. data.source: https://user:pw@...
    commit, dirty = promotion.git_state(root)
    tags = {
        "sdft.prefect_flow_run_id": str(flow_run.get_id() or ""),
        "mlflow.source.git.commit": commit,
        "sdft.git.dirty": str(dirty).lower(),
    }
    return registry.start_run(str(flow_run.get_name() or "retrain"), _flat("", raw), tags)


class StageFailed(RuntimeError):
    """A DVC stage failed; its message (one line) names the stage, its own exit status and its log."""


def stage_exit_code(dvc_stderr: str, dvc_code: int) -> int:
    """The stage command's own exit status, which `dvc repro` reports as "exited with N" (DVC itself exits 255)."""
    found = re.findall(r"exited with (-?\d+)", dvc_stderr)
    return int(found[-1]) if found else dvc_code


@task(name="dvc repro", task_run_name="dvc repro {stage}")
def run_stage(root: Path, stage: str, run_id: str) -> State | None:
    """Run one DVC stage (and anything upstream that is stale); DVC skips it when nothing changed.

    Output goes to `.sdft/logs/<stage>.{out,err}`. The task's `timeout_seconds` (orchestration.stage_timeout_minutes)
    or a cancellation interrupts the wait below, which then stops DVC and the stage's own processes. A failed stage
    gets its last good outputs back (`restore_outputs`), its error output shown once (as it ran), and a Failed state
    with a one-line message (no traceback: the stage's own message is what the user needs).
    """
    # PYTHONUNBUFFERED: the stage's prints reach the console as they happen, not when its pipe buffer fills.
    environment = os.environ | {"MLFLOW_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    # Stage commands call `python`: make it this interpreter's, venv or not.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    (root / LOGS).mkdir(parents=True, exist_ok=True)
    out_file, err_file = root / LOGS / f"{stage}.out", root / LOGS / f"{stage}.err"
    logger = get_run_logger()
    logger.info("stage %s: full output in %s and %s", stage, out_file, err_file)
    # Progress and messages as they come (credentials stripped), noise only logged.
    tee = console.Tee(lambda line: logger.info("%s", env.redact(line)))
    with open(out_file, "wb") as out, open(err_file, "wb") as err:
        pipe = subprocess.PIPE
        process = subprocess.Popen([_tool("dvc"), "repro", stage], cwd=root, env=environment, stdout=pipe, stderr=pipe)
        tee.start(process.stdout, out)
        tee.start(process.stderr, err)
        try:
            while process.poll() is None:
                time.sleep(0.5)  # short sleeps: a timeout or cancellation lands within half a second
        except BaseException as exc:
            _stop_tree(process.pid)
            if isinstance(exc, Exception):  # a timeout: DVC had already removed the stage's outputs
                get_run_logger().warning("%s", restore_outputs(root, stage))
            raise
        finally:
            tee.join()
    if process.returncode != 0:
        errors = env.redact(err_file.read_text())  # already shown line by line as the stage ran
        logger.warning("%s", restore_outputs(root, stage))
        code = stage_exit_code(errors, process.returncode)
        return Failed(message=f"stage '{stage}' failed (exit {code}); its output: {out_file} and {err_file}")
    return None


def restore_outputs(root: Path, stage: str) -> str:
    """After a failed stage, put back its last good outputs (`dvc checkout <stage>`); return what happened.

    DVC deletes a stage's cached outputs before running its command, so a failed `prepare` would leave no
    data/prepared (and a failed `train` no models/adapter). dvc.lock still names the last good ones, and the cache
    holds them. Stages that ran fine in this repro are already what dvc.lock says: only the failed stage changes.
    """
    done = subprocess.run([_tool("dvc"), "checkout", stage], cwd=root, capture_output=True, text=True)
    if done.returncode == 0:
        return f"restored the last good outputs of '{stage}' (dvc checkout {stage})"
    return (
        f"could not restore the outputs of '{stage}' (the first run of a stage has none to restore): "
        f"{env.redact(done.stderr.strip()[-500:])}"
    )


def _stop_tree(pid: int, grace_s: float = 10) -> None:
    """SIGTERM a process and its descendants (DVC runs the stage's command as its child), SIGKILL what remains."""
    import psutil

    try:
        parent = psutil.Process(pid)
        tree = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()


def stage_timeouts(root: Path, params: Params) -> dict[str, float]:
    """`orchestration.stage_timeout_minutes` in seconds; a name that is not a dvc.yaml stage is an error."""
    stages = stage_names(root)
    unknown = sorted(set(params.orchestration.stage_timeout_minutes) - set(stages))
    if unknown:
        raise ValueError(
            f"params.yaml: orchestration.stage_timeout_minutes names {', '.join(unknown)}, which dvc.yaml does not "
            f"define (its stages: {', '.join(stages)})"
        )
    return {stage: minutes * 60 for stage, minutes in params.orchestration.stage_timeout_minutes.items()}


@contextmanager
def one_retrain_at_a_time(root: Path, params: Params) -> Iterator[str | None]:
    """Hold this workspace for one retrain; yield None, or why it stayed busy for `orchestration.lock_wait_minutes`.

    A file lock guarantees it on this machine (even for runs on Prefect's temporary server); on a real Prefect server
    a global concurrency limit of 1, named after the workspace, also shows the holder and the waiting runs in the UI
    (its lease expires a minute after a killed holder stops renewing it).
    """
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import get_current_settings

    wait_s = params.orchestration.lock_wait_minutes * 60
    logger = get_run_logger()
    holder = {"flow_run": str(flow_run.get_id() or ""), "flow_run_name": str(flow_run.get_name() or "")}
    with ExitStack() as held:
        busy = None
        try:
            if get_current_settings().api.url:
                name = workspace_name(root)
                with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):  # a twin run made it
                    client.upsert_global_concurrency_limit_by_name(name, limit=1)
                held.enter_context(concurrency(name, timeout_seconds=wait_s, lease_duration=60, strict=True))
            held.enter_context(workspace_lock(root, wait_s, holder, on_wait=logger.info))
        except (WorkspaceBusy, TimeoutError) as exc:
            busy = f"workspace busy: {exc or 'the retrain concurrency limit stayed full'}"
        yield busy


@task(name="check data")
def check_data(root: Path, params: Params) -> str:
    """Content digest of data.source (only new or modified files are read)."""
    return data_identity(root / params.data.source, root / ".sdft" / "source-digests.json")


def _entry(trigger: str, outcome: str, reason: str, **fields: Any) -> dict[str, Any]:
    run = {"flow_run": str(flow_run.get_id() or ""), "flow_run_name": str(flow_run.get_name() or "")}
    return run | {"trigger": trigger, "outcome": outcome, "reason": reason} | fields


def skipped(root: Path, params: Params, trigger: str, reason: str, data: str | None) -> State:
    """Finish as a completed run named Skipped, with the reason in its message, artifact, history and log."""
    get_run_logger().info("skipped: %s", reason)
    entry = record(root, _entry(trigger, "skipped", reason, data_identity=data))
    create_markdown_artifact(f"**Skipped** ({trigger} trigger): {reason}", key="retrain-skipped")
    publish_history(root)
    notify.send(params.notify, "skipped", f"sdft retrain skipped: {reason}", entry, log=get_run_logger().warning)
    result = RetrainResult(False, None, "", reason, "", skipped=True)
    return Completed(name="Skipped", message=f"skipped: {reason}", data=result)


def default_remote(root: Path) -> str | None:
    """The DVC remote `dvc push` uses (core.remote), or None when the project has none."""
    remote = subprocess.run([_tool("dvc"), "remote", "default"], cwd=root, capture_output=True, text=True)
    name = remote.stdout.strip()
    return name if remote.returncode == 0 and name else None


@task(name="tune")
def tune_study(root: Path, apply: bool = True) -> dict[str, Any]:
    """Run or continue the hyperparameter study (pipeline/tune.py); with `apply`, write its best values into
    params.yaml.

    Output goes to `.sdft/logs/tune.{out,err}`; the study logs its own MLflow run, with one child run per trial.
    """
    command = [sys.executable, "-m", "pipeline.tune", "--params", "params.yaml", "--prepared", "data/prepared"]
    command += ["--encoded", "data/encoded", "--workdir", ".sdft/tune", "--report", str(REPORTS / "tune")]
    command += ["--apply"] if apply else []
    (root / LOGS).mkdir(parents=True, exist_ok=True)
    out_file, err_file = root / LOGS / "tune.out", root / LOGS / "tune.err"
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    with open(out_file, "w") as out, open(err_file, "w") as err:
        process = subprocess.Popen(command, cwd=root, env=environment, stdout=out, stderr=err)
        try:
            while process.poll() is None:
                time.sleep(0.5)
        except BaseException:
            _stop_tree(process.pid)
            raise
    get_run_logger().info("%s", out_file.read_text()[-4000:])
    if process.returncode != 0:
        raise RuntimeError(f"the study failed (exit {process.returncode}):\n{err_file.read_text()[-4000:]}")
    return json.loads((root / REPORTS / "tune" / "best_params.json").read_text())


@task(name="dvc push", retries=3, retry_delay_seconds=[10, 30, 90])
def push_outputs(root: Path) -> None:
    """Send the stages' outputs to the default DVC remote (docs/scale-out.md), so other machines can `dvc pull`."""
    remote = default_remote(root)
    if remote is None:  # the usual case on one machine: said in the log, not on the console every run
        (root / LOGS).mkdir(parents=True, exist_ok=True)
        (root / LOGS / "push.log").write_text("no default DVC remote: outputs stay in this workspace's cache\n")
        return
    pushed = subprocess.run([_tool("dvc"), "push"], cwd=root, capture_output=True, text=True)
    if pushed.returncode != 0:
        raise RuntimeError(f"dvc push to '{remote}' failed:\n{pushed.stderr[-2000:]}")
    get_run_logger().info("%s", pushed.stdout[-2000:])


@task(name="log reports", retries=3, retry_delay_seconds=[2, 5, 10])
def log_reports(root: Path, run_id: str) -> None:
    """Metrics, the training curve and the report files, to the MLflow run."""
    metrics = json.loads((root / REPORTS / "metrics.json").read_text())
    # eval.* (the candidate) and eval.base.*, on the test split: kept apart from train.* (the stage's own curve,
    # on the validation split).
    flat = {
        f"eval.{k}" if model == "candidate" else f"eval.{model}.{k}": v
        for model, values in metrics.items()
        if model != "evaluation"
        for k, v in values.items()
    }
    summary = json.loads((root / REPORTS / "train" / "summary.json").read_text())
    flat |= {f"train.{k}": v for k, v in summary["cost"].items()} | {"train.best_step": summary["best_step"]}
    registry.log_metrics(run_id, flat)
    # Which prepared split each family of numbers comes from: eval.* on test (the gate's), train.* on validation.
    splits = {
        "sdft.eval_split": metrics["evaluation"].get("split", ""),
        "sdft.train_val_split": summary.get("val_split", "validation"),
    }
    registry.set_tags(run_id, {"sdft.stop_reason": summary["stop_reason"]} | splits)
    registry.log_artifacts(run_id, [root / REPORTS, root / "params.yaml", root / "dvc.lock"], "reports")
    from pipeline.prepare import dataset_for_mlflow  # the prepared data as the run's dataset input (docs/data.md)

    report = json.loads((root / REPORTS / "data_validation.json").read_text())
    registry.log_dataset(run_id, *dataset_for_mlflow(report), context="train")


@task(name="gate")
def run_gate(root: Path, params: Params) -> promotion.GateOutcome:
    """Compare the candidate with the champion (or the untuned base model) and write reports/gate.*."""
    outcome = promotion.gate(
        params,
        root,
        root / "data" / "prepared",
        root / REPORTS / "metrics.json",
        root / REPORTS / "eval" / "samples.json",
        root / REPORTS,
    )
    verdict = "PROMOTE" if outcome.decision.promote else "REJECT"
    get_run_logger().info("gate: %s (the report: %s)", verdict, root / REPORTS / "gate.md")
    return outcome


def mlflow_links(run_id: str, model_name: str, version: str | None) -> str:
    """Markdown links to the MLflow run and model version (a local store: open `sdft ui` first)."""
    uri = env.redact(env.tracking_uri())  # a link is shown and stored: never with user:password
    remote = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if remote else os.environ.get("SDFT_MLFLOW_UI", "http://127.0.0.1:5000")
    experiment = registry.experiment_id()
    lines = [f"- MLflow run: [{run_id}]({base}/#/experiments/{experiment}/runs/{run_id})"]
    if version:
        lines.append(f"- Model version: [{model_name} v{version}]({base}/#/models/{model_name}/versions/{version})")
    if not remote:
        lines.append(f"- Local store: the links work once `sdft ui` serves it ({base})")
    return "\n".join(lines)


def publish_history(root: Path, last: int = 20) -> None:
    """The newest retrains from `.sdft/history.jsonl` as a table artifact."""
    columns = ["at", "trigger", "outcome", "model_version", "val_loss", "reason", "flow_run_name", "mlflow_run_id"]
    rows = [{c: e.get(c) for c in columns} for e in reversed(history(root)[-last:])]
    create_table_artifact(rows, key="retrain-history", description=f"sdft: the last {last} retrains, newest first")


@task(name="publish", retries=2, retry_delay_seconds=[2, 10])
def publish(root: Path, params: Params, entry: dict[str, Any], gate_report: str) -> None:
    """Gate report and history artifacts, then the promotion or rejection message."""
    links = mlflow_links(entry["mlflow_run_id"], params.registry.model_name, entry.get("model_version"))
    create_markdown_artifact(
        f"{gate_report}\n\n{links}\n", key="gate-report", description="sdft promotion gate decision"
    )
    publish_history(root)
    text = f"sdft retrain {entry['outcome']}: {entry['reason']}"
    if entry.get("model_version"):
        text += f" (registered {params.registry.model_name} v{entry['model_version']})"
    notify.send(params.notify, entry["outcome"], text, entry, log=get_run_logger().warning)


def report_failure(flow: Any, run: Any, state: State) -> None:
    """on_failure / on_crashed hook: record the failed retrain and send the failure message."""
    root = Path(run.parameters.get("project", ".")).resolve()
    reason = env.redact(state.message or state.name)
    entry = {"flow_run": str(run.id), "flow_run_name": run.name, "trigger": run.parameters.get("trigger", "manual")}
    entry = record(root, entry | {"outcome": "failed", "reason": reason})
    notify.send(notify.settings_of(root), "failed", f"sdft retrain failed ({run.name}): {reason}", entry)


@task(name="register")
def register(root: Path, params: Params, outcome: promotion.GateOutcome, run_id: str) -> str:
    """Log the adapter with the diffusers flavor and its lineage, register it and move `champion` (or `challenger`).

    No task retries: each registry request retries on its own, and re-running the task after a partial failure would
    register a second version.
    """
    flow_run_id = str(flow_run.get_id() or "")
    return promotion.promote(params, root, outcome, run_id, root / "models" / "adapter", flow_run_id)


@flow(name="retrain", log_prints=True, on_failure=[report_failure], on_crashed=[report_failure])
def retrain(project: str = ".", dry_run: bool = False, trigger: Trigger = "manual") -> RetrainResult | State:
    """Retrain on the current data and promote the result only if it beats the baseline.

    trigger: "data" skips the run when data.source holds what the last successful retrain saw; "schedule" and
    "manual" always run (DVC still skips the stages whose inputs did not change).
    """
    root = Path(project).resolve()
    os.environ["SDFT_ROOT"] = str(root)
    env.configure()
    console.quiet_in_process(root / LOGS / "flow.log")  # known third-party notices: in the log, not the console
    params = validate(root)
    ensure_workspace(root)
    timeouts = stage_timeouts(root, params)
    with one_retrain_at_a_time(root, params) as busy:
        if busy:
            return skipped(root, params, trigger, busy, None)
        data = check_data(root, params)
        seen = last_success(root)
        if trigger == "data" and seen and seen.get("data_identity") == data:
            return skipped(root, params, trigger, f"data unchanged since the retrain of {seen['at']}", data)
        best = None
        if params.tune.enabled:  # the data stages, the study, then the run: it logs the tuned params.yaml
            for stage in data_stages(root):
                run_stage.with_options(timeout_seconds=timeouts.get(stage))(root, stage, "")
            best = tune_study(root)
            params = validate(root)
        run_id = open_run(root)
        if best is not None:
            registry.set_tags(
                run_id,
                {
                    "sdft.tune.study": best["study"],
                    "sdft.tune.best_trial": best["best_trial"],
                    "sdft.tune.study_run_id": best.get("mlflow_run_id") or "",
                },
            )
        try:
            for stage in stage_names(root):
                state = run_stage.with_options(timeout_seconds=timeouts.get(stage))(
                    root, stage, run_id, return_state=True
                )
                if not state.is_completed():
                    message = state.message or state.name
                    raise StageFailed(message if message.startswith("stage ") else f"stage '{stage}': {message}")
            push_outputs(root)
            log_reports(root, run_id)
            outcome = run_gate(root, params)
            version, stale = None, None
            if outcome.decision.promote and not dry_run:
                try:
                    version = register(root, params, outcome, run_id)
                except registry.StaleBaseline as exc:  # the champion moved: a rejection, no alias points to it
                    stale = str(exc)
                    get_run_logger().warning("not promoted: %s", stale)
            tags = {
                "sdft.decision": "stale" if stale else "promote" if outcome.decision.promote else "reject",
                "sdft.stale_reason": (stale or "")[:5000],
                "sdft.approval": params.registry.approval,
                "sdft.dry_run": str(dry_run).lower(),
                "sdft.baseline": outcome.decision.baseline_source or "",
                "sdft.model_version": version or "",
                "sdft.trigger": trigger,
                "sdft.data_identity": data,
            }
            registry.set_tags(run_id, tags)
            registry.log_artifacts(run_id, [root / REPORTS / "gate.json", root / REPORTS / "gate.md"], "gate")
        except StageFailed as exc:  # said once, in one line, without a traceback (the task logged the stage's errors)
            registry.end_run(run_id, "FAILED")
            return Failed(message=str(exc))
        except BaseException:
            registry.end_run(run_id, "FAILED")
            raise
        registry.end_run(run_id)
        decided = "stale" if stale else "promoted" if outcome.decision.promote else "rejected"
        checks = {f"{c.metric}": c.candidate for c in outcome.decision.checks}
        entry = record(
            root,
            _entry(
                trigger,
                "dry-run" if dry_run else decided,
                stale or outcome.decision.reason,
                data_identity=data,
                mlflow_run_id=run_id,
                model_version=version,
                **checks,
            ),
        )
    report = (root / REPORTS / "gate.md").read_text()
    publish(root, params, entry, report)
    return RetrainResult(version is not None, version, run_id, stale or outcome.decision.reason, report)


if __name__ == "__main__":
    env.exit_on_sigterm()
    retrain()
