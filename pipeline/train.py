"""Stage `train`: fine-tune Stable Diffusion (LoRA or full), with fixed-noise validation, early stopping and resumable
checkpoints.

Core: `train(components, train_split, val_split, params, ...) -> TrainResult` (values in, values out).
CLI: `python -m pipeline.train --params params.yaml --prepared data/prepared [--encoded data/encoded]
--out models/adapter --report reports/train [--checkpoints models/checkpoints] [--class-images models/class_images]`.
With `--encoded`, latents and frozen text conditioning come from the encode stage when they match the base model and
the prepared data; otherwise (and for class images) they are encoded in memory once per run.

Randomness: one CPU generator, seeded with `train.seed`, draws everything of an optimizer step at once for the whole
effective batch (all processes, all micro-batches): batch indices, noise, timesteps, caption dropout. So gradient
accumulation and data parallelism change memory and speed, not the numbers, and a resumed run replays exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import ImageOps
from tqdm.auto import tqdm

from pipeline import charts, checkpoint, encoded, env
from pipeline.config import Params, ParamsError, TrainParams, load_params, resolve_model
from pipeline.diffusion import (
    TRAINING_SPLITS,
    VALIDATION,
    Components,
    Split,
    diffusion_target,
    encode_conditioning,
    encode_image_list,
    fixed_validation_loss,
    load_components,
    predict,
    read_split,
    size_groups,
    sizes_conditioning,
    stack_if_one_size,
    text_conditioning,
    tokenize,
)
from pipeline.encoded import EncodedSplit
from pipeline.export import KOHYA_FILE, export_kohya, model_card
from pipeline.samples import sample_grid
from pipeline.tracking import LiveLog, system_metrics

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
# Beside the weights: what they are (method, architecture, prediction type, base model), for evaluate and the registry.
TRAINING_FILE = "training.json"
SAMPLES_FILE = "samples.png"  # the best weights on the fixed sample prompts and seeds (shown by the model card)
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP text encoder attention


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops and is never promoted."""


@dataclass
class TrainResult:
    models: dict[str, Any]  # the trained models ("unet", "text_encoder", ...) holding the best weights
    method: str  # "lora" or "full"
    best_step: int
    best_val_loss: float
    initial_val_loss: float
    steps: int
    stop_reason: str
    data_hash: str = ""  # what it was trained on: each image's content hash and caption, per split
    parameters: dict[str, Any] = field(default_factory=dict)  # trainable and frozen counts
    resumed_from_step: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)
    prediction_type: str = "epsilon"  # what the UNet was trained to predict (the base scheduler's, or the override)
    architecture: str = "sd"  # the base model's: "sd" (1.x/2.x) or "sdxl"
    samples: dict[int, Any] = field(default_factory=dict)  # step -> sample grid (PIL image), every sample_every steps

    @property
    def lora_state(self) -> dict[str, torch.Tensor]:
        """The UNet's LoRA weights (PEFT key names); only for method lora."""
        return lora_state_dict(self.models["unet"])


def pick_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, fp16 on other GPUs, full precision on CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def pick_frozen_dtype(params: TrainParams, mixed_precision: str, fsdp: bool = False) -> torch.dtype:
    """dtype of the frozen weights: with LoRA under bf16/fp16 autocast they are only ever read in that dtype, so keeping
    them in it halves their memory and the casts of every step; the trained (LoRA) weights and their optimizer state
    stay fp32 (select_trainable), as mixed precision needs for small updates to register."""
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}
    setting = params.frozen_precision
    if fsdp:  # FSDP2 shards a module's parameters in one flat dtype; its own mixed-precision policy casts them
        if setting in half:
            raise ParamsError(
                f"train.frozen_precision: {setting} cannot be used under FSDP (one dtype per sharded module; FSDP's "
                "mixed precision casts for compute): set frozen_precision: auto."
            )
        return torch.float32
    if setting == "auto":
        return half.get(mixed_precision, torch.float32) if params.method == "lora" else torch.float32
    if setting in half and mixed_precision == "no":
        raise ParamsError(
            f"train.frozen_precision: {setting} needs mixed precision (the step runs under autocast), but "
            f"train.mixed_precision resolves to 'no' here: set mixed_precision: {setting}, or frozen_precision: auto."
        )
    return half.get(setting, torch.float32)


def cast_frozen(models: list[Any], dtype: torch.dtype) -> None:
    for model in models:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)


