"""The whole retrain loop, twice, in a real git repo with real DVC, MLflow and Prefect, on the tiny default model.

Run 1 promotes (the base model is the baseline); run 2 trains with learning rate 0 (the candidate equals the base
model, which is worse than the champion) and is rejected; the champion alias never moves. Then a failing stage and a
malformed params.yaml must leave the registry untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, MODEL, new_project, run_dvc, run_sdft, set_params


def mlflow_client(project: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(uri)


def runs(client, status: str | None = None) -> list:  # noqa: ANN001
    experiment = client.get_experiment_by_name("sdft")
    found = client.search_runs([experiment.experiment_id]) if experiment else []
    return [r for r in found if status is None or r.info.status == status]


@pytest.fixture(scope="module")
def promoted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Path, str]:
    """A project after its first retrain (shared: a retrain takes about a minute)."""
    project = new_project(tmp_path_factory.mktemp("e2e") / "project", tiny_model, FAST)
    first = run_sdft(project, "run")
    assert first.returncode == 0, first.stderr[-3000:]
    return project, first.stdout


def test_promoted_model_loads_with_stock_diffusers_and_pyfunc(promoted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from diffusers import StableDiffusionPipeline

    project, _ = promoted
    # The adapter is a plain diffusers LoRA: stock load_lora_weights reads it and it changes the UNet's output.
    pipe = StableDiffusionPipeline.from_pretrained(project / "models" / "tiny-sd", safety_checker=None)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    before = pipe.unet(sample, 500, text).sample
    pipe.load_lora_weights(str(project / "models" / "adapter"))
    after = pipe.unet(sample, 500, text).sample
    assert not torch.allclose(before, after)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)

    # The registered champion loads through MLflow's diffusers pyfunc and generates.
    mlflow_client(project, monkeypatch)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = model.predict(
        pd.DataFrame({"prompt": ["a blue square on a white background"]}),
        params={"num_inference_steps": 2, "height": 64, "width": 64},
    )
    assert len(images) == 1


def test_retrain_promotes_then_rejects_a_worse_model(promoted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    # Run 1 (the fixture): no champion yet, so the candidate is compared with the untuned base model, and wins.
    project, first_stdout = promoted
    assert "PROMOTED: registered as version 1" in first_stdout
    assert "mlflow ui --backend-store-uri" in first_stdout
    gate = json.loads((project / "reports" / "gate.json").read_text())
    assert gate["promote"] is True and gate["baseline_kind"] == "base"
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["candidate"]["val_loss"] < metrics["base"]["val_loss"]
    # The gate compared on the test split (the demo's 17 test images), which train never read; every report says so.
    assert metrics["evaluation"]["split"] == gate["split"] == "test" and gate["n_test_images"] == 17
    assert "Measured on the `test` split (17 images" in (project / "reports" / "gate.md").read_text()
    assert not (project / "data" / "encoded" / "test.safetensors").exists()

    client = mlflow_client(project, monkeypatch)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"
    assert champion.tags["sdft.decision"] == "promote"
    assert champion.tags["mlflow.source.git.commit"]
    assert "val_loss" in champion.description  # the gate report travels with the version
    assert champion.tags["sdft.eval_split"] == "test"
    (run1,) = runs(client)
    assert run1.data.tags["sdft.decision"] == "promote"
    assert run1.data.tags["sdft.eval_split"] == "test" and run1.data.tags["sdft.train_val_split"] == "validation"
    assert run1.data.metrics["eval.val_loss"] == pytest.approx(metrics["candidate"]["val_loss"], rel=1e-5)
    # Training logged as it ran: its cost, and the sample grid of step 50 (train.sample_every) as an image by step.
    assert run1.data.metrics["train.flops_per_image"] > 0 and "train.images_per_s" in run1.data.metrics
    assert "system/cpu_utilization_percentage" in run1.data.metrics  # MLflow system metrics while training
    images = [a.path for a in client.list_artifacts(run1.info.run_id, "images")]
    assert any(path.startswith("images/train_samples+step+50+") for path in images), images
    # The encode stage ran, and train read its output.
    assert json.loads((project / "reports" / "train" / "summary.json").read_text())["cost"]["precomputed_inputs"] == 1

    # Nothing changed: DVC has nothing to do.
    status = run_dvc(project, "status")
    assert "up to date" in status.stdout, status.stdout
    # A train param changed: train and evaluate are stale, prepare is not.
    set_params(project, {"train.learning_rate": 0.0})
    plan = run_dvc(project, "repro", "--dry").stdout
    assert "Stage 'prepare' didn't change" in plan, plan
    assert "Running stage 'train'" in plan, plan

    # Run 2: learning rate 0 gives the untuned model, which must lose to the champion.
    second = run_sdft(project, "run")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "REJECTED" in second.stdout
    log = second.stdout + second.stderr
    assert "Stage 'prepare' didn't change, skipping" in log
    assert "Running stage 'train'" in log and "Running stage 'evaluate'" in log
    gate = json.loads((project / "reports" / "gate.json").read_text())
    assert gate["promote"] is False
    assert gate["baseline_kind"] == "champion" and gate["champion_version"] == "1"
    assert gate["split"] == "test" and not gate["baseline_from_cache"]  # the champion measured on the test split
    check = gate["checks"][0]  # the primary rule; the guardrails follow it
    assert check["metric"] == "val_loss" and check["passed"] is False
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
    rejected = [r for r in runs(client) if r.info.run_id != run1.info.run_id]
    assert [r.data.tags["sdft.decision"] for r in rejected] == ["reject"]

    # A failing stage (an invalid image with data.on_invalid: fail) leaves the registry exactly as it was.
    (project / "data" / "demo" / "images" / "broken.png").write_bytes(b"not a png")
    with open(project / "data" / "demo" / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "images/broken.png", "text": "a broken file"}) + "\n")
    set_params(project, {"data.on_invalid": "fail"})
    failed = run_sdft(project, "run")
    assert failed.returncode == 1
    assert "nothing was promoted" in failed.stderr
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
    assert len(runs(client, "FAILED")) == 1

    # A malformed params.yaml stops before any work: no new run, a message with the file, line and key.
    n_runs = len(runs(client))
    text = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(text.replace("max_grad_norm:", "max_grad_nrom:"))
    bad = run_sdft(project, "run")
    assert bad.returncode == 2
    assert "unknown key 'train.max_grad_nrom'" in bad.stderr and "params.yaml:" in bad.stderr
    assert len(runs(client)) == n_runs
