"""Registering train outputs the `mlflow.diffusers` flavor cannot log, against a real `mlflow server`: a full
fine-tune (and a LoRA trained for v-prediction on an epsilon base) is logged as sdft's pyfunc model, serves from
`models:/<name>@champion` with the diffusers flavor's input and params, comes back for champion re-evaluation, and
keeps its lineage digests.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import candidate, evaluate, lineage, registry
from tests.mlflow_server import MlflowServer, client_env
from tests.test_evaluate import write_params
from tests.test_evaluate_outputs import prepared  # noqa: F401  (fixture: the same small prepared set)
from tests.train_outputs import VAL_SEED, VAL_TIMESTEPS, train_output


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def name(server: MlflowServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    for key, value in client_env(server.uri).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SDFT_USER", "alice")
    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:60]


def register(name: str, output: Path, base: Path) -> str:
    run_id = registry.start_run("test", {}, {})
    return registry.register(run_id, output, str(base), name, None, "gate", {"sdft.decision": "promote"})


def generate(uri: str, prompts: list[str]) -> tuple[object, list[Image.Image]]:
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(uri)
    params = {"num_inference_steps": 2, "height": 32, "width": 32}
    images = model.predict(pd.DataFrame({"prompt": prompts}), params=params)
    return model, [Image.open(io.BytesIO(png)) for png in images]


@pytest.mark.slow  # a server start (~30 s on 2 shared cores), training, two pipeline loads
def test_full_fine_tune_registers_serves_and_re_evaluates(
    name: str,
    tmp_path: Path,
    tiny_model: Path,
    prepared: Path,  # noqa: F811 (fixture)
) -> None:
    import mlflow.artifacts
    from diffusers import UNet2DConditionModel
    from mlflow.models import Model

    out = tmp_path / "full"
    train_output(tiny_model, prepared, out, method="full", learning_rate=1e-3, max_steps=2)
    assert register(name, out, tiny_model) == "1"

    uri = f"models:/{name}@champion"
    model, images = generate(uri, ["a red circle on a white background", "a blue square"])
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    # The served UNet is the fine-tuned one, not the base's.
    served = model.unwrap_python_model().pipe.unet.state_dict()
    fine = UNet2DConditionModel.from_pretrained(out, subfolder="unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").state_dict()
    assert all(torch.equal(served[k], fine[k]) for k in fine)
    assert not all(torch.equal(fine[k], base[k]) for k in fine)
    # The model says why it is not a diffusers-flavor model.
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "mlmodel"))
    meta = Model.load(local).metadata["sdft"]
    assert meta["method"] == "full" and "LoRA adapters only" in meta["why_pyfunc"]

    # Champion re-evaluation: download, then evaluate as the gate does (--base-model, --no-base).
    folder, base_model = registry.download_adapter(name, "1", tmp_path / "champion")
    assert base_model == str(tiny_model)
    assert candidate.read_output(folder).method == "full"
    # Lineage: the downloaded version's weights hash like the train output's.
    assert lineage.adapter_digests(folder) == lineage.adapter_digests(out)
    params = write_params(tmp_path, tiny_model, {"val_timesteps": VAL_TIMESTEPS, "seed": VAL_SEED})
    args = [
        "--params",
        str(params),
        "--prepared",
        str(prepared),
        "--adapter",
        str(folder),
        "--out",
        str(tmp_path / "e"),
    ]
    assert evaluate.main([*args, "--base-model", base_model, "--name", "champion", "--no-base"]) == 0
    summary = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert summary["evaluation"]["models"]["champion"]["method"] == "full"


@pytest.mark.slow  # a server start (~30 s on 2 shared cores), training, two pipeline loads
def test_v_prediction_lora_is_served_with_its_prediction_type(
    name: str,
    tmp_path: Path,
    tiny_model: Path,
    prepared: Path,  # noqa: F811 (fixture)
) -> None:
    out = tmp_path / "v-lora"
    train_output(tiny_model, prepared, out, prediction_type="v_prediction", max_steps=1)
    assert register(name, out, tiny_model) == "1"
    model, images = generate(f"models:/{name}@champion", ["a red circle"])
    assert len(images) == 1
    assert model.unwrap_python_model().pipe.scheduler.config.prediction_type == "v_prediction"
    folder, _ = registry.download_adapter(name, "1", tmp_path / "champion")
    assert candidate.read_output(folder).prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("method", "prediction_type", "pyfunc"),
    [("lora", "epsilon", False), ("lora", None, False), ("lora", "v_prediction", True), ("full", "epsilon", True)],
)
def test_which_outputs_need_the_pyfunc_model(method: str, prediction_type: str | None, pyfunc: bool) -> None:
    output = candidate.TrainOutput(Path("x"), method, "sd", prediction_type, ("unet",))
    assert bool(registry.needs_pyfunc(output, "epsilon")) == pyfunc


def test_text_encoder_lora_needs_the_pyfunc_model_only_where_transformers_refuses_this_peft() -> None:
    from pipeline.diffusion import stock_text_encoder_lora

    output = candidate.TrainOutput(Path("x"), "lora", "sd", "epsilon", ("text_encoder", "unet"))
    assert bool(registry.needs_pyfunc(output, "epsilon")) == (not stock_text_encoder_lora())


@pytest.mark.slow  # a server start, training, a pipeline load
def test_text_encoder_lora_is_served_with_its_text_encoder(
    name: str,
    tmp_path: Path,
    tiny_model: Path,
    prepared: Path,  # noqa: F811 (fixture)
) -> None:
    import torch

    out = tmp_path / "te-lora"
    result = train_output(tiny_model, prepared, out, train_text_encoder=True, text_encoder_lr=1e-2)
    assert result.best_step > 0
    assert register(name, out, tiny_model) == "1"
    model, images = generate(f"models:/{name}@champion", ["a red circle"])
    assert len(images) == 1
    from pipeline.diffusion import stock_text_encoder_lora

    if stock_text_encoder_lora():  # logged with mlflow.diffusers, whose load_lora_weights loads the text encoder too
        return
    # This stack (transformers 5, peft 0.21): the pyfunc model, whose text encoder carries the trained LoRA.
    pipe = model.unwrap_python_model().pipe
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        served, trained = pipe.text_encoder(ids)[0], result.models["text_encoder"](ids)[0]
    torch.testing.assert_close(served, trained, atol=1e-4, rtol=1e-3)