# Dense bf16/fp16 tensor-core peaks (vendor datasheets, no sparsity), for MFU. Others: set SDFT_PEAK_TFLOPS.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense half-precision FLOP/s of one `device`, when known (None on CPU and unlisted GPUs)."""
    if os.environ.get("SDFT_PEAK_TFLOPS"):
        return float(os.environ["SDFT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def count_flops_per_image(
    components: Components, data: TrainData, scheduler: Any, params: TrainParams, accelerator: Any
) -> float:
    """FLOPs of one training image (forward and backward, as the step runs them), counted by torch on one micro-batch.

    Drawn from its own generator and under a forked RNG, so the run's numbers do not change; the caller clears the
    gradients it leaves.
    """
    from torch.utils.flop_counter import FlopCounterMode

    n_proc = accelerator.num_processes
    single = params.model_copy(update={"gradient_accumulation_steps": 1})
    draw = draw_step(LoopState(), data, single, n_proc, torch.Generator().manual_seed(0), 1000)
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
        accumulate_gradients(components, data, scheduler, draw, single, accelerator, 1.0)
    return counter.get_total_flops() / (len(draw["idx"]) // n_proc)


# --- what trains -------------------------------------------------------------------------------------------------


def add_lora(model: Any, params: TrainParams, targets: list[str]) -> None:
    """Attach a LoRA adapter to `targets`; B starts at zero, so the adapted model equals the base model at step 0."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import PreTrainedModel

    config = LoraConfig(
        r=params.lora_rank,
        lora_alpha=params.lora_alpha,
        lora_dropout=params.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    if not isinstance(model, PreTrainedModel):
        model.add_adapter(config)  # diffusers models
    else:
        # Text encoders: peft directly. transformers 5's `add_adapter` wraps the same call but refuses peft < 0.22
        # (a version check only); the layers and the saved keys are the same.
        inject_adapter_in_model(config, model, adapter_name="default")


def lora_state_dict(model: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def select_trainable(components: Components, params: TrainParams) -> dict[str, torch.nn.Parameter]:
    """Freeze every model, then adapt (LoRA) or unfreeze (full) exactly what `params` says; trained weights in fp32.

    Returns the trained parameters by qualified name ("unet.<name>", "text_encoder.<name>", ...).
    """
    models = {"unet": components.unet, "text_encoder": components.text_encoder}
    if components.is_sdxl:
        models["text_encoder_2"] = components.text_encoder_2
    for model in (*models.values(), components.vae):
        model.requires_grad_(False)
    text_names = [name for name in models if name != "unet"] if params.train_text_encoder else []
    if params.method == "lora":
        add_lora(components.unet, params, params.lora_target_modules)
        for name in text_names:
            add_lora(models[name], params, TEXT_LORA_TARGETS)
    else:
        patterns = params.train_blocks
        matched = [
            p.requires_grad_(True)
            for n, p in components.unet.named_parameters()
            if not patterns or any(n == pat or n.startswith(pat.rstrip(".") + ".") for pat in patterns)
        ]
        if not matched:
            raise ParamsError(
                f"train.train_blocks {patterns} matches no UNet parameter; use name prefixes such as "
                "down_blocks.0, mid_block, up_blocks.1 (or [] for the whole UNet)."
            )
        for name in text_names:
            models[name].requires_grad_(True)
    trainable = {
        f"{model_name}.{n}": p for model_name, m in models.items() for n, p in m.named_parameters() if p.requires_grad
    }
    for p in trainable.values():
        p.data = p.data.float()
    return trainable


def parameter_counts(components: Components) -> dict[str, Any]:
    per_model = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        model = getattr(components, name)
        if model is not None:
            n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
            per_model[name] = {"trainable": n_train, "frozen": sum(p.numel() for p in model.parameters()) - n_train}
    return {
        "trainable": sum(v["trainable"] for v in per_model.values()),
        "frozen": sum(v["frozen"] for v in per_model.values()),
        "per_model": per_model,
    }


def describe_counts(counts: dict[str, Any], method: str) -> str:
    share = 100 * counts["trainable"] / (counts["trainable"] + counts["frozen"])
    per_model = ", ".join(
        f"{k} {v['trainable']:,}/{v['trainable'] + v['frozen']:,}" for k, v in counts["per_model"].items()
    )
    return (
        f"trainable parameters ({method}): {counts['trainable']:,}, frozen: {counts['frozen']:,} "
        f"({share:.2f}% trains); "
        f"{per_model}"
    )


def make_optimizer(trainable: dict[str, torch.nn.Parameter], params: TrainParams) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay; the text encoder(s) get their own learning rate."""
    unet = [p for n, p in trainable.items() if n.startswith("unet.")]
    text = [p for n, p in trainable.items() if not n.startswith("unet.")]
    groups = [{"params": unet, "lr": params.learning_rate}]
    if text:
        lr = params.text_encoder_lr if params.text_encoder_lr is not None else params.learning_rate
        groups.append({"params": text, "lr": lr})
    if params.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ParamsError(
                "train.optimizer is adamw8bit but bitsandbytes is not installed (it needs a CUDA GPU): "
                "`pip install bitsandbytes`, or set train.optimizer to adamw or adamw_fused."
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=params.learning_rate, weight_decay=params.weight_decay)
    fused = True if params.optimizer == "adamw_fused" else None
    return torch.optim.AdamW(groups, lr=params.learning_rate, weight_decay=params.weight_decay, fused=fused)


class EMA:
    """Exponential moving average of the trained weights (Polyak averaging), validated and saved instead of them.

    The decay warms up as min(decay, (1 + step) / (10 + step)), as diffusers' EMAModel, so a short run is not held
    at its initial weights.
    """

    def __init__(self, trainable: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in trainable.items()}

    @torch.no_grad()
    def update(self, trainable: dict[str, torch.nn.Parameter], step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for n, p in trainable.items():
            self.shadow[n].lerp_(p.detach(), 1 - decay)

    @contextlib.contextmanager
    def applied(self, trainable: dict[str, torch.nn.Parameter]) -> Iterator[None]:
        """Swap the averaged weights in (for validation or a snapshot), then the live ones back."""
        live = {n: p.detach().clone() for n, p in trainable.items()}
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(live[n])


# --- the data ----------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """Cached inputs. Rows [0, n_instance) are the training images; after them, the prior-preservation class images.

    Latents are grouped by size (aspect-ratio buckets): `latents[b]` holds the rows `bucket_rows[b]`, in that order.
    With one size there is one group, and it also holds the class images.
    """

    latents: list[torch.Tensor]  # per bucket: (n_b, 4, h/8, w/8) VAE means, scaled
    flipped: list[torch.Tensor] | None  # the same of the mirrored images (data.random_flip), else None
    bucket_rows: list[torch.Tensor]  # per bucket: the global training-image rows it holds
    n_instance: int
    cond: dict[str, torch.Tensor] | None  # frozen text conditioning per row; None when a text encoder trains
    tokens: dict[str, torch.Tensor]  # token ids per row (encoded every step when a text encoder trains)
    empty_cond: dict[str, torch.Tensor] | None  # the empty prompt's conditioning (caption dropout)
    empty_tokens: dict[str, torch.Tensor]
    time_ids: torch.Tensor | None  # SDXL size/crop ids per row
    val_latents: torch.Tensor | list[torch.Tensor]  # (N, 4, h/8, w/8), or one tensor per image when sizes differ
    val_cond: dict[str, torch.Tensor] | None
    val_captions: list[str]
    val_sizes: list[tuple[int, int]]  # (height, width) of each held-out image
    precomputed: bool = False  # read from the encode stage's output rather than encoded here


def encode_data(
    components: Components,
    train_split: Split,
    val_split: Split,
    class_split: Split | None,
    cache_text: bool,
    device: torch.device,
    random_flip: bool = False,
    precomputed: tuple[EncodedSplit, EncodedSplit] | None = None,
) -> TrainData:
    """Encode images once (the VAE is frozen), and captions once too unless a text encoder trains.

    `precomputed`: the encode stage's (train, validation) output, already checked to match this base model and data;
    only the class images (prior preservation) and the empty prompt are then encoded here.
    """
    vae = components.vae
    class_images = list(class_split.images) if class_split is not None else []
    class_captions = list(class_split.captions) if class_split is not None else []
    images, captions = list(train_split.images) + class_images, list(train_split.captions) + class_captions
    sizes = [(i.height, i.width) for i in images]
    val_sizes = [(i.height, i.width) for i in val_split.images]
    if precomputed is not None:
        train_enc, val_enc = precomputed
        rows = train_enc.latents + encode_image_list(vae, class_images)
        # Mirrored images are encoded too (not the latents flipped: the VAE is not exactly flip-equivariant).
        mirrored = [ImageOps.mirror(i) for i in class_images]
        flipped_rows = train_enc.flipped + encode_image_list(vae, mirrored) if random_flip else None
        val_rows = val_enc.latents
    else:
        rows = encode_image_list(vae, images)
        flipped_rows = encode_image_list(vae, [ImageOps.mirror(i) for i in images]) if random_flip else None
        val_rows = encode_image_list(vae, val_split.images)

    n_instance = len(train_split.images)
    groups = size_groups([tuple(x.shape) for x in rows[:n_instance]])
    if len(groups) > 1 and class_split is not None:
        raise ParamsError(
            f"train.prior_preservation needs one image size, but the prepared training images come in {len(groups)} "
            "sizes (data.bucketing): turn data.bucketing off, or prior_preservation off."
        )
    if class_split is not None and rows[n_instance].shape != rows[0].shape:
        raise ParamsError(
            f"the class images ({class_images[0].width}x{class_images[0].height}) differ in size from the training "
            f"images ({images[0].width}x{images[0].height}): regenerate them at data.resolution "
            "(empty train.prior_preservation.class_images_dir's cache) or resize them."
        )
    if len(groups) == 1:
        groups = [list(range(len(rows)))]  # one size: the class rows ride in the same group, at their global rows

    def grouped(per_row: list[torch.Tensor]) -> list[torch.Tensor]:
        # Rows read from the encode stage's files are on the CPU, rows encoded here (class images) on the device.
        return [torch.stack([per_row[r].to(device) for r in g]) for g in groups]

    sdxl_ids = sizes_conditioning(sizes) if components.is_sdxl else None
    val_ids = sizes_conditioning(val_sizes) if components.is_sdxl else None
    cond = val_cond = empty = None
    if cache_text:
        empty = {k: v for k, v in encode_conditioning(components, [""], 8).items() if k != "time_ids"}
        if precomputed is not None:
            cond, val_cond = dict(train_enc.cond or {}), dict(val_enc.cond or {})
            if class_captions:
                extra = encode_conditioning(components, class_captions, 8)
                cond = {k: torch.cat([v.to(device), extra[k].to(device)]) for k, v in cond.items()}
        else:
            cond = encode_conditioning(components, captions, sizes)
            val_cond = encode_conditioning(components, list(val_split.captions), val_sizes)
        cond.pop("time_ids", None)
        if val_ids is not None:
            val_cond["time_ids"] = val_ids
    return TrainData(
        latents=grouped(rows),
        flipped=grouped(flipped_rows) if flipped_rows is not None else None,
        bucket_rows=[torch.tensor([r for r in g if r < n_instance]) for g in groups],
        n_instance=n_instance,
        cond={k: v.to(device) for k, v in cond.items()} if cond else None,
        tokens=tokenize(components, captions),
        empty_cond={k: v.to(device) for k, v in empty.items()} if empty else None,
        empty_tokens=tokenize(components, [""]),
        time_ids=sdxl_ids.to(device) if sdxl_ids is not None else None,
        val_latents=stack_if_one_size(val_rows),
        val_cond=val_cond,
        val_captions=list(val_split.captions),
        val_sizes=val_sizes,
        precomputed=precomputed is not None,
    )


@dataclass
class LoopState:
    """Everything the loop carries from step to step; a checkpoint stores exactly this (plus weights and RNGs)."""

    step: int = 0
    best: float = math.inf
    best_step: int = 0
    bad_checks: int = 0
    initial: float = math.nan
    images_seen: int = 0
    seconds: float = 0.0
    stop_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    order: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    class_order: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    bucket_orders: dict[str, list[int]] = field(default_factory=dict)  # with several image sizes: per bucket


def _take(state: LoopState, attr: str, n: int, population: int, generator: torch.Generator) -> torch.Tensor:
    """The next `n` indices of a seeded epoch permutation, refilled with a fresh one when it runs short."""
    order = getattr(state, attr)
    while len(order) < n:
        order = torch.cat([order, torch.randperm(population, generator=generator)])
    setattr(state, attr, order[n:])
    return order[:n]


def _take_bucket(state: LoopState, bucket: int, n: int, population: int, generator: torch.Generator) -> torch.Tensor:
    """`_take` for one bucket's own epoch permutation (kept in the checkpoint's JSON state)."""
    order = state.bucket_orders.get(str(bucket), [])
    while len(order) < n:
        order = order + torch.randperm(population, generator=generator).tolist()
    state.bucket_orders[str(bucket)] = order[n:]
    return torch.tensor(order[:n], dtype=torch.long)


def draw_step(
    state: LoopState, data: TrainData, params: TrainParams, rows: int, generator: torch.Generator, n_timesteps: int
) -> dict[str, torch.Tensor]:
    """All the randomness of one optimizer step, for `rows` training images (and as many class images).

    With several image sizes (aspect-ratio buckets) a step draws one bucket, with probability proportional to its
    size, so every image is seen equally often on average, and takes its images from that bucket's own permutation
    (a bucket smaller than the batch repeats images within the step).
    """
    bucket = 0
    if len(data.latents) == 1:
        idx = _take(state, "order", rows, data.n_instance, generator)
        pos = idx  # one group: group positions are the global rows
    else:
        sizes = torch.tensor([len(r) for r in data.bucket_rows], dtype=torch.float)
        bucket = int(torch.multinomial(sizes, 1, generator=generator))
        pos = _take_bucket(state, bucket, rows, len(data.bucket_rows[bucket]), generator)
        idx = data.bucket_rows[bucket][pos]
    is_prior = torch.zeros(rows, dtype=torch.bool)
    if params.prior_preservation.enabled:
        n_class = len(data.latents[0]) - data.n_instance
        class_idx = _take(state, "class_order", rows, n_class, generator) + data.n_instance
        # Interleaved (instance, class, instance, class, ...): every micro-batch holds as many of each.
        idx = pos = torch.stack([idx, class_idx], dim=1).flatten()
        is_prior = torch.stack([is_prior, torch.ones(rows, dtype=torch.bool)], dim=1).flatten()
    shape = (len(idx), *data.latents[bucket].shape[1:])
    draw = {
        "idx": idx,
        "pos": pos,
        "bucket": torch.full((len(idx),), bucket),
        "is_prior": is_prior,
        "noise": torch.randn(shape, generator=generator),
    }
    if params.noise_offset:
        draw["offset"] = torch.randn((*shape[:2], 1, 1), generator=generator)
    if params.input_perturbation:
        draw["perturbation"] = torch.randn(shape, generator=generator)
    draw["t"] = torch.randint(0, n_timesteps, (len(idx),), generator=generator)
    if data.flipped is not None:
        draw["flip"] = torch.rand(len(idx), generator=generator) < 0.5
    if params.caption_dropout:
        draw["drop"] = torch.rand(len(idx), generator=generator) < params.caption_dropout
    return draw


def apply_speed_settings(unet: Any, text_models: list[Any], params: TrainParams, device: torch.device) -> None:
    if params.gradient_checkpointing:  # recompute activations in backward instead of keeping them
        unet.enable_gradient_checkpointing()
        for model in text_models:
            model.gradient_checkpointing_enable()
    if params.channels_last and device.type == "cpu" and params.method == "full" and params.train_blocks:
        # torch 2.13's CPU GroupNorm backward crashes the process (SIGSEGV) on a channels-last input that needs no
        # gradient while the norm's weights do: the first trained block behind frozen ones. It is a GPU layout anyway.
        print("note: train.channels_last is skipped on the CPU when train.train_blocks freezes the blocks before")
    elif params.channels_last:
        unet.to(memory_format=torch.channels_last)


def micro_batches(draw: dict[str, torch.Tensor], n_micro: int, rank: int, n_proc: int) -> Iterator[dict]:
    """This process's share of each micro-batch: micro-batch m of process r is chunk m * n_proc + r."""
    chunks = n_micro * n_proc
    size = len(draw["idx"]) // chunks
    for m in range(n_micro):
        start = (m * n_proc + rank) * size
        yield {k: v[start : start + size] for k, v in draw.items()}


def batch_conditioning(
    components: Components, data: TrainData, rows: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Text conditioning of a micro-batch: cached, or encoded now when a text encoder trains.

    Caption dropout replaces a caption by the empty prompt, which teaches the unconditional prediction that
    classifier-free guidance subtracts.
    """
    idx, drop = rows["idx"], rows.get("drop")
    if data.cond is not None:
        cond = {k: v[idx.to(v.device, non_blocking=True)] for k, v in data.cond.items() if k != "time_ids"}
        if drop is not None:
            for k, v in cond.items():
                mask = drop.to(v.device, non_blocking=True).view(-1, *[1] * (v.dim() - 1))
                cond[k] = torch.where(mask, data.empty_cond[k].to(v.dtype), v)
    else:
        tokens = {k: v[idx] for k, v in data.tokens.items()}
        if drop is not None:
            tokens = {k: torch.where(drop[:, None], data.empty_tokens[k], v) for k, v in tokens.items()}
        cond = text_conditioning(components, tokens)
    if data.time_ids is not None:
        cond["time_ids"] = data.time_ids[idx.to(data.time_ids.device, non_blocking=True)]
    return {k: v.to(device, non_blocking=True) for k, v in cond.items()}


def accumulate_gradients(
    components: Components,
    data: TrainData,
    scheduler: Any,
    draw: dict[str, torch.Tensor],
    params: TrainParams,
    accelerator: Any,
    loss_scale: float,
) -> torch.Tensor:
    """Forward and backward over this process's micro-batches of one optimizer step; returns its loss (no sync)."""
    step_loss = torch.zeros((), device=accelerator.device)
    micro = list(
        micro_batches(draw, params.gradient_accumulation_steps, accelerator.process_index, accelerator.num_processes)
    )
    trained = [m for m in (components.unet, components.text_encoder, components.text_encoder_2) if _is_wrapped(m)]
    for m, rows in enumerate(micro):
        bucket = int(rows["bucket"][0])  # a step's images all have one size
        # Every copy of the step's draws to the GPU is asynchronous (the draws are page-locked; see the loop): a
        # blocking copy would make the host wait for the GPU to finish all the work queued so far, every step.
        device = data.latents[bucket].device
        on_device = {k: v.to(device, non_blocking=True) for k, v in rows.items() if k not in ("idx", "bucket")}
        latents = data.latents[bucket][on_device["pos"]]  # (b, 4, H/8, W/8)
        if "flip" in rows:  # data.random_flip: half the images mirrored
            mirrored = data.flipped[bucket][on_device["pos"]]
            latents = torch.where(on_device["flip"].view(-1, 1, 1, 1), mirrored, latents)
        noise = on_device["noise"]
        if params.noise_offset:
            # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
            noise = noise + params.noise_offset * on_device["offset"]
        t = on_device["t"]
        # Input perturbation (Ning et al. 2023): the input is noised with slightly perturbed noise while the target
        # keeps the clean noise, mimicking the prediction errors the model meets at sampling time.
        input_noise = noise
        if params.input_perturbation:
            input_noise = noise + params.input_perturbation * on_device["perturbation"]
        noisy = scheduler.add_noise(latents, input_noise, t)
        target = diffusion_target(scheduler, latents, noise, t)  # noise (epsilon) or velocity (v-prediction)
        if params.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        # DDP: average gradients across processes only on the step's last micro-batch.
        syncing = contextlib.ExitStack()
        if m < len(micro) - 1:
            for model in trained:
                syncing.enter_context(accelerator.no_sync(model))
        with syncing, accelerator.autocast():
            cond = batch_conditioning(components, data, rows, accelerator.device)  # (b, 77, D) text states
            pred = predict(components.unet, noisy, t, cond)
            per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (b,)
            weights = loss_weights(scheduler, t, on_device["is_prior"], params)
            loss = (per_sample * weights).sum() * loss_scale
            accelerator.backward(loss)
        step_loss += loss.detach()
    return step_loss


def _is_wrapped(model: Any) -> bool:
    """A model accelerate prepared for training (DDP-wrapped, or with trainable parameters on one process)."""
    return model is not None and any(p.requires_grad for p in model.parameters())


def loss_weights(scheduler: Any, t: torch.Tensor, is_prior: torch.Tensor, params: TrainParams) -> torch.Tensor:
    """Per-sample loss weight: min-SNR-gamma (Hang et al. 2023) times the prior-preservation weight, on t's device."""
    weight = torch.ones(len(t), device=t.device)
    if params.snr_gamma is not None:
        alphas_cumprod = scheduler.alphas_cumprod.to(t.device)[t]
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=params.snr_gamma)
        # The paper's weight min(SNR, gamma) is for a loss on x0. An epsilon loss is SNR times smaller, so it becomes
        # min(SNR, gamma) / SNR; a v loss is (SNR + 1) times smaller, so min(SNR, gamma) / (SNR + 1).
        weight = clipped / snr if scheduler.config.prediction_type == "epsilon" else clipped / (snr + 1)
    return torch.where(is_prior, weight * params.prior_preservation.prior_loss_weight, weight)


# --- the loop ----------------------------------------------------------------------------------------------------


def train(
    components: Components,
    train_split: Split,
    val_split: Split,
    params: TrainParams,
    *,
    class_split: Split | None = None,
    checkpoints: Path | None = None,
    fingerprint: str = "",
    random_flip: bool = False,
    precomputed: tuple[EncodedSplit, EncodedSplit] | None = None,
    on_validation: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune the UNet (and optionally the text encoders); return the models holding the weights with the lowest
    held-out validation loss. With `checkpoints`, save resumable state there and resume from a matching checkpoint.

    `on_validation(step, val_loss)` is called at every validation check (step 0 included); it may raise to stop the
    run (the tuner prunes a trial so), and the exception propagates. Single-process runs only.
    """
    from accelerate import Accelerator
    from accelerate.utils import broadcast
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    torch.manual_seed(params.seed)
    accelerator = Accelerator(mixed_precision=pick_mixed_precision(params.mixed_precision))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # Otherwise every process would train alone on the same data and all would write the outputs.
        raise ParamsError(
            f"{launched} processes were launched but accelerate runs {accelerator.num_processes}: without GPUs set "
            "ACCELERATE_USE_CPU=true (gloo), or launch with `accelerate launch --config_file configs/accelerate/...`."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not accelerator.is_fsdp2:
        # accelerate 1.15 shards only on GPUs (without them it silently runs DDP), and this loop knows FSDP2 only.
        raise ParamsError(
            f"FSDP was asked for but accelerate runs {accelerator.distributed_type.value}: FSDP needs GPUs and "
            "fsdp_version: 2 (configs/accelerate/fsdp.yaml). Without GPUs use DDP "
            "(configs/accelerate/multi-gpu-ddp.yaml)."
        )
    if accelerator.is_fsdp2 and params.train_text_encoder:
        raise ParamsError(
            "train.train_text_encoder must be false under FSDP: accelerate shards one model per run (the UNet). "
            "Train the text encoder with DDP (configs/accelerate/multi-gpu-ddp.yaml)."
        )
    trainable = select_trainable(components, params)
    counts = parameter_counts(components)
    print(describe_counts(counts, params.method))
    text_trains = params.train_text_encoder
    # The frozen encoders work on the training device too (caching, sample grids, text encoders that train); the UNet
    # gets there through accelerator.prepare (sharded under FSDP).
    for module in (*components.text_encoders, components.vae):
        module.to(accelerator.device)
    t0 = time.perf_counter()
    data = encode_data(
        components, train_split, val_split, class_split, not text_trains, accelerator.device, random_flip, precomputed
    )
    encode_seconds = time.perf_counter() - t0
    # After encoding (the latents are computed in fp32, as the encode stage computes them).
    frozen_dtype = pick_frozen_dtype(params, accelerator.mixed_precision, fsdp=accelerator.is_fsdp2)
    if frozen_dtype != torch.float32:
        cast_frozen([components.unet, *components.text_encoders], frozen_dtype)

    scheduler = DDPMScheduler.from_config(
        components.noise_scheduler.config,
        **({"prediction_type": params.prediction_type} if params.prediction_type else {}),
    )
    unet = components.unet
    text_models = components.text_encoders if text_trains else []
    apply_speed_settings(unet, text_models, params, accelerator.device)
    optimizer = make_optimizer(trainable, params)
    # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    lr_scheduler = get_scheduler(
        params.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=params.lr_warmup_steps,
        num_training_steps=max(params.max_steps, 1),
    )
    # FSDP shards the UNet in place: keep its structure (weights on the meta device) to receive the gathered result.
    skeleton = unsharded_copy(unet) if accelerator.is_fsdp2 else None
    prepared = accelerator.prepare(unet, *text_models, optimizer)
    wrapped, optimizer = prepared[:-1], prepared[-1]
    if accelerator.is_fsdp2:  # fully_shard replaced the parameters by this process's shards (DTensors)
        trainable = {f"unet.{n}": p for n, p in wrapped[0].named_parameters() if p.requires_grad}
    # The step runs the wrapped models (DDP needs its wrapper's forward to average gradients).
    step_components = dataclasses.replace(
        components, **dict(zip(("unet", "text_encoder", "text_encoder_2"), wrapped, strict=False))
    )
    flops_per_image = count_flops_per_image(step_components, data, scheduler, params, accelerator)
    optimizer.zero_grad(set_to_none=True)
    if params.compile:
        # Compiled graphs are cached on disk (TORCHINDUCTOR_CACHE_DIR, set by main to .sdft/compile-cache), so a later
        # run with the same model and shapes skips most of the compile time.
        mode = None if params.compile_mode == "default" else params.compile_mode
        step_components.unet = torch.compile(step_components.unet, mode=mode)
    ema = EMA(trainable, params.ema_decay) if params.ema_decay else None
    generator = torch.Generator("cpu").manual_seed(params.seed)
    n_proc = accelerator.num_processes
    rows_per_step = params.batch_size * params.gradient_accumulation_steps * n_proc
    # Each process back-propagates its share of sum(weight * loss) / rows_per_step; DDP averages over processes.
    loss_scale = n_proc / rows_per_step

    def validate() -> float:
        with ema.applied(trainable) if ema else contextlib.nullcontext():
            for model in (unet, *text_models):
                model.eval()
            val_cond = data.val_cond
            if val_cond is None:
                val_cond = encode_conditioning(components, data.val_captions, data.val_sizes)
            # Half-precision frozen weights are read under autocast, as in the step; fp32 ones in full precision.
            with accelerator.autocast() if frozen_dtype != torch.float32 else contextlib.nullcontext():
                loss = fixed_validation_loss(
                    unet, scheduler, data.val_latents, val_cond, params.validation_timesteps, params.seed
                )
            if accelerator.is_fsdp2:  # drop the weights gathered for this forward: the EMA swap-back writes shards
                reshard(unet)
            for model in (unet, *text_models):
                model.train()
            loss = loss.mean()
            if accelerator.num_processes > 1:
                # The main process's number decides for all: GPU kernels need not give every process the same bits,
                # and processes that disagreed on early stopping would wait for each other forever (DDP), or on a
                # best-weights snapshot, which is a collective under FSDP.
                loss = broadcast(loss.reshape(1).to(accelerator.device))
            return float(loss)

    def snapshot() -> dict[str, torch.Tensor]:
        source = ema.shadow if ema else trainable
        return {n: full_tensor(p.detach()).to("cpu", copy=True) for n, p in source.items()}

    sample_prompts, sample_size = sample_settings(params, train_split, val_split)
    samples: dict[int, Any] = {}
    live = LiveLog()  # metrics and sample grids to the flow's MLflow run, if any
    # Grids are kept beside the checkpoints too, so a resumed run still reports those drawn before it was killed.
    sample_dir = checkpoints / "samples" if checkpoints is not None else None

    def sample(step: int) -> None:
        """A grid for the fixed prompts and seeds: on the main process (all of them under FSDP: a collective)."""
        if not (accelerator.is_main_process or accelerator.is_fsdp2) or not sample_prompts:
            return
        with ema.applied(trainable) if ema else contextlib.nullcontext():
            grid = sample_grid(
                components, unet, scheduler, sample_prompts, params.seed, sample_size, params.sample_steps,
                params.sample_guidance_scale, accelerator.autocast() if frozen_dtype != torch.float32 else None,
            )  # fmt: skip
        if accelerator.is_fsdp2:
            reshard(unet)
        if accelerator.is_main_process:
            samples[step] = grid
            live.image(grid, "train_samples", step)
            if sample_dir is not None:
                sample_dir.mkdir(parents=True, exist_ok=True)
                grid.save(sample_dir / f".step_{step:06d}.partial.png")
                (sample_dir / f".step_{step:06d}.partial.png").replace(sample_dir / f"step_{step:06d}.png")

    state, best_weights = LoopState(), {}
    if checkpoints is not None:
        state, best_weights = resume(
            checkpoints, fingerprint, trainable, optimizer, lr_scheduler, ema, generator, accelerator
        )
    resumed_from = state.step or None
    if sample_dir is not None and accelerator.is_main_process:
        samples.update(kept_samples(sample_dir, up_to=state.step))  # a fresh start (step 0) removes them all
    if not resumed_from:
        state.initial = state.best = validate()
        best_weights = snapshot()
        state.history.append({"step": 0, "val_loss": state.initial})
        if on_validation is not None:
            on_validation(0, state.initial)
    losses = torch.zeros(params.log_every, device=accelerator.device)  # per-step losses since the last host sync
    pending: list[dict[str, float]] = []
    start = time.perf_counter() - state.seconds
    for model in (unet, *text_models):
        model.train()
    bar = tqdm(total=params.max_steps, initial=state.step, desc="train", unit="step", mininterval=2)
    first_step_seconds: float | None = None
    for step in range(state.step + 1, params.max_steps + 1):
        if state.stop_reason:
            break
        draw = draw_step(state, data, params, rows_per_step, generator, scheduler.config.num_train_timesteps)
        if accelerator.device.type == "cuda":  # page-locked, so the copies to the GPU overlap the step (non_blocking)
            draw = {k: v.pin_memory() for k, v in draw.items()}
        step_loss = accumulate_gradients(step_components, data, scheduler, draw, params, accelerator, loss_scale)
        clip_gradients(accelerator, trainable, params.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.update(trainable, step)
        losses[len(pending)] = step_loss
        state.step, state.images_seen = step, state.images_seen + len(draw["idx"])
        if first_step_seconds is None:  # one host sync: the first step's time (compilation included, with compile)
            float(step_loss)
            first_step_seconds = time.perf_counter() - start - state.seconds
        record: dict[str, float] = {"step": step, "lr": lr_scheduler.get_last_lr()[0]}
        pending.append(record)
        state.history.append(record)
        bar.update()

        validating = step % params.validation_every == 0 or step == params.max_steps
        saving = checkpoints is not None and params.checkpoint_every and step % params.checkpoint_every == 0
        if validating or saving or len(pending) == params.log_every:
            sync_losses(pending, losses, accelerator, live, state, start, bar)
        if params.sample_every and step % params.sample_every == 0:
            sample(step)
        if validating:
            record["val_loss"] = val = validate()
            live.metrics({"train.val_loss": val}, step)
            if track_validation(state, step, val, params):
                best_weights = snapshot()
            if on_validation is not None:
                on_validation(step, val)
        if saving:
            state.seconds = time.perf_counter() - start
            save_checkpoint(
                checkpoints, fingerprint, params, state, trainable, best_weights, optimizer, lr_scheduler, ema,
                generator, write=accelerator.is_main_process,
            )  # fmt: skip
            accelerator.wait_for_everyone()
    sync_losses(pending, losses, accelerator, live, state, start, bar)
    bar.close()
    live.flush()

    load_weights(trainable, best_weights)
    models = trained_models(components, trainable)
    if skeleton is not None:
        models["unet"] = gather_model(accelerator, unet, skeleton)
    seconds = time.perf_counter() - start
    return TrainResult(
        models={name: accelerator.unwrap_model(m) for name, m in models.items()},
        method=params.method,
        best_step=state.best_step,
        best_val_loss=state.best,
        initial_val_loss=state.initial,
        steps=state.step,
        stop_reason=state.stop_reason or f"reached train.max_steps={params.max_steps}",
        data_hash=hashlib.sha256(json.dumps(data_identity(train_split, val_split, class_split)).encode()).hexdigest(),
        parameters=counts,
        resumed_from_step=resumed_from,
        history=state.history,
        samples=samples,
        prediction_type=scheduler.config.prediction_type,
        architecture="sdxl" if components.is_sdxl else "sd",
        cost={
            "train_seconds": round(seconds, 3),
            "encode_seconds": round(encode_seconds, 3),
            "precomputed_inputs": int(data.precomputed),
            "images_seen": state.images_seen,
            "images_per_s": round(state.images_seen / seconds, 3) if seconds > 0 and state.images_seen else 0.0,
            "effective_batch_size": rows_per_step,
            "processes": n_proc,
            "peak_memory_mb": round(_peak_memory_mb(), 1),
            "trainable_parameters": counts["trainable"],
            **run_cost(
                seconds,
                state.images_seen,
                flops_per_image,
                first_step_seconds,
                state.step - (resumed_from or 0),
                accelerator.device,
                n_proc,
            ),  # fmt: skip
        },
    )


def sample_settings(params: TrainParams, train_split: Split, val_split: Split) -> tuple[list[str], tuple[int, int]]:
    """Prompts of the sample grids (train.sample_prompts, or the first 4 held-out captions) and their (height, width):
    the first training image's."""
    prompts = params.sample_prompts or list(val_split.captions[:4])
    return prompts, (train_split.images[0].height, train_split.images[0].width)


def kept_samples(folder: Path, up_to: int) -> dict[int, Any]:
    """The sample grids a resumed run drew before `up_to`; later ones (and all, when starting fresh) are removed."""
    from PIL import Image

    kept = {}
    for path in sorted(folder.glob("step_*.png")) if folder.is_dir() else []:
        step = int(path.stem.removeprefix("step_"))
        if step <= up_to:
            with Image.open(path) as image:
                kept[step] = image.convert("RGB")
        else:
            path.unlink()
    return kept


def run_cost(
    seconds: float,
    images: int,
    flops_per_image: float,
    first_step_seconds: float | None,
    steps_run: int,
    device: torch.device,
    n_proc: int,
) -> dict[str, float]:
    """What the run cost beyond images/s: FLOPs, achieved TFLOP/s, MFU (known GPUs), GPU-hours, first-step time."""
    rate = images / seconds if seconds > 0 else 0.0
    achieved = flops_per_image * rate
    cost = {
        "flops_per_image": flops_per_image,
        "achieved_tflops": round(achieved / 1e12, 6),
        "gpu_hours": round(seconds * n_proc / 3600, 6) if device.type == "cuda" else 0.0,
    }
    peak = peak_flops(device)
    if peak:
        cost["mfu"] = round(achieved / (peak * n_proc), 4)
    if first_step_seconds is not None:
        cost["first_step_seconds"] = round(first_step_seconds, 3)
        if steps_run > 1:  # the first step's excess over the others' mean: compilation and warm-up
            others = (seconds - first_step_seconds) / (steps_run - 1)
            cost["warmup_seconds"] = round(max(first_step_seconds - others, 0.0), 3)
    return cost


def track_validation(state: LoopState, step: int, val: float, params: TrainParams) -> bool:
    """Update the best loss and the early-stopping counter; True when `val` is a new best."""
    if val < state.best - params.early_stopping_min_delta:
        state.best, state.best_step, state.bad_checks = val, step, 0
        return True
    state.bad_checks += 1
    if params.early_stopping_patience and state.bad_checks >= params.early_stopping_patience:
        state.stop_reason = (
            f"early stop at step {step}: validation loss did not improve by more than "
            f"{params.early_stopping_min_delta} for {state.bad_checks} checks "
            f"(patience {params.early_stopping_patience})"
        )
    return False


def sync_losses(
    pending: list[dict[str, float]],
    losses: torch.Tensor,
    accelerator: Any,
    live: LiveLog,
    state: LoopState,
    start: float,
    bar: Any,
) -> None:
    """Copy the losses of the pending steps to the host in one transfer (not one sync per step); stop on NaN/inf."""
    if not pending:
        return
    values = accelerator.reduce(losses[: len(pending)].clone(), "mean").tolist()
    for record, value in zip(pending, values, strict=True):
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"training loss is {value} at step {int(record['step'])}; the best weights so far are from step "
                f"{state.best_step}. Lower train.learning_rate or set train.max_grad_norm; this run will not be "
                "promoted."
            )
        record["train_loss"] = value
    elapsed = time.perf_counter() - start
    rate = state.images_seen / elapsed if elapsed > 0 else 0.0
    # Training time at this step, read right after a host sync (so it is exact): loss against time in curve.csv, and
    # steady-state speed between two such steps (bench/train_bench.py) without compilation or warm-up.
    pending[-1]["seconds"] = round(elapsed, 4)
    for record in pending:
        live.metrics({f"train.{k}": v for k, v in record.items() if k not in ("step", "seconds")}, int(record["step"]))
    live.metrics({"train.images_per_s": rate}, int(pending[-1]["step"]))
    bar.set_postfix(loss=f"{values[-1]:.4f}", img_s=f"{rate:.1f}")
    pending.clear()


def trained_models(components: Components, trainable: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
    names = {n.split(".", 1)[0] for n in trainable}
    return {name: getattr(components, name) for name in ("unet", "text_encoder", "text_encoder_2") if name in names}


@torch.no_grad()
def load_weights(trainable: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    """Copy whole `weights` into the trained parameters (into each process's shard under FSDP: a collective)."""
    for n, p in trainable.items():
        p.copy_(shard_like(weights[n], p))


# --- sharded weights (FSDP) --------------------------------------------------------------------------------------
# Under FSDP2 each trained parameter is a DTensor holding this process's shard. Whatever reads or writes weights
# (best-weights snapshots, checkpoints, the saved model) goes through these, which gather or split the whole tensors
# and pass plain tensors through. Gathering and splitting are collectives: every process calls them, in the same order.


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP shard (DTensor) is all-gathered, a plain tensor is returned as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole `tensor` on `like`'s device, split as `like` is when `like` is an FSDP shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor.to(like.device)


def full_optimizer_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`optimizer.state_dict()` with whole tensors (Adam's moments are sharded like their parameters under FSDP)."""
    state = {i: {k: full_tensor(v) for k, v in s.items()} for i, s in state_dict["state"].items()}
    return state_dict | {"state": state}


def shard_optimizer_state(optimizer: Any) -> None:
    """After `load_state_dict` of whole tensors: split each state tensor shaped like its parameter as the parameter."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.dim() > 0:
                    optimizer.state[p][key] = shard_like(value, p)


def reshard(model: Any) -> None:
    """Free FSDP's gathered copy of the weights, so that the next forward gathers the shards again.

    A forward without backward (validation) leaves at least the root's weights gathered; written shards (the EMA
    swap, `load_weights`) would not reach that copy, and the next training step would run the stale weights.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clip_gradients(accelerator: Any, trainable: dict[str, torch.nn.Parameter], max_norm: float) -> None:
    if accelerator.is_fsdp2:
        # accelerate clips FSDP gradients only when given all of a model's parameters (silently none otherwise);
        # torch's clip computes the norm over the sharded gradients (DTensors) of the whole model.
        accelerator.unscale_gradients()
        torch.nn.utils.clip_grad_norm_(list(trainable.values()), max_norm)
    else:
        accelerator.clip_grad_norm_(list(trainable.values()), max_norm)


def unsharded_copy(model: Any) -> Any:
    """`model`'s structure (class, config, LoRA layers) with its parameters on the meta device: no memory."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_model(accelerator: Any, model: Any, skeleton: Any) -> Any:
    """The main process: `skeleton` holding `model`'s whole weights (gathered to its CPU); the others: `model`."""
    state = accelerator.get_state_dict(model)  # every process; FSDP2: a full state dict on the main process only
    if not accelerator.is_main_process:
        return model
    skeleton.load_state_dict(state, assign=True)
    return skeleton


# --- checkpoints -------------------------------------------------------------------------------------------------


def save_checkpoint(
    folder: Path,
    fingerprint: str,
    params: TrainParams,
    state: LoopState,
    trainable: dict[str, torch.nn.Parameter],
    best_weights: dict[str, torch.Tensor],
    optimizer: Any,
    lr_scheduler: Any,
    ema: EMA | None,
    generator: torch.Generator,
    write: bool = True,
) -> Path | None:
    """Every process calls it (FSDP gathers the sharded weights and optimizer state); only `write` saves."""
    opt_tensors, opt_meta = checkpoint.flatten_optimizer(full_optimizer_state(optimizer.state_dict()))
    tensors = {f"weights.{n}": full_tensor(p) for n, p in trainable.items()}
    tensors |= {f"ema.{n}": full_tensor(w) for n, w in ema.shadow.items()} if ema else {}
    if not write:
        return None
    rng_tensors, rng_meta = checkpoint.rng_state(generator)
    tensors |= {f"best.{n}": w for n, w in best_weights.items()}
    tensors |= opt_tensors | rng_tensors | {"order": state.order, "class_order": state.class_order}
    meta = {k: v for k, v in asdict(state).items() if k not in ("order", "class_order")}
    meta |= {"optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), "rng": rng_meta}
    return checkpoint.save(folder, state.step, tensors, meta, params.checkpoints_total_limit, fingerprint)


def resume(
    folder: Path,
    fingerprint: str,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: Any,
    lr_scheduler: Any,
    ema: EMA | None,
    generator: torch.Generator,
    accelerator: Any,
) -> tuple[LoopState, dict[str, torch.Tensor]]:
    """Restore the newest checkpoint of this run from `folder`, or say why the run starts fresh."""
    ckpt, reason, skipped = checkpoint.load_newest(folder, fingerprint)
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    if ckpt is None:
        print(f"starting fresh: {reason}")
        if accelerator.is_main_process and checkpoint.step_dirs(folder):
            checkpoint.clear(folder)  # another run's state: it would be rotated out or, worse, resumed later
        accelerator.wait_for_everyone()
        return LoopState(), {}
    path, tensors, meta = ckpt.path, ckpt.tensors, ckpt.state
    load_weights(trainable, {n: tensors[f"weights.{n}"] for n in trainable})
    optimizer.load_state_dict(checkpoint.unflatten_optimizer(tensors, meta["optimizer"]))
    shard_optimizer_state(optimizer)
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if ema:
        ema.shadow = {n: shard_like(tensors[f"ema.{n}"], p) for n, p in trainable.items()}
    checkpoint.set_rng_state(generator, tensors, meta["rng"])
    fields = {f.name for f in dataclasses.fields(LoopState)}
    state = LoopState(**{k: v for k, v in meta.items() if k in fields})
    state.order, state.class_order = tensors["order"], tensors["class_order"]
    print(f"resumed from {path} (step {state.step})")
    return state, {n: tensors[f"best.{n}"] for n in trainable}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- outputs -----------------------------------------------------------------------------------------------------


def checkpoint_layout(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's LoRA keys as every reader expects them: CLIP text encoders' modules under `text_model.`.

    transformers 5 flattened `CLIPTextModel` (`encoder.layers.N...`); transformers 4 and the original checkpoints keep
    `text_model.encoder.layers.N...`, which is what diffusers' own `save_lora_weights` wrote under transformers 4 and
    what older diffusers and ComfyUI map. diffusers 0.42 drops the prefix again for a flattened model, and
    `diffusion.load_lora` does the same, so one file loads on both sides.
    (`CLIPTextModelWithProjection`, SDXL's second encoder, still has `text_model` in transformers 5.)
    """
    if not name.startswith("text_encoder"):
        return state
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def save_adapter(result: TrainResult, out: Path, base: dict[str, Any] | None = None) -> Path:
    """Write what was trained, atomically.

    LoRA: the diffusers LoRA format (`load_lora_weights` reads it), with the LoRA config (rank, alpha) in the
    safetensors header so alpha != rank loads with the right scale. Full: the changed sub-models in the diffusers
    layout (`unet/`, `text_encoder/`, ...), each loadable with `from_pretrained(out, subfolder=...)`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if result.method == "lora":
        layers, metadata = {}, {}
        for name, model in result.models.items():
            # PEFT key names (lora_A/lora_B), which `load_lora_weights` reads as they are. diffusers'
            # `convert_state_dict_to_diffusers` renames only the attention keys, and a file mixing both namings
            # loads wrongly once LoRA also targets feed-forward or conv layers.
            layers[f"{name}_lora_layers"] = checkpoint_layout(name, lora_state_dict(model))
            config = model.peft_config["default"].to_dict()
            # Sets (target_modules) are sorted here: diffusers writes them in set order, which changes per process.
            # (safetensors still orders the header's metadata keys per process, so rebuilds compare tensor hashes.)
            metadata[f"{name}_lora_adapter_metadata"] = {
                k: sorted(v) if isinstance(v, set) else v for k, v in config.items()
            }
        # Only SDXL's writer knows `text_encoder_2`; both write the same keys otherwise.
        pipeline_class = StableDiffusionXLPipeline if "text_encoder_2" in result.models else StableDiffusionPipeline
        pipeline_class.save_lora_weights(partial, **layers, **metadata, safe_serialization=True)
    else:
        for name, model in result.models.items():
            model.save_pretrained(partial / name, safe_serialization=True)
    description = {
        "format_version": 1,
        "method": result.method,
        "architecture": result.architecture,
        "prediction_type": result.prediction_type,
        "trained": sorted(result.models),
        **(base or {}),
    }
    (partial / TRAINING_FILE).write_text(json.dumps(description, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out / ADAPTER_FILE if result.method == "lora" else out


def write_reports(result: TrainResult, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    # Not asdict(): it would deep-copy the models and images it then drops.
    skip = ("models", "history", "samples")
    summary = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in skip}
    summary["val_split"] = VALIDATION  # every val_loss here (best, initial, curve) is on the validation split
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    folder = report_dir / "samples"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for step, grid in sorted(result.samples.items()):
        grid.save(folder / f"step_{step:06d}.png")
    with open(report_dir / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "train_loss", "val_loss", "lr", "seconds"], restval="")
        writer.writeheader()
        writer.writerows(result.history)
    series = {
        column: [(r["step"], r[column]) for r in result.history if r.get(column) is not None]
        for column in ("train_loss", "val_loss")
    }
    curve = charts.line_chart(series, "Training and held-out validation loss", "step")
    charts.write_svg(report_dir / "curve.svg", curve)  # `dvc plots show` draws it offline (no Vega CDN)


def data_identity(*splits: Split | None) -> list[list[tuple[str, str]]]:
    """What the training data is, for the checkpoint fingerprint: each image's hash and caption, per split."""
    return [sorted(zip(s.hashes, s.captions, strict=True)) if s else [] for s in splits]


def run(params: Params, root: Path, args: argparse.Namespace) -> tuple[TrainResult, Components, tuple[Split, Split]]:
    model = resolve_model(params, root)
    components = load_components(model, params.base.revision)
    # Train reads train and validation only, never `TEST` (evaluate's and the gate's): see diffusion.TRAINING_SPLITS.
    train_split, val_split = (read_split(args.prepared / split) for split in TRAINING_SPLITS)
    class_split = None
    if params.train.prior_preservation.enabled:
        from pipeline.prior import class_images

        class_split = class_images(
            params.train.prior_preservation, model, params.base.revision, train_split.images[0].height,
            root, args.class_images, seed=params.train.seed,
        )  # fmt: skip
    precomputed = None
    if args.encoded is not None:
        precomputed = load_precomputed(
            args.encoded, args.prepared, components, params.data.random_flip, not params.train.train_text_encoder
        )
    run_fingerprint = checkpoint.fingerprint(
        params.train.model_dump(),
        f"{params.base.model}@{params.base.revision}",
        {"splits": data_identity(train_split, val_split, class_split), "random_flip": params.data.random_flip},
    )
    result = train(
        components,
        train_split,
        val_split,
        params.train,
        class_split=class_split,
        checkpoints=args.checkpoints,
        fingerprint=run_fingerprint,
        random_flip=params.data.random_flip,
        precomputed=precomputed,
    )
    return result, components, (train_split, val_split)


def best_samples(
    result: TrainResult, components: Components, params: TrainParams, train_split: Split, val_split: Split
) -> Any:
    """The sample grid of the weights the stage outputs (the best), for the model card; None without prompts."""
    from diffusers import DDPMScheduler

    prompts, size = sample_settings(params, train_split, val_split)
    if not prompts:
        return None
    models = {"vae": components.vae} | {k: v for k, v in result.models.items()}
    for model in models.values():
        model.float()  # frozen weights may have trained in bf16/fp16 (frozen_precision); sampling here is fp32
    trained = dataclasses.replace(components, **models)
    scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, prediction_type=result.prediction_type)
    return sample_grid(
        trained, trained.unet, scheduler, prompts, params.seed, size, params.sample_steps, params.sample_guidance_scale
    )


def load_precomputed(
    folder: Path, prepared: Path, components: Components, random_flip: bool, with_text: bool
) -> tuple[EncodedSplit, EncodedSplit] | None:
    """The encode stage's output when it matches this base model and prepared data, else None (and why)."""
    index = encoded.read_index(folder)
    if index is not None and index.get("enabled"):
        digests = {split: encoded.split_digest(prepared / split) for split in TRAINING_SPLITS}
        ok, why = encoded.usable(index, encoded.model_fingerprint(components), digests, random_flip)
    else:
        ok, why = encoded.usable(index, "", {}, random_flip)
    if not ok:
        print(f"encoding in memory: {why} ({folder}; `dvc repro encode` rebuilds it)")
        return None
    rows = index["splits"]
    print(f"reading precomputed latents{' and text conditioning' if with_text else ''} from {folder}")
    return (
        encoded.read_split(folder, "train", rows["train"]["rows"], with_text),
        encoded.read_split(folder, "validation", rows["validation"]["rows"], with_text),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, type=Path, help="output folder of the prepare stage")
    parser.add_argument(
        "--encoded", type=Path, help="output folder of the encode stage: precomputed latents (optional)"
    )
    parser.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    parser.add_argument("--report", required=True, type=Path, help="folder for summary.json and curve.csv")
    parser.add_argument("--checkpoints", type=Path, help="folder for resumable checkpoints (kept across runs)")
    parser.add_argument(
        "--class-images", type=Path, help="cache of generated prior-preservation class images (default: none)"
    )
    args = parser.parse_args(argv)
    env.configure()
    for folder in (args.checkpoints, args.class_images):
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)  # DVC outputs: they must exist even when unused
    try:
        params = load_params(args.params)
        root = Path(args.params).resolve().parent
        if params.train.compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / ".sdft" / "compile-cache"))
        with system_metrics():
            result, components, splits = run(params, root, args)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (NonFiniteLoss, checkpoint.CheckpointWriteError) as exc:
        print(f"error: {exc}\n{env.nothing_written(args.out, 'train')}", file=sys.stderr)
        return 1
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    # What the stage does after the last step, so a quiet minute on a slow machine is not taken for a hang.
    print(f"saving {args.out} and {args.report}, then drawing the best weights' sample grid", flush=True)
    save_adapter(result, args.out, {"base_model": params.base.model, "base_revision": params.base.revision})
    if params.train.export_kohya:
        export_kohya(args.out, args.out / KOHYA_FILE, params.base.model, result.data_hash, dict(components.unet.config))
    write_reports(result, args.report)
    grid = best_samples(result, components, params.train, *splits)
    if grid is not None:
        grid.save(args.out / SAMPLES_FILE)
        grid.save(args.report / "samples" / "best.png")
    summary = json.loads((args.report / "summary.json").read_text())
    files = sorted(p.relative_to(args.out).as_posix() for p in args.out.rglob("*") if p.is_file())
    card = model_card(params.base.model, result.data_hash, params.train.model_dump(), summary, files)
    (args.out / "README.md").write_text(card)
    print(
        f"best validation loss {result.best_val_loss:.5f} at step {result.best_step} "
        f"(untuned {result.initial_val_loss:.5f}); {result.stop_reason}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
