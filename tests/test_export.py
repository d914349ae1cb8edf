"""Kohya export and model card: the kohya file maps onto the UNet and loads to the same model as the diffusers one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.diffusion import load_components
from pipeline.export import KOHYA_FILE, export_kohya, main, model_card, to_kohya
from pipeline.train import save_adapter, train
from tests.test_train import prepared, splits, tp  # noqa: F401  (prepared and splits are fixtures)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, splits) -> Path:  # noqa: F811
    """A trained LoRA with alpha != rank on attention, feed-forward and conv layers."""
    params = tp(max_steps=2, lora_rank=2, lora_alpha=8, lora_targets="attention+ffn+conv")
    result = train(load_components(str(tiny_model)), *splits, params)
    return save_adapter(result, tmp_path_factory.mktemp("adapter") / "adapter").parent


def test_every_kohya_key_maps_back_to_a_unet_module(tmp_path: Path, adapter: Path, tiny_model: Path) -> None:
    out = export_kohya(adapter, tmp_path / KOHYA_FILE, "models/tiny-sd", "abc123")
    unet = load_components(str(tiny_model)).unet
    modules = {name.replace(".", "_") for name, _ in unet.named_modules()}
    with safe_open(str(out), "pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
        alphas = {k: handle.get_tensor(k) for k in keys if k.endswith(".alpha")}
    stems = {k.split(".", 1)[0] for k in keys}
    assert all(k.startswith("lora_unet_") for k in stems)
    assert {s.removeprefix("lora_unet_") for s in stems} <= modules
    for stem in stems:
        assert {f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha"} <= set(keys)
    assert {float(a) for a in alphas.values()} == {8.0}  # lora_alpha, not the rank (2)
    assert metadata["ss_network_dim"] == "2" and float(metadata["ss_network_alpha"]) == 8.0
    assert metadata["sdft_base_model"] == "models/tiny-sd" and metadata["sdft_data_hash"] == "abc123"


def test_kohya_file_loads_as_the_diffusers_file_does(tmp_path: Path, adapter: Path, tiny_model: Path) -> None:
    from diffusers import StableDiffusionPipeline

    export_kohya(adapter, adapter.parent / f"kohya-{KOHYA_FILE}", "models/tiny-sd", "")
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([50, 800]), torch.randn(2, 77, 32)
    outputs = {}
    for name, kwargs in (
        ("base", None),
        ("diffusers", {}),
        ("kohya", {"weight_name": f"kohya-{KOHYA_FILE}"}),
    ):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
        if kwargs is not None:
            pipe.load_lora_weights(str(adapter) if name == "diffusers" else str(adapter.parent), **kwargs)
        with torch.no_grad():
            outputs[name] = pipe.unet(x, t, emb).sample
    assert not torch.allclose(outputs["diffusers"], outputs["base"], atol=1e-4)
    torch.testing.assert_close(outputs["kohya"], outputs["diffusers"], atol=1e-5, rtol=1e-4)


def test_text_encoder_lora_exports_kohya_keys_that_map_to_its_modules(tmp_path: Path, tiny_model: Path, splits) -> None:  # noqa: F811
    params = tp(max_steps=1, train_text_encoder=True, lora_rank=2, lora_alpha=8)
    components = load_components(str(tiny_model))
    folder = save_adapter(train(components, *splits, params), tmp_path / "adapter").parent
    out = export_kohya(folder, tmp_path / KOHYA_FILE, "models/tiny-sd", "")
    # kohya names follow the original checkpoint layout, where CLIP's modules sit under `text_model.`
    text_modules = {
        "text_model_" + n.replace(".", "_") for n, _ in load_components(str(tiny_model)).text_encoder.named_modules()
    }
    with safe_open(str(out), "pt") as handle:
        keys = list(handle.keys())  # noqa: SIM118 (safe_open has no __iter__)
        alphas = {float(handle.get_tensor(k)) for k in keys if k.startswith("lora_te_") and k.endswith(".alpha")}
    stems = {k.split(".", 1)[0] for k in keys}
    te = {s.removeprefix("lora_te_") for s in stems if s.startswith("lora_te_")}
    assert te and te <= text_modules and alphas == {8.0}
    assert all(s.startswith(("lora_te_", "lora_unet_")) for s in stems)


def test_to_kohya_names_the_sd1_text_encoder_lora_te() -> None:
    tensors = {
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8),
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
    }
    kohya = to_kohya(tensors, {"text_encoder": {"lora_alpha": 4, "r": 2}})
    assert set(kohya) == {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }
    assert float(kohya["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 4.0


def test_export_cli_and_model_card(tmp_path: Path, adapter: Path) -> None:
    assert main(["--adapter", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["--adapter", str(adapter), "--out", str(tmp_path / "x.safetensors")]) == 0
    assert (tmp_path / "x.safetensors").stat().st_size > 0
    summary = {"method": "lora", "best_val_loss": 0.5, "best_step": 4, "initial_val_loss": 0.6, "stop_reason": "done"}
    card = model_card("models/tiny-sd", "deadbeef", {"lora_rank": 2}, summary, ["pytorch_lora_weights.safetensors"])
    assert "`models/tiny-sd`" in card and "deadbeef" in card and "0.50000 at step 4" in card
    assert "reports/eval/grid.png" in card and "load_lora_weights" in card
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == {"lora_rank": 2}
