"""Outputs that load everywhere: a kohya-style copy of the LoRA and a model card next to the adapter.

The diffusers LoRA file (`pytorch_lora_weights.safetensors`) loads in diffusers and in MLflow's diffusers flavor;
AUTOMATIC1111, ComfyUI, kohya-ss/sd-scripts and most community tools read kohya-style keys
(`lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha` per module). `export_kohya` writes that file
from the diffusers one (plus, for SDXL, the UNet's config), so it also works on an adapter pulled back from the
registry.

Module names, as the tools' own trainers write them:
- SD 1.x/2.x: the diffusers UNet's names (`lora_unet_down_blocks_0_attentions_0_...`) and `lora_te_text_model_...`,
  which is what sd-scripts' SD trainer writes (it trains on the diffusers UNet); ComfyUI and AUTOMATIC1111 map them.
- SDXL: sd-scripts trains SDXL on its own copy of the original (SGM/LDM) UNet (`library/sdxl_original_unet.py`), so
  its files and `networks/sdxl_merge_lora.py` use the SGM names (`lora_unet_input_blocks_4_1_...`,
  `lora_unet_middle_block_1_...`, `lora_unet_output_blocks_2_2_conv`), with `lora_te1_`/`lora_te2_` for the two text
  encoders. ComfyUI maps SGM names directly from the checkpoint's `diffusion_model.*` keys (`comfy/lora.py`
  `model_lora_keys_unet`), and diffusers reads them through `_maybe_map_sgm_blocks_to_diffusers`.
  `sgm_unet_name` below is the block arithmetic of that layout (the same one ComfyUI's `comfy/utils.py`
  `unet_to_diffusers` and sd-scripts' `library/sdxl_model_util.py` encode), written from the layout itself.

CLI: `python -m pipeline.export --adapter models/adapter --out models/adapter/adapter_kohya.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "adapter_kohya.safetensors"
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}


def read_adapter(adapter: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The adapter's tensors (PEFT key names, prefixed by model) and each model's LoRA config from the header."""
    from diffusers.utils import convert_state_dict_to_peft
    from safetensors import safe_open

    with safe_open(str(adapter / ADAPTER_FILE), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        header = handle.metadata() or {}
    if any(".lora.down." in k or ".lora.up." in k for k in tensors):  # older diffusers naming
        tensors = convert_state_dict_to_peft(tensors)
    flat = json.loads(header.get("lora_adapter_metadata", "{}"))
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        model, field = key.split(".", 1)
        configs.setdefault(model, {})[field] = value
    return tensors, configs


# diffusers ResnetBlock2D -> SGM ResBlock: (in_layers = GroupNorm, SiLU, conv), (emb_layers = SiLU, linear),
# (out_layers = GroupNorm, SiLU, dropout, conv), skip_connection.
_SGM_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Modules outside the blocks.
_SGM_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sgm_unet_name(module: str, unet_config: dict[str, Any]) -> str:
    """A diffusers UNet2DConditionModel module path -> the same module's path in the original (SGM/LDM) UNet.

    The SGM UNet numbers its blocks flat: `input_blocks.0` is conv_in, then each down block contributes one entry
    per resnet (`.0` resnet, `.1` its attention) and one for its downsampler (`.0.op`); `middle_block` is
    resnet, attention, resnet; each up block contributes layers_per_block + 1 entries (`.0` resnet, `.1` attention),
    its upsampler sitting in the last entry after them (`.2.conv` when the block has attention, else `.1.conv`).
    SDXL base (layers_per_block 2): down_blocks.1.attentions.0 -> input_blocks.4.1, up_blocks.0.upsamplers.0 ->
    output_blocks.2.2.
    """
    for prefix, target in _SGM_TOP.items():
        if module == prefix or module.startswith(prefix + "."):
            return target + module[len(prefix) :]
    n = len(unet_config["down_block_types"])
    per_block = unet_config["layers_per_block"]
    down_layers = [per_block] * n if isinstance(per_block, int) else list(per_block)
    up_layers = list(reversed(down_layers))
    parts = module.split(".")

    def inner(kind: str, rest: list[str]) -> str:
        if kind == "resnets":
            rest = [*_SGM_RESNET.get(rest[0], rest[0]).split("."), *rest[1:]]
        return ".".join(rest)

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        start = 1 + sum(layers + 1 for layers in down_layers[:i])  # conv_in is input_blocks.0
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv
            return f"input_blocks.{start + down_layers[i]}.0.op" + _tail(parts[5:])
        j = int(parts[3])
        slot = "0" if kind == "resnets" else "1"
        return f"input_blocks.{start + j}.{slot}.{inner(kind, parts[4:])}"
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        index = 1 if kind == "attentions" else 2 * j  # resnet, attention, resnet
        return f"middle_block.{index}.{inner(kind, parts[3:])}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        start = sum(layers + 1 for layers in up_layers[:i])
        if kind == "upsamplers":  # up_blocks.i.upsamplers.0.conv
            has_attention = "CrossAttn" in unet_config["up_block_types"][i]
            return f"output_blocks.{start + up_layers[i]}.{2 if has_attention else 1}.conv" + _tail(parts[5:])
        j = int(parts[3])
        slot = "0" if kind == "resnets" else "1"
        return f"output_blocks.{start + j}.{slot}.{inner(kind, parts[4:])}"
    raise ValueError(f"no SGM name for UNet module {module!r}: sdft's kohya export knows UNet2DConditionModel only")


def _tail(rest: list[str]) -> str:
    return "".join(f".{p}" for p in rest)


def to_kohya(
    tensors: dict[str, torch.Tensor], configs: dict[str, dict[str, Any]], unet_config: dict[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT keys (`unet.<module>.lora_A.weight`) -> kohya keys, with each module's real alpha.

    diffusers' `convert_state_dict_to_kohya` writes alpha = rank (scale 1). Kohya tools scale by alpha / rank, as PEFT
    scales by lora_alpha / r, so the `.alpha` of every module is set to the adapter's lora_alpha here. SDXL (a
    `text_encoder_2` LoRA, or `unet_config` with text_time conditioning) gets SGM UNet names, which need `unet_config`.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    sdxl = any(k.startswith("text_encoder_2.") for k in tensors) or (
        unet_config is not None and unet_config.get("addition_embed_type") == "text_time"
    )
    if sdxl and unet_config is None:
        raise ValueError("an SDXL LoRA's kohya names need the UNet's config (layers_per_block, block types)")
    # CLIPTextModel's modules sit under `text_model.` in the checkpoint layout kohya tools expect.
    fixed = {}
    for key, value in tensors.items():
        model, rest = key.split(".", 1)
        if model.startswith("text_encoder") and not rest.startswith("text_model."):
            rest = "text_model." + rest
        if model == "unet" and sdxl:
            module, lora, weight = rest.rsplit(".", 2)  # <module>.lora_A.weight
            rest = f"{sgm_unet_name(module, unet_config)}.{lora}.{weight}"
        fixed[f"{model}.{rest}"] = value
    kohya = convert_state_dict_to_kohya(fixed)
    out = {}
    for key, value in kohya.items():
        if not sdxl and key.startswith("lora_te1_"):
            key = "lora_te_" + key[len("lora_te1_") :]  # SD 1.x/2.x has one text encoder: kohya calls it lora_te
        if key.endswith(".alpha"):
            model = next(m for prefix, m in KOHYA_PREFIXES.items() if key.startswith(prefix))
            rank = value.item()
            value = torch.tensor(float(configs.get(model, {}).get("lora_alpha", rank)))
        out[key] = value.contiguous()
    return out


def kohya_metadata(configs: dict[str, dict[str, Any]], base_model: str, data_hash: str) -> dict[str, str]:
    """safetensors header (strings only): kohya's `ss_*` fields where tools read them, and sdft's own."""
    unet = configs.get("unet", {})
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(unet.get("r", "")),
        "ss_network_alpha": str(unet.get("lora_alpha", "")),
        "ss_sd_model_name": base_model,
        "sdft_base_model": base_model,
        "sdft_data_hash": data_hash,
        "sdft_lora_targets": json.dumps(sorted(unet.get("target_modules") or [])),
    }


def export_kohya(
    adapter: Path, out: Path, base_model: str, data_hash: str, unet_config: dict[str, Any] | None = None
) -> Path:
    """Write the kohya-format copy of the diffusers adapter in `adapter` to `out` (atomically).

    SDXL needs the UNet's config for its SGM names: `unet_config`, else read from `base_model` (a folder or hub id).
    """
    from safetensors.torch import save_file

    tensors, configs = read_adapter(adapter)
    sdxl = any(k.startswith("text_encoder_2.") for k in tensors) or _sdxl_training(adapter)
    if sdxl and unet_config is None:
        unet_config = _base_unet_config(base_model, adapter)
    partial = out.with_name(out.name + ".partial")
    kohya = to_kohya(tensors, configs, unet_config)
    save_file(kohya, str(partial), metadata=kohya_metadata(configs, base_model, data_hash))
    partial.rename(out)
    return out


def _sdxl_training(adapter: Path) -> bool:
    """Whether the adapter's training.json (written by train) says the base is SDXL."""
    path = adapter / "training.json"
    return path.is_file() and json.loads(path.read_text()).get("architecture") == "sdxl"


def _base_unet_config(base_model: str, adapter: Path) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    if not base_model:
        raise ValueError(f"{adapter}: an SDXL LoRA's kohya names need the base model's UNet config: pass --base-model")
    try:
        return dict(UNet2DConditionModel.load_config(base_model, subfolder="unet"))
    except OSError as exc:
        raise ValueError(f"{adapter}: cannot read the UNet config of base model {base_model!r} ({exc})") from exc


def model_card(
    base_model: str,
    data_hash: str,
    train_params: dict[str, Any],
    summary: dict[str, Any],
    files: list[str],
    grid: str = "reports/eval/grid.png",
) -> str:
    """README.md for the adapter folder: what it is, how it was made, how well it did, how to load it."""
    method = summary.get("method", "lora")
    load = (
        'pipe.load_lora_weights("models/adapter")'
        if method == "lora"
        else 'pipe.unet = UNet2DConditionModel.from_pretrained("models/adapter", subfolder="unet")'
    )
    params_yaml = json.dumps(train_params, indent=2, default=str)
    nan = float("nan")
    lines = [
        f"# sdft {'LoRA adapter' if method == 'lora' else 'fine-tuned weights'}",
        "",
        f"- **Base model**: `{base_model}`",
        f"- **Training data**: sha256 `{data_hash}` (hash of every image's content hash and caption, per split)",
        f"- **Method**: {method}; best validation loss (validation split) {summary.get('best_val_loss', nan):.5f} "
        f"at step {summary.get('best_step')} (untuned {summary.get('initial_val_loss', nan):.5f}); "
        f"{summary.get('stop_reason', '')}",
        f"- **Parameters**: {summary.get('parameters', {}).get('trainable', 0):,} trained, "
        f"{summary.get('parameters', {}).get('frozen', 0):,} frozen",
        f"- **Samples**: base vs candidate grid in `{grid}` (written by the evaluate stage)"
        + (
            "; below, these weights on the fixed sample prompts and seeds (`samples.png`)"
            if "samples.png" in files
            else ""
        ),
        f"- **Files**: {', '.join(f'`{f}`' for f in files)}",
        "",
        *(["![samples at the best step](samples.png)", ""] if "samples.png" in files else []),
        "## Load it",
        "",
        "```python",
        "from diffusers import AutoPipelineForText2Image, UNet2DConditionModel",
        f'pipe = AutoPipelineForText2Image.from_pretrained("{base_model}")',
        load,
        "```",
        "",
        f"`{KOHYA_FILE}` (when present) holds the same LoRA with kohya key names (SDXL: the original UNet's block "
        "names, as kohya-ss/sd-scripts writes them) for AUTOMATIC1111, ComfyUI and sd-scripts; the diffusers file "
        "above keeps text-encoder keys under `text_model.`, which older diffusers versions need.",
        "",
        "## Train parameters",
        "",
        "```json",
        params_yaml,
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a diffusers LoRA folder as a kohya-format safetensors file.")
    parser.add_argument("--adapter", required=True, type=Path, help=f"folder holding {ADAPTER_FILE}")
    parser.add_argument("--out", required=True, type=Path, help="kohya .safetensors file to write")
    parser.add_argument(
        "--base-model", default="", help="recorded in the file's metadata; SDXL: its unet/config.json gives the names"
    )
    parser.add_argument("--data-hash", default="", help="recorded in the file's metadata")
    args = parser.parse_args(argv)
    if not (args.adapter / ADAPTER_FILE).is_file():
        print(f"error: no {ADAPTER_FILE} in {args.adapter}", file=sys.stderr)
        return 2
    try:
        print(export_kohya(args.adapter, args.out, args.base_model, args.data_hash))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
