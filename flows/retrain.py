"""The retrain flow: DVC stages (prepare -> train -> evaluate), then gate, then register.

The stage graph lives in `dvc.yaml` alone; each stage runs as a task through `dvc repro <stage>`, so DVC skips what is
up to date. Gate and registration depend on the registry, which DVC cannot track, so they run here.

    python -m flows.retrain            # or: sdft run
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from pipeline import env, promotion, registry
from pipeline.config import Params, load_params

REPORTS = Path("reports")


@dataclass
class RetrainResult:
    promoted: bool
    version: str | None
    run_id: str
    reason: str
    gate_report: str


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
    raw = yaml.safe_load((root / "params.yaml").read_text())
    commit, dirty = promotion.git_state(root)
    tags = {
        "sdft.prefect_flow_run_id": str(flow_run.get_id() or ""),
        "mlflow.source.git.commit": commit,
        "sdft.git.dirty": str(dirty).lower(),
    }
    return registry.start_run(str(flow_run.get_name() or "retrain"), _flat("", raw), tags)


@task(name="dvc repro", task_run_name="dvc repro {stage}")
def run_stage(root: Path, stage: str, run_id: str) -> None:
    """Run one DVC stage (and anything upstream that is stale); DVC skips it when nothing changed."""
    environment = os.environ | {"MLFLOW_RUN_ID": run_id}
    # Stage commands call `python`: make it this interpreter's, venv or not.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    result = subprocess.run([_tool("dvc"), "repro", stage], cwd=root, env=environment, capture_output=True, text=True)
    logger = get_run_logger()
    logger.info("%s", result.stdout[-4000:])
    if result.returncode != 0:
        raise RuntimeError(f"stage '{stage}' failed (exit {result.returncode}):\n{result.stderr[-4000:]}")


@task(name="log reports", retries=3, retry_delay_seconds=[2, 5, 10])
def log_reports(root: Path, run_id: str) -> None:
    """Metrics, the training curve and the report files, to the MLflow run."""
    metrics = json.loads((root / REPORTS / "metrics.json").read_text())
    # eval.* (the candidate) and eval.base.*: kept apart from train.* (the stage's own validation curve).
    flat = {
        f"eval.{k}" if model == "candidate" else f"eval.{model}.{k}": v
        for model, values in metrics.items()
        if model != "evaluation"
        for k, v in values.items()
    }
    summary = json.loads((root / REPORTS / "train" / "summary.json").read_text())
    flat |= {f"train.{k}": v for k, v in summary["cost"].items()} | {"train.best_step": summary["best_step"]}
    registry.log_metrics(run_id, flat)
    registry.set_tags(run_id, {"sdft.stop_reason": summary["stop_reason"]})
    registry.log_artifacts(run_id, [root / REPORTS, root / "params.yaml", root / "dvc.lock"], "reports")


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
    get_run_logger().info("gate: %s", outcome.decision.reason)
    return outcome


@task(name="register", retries=2, retry_delay_seconds=[5, 15])
def register(root: Path, params: Params, outcome: promotion.GateOutcome, run_id: str) -> str:
    """Log the adapter with the diffusers flavor, register it and move `champion`."""
    return promotion.promote(params, root, outcome, run_id, root / "models" / "adapter")


@flow(name="retrain", log_prints=True)
def retrain(project: str = ".", dry_run: bool = False) -> RetrainResult:
    """Retrain on the current data and promote the result only if it beats the baseline."""
    root = Path(project).resolve()
    os.environ["SDFT_ROOT"] = str(root)
    env.configure()
    params = validate(root)
    ensure_workspace(root)
    run_id = open_run(root)
    try:
        for stage in stage_names(root):
            run_stage(root, stage, run_id)
        log_reports(root, run_id)
        outcome = run_gate(root, params)
        version = None
        if outcome.decision.promote and not dry_run:
            version = register(root, params, outcome, run_id)
        tags = {
            "sdft.decision": "promote" if outcome.decision.promote else "reject",
            "sdft.dry_run": str(dry_run).lower(),
            "sdft.baseline": outcome.decision.baseline_source or "",
            "sdft.model_version": version or "",
        }
        registry.set_tags(run_id, tags)
        registry.log_artifacts(run_id, [root / REPORTS / "gate.json", root / REPORTS / "gate.md"], "gate")
    except BaseException:
        registry.end_run(run_id, "FAILED")
        raise
    registry.end_run(run_id)
    report = (root / REPORTS / "gate.md").read_text()
    create_markdown_artifact(report, key="gate-report", description="sdft promotion gate decision")
    return RetrainResult(version is not None, version, run_id, outcome.decision.reason, report)


if __name__ == "__main__":
    retrain()
