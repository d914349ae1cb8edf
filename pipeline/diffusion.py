"""Shared diffusion helpers used by both `train` and `evaluate`: the same code must compute the same numbers.

- loading the frozen components of a base model with `from_pretrained` (hub id or local folder alike);
- reading a prepared split and encoding it once (VAE latents, text embeddings);
- the fixed-noise validation loss, so a curve is comparable across steps, runs and models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def load_components(model: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler, all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs: dict[str, Any] = {"revision": revision}
    components = Components(
        tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kwargs),
        vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs),
        unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs),
        # Training adds noise with the DDPM forward process whatever sampler the pipeline ships with.
        noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs),
    )
    for module in (components.text_encoder, components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
    return components


@dataclass
class Split:
    """A prepared split: images (RGB, already at the training resolution) and their captions."""

    images: list[Image.Image]
    captions: list[str]
    hashes: list[str]


def read_split(folder: Path) -> Split:
    """Read `<folder>/metadata.jsonl` and its images, as written by the `prepare` stage."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} is missing: run the prepare stage first (`dvc repro prepare`).")
    rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    images = []
    for row in rows:
        with Image.open(folder / row["file_name"]) as image:
            images.append(image.convert("RGB"))
    return Split(images=images, captions=[r["text"] for r in rows], hashes=[r["sha256"] for r in rows])


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor in [-1, 1], shape (N, 3, H, W)."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def encode_images(vae: Any, images: list[Image.Image], batch_size: int = 16) -> torch.Tensor:
    """VAE latents (the distribution's mean, scaled), shape (N, 4, H/8, W/8).

    The mean rather than a sample: latents are computed once and cached, so a sample would freeze one arbitrary draw.
    """
    out = []
    for start in range(0, len(images), batch_size):
        batch = pixels(images[start : start + batch_size]).to(vae.device, vae.dtype)
        out.append(vae.encode(batch).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out).float()


@torch.no_grad()
def encode_text(tokenizer: Any, text_encoder: Any, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """Last hidden states of the text encoder (what SD's cross-attention reads), shape (N, 77, D)."""
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(
            captions[start : start + batch_size],
            padding="max_length",
            max_length=text_encoder.config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(text_encoder(ids.to(text_encoder.device))[0])
    return torch.cat(out).float()


def diffusion_target(noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction, Salimans & Ho 2022)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r} in the base model's scheduler config")


@torch.no_grad()
def fixed_validation_loss(
    unet: Any,
    noise_scheduler: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    n_timesteps: int,
    seed: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-sample denoising loss at fixed, evenly spaced timesteps with fixed noise: shape (N,).

    The noise comes from a CPU generator seeded with `seed`, drawn in one go for all (timestep, sample) pairs, so the
    same held-out set gives the same numbers for every model, step and run; differences are due to the model alone.
    """
    n_train = noise_scheduler.config.num_train_timesteps
    # Midpoints of n equal bins over [0, T): covers the whole noise range, including the hard, low-noise end.
    timesteps = ((torch.arange(n_timesteps) + 0.5) * n_train / n_timesteps).long()
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((n_timesteps, *latents.shape), generator=generator)
    device, dtype = unet.device, unet.dtype
    losses = torch.zeros(len(latents))
    for k, t_value in enumerate(timesteps):
        for start in range(0, len(latents), batch_size):
            x0 = latents[start : start + batch_size]
            eps = noise[k, start : start + batch_size]
            t = torch.full((len(x0),), int(t_value), dtype=torch.long)
            noisy = noise_scheduler.add_noise(x0, eps, t)
            target = diffusion_target(noise_scheduler, x0, eps, t)
            pred = unet(
                noisy.to(device, dtype), t.to(device), embeddings[start : start + batch_size].to(device, dtype)
            ).sample
            per_sample = F.mse_loss(pred.float().cpu(), target, reduction="none").mean(dim=(1, 2, 3))
            losses[start : start + batch_size] += per_sample / n_timesteps
    return losses
