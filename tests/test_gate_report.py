"""The gate's report as a new user reads it: the champion itself is named in one line, a champion of other data is
flagged, and a rejection says why once, in words. A real local MLflow store; versions registered with a small LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline import promotion, registry
from pipeline.config import load_params
from tests.mlflow_server import save_test_adapter

GATE_MD = "**Gate: PROMOTE** (candidate vs base model (untuned)). Promoted.\n"


@pytest.fixture
def project(make_project, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: ANN001
    root = make_project({"gate.guardrails": []})  # val_loss only: the metrics below are written by hand
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.chdir(root)
    reports = root / "reports"
    (reports / "eval").mkdir(parents=True)
    losses = {"candidate": [0.5, 0.6, 0.7, 0.8], "base": [0.9, 1.0, 1.1, 1.2]}
    metrics = {name: {"val_loss": sum(v) / len(v)} for name, v in losses.items()}
    (reports / "metrics.json").write_text(
        json.dumps(metrics | {"evaluation": {"eval_set_hash": "e" * 64, "split": "test"}})
    )
    (reports / "eval" / "samples.json").write_text(json.dumps({n: {"val_loss": v} for n, v in losses.items()}))
    (reports / "data_validation.json").write_text(json.dumps({"source": "data/demo", "identity": {}}))
    return root


def register(root: Path, adapter: Path, tiny_model: Path, source: str) -> str:
    run_id = registry.start_run("test", {}, {})
    tags = {"sdft.adapter_tensors_sha256": promotion.lineage.adapter_digests(adapter)["sdft.adapter_tensors_sha256"]}
    tags["sdft.data.source"] = source
    return registry.register(run_id, adapter, str(tiny_model), "sdft-demo", None, GATE_MD, tags, "auto", "first")


def run_gate(root: Path, adapter: Path) -> promotion.GateOutcome:
    params = load_params(root / "params.yaml")
    reports = root / "reports"
    return promotion.gate(
        params, root, root / "data" / "prepared", reports / "metrics.json", reports / "eval" / "samples.json", reports,
        adapter,
    )  # fmt: skip


def test_the_champions_own_weights_are_named_in_one_line(project: Path, tiny_model: Path, tmp_path: Path) -> None:
    adapter = save_test_adapter(tiny_model, tmp_path / "adapter")
    assert register(project, adapter, tiny_model, "data/demo") == "1"
    copy = shutil.copytree(adapter, tmp_path / "rerun")  # an unchanged rerun: the same tensors, another folder

    outcome = run_gate(project, copy)

    assert outcome.decision.promote is False and outcome.champion_version == "1"
    report = (project / "reports" / "gate.md").read_text()
    assert report.strip().splitlines() == [
        "**Gate: REJECT** (candidate vs champion v1). Not promoted: the candidate is champion v1 itself (the same "
        "weights); change the data or the train params to get a new candidate."
    ]
    assert json.loads((project / "reports" / "gate.json").read_text())["warnings"] == []


def test_a_champion_trained_on_other_data_is_flagged(project: Path, tiny_model: Path, tmp_path: Path) -> None:
    champion = save_test_adapter(tiny_model, tmp_path / "champion", seed=1)
    register(project, champion, tiny_model, "data/demo")
    (project / "reports" / "data_validation.json").write_text(json.dumps({"source": "/home/me/photos"}))
    # The champion's numbers on this set, as the cache holds them.
    champion_version = registry.champion("sdft-demo")
    values, samples = {"val_loss": 0.6}, {"val_loss": [0.55, 0.6, 0.65, 0.6]}
    promotion.write_baseline_cache(project, "sdft-demo", champion_version, "e" * 64, values, samples)

    outcome = run_gate(project, save_test_adapter(tiny_model, tmp_path / "candidate", seed=2))

    (warning,) = outcome.record["warnings"]
    assert "champion v1 of `sdft-demo` was trained on `data/demo`, this candidate on `/home/me/photos`" in warning
    assert "registry.model_name" in warning
    report = (project / "reports" / "gate.md").read_text()
    assert report.startswith("> **Warning:** champion v1")
    # The rejection: its reason once, in words (no "not lower by 0 (0%)", no "-0%", no second list of failures).
    assert outcome.decision.promote is False
    assert report.count("val_loss is") == 1 and "Failed:" not in report and "-0%" not in report
