"""Kohya export and model card: the kohya file maps onto the UNet and loads to the same model as the diffusers one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.diffusion import load_components
from pipeline.export import KOHYA_FILE, export_kohya, main, model_card, sgm_unet_name, to_kohya
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
    # The diffusers file keeps CLIP's checkpoint layout too (transformers 5's CLIPTextModel has no `text_model.`).
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as handle:
        text_keys = [k for k in handle.keys() if k.startswith("text_encoder")]  # noqa: SIM118
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
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
    sdxl_like = tmp_path / "sdxl-adapter"  # SDXL names need the base's UNet config: an error without --base-model
    sdxl_like.mkdir()
    (sdxl_like / "pytorch_lora_weights.safetensors").write_bytes(
        (adapter / "pytorch_lora_weights.safetensors").read_bytes()
    )
    (sdxl_like / "training.json").write_text(json.dumps({"architecture": "sdxl"}))
    assert main(["--adapter", str(sdxl_like), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert not (tmp_path / "y.safetensors").exists()
    assert (tmp_path / "x.safetensors").stat().st_size > 0
    summary = {"method": "lora", "best_val_loss": 0.5, "best_step": 4, "initial_val_loss": 0.6, "stop_reason": "done"}
    card = model_card("models/tiny-sd", "deadbeef", {"lora_rank": 2}, summary, ["pytorch_lora_weights.safetensors"])
    assert "`models/tiny-sd`" in card and "deadbeef" in card and "0.50000 at step 4" in card
    assert "reports/eval/grid.png" in card and "load_lora_weights" in card
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == {"lora_rank": 2}


# SDXL base 1.0's UNet topology (channels shrunk): three levels, attention in the two lower ones, two layers each.
SDXL_TOPOLOGY = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}


@pytest.mark.parametrize(
    ("diffusers_name", "sgm_name"),
    [  # the layout of sd-scripts' SdxlUNet2DConditionModel (library/sdxl_original_unet.py), read off its constructor
        ("conv_in", "input_blocks.0.0"),
        ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
        ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
         "input_blocks.4.1.transformer_blocks.1.attn1.to_q"),
        ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
        ("mid_block.resnets.0.time_emb_proj", "middle_block.0.emb_layers.1"),
        ("mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj",
         "middle_block.1.transformer_blocks.9.ff.net.0.proj"),
        ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
        ("up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_out.0",
         "output_blocks.2.1.transformer_blocks.0.attn2.to_out.0"),
        ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("up_blocks.1.resnets.0.conv1", "output_blocks.3.0.in_layers.2"),
        ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_out", "out.2"),
    ],
)  # fmt: skip
def test_sgm_names_of_the_sdxl_unet(diffusers_name: str, sgm_name: str) -> None:
    assert sgm_unet_name(diffusers_name, SDXL_TOPOLOGY) == sgm_name


def test_every_sdxl_sgm_name_maps_back_through_diffusers_converter() -> None:
    """Every adaptable module of an SDXL-topology UNet -> kohya SGM key -> diffusers' own kohya reader -> itself."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), **SDXL_TOPOLOGY, transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 4), cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True,
    )  # fmt: skip
    skip = ("conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding")  # no LoRA target reaches these
    names = [
        n
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and not n.startswith(skip)
    ]
    kohya = {}
    for name in names:
        stem = "lora_unet_" + sgm_unet_name(name, dict(unet.config)).replace(".", "_")
        kohya |= {f"{stem}.lora_down.weight": torch.zeros(1), f"{stem}.lora_up.weight": torch.zeros(1)}
    state, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(kohya, unet.config))
    # diffusers' older attention-processor spelling for attention projections; the module path is the same.
    back = {
        k.removeprefix("unet.")
        .split(".lora")[0]
        .split("_lora")[0]
        .replace(".processor.", ".")
        .replace("to_out", "to_out.0")
        for k in state
        if ".down." in k
    }
    assert back == set(names)


def test_sdxl_kohya_file_has_sd_scripts_names_and_loads_to_the_trained_unet(
    tmp_path_factory: pytest.TempPathFactory,
    splits,  # noqa: F811
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from pipeline.diffusion import predict
    from pipeline.tiny import build_tiny_sdxl

    sdxl = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
    params = tp(max_steps=3, train_text_encoder=True, lora_rank=2, lora_alpha=8, lora_targets="attention+ffn+conv")
    result = train(load_components(str(sdxl)), *splits, params)
    assert result.best_step > 0  # the saved weights are trained ones (B != 0), so a dropped module would show
    folder = save_adapter(result, tmp_path_factory.mktemp("sdxl-adapter") / "adapter").parent
    out = export_kohya(folder, folder / KOHYA_FILE, str(sdxl), "")  # the UNet config read from the base model
    with safe_open(str(out), "pt") as handle:
        kohya = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    stems = {k.split(".", 1)[0] for k in kohya}
    unet_stems = {s for s in stems if s.startswith("lora_unet_")}
    assert stems == unet_stems | {s for s in stems if s.startswith(("lora_te1_text_model_", "lora_te2_text_model_"))}
    assert all(
        s.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        for s in unet_stems
    )
    # sd-scripts' names for the tiny SDXL's resampling convs (up_blocks.0 has attention: its upsampler is slot 2).
    assert {"lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv"} <= unet_stems
    assert any(s.startswith("lora_te2_") for s in stems) and all(
        {f"{s}.lora_down.weight", f"{s}.lora_up.weight", f"{s}.alpha"} <= set(kohya) for s in stems
    )

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    cond = {
        "emb": torch.randn(2, 77, 64),
        "pooled": torch.randn(2, 32),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
    }
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        base = predict(pipe.unet, x, t, cond)
    # diffusers' kohya reader (SGM blocks -> diffusers names) consumes every key, or raises naming the leftovers.
    converted, alphas = pipe.lora_state_dict(dict(kohya), unet_config=pipe.unet.config)
    assert len(converted) == 2 * len(stems) and len(alphas) == len(stems)
    unet_only = {k: v for k, v in kohya.items() if k.startswith("lora_unet_")}
    pipe.load_lora_weights(unet_only)
    adapted = {n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "default_0" in m.lora_A}
    assert len(adapted) == len(unet_stems)  # one LoRA layer per kohya UNet module, none dropped
    with torch.no_grad():
        loaded, trained = predict(pipe.unet, x, t, cond), predict(result.models["unet"], x, t, cond)
    assert not torch.allclose(loaded, base, atol=1e-5)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)
