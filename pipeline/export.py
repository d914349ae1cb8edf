"""Outputs that load everywhere: a kohya-style copy of the LoRA and a model card next to the adapter.

The diffusers LoRA file (`pytorch_lora_weights.safetensors`) loads in diffusers and in MLflow's diffusers flavor;
AUTOMATIC1111, ComfyUI and most community tools read only kohya-style keys (`lora_unet_<module>.lora_down.weight`,
`.lora_up.weight` and `.alpha` per module). `export_kohya` writes that file from the diffusers one alone, so it also
works on an adapter pulled back from the registry.

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


def to_kohya(tensors: dict[str, torch.Tensor], configs: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """PEFT keys (`unet.<module>.lora_A.weight`) -> kohya keys, with each module's real alpha.

    diffusers' `convert_state_dict_to_kohya` writes alpha = rank (scale 1). Kohya tools scale by alpha / rank, as PEFT
    scales by lora_alpha / r, so the `.alpha` of every module is set to the adapter's lora_alpha here.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    # CLIPTextModel's modules sit under `text_model.` in the checkpoint layout kohya tools expect.
    fixed = {}
    for key, value in tensors.items():
        model, rest = key.split(".", 1)
        if model.startswith("text_encoder") and not rest.startswith("text_model."):
            rest = "text_model." + rest
        fixed[f"{model}.{rest}"] = value
    kohya = convert_state_dict_to_kohya(fixed)
    sdxl = any(k.startswith("text_encoder_2.") for k in tensors)
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


def export_kohya(adapter: Path, out: Path, base_model: str, data_hash: str) -> Path:
    """Write the kohya-format copy of the diffusers adapter in `adapter` to `out` (atomically)."""
    from safetensors.torch import save_file

    tensors, configs = read_adapter(adapter)
    partial = out.with_name(out.name + ".partial")
    save_file(to_kohya(tensors, configs), str(partial), metadata=kohya_metadata(configs, base_model, data_hash))
    partial.rename(out)
    return out


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
        f"`{KOHYA_FILE}` (when present) holds the same LoRA with kohya key names for AUTOMATIC1111 and ComfyUI.",
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
    parser.add_argument("--base-model", default="", help="recorded in the file's metadata")
    parser.add_argument("--data-hash", default="", help="recorded in the file's metadata")
    args = parser.parse_args(argv)
    if not (args.adapter / ADAPTER_FILE).is_file():
        print(f"error: no {ADAPTER_FILE} in {args.adapter}", file=sys.stderr)
        return 2
    print(export_kohya(args.adapter, args.out, args.base_model, args.data_hash))
    return 0


if __name__ == "__main__":
    sys.exit(main())
