"""The embedded default base model: a tiny, SD-shaped pipeline built from config, with a real CLIP tokenizer.

No weights can be downloaded here, so the default `base.model` is this model saved in the standard diffusers layout
(`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`). Everything downstream loads it with
`from_pretrained`, exactly as it would load `stable-diffusion-v1-5/stable-diffusion-v1-5`. Its weights are random
(seeded): it checks the plumbing, it does not draw anything meaningful.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary is 49,408 tokens: 256 bytes, the same with </w>, 48,894 merges, and the two specials
# (256 * 2 + 48,894 + 2 = 49,408), so the merges are lines 1..48,894 of the file after its header.
N_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, shifted = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shifted)
            shifted += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _bpe_path() -> Path:
    try:
        files = importlib.metadata.files("open_clip_torch") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.as_posix() == BPE_FILE:
            return Path(file.locate())
    raise FileNotFoundError(
        f"CLIP's BPE merges file ({BPE_FILE}) was not found: it ships in the open_clip_torch wheel. "
        "Install it without its dependencies: `pip install --no-deps open_clip_torch` (make install does this)."
    )


def write_clip_tokenizer(folder: Path) -> Path:
    """Write CLIP's real tokenizer (vocab.json + merges.txt) to `folder`, offline, and return the folder."""
    from transformers import CLIPTokenizer

    with gzip.open(_bpe_path(), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : N_MERGES + 1]
    base = list(_bytes_to_unicode().values())
    vocab = base + [token + "</w>" for token in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
        )
        tokenizer.save_pretrained(folder)
    return folder


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Build the tiny SD 1.x-shaped pipeline deterministically and save it in the diffusers layout."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config("quick_gelu"))
    # SD 1.5's own scheduler configuration.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save_atomically(pipe, folder)


def _tiny_vae(seed: int, scaling_factor: float = 0.18215) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    # Four blocks: three 2x downsamples, the same 8x factor as SD's VAE, so 64 px images give 8x8 latents.
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _tiny_text_config(hidden_act: str, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer"))


def _save_atomically(pipe: Any, folder: Path) -> Path:
    """Write to a sibling folder and rename, so an interrupted build never leaves a half-written model behind."""
    partial = folder.with_name(folder.name + ".partial")
    pipe.save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)
    return folder


def build_tiny_sd2(folder: Path, seed: int = 0) -> Path:
    """A tiny SD 2.x-shaped pipeline: v-prediction scheduler, linear attention projections, GELU text encoder.

    SD 2.x's text encoder is OpenCLIP ViT-H (GELU); diffusers loads it as a `CLIPTextModel`, as here.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed + 1)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config("gelu"))
    # SD 2.1 (768 px)'s scheduler configuration: the model predicts velocity, not noise.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _save_atomically(pipe, folder)


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A tiny SDXL-shaped pipeline: two text encoders, pooled-text and size/crop ("text_time") conditioning.

    Cross-attention reads both encoders' penultimate states side by side (32 + 32 = 64); the added embedding reads
    the second encoder's pooled projection (32) and six size/crop ids, each embedded in 8 dims: 32 + 6 * 8 = 80.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed + 1, scaling_factor=0.13025)  # SDXL's VAE scaling factor
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config("quick_gelu"))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config("gelu"))
    # SDXL base 1.0's scheduler configuration.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    tokenizer = _clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _save_atomically(pipe, folder)
