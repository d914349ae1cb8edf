"""Gate and register: what runs after the DVC stages, because it depends on the registry's state, not on files.

1. `gate(...)` reads the evaluate stage's outputs, finds the baseline (the `champion`, evaluated on the same held-out
   set and cached by what the version is (its run and weights) and the evaluation-set hash; or the untuned base model
   on the first run), calls the pure `gate.decide`, and writes `reports/gate.json` and `reports/gate.md`. It changes
   nothing in the registry. Every number it compares is measured on the prepared `test` split, which no training,
   early stop or tuning read.
2. `promote(...)` registers a promoted candidate and moves `champion`, refusing if the champion moved meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import env, lineage, registry
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
    report: str = ""  # gate.md: the registered version's description


def load_model_metrics(metrics: dict[str, Any], samples: dict[str, Any], name: str, source: str) -> MetricSet:
    if name not in metrics:
        raise FileNotFoundError(f"no '{name}' entry in the evaluation metrics; re-run `dvc repro evaluate`.")
    return MetricSet(values=dict(metrics[name]), samples=dict(samples.get(name, {})), source=source)


def champion_identity(model_name: str, champion: registry.Champion) -> dict[str, str]:
    """What the champion version IS, not just its number: another tracking store (or a recreated one) has its own
    "v1", made by another run (run ids are random UUIDs) with other weights. The store's URI is not part of it: the
    same store reached by another address is the same model."""
    return {
        "model": model_name,
        "version": champion.version,
        "run_id": champion.run_id,
        "source": env.redact(champion.source),
        "adapter_sha256": champion.adapter_sha256,
    }


def baseline_cache_file(root: Path, model_name: str, champion: registry.Champion, eval_set_hash: str) -> Path:
    """`.sdft/baselines/<name>-v<version>-<key>.json`, the key a hash of the champion's identity and the eval set."""
    key = json.dumps(champion_identity(model_name, champion) | {"eval_set_hash": eval_set_hash}, sort_keys=True)
    return root / CACHE / f"{model_name}-v{champion.version}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def read_baseline_cache(
    root: Path, model_name: str, champion: registry.Champion, eval_set_hash: str
) -> MetricSet | None:
    """The cached champion metrics, only when the file records this very champion and evaluation set."""
    cached = baseline_cache_file(root, model_name, champion, eval_set_hash)
    if not cached.is_file():
        return None
    data = json.loads(cached.read_text())
    if data.get("identity") != champion_identity(model_name, champion) or data.get("eval_set_hash") != eval_set_hash:
        return None  # written for another store or model (or by an older sdft): measure again
    return MetricSet(data["values"], data["samples"], f"champion v{champion.version}")


def write_baseline_cache(
    root: Path,
    model_name: str,
    champion: registry.Champion,
    eval_set_hash: str,
    values: dict[str, Any],
    samples: dict[str, Any],
) -> Path:
    cached = baseline_cache_file(root, model_name, champion, eval_set_hash)
    cached.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "identity": champion_identity(model_name, champion),
        "eval_set_hash": eval_set_hash,
        "store": env.redact(env.tracking_uri()),  # for a reader; not part of the key
    }
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(record | {"values": values, "samples": samples}))
    tmp.replace(cached)
    return cached


def champion_metrics(
    params: Params,
    root: Path,
    prepared: Path,
    champion: registry.Champion,
    eval_set_hash: str,
    split: str = "test",
) -> tuple[MetricSet, bool]:
    """The champion's metrics on this evaluation set: from the cache when it holds this very version (same store, run
    and weights) on this set, else measured.

    The set hash covers the held-out split's name and images, so a baseline measured on another set (the validation
    split of a two-split workspace, older data) is never reused: the champion is measured again, and a line says so.
    """
    name, version = params.registry.model_name, champion.version
    cached = read_baseline_cache(root, name, champion, eval_set_hash)
    if cached is not None:
        return cached, True
    if sorted((root / CACHE).glob(f"{name}-v{version}-*.json")):
        print(
            f"gate: champion v{version}'s cached baseline was measured on another evaluation set (new data, the new "
            f"{split} split, or changed evaluate settings): re-evaluating it on the {split} split",
            flush=True,
        )
    work = root / ".sdft" / "champions" / f"{name}-v{version}"
    shutil.rmtree(work, ignore_errors=True)
    adapter, base_model = registry.download_adapter(name, version, work / "model")
    # Its output goes to a log, as a stage's does; the console gets one line (and the log's end if it fails).
    log = root / ".sdft" / "logs" / "champion-evaluate.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"measuring champion v{version} on this evaluation set (log: {log})", flush=True)
    with open(log, "wb") as output:
        done = subprocess.run(
            [
                sys.executable, "-m", "pipeline.evaluate",
                "--params", str(root / "params.yaml"), "--prepared", str(prepared), "--adapter", str(adapter),
                "--base-model", base_model, "--name", "champion", "--no-base",
                "--out", str(work / "eval"), "--metrics", str(work / "metrics.json"),
            ],
            cwd=root,
            stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"evaluating champion v{version} failed (exit {done.returncode}); {log} ends:\n{tail}")
    summary = json.loads((work / "metrics.json").read_text())
    if summary["evaluation"]["eval_set_hash"] != eval_set_hash:
        raise RuntimeError("the champion was evaluated on a different evaluation set than the candidate; re-run.")
    samples = json.loads((work / "eval" / "samples.json").read_text())["champion"]
    write_baseline_cache(root, name, champion, eval_set_hash, summary["champion"], samples)
    return MetricSet(summary["champion"], samples, f"champion v{version}"), False


