"""Gate and register: what runs after the DVC stages, because it depends on the registry's state, not on files.

1. `gate(...)` reads the evaluate stage's outputs, finds the baseline (the `champion`, evaluated on the same held-out
   set and cached by version and evaluation-set hash; or the untuned base model on the first run), calls the pure
   `gate.decide`, and writes `reports/gate.json` and `reports/gate.md`. It changes nothing in the registry.
2. `promote(...)` registers a promoted candidate and moves `champion`, refusing if the champion moved meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.config import Params, resolve_model
from pipeline.gate import Decision, MetricSet, decide

CACHE = Path(".sdft") / "baselines"


@dataclass
class GateOutcome:
    decision: Decision
    baseline_kind: str  # "champion" or "base"
    champion_version: str | None  # the champion compared with (None on the first run)
    eval_set_hash: str
    record: dict[str, Any]


def load_model_metrics(metrics: dict[str, Any], samples: dict[str, Any], name: str, source: str) -> MetricSet:
    if name not in metrics:
        raise FileNotFoundError(f"no '{name}' entry in the evaluation metrics; re-run `dvc repro evaluate`.")
    return MetricSet(values=dict(metrics[name]), samples=dict(samples.get(name, {})), source=source)


def champion_metrics(
    params: Params, root: Path, prepared: Path, version: str, eval_set_hash: str
) -> tuple[MetricSet, bool]:
    """The champion's metrics on this evaluation set: from the cache when (version, set hash) match, else measured."""
    name = params.registry.model_name
    cached = root / CACHE / f"{name}-v{version}-{eval_set_hash[:16]}.json"
    if cached.is_file():
        data = json.loads(cached.read_text())
        return MetricSet(data["values"], data["samples"], f"champion v{version}"), True
    work = root / ".sdft" / "champions" / f"{name}-v{version}"
    shutil.rmtree(work, ignore_errors=True)
    adapter, base_model = registry.download_adapter(name, version, work / "model")
    subprocess.run(
        [
            sys.executable, "-m", "pipeline.evaluate",
            "--params", str(root / "params.yaml"), "--prepared", str(prepared), "--adapter", str(adapter),
            "--base-model", base_model, "--name", "champion", "--no-base",
            "--out", str(work / "eval"), "--metrics", str(work / "metrics.json"),
        ],
        check=True,
        cwd=root,
    )  # fmt: skip
    summary = json.loads((work / "metrics.json").read_text())
    if summary["evaluation"]["eval_set_hash"] != eval_set_hash:
        raise RuntimeError("the champion was evaluated on a different evaluation set than the candidate; re-run.")
    samples = json.loads((work / "eval" / "samples.json").read_text())["champion"]
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps({"values": summary["champion"], "samples": samples}))
    tmp.replace(cached)
    return MetricSet(summary["champion"], samples, f"champion v{version}"), False


def gate(params: Params, root: Path, prepared: Path, metrics_file: Path, samples_file: Path, out: Path) -> GateOutcome:
    """Decide, and write `<out>/gate.json` and `<out>/gate.md`. No registry change."""
    metrics = json.loads(metrics_file.read_text())
    samples = json.loads(samples_file.read_text())
    eval_set_hash = metrics["evaluation"]["eval_set_hash"]
    candidate = load_model_metrics(metrics, samples, "candidate", "candidate")
    champion = registry.champion(params.registry.model_name)
    if champion is None:
        baseline = load_model_metrics(metrics, samples, "base", "base model (untuned)")
        kind, from_cache = "base", False
    else:
        baseline, from_cache = champion_metrics(params, root, prepared, champion.version, eval_set_hash)
        kind = "champion"
    decision = decide(candidate, baseline, params.gate)
    record = decision.to_dict() | {
        "baseline_kind": kind,
        "champion_version": champion.version if champion else None,
        "baseline_from_cache": from_cache,
        "eval_set_hash": eval_set_hash,
        "model_name": params.registry.model_name,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gate.md").write_text(decision.to_markdown())
    return GateOutcome(decision, kind, champion.version if champion else None, eval_set_hash, record)


def params_hash(params_file: Path) -> str:
    return hashlib.sha256(params_file.read_bytes()).hexdigest()


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project, or ("", False) outside git."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return commit, bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no"))


def lineage_tags(params: Params, root: Path, run_id: str, eval_set_hash: str) -> dict[str, str]:
    """Tags that lead a model version back to its code, data and params."""
    import yaml

    commit, dirty = git_state(root)
    lock_file = root / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else {}
    tags = {
        "mlflow.source.git.commit": commit,
        "sdft.git.dirty": str(dirty).lower(),
        "sdft.params_hash": params_hash(root / "params.yaml"),
        "sdft.base_model": params.base.model,
        "sdft.base_model_revision": params.base.revision or "",
        "sdft.run_id": run_id,
        "sdft.eval_set_hash": eval_set_hash,
        "sdft.prefect_flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID", ""),
    }
    for stage, entry in (lock.get("stages") or {}).items():
        outs = entry.get("outs") or []
        tags[f"sdft.dvc.{stage}.outs"] = ",".join(f"{o['path']}:{o.get('md5', '')}" for o in outs)
        if stage == "prepare" and outs:
            tags["sdft.data_digest"] = outs[0].get("md5", "")
    return tags


def promote(params: Params, root: Path, outcome: GateOutcome, run_id: str, adapter: Path) -> str:
    """Register the candidate and make it champion; return the version. Call only when the gate said promote."""
    if not outcome.decision.promote:
        raise ValueError("the gate rejected this candidate; refusing to register it")
    tags = lineage_tags(params, root, run_id, outcome.eval_set_hash)
    tags["sdft.decision"] = "promote"
    return registry.register(
        run_id,
        adapter,
        resolve_model(params, root),
        params.registry.model_name,
        expected_champion=outcome.champion_version,
        description=outcome.decision.to_markdown(),
        version_tags=tags,
    )
