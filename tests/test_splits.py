"""The boundary between the three splits: train and encode never read `test`; evaluate and the gate read only it, and
say so; a workspace from before the test split is re-measured with a message, not a crash.

(The split itself, by content hash, is tested in test_ingest.py and test_prepare.py; evaluate's side in
test_evaluate.py.)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import encode, promotion, registry, train
from pipeline.config import load_params
from pipeline.diffusion import TEST, TRAINING_SPLITS
from tests.conftest import set_params
from tests.test_train import prepared, write_params, write_split  # noqa: F401  (prepared is a fixture)

REPO = Path(__file__).resolve().parents[1]


def train_once(project: Path, tiny_model: Path, data: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """encode then train on `data` (a prepared folder): (adapter tensors, summary.json, the encode index)."""
    params = write_params(
        project, tiny_model, data, max_steps=2, batch_size=4, validation_every=2, validation_timesteps=1,
        sample_every=0, sample_steps=1, sample_prompts=["a red circle"], checkpoint_every=0,
    )  # fmt: skip
    encoded = project / "encoded"
    assert encode.main(["--params", str(params), "--prepared", str(data), "--out", str(encoded)]) == 0
    out, report = project / "adapter", project / "report"
    args = ["--params", str(params), "--prepared", str(data), "--encoded", str(encoded)]
    assert train.main([*args, "--out", str(out), "--report", str(report)]) == 0
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    index = json.loads((encoded / "index.json").read_text())
    return tensors, json.loads((report / "summary.json").read_text()), index


def test_train_and_encode_never_read_the_test_split(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:  # noqa: F811
    """The same training with the test split intact, corrupted (unreadable images, nonsense rows) and removed."""
    intact = tmp_path / "intact"
    for split in TRAINING_SPLITS:
        shutil.copytree(prepared / split, intact / split)
    write_split(intact / TEST, 4, seed=3)
    corrupted = tmp_path / "corrupted"
    shutil.copytree(intact, corrupted)
    for png in (corrupted / TEST).glob("*.png"):
        png.write_bytes(b"not an image")
    (corrupted / TEST / "metadata.jsonl").write_text('{"file_name": "missing.png"}\nnot json\n')
    removed = tmp_path / "removed"
    shutil.copytree(intact, removed, ignore=shutil.ignore_patterns(TEST))
    assert not (removed / TEST).exists()

    runs = [train_once(tmp_path / f"run-{data.name}", tiny_model, data) for data in (intact, corrupted, removed)]

    (weights, summary, index), *others = runs
    assert set(index["splits"]) == {"train", "validation"}  # encode stores no test latents
    assert summary["val_split"] == "validation"
    for other_weights, other_summary, other_index in others:
        assert other_weights.keys() == weights.keys()
        assert all(torch.equal(other_weights[k], weights[k]) for k in weights)
        assert other_summary["data_hash"] == summary["data_hash"]
        assert other_summary["best_val_loss"] == summary["best_val_loss"]
        assert other_index["splits"] == index["splits"]


def test_dvc_graph_keeps_test_out_of_encode_and_train() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("encode", "train"):
        deps = stages[stage]["deps"]
        assert "data/prepared/train" in deps and "data/prepared/validation" in deps
        assert not any(d in ("data/prepared", "data/prepared/test") for d in deps), deps
    assert "data/prepared" in stages["evaluate"]["deps"]
    assert "data.test_fraction" in stages["prepare"]["params"]


# --------------------------------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty MLflow store (no champion yet), shared by this module's tests: creating one takes seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture
def gate_project(tmp_path: Path, mlflow_store: str) -> Path:
    """A project folder with the repository's params.yaml (val_loss only: no guardrails), on the empty store."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, {"gate.guardrails": []})
    return tmp_path


def write_evaluation(root: Path, evaluation: dict) -> tuple[Path, Path]:
    """metrics.json and samples.json as evaluate writes them, for a candidate clearly better than the base model."""
    base = [0.30, 0.32, 0.28, 0.31, 0.29, 0.30]
    candidate = [b - 0.1 for b in base]
    metrics = {
        "base": {"val_loss": sum(base) / 6},
        "candidate": {"val_loss": sum(candidate) / 6},
        "evaluation": {"eval_set_hash": "e" * 64} | evaluation,
    }
    (root / "metrics.json").write_text(json.dumps(metrics))
    (root / "samples.json").write_text(json.dumps({"base": {"val_loss": base}, "candidate": {"val_loss": candidate}}))
    return root / "metrics.json", root / "samples.json"


def test_gate_compares_on_the_test_split_and_says_so(gate_project: Path) -> None:
    params = load_params(gate_project / "params.yaml", paths=False)
    metrics, samples = write_evaluation(gate_project, {"split": "test", "n_test_images": 6})

    outcome = promotion.gate(params, gate_project, gate_project, metrics, samples, gate_project / "reports")

    assert outcome.decision.promote and outcome.baseline_kind == "base"
    record = json.loads((gate_project / "reports" / "gate.json").read_text())
    assert record["split"] == "test" and record["n_test_images"] == 6
    markdown = (gate_project / "reports" / "gate.md").read_text()
    assert "Measured on the `test` split (6 images, evaluation set `eeeeeeeeeeeeeeee`), which training, early " in (
        markdown
    )


def test_gate_refuses_metrics_measured_before_the_test_split(gate_project: Path) -> None:
    """An evaluation written by the two-split version (on validation, no `split` field) is not compared."""
    params = load_params(gate_project / "params.yaml", paths=False)
    metrics, samples = write_evaluation(gate_project, {"n_validation_images": 8})

    with pytest.raises(RuntimeError, match="measured on the validation split .* Re-run `dvc repro`"):
        promotion.gate(params, gate_project, gate_project, metrics, samples, gate_project / "reports")
    assert not (gate_project / "reports" / "gate.json").exists()


def test_champion_baseline_cached_for_another_evaluation_set_is_measured_again(
    gate_project: Path, capsys: pytest.CaptureFixture
) -> None:
    params = load_params(gate_project / "params.yaml", paths=False)
    name = params.registry.model_name
    champion = registry.Champion(version="3", run_id="r" * 32, source="models:/x/3", adapter_sha256="f" * 64)
    # Measured on the old validation split (its own evaluation-set hash).
    promotion.write_baseline_cache(gate_project, name, champion, "a" * 64, {"val_loss": 0.2}, {"val_loss": [0.2] * 8})
    capsys.readouterr()

    # The same set: the cache answers, and the registry is never asked.
    cached, from_cache = promotion.champion_metrics(params, gate_project, gate_project, champion, "a" * 64)
    assert from_cache and cached.values == {"val_loss": 0.2}
    assert capsys.readouterr().out == ""

    # The new test split: the old entry is not reused; one line says the champion is measured again. (The store has
    # no such model, so measuring it then fails: what matters here is that the old number was not taken.)
    with pytest.raises(Exception, match=name):
        promotion.champion_metrics(params, gate_project, gate_project, champion, "b" * 64)
    (line,) = capsys.readouterr().out.splitlines()
    assert line == (
        "gate: champion v3's cached baseline was measured on another evaluation set (new data, the new test split, "
        "or changed evaluate settings): re-evaluating it on the test split"
    )