def gate(
    params: Params,
    root: Path,
    prepared: Path,
    metrics_file: Path,
    samples_file: Path,
    out: Path,
    adapter: Path | None = None,
) -> GateOutcome:
    """Decide, and write `<out>/gate.json` and `<out>/gate.md`. No registry change.

    `adapter` (default `<root>/models/adapter`) is the candidate's train output: when its weights are the champion's,
    the candidate is the champion itself and nothing is compared.
    """
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
    warnings: list[str] = []
    from_cache = False
    if champion is None:
        baseline = load_model_metrics(metrics, samples, "base", "base model (untuned)")
        kind = "base"
        decision = decide(candidate, baseline, params.gate)
    else:
        kind = "champion"
        champion_tags = dict(registry.get_version(params.registry.model_name, champion.version).tags or {})
        warnings = data_source_warnings(params, root, champion.version, champion_tags)
        if is_same_model(adapter or root / "models" / "adapter", champion_tags):
            reason = (
                f"Not promoted: the candidate is champion v{champion.version} itself (the same weights); change the "
                "data or the train params to get a new candidate."
            )
            decision = Decision(False, reason, f"champion v{champion.version}", [], confidence=params.gate.confidence)
        else:
            baseline, from_cache = champion_metrics(params, root, prepared, champion, eval_set_hash, split)
            decision = decide(candidate, baseline, params.gate)
    record = decision.to_dict() | {
        "baseline_kind": kind,
        "champion_version": champion.version if champion else None,
        "baseline_from_cache": from_cache,
        "eval_set_hash": eval_set_hash,
        "split": split,
        "n_test_images": evaluation.get("n_test_images"),
        "model_name": params.registry.model_name,
        "warnings": warnings,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate.json").write_text(json.dumps(record, indent=2) + "\n")
    report = "".join(f"> **Warning:** {w}\n\n" for w in warnings) + decision.to_markdown()
    if decision.checks:  # nothing is measured when the candidate is the champion itself
        report += "\n" + measured_on(record) + "\n"
    (out / "gate.md").write_text(report)
    return GateOutcome(decision, kind, champion.version if champion else None, eval_set_hash, record, report)


def measured_on(record: dict[str, Any]) -> str:
    """The gate report's line saying which data its numbers come from."""
    how = "cached" if record["baseline_from_cache"] else "measured in this run"
    baseline = f"; the {record['baseline_kind']} baseline was {how}" if record["baseline_kind"] == "champion" else ""
    return (
        f"Measured on the `{record['split']}` split ({record['n_test_images']} images, evaluation set "
        f"`{record['eval_set_hash'][:16]}`), which training, early stopping and checkpoint choice never read{baseline}."
    )


def is_same_model(adapter: Path, champion_tags: dict[str, str]) -> bool:
    """Whether the train output in `adapter` holds the champion's weights (its recorded tensor digest)."""
    recorded = champion_tags.get("sdft.adapter_tensors_sha256")
    if not recorded or not adapter.is_dir():
        return False
    try:
        return lineage.adapter_digests(adapter)["sdft.adapter_tensors_sha256"] == recorded
    except FileNotFoundError:
        return False


def data_source_warnings(params: Params, root: Path, version: str, champion_tags: dict[str, str]) -> list[str]:
    """A warning when the champion was trained on another data source than the candidate (`sdft.data.source`)."""
    theirs = champion_tags.get("sdft.data.source", "")
    ours = lineage.data_identity(root / "reports" / "data_validation.json").get("sdft.data.source", "")
    if not theirs or not ours or theirs == ours:
        return []
    return [
        f"champion v{version} of `{params.registry.model_name}` was trained on `{theirs}`, this candidate on "
        f"`{ours}`. The gate compares them on this candidate's held-out images, which the champion never saw, so a "
        "model of different data is judged against it. For a new dataset or subject, set its own "
        "`registry.model_name` in params.yaml: its first run is then compared with the untuned base model."
    ]


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
        description=outcome.report or outcome.decision.to_markdown(),
        version_tags=tags,
        approval=params.registry.approval,
        reason=outcome.decision.reason,
    )
