"""Tiny SD 2.x and SDXL builders: each trains a few steps, and the stock pipeline loads the adapter it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.diffusion import load_components, predict
from pipeline.tiny import build_tiny_sd2, build_tiny_sdxl
from pipeline.train import save_adapter, train
from tests.test_train import prepared, splits, tp  # noqa: F401  (prepared and splits are fixtures)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd2(tmp_path_factory.mktemp("sd2") / "tiny-sd2")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def test_sd2_is_v_prediction_with_a_gelu_text_encoder(sd2: Path) -> None:
    scheduler = json.loads((sd2 / "scheduler" / "scheduler_config.json").read_text())
    text = json.loads((sd2 / "text_encoder" / "config.json").read_text())
    unet = json.loads((sd2 / "unet" / "config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert text["hidden_act"] == "gelu" and unet["use_linear_projection"] is True
    assert not load_components(str(sd2)).is_sdxl


def test_sdxl_layout_is_detected(sdxl: Path) -> None:
    index = json.loads((sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    components = load_components(str(sdxl))
    assert components.is_sdxl and components.unet.config.addition_embed_type == "text_time"


def _check_adapter_loads(pipeline_class: type, model: Path, adapter: Path, trained_unet: torch.nn.Module) -> None:
    pipe = pipeline_class.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(adapter))
    # The loaded UNet predicts what the trained one does (SDXL: with pooled text and size ids too).
    config = trained_unet.config
    cond = {"emb": torch.randn(2, 77, config.cross_attention_dim)}
    if config.addition_embed_type == "text_time":
        cond |= {"pooled": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(predict(pipe.unet, x, t, cond), predict(trained_unet, x, t, cond))
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and float(image.std()) > 0


def test_sd2_trains_and_loads_with_the_stock_pipeline(tmp_path: Path, sd2: Path, splits) -> None:  # noqa: F811
    from diffusers import StableDiffusionPipeline

    result = train(load_components(str(sd2)), *splits, tp(max_steps=2))
    assert result.history[-1]["train_loss"] > 0
    save_adapter(result, tmp_path / "adapter")
    _check_adapter_loads(StableDiffusionPipeline, sd2, tmp_path / "adapter", result.models["unet"])


def test_sdxl_trains_and_loads_with_the_stock_pipeline(tmp_path: Path, sdxl: Path, splits) -> None:  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    result = train(load_components(str(sdxl)), *splits, tp(max_steps=2, caption_dropout=0.5))
    assert all(r["train_loss"] > 0 for r in result.history[1:])
    save_adapter(result, tmp_path / "adapter")
    _check_adapter_loads(StableDiffusionXLPipeline, sdxl, tmp_path / "adapter", result.models["unet"])


def test_sdxl_full_text_encoders_train_per_step(tmp_path: Path, sdxl: Path, splits) -> None:  # noqa: F811
    result = train(
        load_components(str(sdxl)),
        *splits,
        tp(max_steps=1, method="full", train_blocks=["mid_block"], train_text_encoder=True),
    )
    assert set(result.models) == {"unet", "text_encoder", "text_encoder_2"}
    per_model = result.parameters["per_model"]
    assert per_model["text_encoder_2"]["trainable"] > 0 and per_model["vae"]["trainable"] == 0


def test_sdxl_text_encoder_lora_on_both_encoders_loads_back(tmp_path: Path, sdxl: Path, splits) -> None:  # noqa: F811
    from diffusers import StableDiffusionXLPipeline

    from pipeline.diffusion import load_lora

    # With FFN and conv LoRA the random tiny SDXL's validation loss improves within a few steps (attention alone does
    # not), so the best weights, which the stage saves, are trained ones.
    params = tp(max_steps=3, train_text_encoder=True, lora_alpha=8, lora_targets="attention+ffn+conv")
    result = train(load_components(str(sdxl)), *splits, params)
    assert set(result.models) == {"unet", "text_encoder", "text_encoder_2"} and result.best_step > 0
    save_adapter(result, tmp_path / "adapter")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    ids = pipe.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states[-2]
    load_lora(pipe, tmp_path / "adapter")
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2"):
            loaded = getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]
            trained = result.models[name](ids, output_hidden_states=True).hidden_states[-2]
            torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(loaded, base, atol=1e-5)  # text_encoder_2's LoRA changed it, and loaded with it


def test_compute_device_follows_sdft_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.diffusion import compute_device

    monkeypatch.setenv("SDFT_DEVICE", "cpu")
    assert compute_device() == torch.device("cpu")
    monkeypatch.setenv("SDFT_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="SDFT_DEVICE='gpu0' is not a torch device"):
        compute_device()
    monkeypatch.delenv("SDFT_DEVICE")
    assert compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
