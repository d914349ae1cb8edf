"""Gate and register: what runs after the DVC stages, because it depends on the registry's state, not on files.

1. `gate(...)` reads the evaluate stage's outputs, finds the baseline (the `champion`, evaluated on the same held-out
   set and cached by version and evaluation-set hash; or the untuned base model on the first run), calls the pure
   `gate.decide`, and writes `reports/gate.json` and `reports/gate.md`. It changes nothing in the registry. Every
   number it compares is measured on the prepared `test` split, which no training, early stop or tuning read.
2. `promote(...)` registers a promoted candidate and moves `champion`, refusing if the champion moved meanwhile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import lineage, registry
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
    params: Params, root: Path, prepared: Path, version: str, eval_set_hash: str, split: str = "test"
) -> tuple[MetricSet, bool]:
    """The champion's metrics on this evaluation set: from the cache when (version, set hash) match, else measured.

    The set hash covers the held-out split's name and images, so a baseline measured on another set (the validation
    split of a two-split workspace, older data) is never reused: the champion is measured again, and a line says so.
    """
    name = params.registry.model_name
    cached = root / CACHE / f"{name}-v{version}-{eval_set_hash[:16]}.json"
    if cached.is_file():
        data = json.loads(cached.read_text())
        return MetricSet(data["values"], data["samples"], f"champion v{version}"), True
    earlier = sorted((root / CACHE).glob(f"{name}-v{version}-*.json"))
    if earlier:
        print(
            f"gate: champion v{version}'s cached baseline was measured on another evaluation set (new data, the new "
            f"{split} split, or changed evaluate settings): re-evaluating it on the {split} split",
            flush=True,
        )
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
    tmp.write_text(json.dumps({"values": summary["champion"], "samples": samples, "split": split}))
    tmp.replace(cached)
    return MetricSet(summary["champion"], samples, f"champion v{version}"), False


def gate(params: Params, root: Path, prepared: Path, metrics_file: Path, samples_file: Path, out: Path) -> GateOutcome:
    """Decide, and write `<out>/gate.json` and `<out>/gate.md`. No registry change."""
    metrics = json.loads(metrics_file.read_text())
    samples = json.loads(samples_file.read_text())
    evaluation = metrics["evaluation"]
    eval_set_hash = evaluation["eval_set_hash"]
    split = evaluation.get("split")
    if split != "test":
        raise RuntimeError(
            f"{metrics_file} was measured on the {split or 'validation'} split (written before the test split "
            "existed): the gate compares models on the test split only. Re-run `dvc repro` (prepare then evaluate)."
        )
    candidate = load_model_metrics(metrics, samples, "candidate", "candidate")
    champion = registry.champion(params.registry.model_name)
    if champion is None:
        baseline = load_model_metrics(metrics, samples, "base", "base model (untuned)")
        kind, from_cache = "base", False
    else:
        baseline, from_cache = champion_metrics(params, root, prepared, champion.version, eval_set_hash, split)
        kind = "champion"
    decision = decide(candidate, baseline, params.gate)
    record = decision.to_dict() | {
        "baseline_kind": kind,
        "champion_version": champion.version if champion else None,
        "baseline_from_cache": from_cache,
        "eval_set_hash": eval_set_hash,
        "split": split,
        "n_test_images": evaluation.get("n_test_images"),
        "model_name": params.registry.model_name,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "gate.md").write_text(decision.to_markdown() + "\n" + measured_on(record) + "\n")
    return GateOutcome(decision, kind, champion.version if champion else None, eval_set_hash, record)


def measured_on(record: dict[str, Any]) -> str:
    """The gate report's line saying which data its numbers come from."""
    how = "cached" if record["baseline_from_cache"] else "measured in this run"
    baseline = f"; the {record['baseline_kind']} baseline was {how}" if record["baseline_kind"] == "champion" else ""
    return (
        f"Measured on the `{record['split']}` split ({record['n_test_images']} images, evaluation set "
        f"`{record['eval_set_hash'][:16]}`), which training, early stopping and checkpoint choice never read{baseline}."
    )


# Kept here for callers of the earlier API (flows/retrain.py reads the git state through promotion).
git_state = lineage.git_state
params_hash = lineage.params_hash


def promote(params: Params, root: Path, outcome: GateOutcome, run_id: str, adapter: Path, flow_run_id: str = "") -> str:
    """Register the candidate with its lineage; return the version. Call only when the gate said promote.

    registry.approval auto: the version becomes `champion`. manual: it becomes `challenger`, for `sdft approve`.
    Raises registry.StaleBaseline when the champion moved since the comparison (the version is then tagged stale).
    """
    if not outcome.decision.promote:
        raise ValueError("the gate rejected this candidate; refusing to register it")
    tags = lineage.tags(
        root, params.base.model, params.base.revision, run_id, outcome.eval_set_hash, flow_run_id, adapter
    )
    tags["sdft.decision"] = "promote"
    tags["sdft.eval_split"] = outcome.record.get("split") or ""  # the gate's numbers (eval.*) come from this split
    tags["sdft.approval"] = params.registry.approval
    return registry.register(
        run_id,
        adapter,
        resolve_model(params, root),
        params.registry.model_name,
        expected_champion=outcome.champion_version,
        description=outcome.decision.to_markdown(),
        version_tags=tags,
        approval=params.registry.approval,
        reason=outcome.decision.reason,
    )
