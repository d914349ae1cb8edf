"""Gate decisions with known answers, on the pre-trained shape-world base and the judges (issue 14).

Each test runs the real stages (`dvc repro` in a fresh project) from `assets/tiny-shapes-sd`, then the real gate
against the untuned base model, and checks the decision and the reason it gives:

- a fine-tune that learns nothing (learning rate 0) is rejected as not better;
- a fine-tune on purple alone with a learning rate high enough to wreck the base colours is rejected by the
  forgetting guardrail (`base_adherence_accuracy`), and the report names it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import promotion
from pipeline.config import load_params
from pipeline.world import NEW_COLOURS
from tests.conftest import REPO, new_project, run_dvc

pytestmark = pytest.mark.slow
BASE = REPO / "assets" / "tiny-shapes-sd"
QUICK = {"train.sample_every": 0, "train.checkpoint_every": 0, "evaluate.images_per_prompt": 2}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


def decide(project: Path) -> promotion.GateOutcome:
    run_dvc(project, "init", "-q")
    done = run_dvc(project, "repro")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    params = load_params(project / "params.yaml", paths=False)
    reports = project / "reports"
    return promotion.gate(
        params, project, project / "data" / "prepared", reports / "metrics.json", reports / "eval" / "samples.json",
        reports, project / "models" / "adapter",
    )  # fmt: skip


def only_purple(project: Path) -> None:
    """Keep only the demo's purple images: no replay of the colours the base model knows."""
    demo = project / "data" / "demo"
    rows = [json.loads(line) for line in (demo / "metadata.jsonl").read_text().splitlines()]
    keep = [r for r in rows if any(c in r["text"] for c in NEW_COLOURS)]
    for row in rows:
        if row not in keep:
            (demo / row["file_name"]).unlink()
    (demo / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))


def test_a_fine_tune_that_learns_nothing_is_rejected_as_not_better(tmp_path: Path, store: str) -> None:
    project = new_project(tmp_path / "project", BASE, QUICK | {"train.learning_rate": 0.0, "train.max_steps": 20})

    outcome = decide(project)

    assert outcome.decision.promote is False and outcome.baseline_kind == "base"
    (val_loss,) = [c for c in outcome.decision.checks if c.metric == "val_loss"]
    assert not val_loss.passed and "not better" in val_loss.detail
    assert "val_loss" in (project / "reports" / "gate.md").read_text().splitlines()[0]


def test_a_learning_rate_that_wrecks_the_base_colours_is_rejected_by_the_forgetting_guardrail(
    tmp_path: Path, store: str
) -> None:
    # Validation every 100 steps: the best-weights choice then cannot fall back to a checkpoint before the damage.
    wreck = {"train.learning_rate": 0.003, "train.max_steps": 300, "train.validation_every": 100}
    wreck |= {"train.lora_targets": "attention+ffn"}
    project = new_project(tmp_path / "project", BASE, QUICK | wreck)
    only_purple(project)
    git = ["git", "-c", "user.email=test@sdft", "-c", "user.name=test"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "purple only"], cwd=project, check=True)

    outcome = decide(project)

    checks = {c.metric: c for c in outcome.decision.checks}
    assert outcome.decision.promote is False
    assert not checks["base_adherence_accuracy"].passed, checks["base_adherence_accuracy"].detail
    assert checks["base_adherence_accuracy"].difference < -0.05
    assert "base_adherence_accuracy" in (project / "reports" / "gate.md").read_text().splitlines()[0]
