"""Shared diffusion helpers used by both `train` and `evaluate`: the same code must compute the same numbers.

- loading the frozen components of a base model with `from_pretrained` (hub id or local folder alike), SD 1.x/2.x
  (one text encoder) or SDXL (two, plus pooled-text and size/crop conditioning);
- reading a prepared split and encoding it once (VAE latents, text embeddings);
- the fixed-noise validation loss, so a curve is comparable across steps, runs and models;
- where models run (`compute_device`).
"""

from __future__ import annotations

import json
import os
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
    tokenizer_2: Any = None  # SDXL only
    text_encoder_2: Any = None  # SDXL only: CLIPTextModelWithProjection (pooled text for the added embedding)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_encoders(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def to(self, device: torch.device | str) -> Components:
        """Move the models (text encoders, VAE, UNet) to `device`; the tokenizers and noise scheduler stay put."""
        for module in (*self.text_encoders, self.vae, self.unet):
            module.to(device)
        return self


def compute_device() -> torch.device:
    """Where the encode, evaluate and class-image steps run their models: `SDFT_DEVICE` when set (cpu, cuda, cuda:1,
    mps), else the first GPU, else the CPU. Training runs on accelerate's device (one per process) instead."""
    name = os.environ.get("SDFT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"SDFT_DEVICE={name!r} is not a torch device: use cpu, cuda, cuda:<index> or mps") from exc


def is_sdxl_model(model: str, revision: str | None = None) -> bool:
    """SDXL is recognised by its second text encoder in `model_index.json` (the UNet's "text_time" embedding)."""
    from diffusers import DiffusionPipeline

    return "text_encoder_2" in DiffusionPipeline.load_config(model, revision=revision)


def load_components(model: str, revision: str | None = None, dtype: torch.dtype = torch.float32) -> Components:
    """Load tokenizer(s), text encoder(s), VAE, UNet and a DDPM noise scheduler, all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kwargs: dict[str, Any] = {"revision": revision}
    extra: dict[str, Any] = {}
    if is_sdxl_model(model, revision):
        extra = {
            "tokenizer_2": CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", **kwargs),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                model, subfolder="text_encoder_2", torch_dtype=dtype, **kwargs
            ),
        }
    components = Components(
        tokenizer=CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kwargs),
        vae=AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs),
        unet=UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs),
        # Training adds noise with the DDPM forward process whatever sampler the pipeline ships with.
        noise_scheduler=DDPMScheduler.from_pretrained(model, subfolder="scheduler", **kwargs),
        **extra,
    )
    for module in (*components.text_encoders, components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
    return components


# The prepared splits (folders of the prepare stage's output) and who may read them. `train` fits the weights;
# `validation` chooses (early stopping, best checkpoint, hyperparameter tuning); `test` judges: read only by evaluate
# and, through it, the gate, so the numbers that promote a model come from images that chose nothing about it.
TRAIN, VALIDATION, TEST = "train", "validation", "test"
TRAINING_SPLITS = (TRAIN, VALIDATION)  # all that encode and train read


@dataclass
class Split:
    """A prepared split: images (RGB, already at the training resolution) and their captions."""

    images: list[Image.Image]
    captions: list[str]
    hashes: list[str]


def read_rows(folder: Path) -> list[dict[str, Any]]:
    """The rows of `<folder>/metadata.jsonl`, as written by the `prepare` stage (file_name, text, sha256, ...)."""
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} is missing: run the prepare stage first (`dvc repro prepare`).")
    return [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]


def read_split(folder: Path) -> Split:
    """Read `<folder>/metadata.jsonl` and its images, as written by the `prepare` stage."""
    rows = read_rows(folder)
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


def size_groups(shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """Row indices grouped by shape (aspect-ratio buckets), groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(row)
    return list(groups.values())


def stack_if_one_size(latents: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One (N, ...) tensor when every item has the same shape; else the list (what fixed_validation_loss takes)."""
    return torch.stack(latents) if latents and len({tuple(x.shape) for x in latents}) == 1 else latents


@torch.no_grad()
def encode_image_list(vae: Any, images: list[Image.Image], batch_size: int = 16) -> list[torch.Tensor]:
    """Latents of images of any sizes (aspect-ratio buckets): one (4, h/8, w/8) tensor per image, in order."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(images)
    for rows in size_groups([(i.height, i.width) for i in images]):
        for row, latent in zip(rows, encode_images(vae, [images[r] for r in rows], batch_size), strict=True):
            out[row] = latent
    return out


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


def tokenize(components: Components, captions: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for each text encoder: {"ids": (N, 77)} and, for SDXL, {"ids_2": (N, 77)}."""
    out = {}
    for key, tokenizer, encoder in (
        ("ids", components.tokenizer, components.text_encoder),
        ("ids_2", components.tokenizer_2, components.text_encoder_2),
    ):
        if encoder is not None:
            out[key] = tokenizer(
                captions,
                padding="max_length",
                max_length=encoder.config.max_position_embeddings,
                truncation=True,
                return_tensors="pt",
            ).input_ids
    return out


def text_conditioning(components: Components, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text conditioning from token ids, with gradients when an encoder trains.

    SD 1.x/2.x: {"emb": last hidden states (N, 77, D)}. SDXL: {"emb": both encoders' penultimate hidden states side by
    side (N, 77, D1 + D2), "pooled": the second encoder's projected pooled output (N, P)}, as SDXL's pipeline does.
    """
    encoder = components.text_encoder
    device = next(encoder.parameters()).device  # also through a DDP wrapper
    ids = tokens["ids"].to(device, non_blocking=True)
    if not components.is_sdxl:
        return {"emb": encoder(ids)[0]}
    first = encoder(ids, output_hidden_states=True)
    second = components.text_encoder_2(tokens["ids_2"].to(device, non_blocking=True), output_hidden_states=True)
    emb = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return {"emb": emb, "pooled": second.text_embeds}


def size_conditioning(n: int, height: int, width: int) -> torch.Tensor:
    """SDXL's micro-conditioning ids (N, 6): original size, crop top-left, target size.

    Prepared images are already resized and cropped to the training resolution, so original = target, crop = (0, 0).
    """
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(n, 1)


def sizes_conditioning(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """`size_conditioning` per row, for images of different sizes (aspect-ratio buckets): sizes are (height, width)."""
    return torch.tensor([[h, w, 0, 0, h, w] for h, w in sizes], dtype=torch.float32).reshape(-1, 6)


@torch.no_grad()
def encode_conditioning(
    components: Components, captions: list[str], resolution: int | list[tuple[int, int]], batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Frozen text conditioning for every caption, computed once: {"emb"} (+ {"pooled", "time_ids"} for SDXL).

    `resolution`: the square training size, or each caption's image (height, width) when sizes differ.
    """
    parts = [
        text_conditioning(components, tokenize(components, captions[start : start + batch_size]))
        for start in range(0, len(captions), batch_size)
    ]
    cond = {key: torch.cat([p[key] for p in parts]).float() for key in parts[0]}
    if components.is_sdxl:
        cond["time_ids"] = (
            sizes_conditioning(resolution)
            if isinstance(resolution, list)
            else size_conditioning(len(captions), resolution, resolution)
        )
    return cond


def predict(unet: Any, noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """UNet prediction; SDXL also reads the pooled text and the size/crop ids (its "text_time" added embedding)."""
    kwargs = {}
    if "pooled" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    return unet(noisy, t, cond["emb"], **kwargs).sample


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
    latents: torch.Tensor | list[torch.Tensor],
    embeddings: torch.Tensor | dict[str, torch.Tensor],
    n_timesteps: int,
    seed: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Per-sample denoising loss at fixed, evenly spaced timesteps with fixed noise: shape (N,).

    The noise comes from a CPU generator seeded with `seed`, drawn in one go for all (timestep, sample) pairs, so the
    same held-out set gives the same numbers for every model, step and run; differences are due to the model alone.
    `embeddings` is the text states (N, 77, D), or the conditioning dict of `encode_conditioning` (SDXL).
    `latents` may also be a list of per-image latents of different sizes (aspect-ratio buckets): each size group is
    scored on its own, with the same seed, and the per-sample values come back in the list's order.
    """
    cond = embeddings if isinstance(embeddings, dict) else {"emb": embeddings}
    if isinstance(latents, list):
        losses = torch.zeros(len(latents))
        for rows in size_groups([tuple(x.shape) for x in latents]):
            index = torch.tensor(rows)
            group = torch.stack([latents[r] for r in rows])
            group_cond = {k: v[index] for k, v in cond.items()}
            losses[index] = fixed_validation_loss(
                unet, noise_scheduler, group, group_cond, n_timesteps, seed, batch_size
            )
        return losses
    n_train = noise_scheduler.config.num_train_timesteps
    # Midpoints of n equal bins over [0, T): covers the whole noise range, including the hard, low-noise end.
    timesteps = ((torch.arange(n_timesteps) + 0.5) * n_train / n_timesteps).long()
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((n_timesteps, *latents.shape), generator=generator)
    # Everything on the UNet's device (the latents and conditioning may be anywhere: cached on the GPU, or read from
    # the encode stage's files); the noising and the target in fp32, the UNet's input in its dtype.
    device, dtype = unet.device, unet.dtype
    losses = torch.zeros(len(latents))
    for k, t_value in enumerate(timesteps):
        for start in range(0, len(latents), batch_size):
            x0 = latents[start : start + batch_size].to(device, torch.float32)
            eps = noise[k, start : start + batch_size].to(device)
            t = torch.full((len(x0),), int(t_value), dtype=torch.long, device=device)
            noisy = noise_scheduler.add_noise(x0, eps, t)
            target = diffusion_target(noise_scheduler, x0, eps, t)
            batch_cond = {k: v[start : start + batch_size].to(device, dtype) for k, v in cond.items()}
            pred = predict(unet, noisy.to(dtype), t, batch_cond)
            per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            losses[start : start + batch_size] += per_sample.cpu() / n_timesteps
    return losses


def stock_text_encoder_lora() -> bool:
    """Whether transformers' own adapter API accepts the installed peft (transformers 5 asks for peft >= 0.22)."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
        from transformers.utils.peft_utils import check_peft_version
    except ImportError:
        return True
    try:
        check_peft_version(MIN_PEFT_VERSION)
    except ValueError:
        return False
    return True


def load_lora(pipe: Any, folder: Path | str, weight_name: str = "pytorch_lora_weights.safetensors") -> None:
    """`pipe.load_lora_weights(folder)`, also for text-encoder LoRA where transformers refuses the installed peft.

    diffusers loads a text encoder's LoRA through transformers' adapter API, which (transformers >= 5) refuses
    peft < 0.22 with a version check. The layers are peft's either way, so here they are injected with peft directly
    from the same file and config; the UNet part always goes through diffusers.
    """
    state, alphas, metadata = pipe.lora_state_dict(str(folder), weight_name=weight_name, return_lora_metadata=True)
    text = {k: v for k, v in state.items() if k.startswith("text_encoder")}
    if not text or stock_text_encoder_lora():
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    unet = {k: v for k, v in state.items() if not k.startswith("text_encoder")}
    pipe.load_lora_into_unet(unet, network_alphas=alphas, unet=pipe.unet, metadata=metadata, _pipeline=pipe)
    for name in ("text_encoder", "text_encoder_2"):
        prefix = f"{name}."
        weights = {k[len(prefix) :]: v for k, v in text.items() if k.startswith(prefix)}
        if not weights:
            continue
        model = getattr(pipe, name)
        if not hasattr(model, "text_model"):  # transformers 5's flat CLIPTextModel; files keep `text_model.`
            weights = {k.removeprefix("text_model."): v for k, v in weights.items()}
        fields = {k[len(prefix) :]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
        if not fields:
            raise ValueError(f"{folder}: {name} LoRA weights without their LoRA config in the safetensors header")
        config = LoraConfig(**{k: v for k, v in fields.items() if k in LoraConfig.__dataclass_fields__})
        inject_adapter_in_model(config, model, adapter_name="default")
        result = set_peft_model_state_dict(model, weights, adapter_name="default")
        if result.unexpected_keys:
            raise ValueError(f"{folder}: {name} LoRA keys match no module: {result.unexpected_keys[:3]}")
