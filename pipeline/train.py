"""Stage `train`: LoRA fine-tuning of the UNet, with fixed-noise validation and early stopping.

Core: `train(components, train_split, val_split, params) -> TrainResult` (values in, values out).
CLI: `python -m pipeline.train --params params.yaml --prepared data/prepared --out models/adapter
--report reports/train`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import env
from pipeline.config import ParamsError, TrainParams, load_params, resolve_model
from pipeline.diffusion import (
    Components,
    Split,
    diffusion_target,
    encode_images,
    encode_text,
    fixed_validation_loss,
    load_components,
    read_split,
)
from pipeline.tracking import LiveLog

ADAPTER_FILE = "pytorch_lora_weights.safetensors"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the run stops and is never promoted."""


@dataclass
class TrainResult:
    lora_state: dict[str, torch.Tensor]  # the best adapter (lowest validation loss), PEFT key names
    best_step: int
    best_val_loss: float
    initial_val_loss: float
    steps: int
    stop_reason: str
    history: list[dict[str, float]] = field(default_factory=list)
    cost: dict[str, float] = field(default_factory=dict)


def pick_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a GPU that supports it, fp16 on other GPUs, full precision on CPU."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def add_lora(unet: Any, params: TrainParams) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter to the UNet's target modules; only its weights train, kept in fp32."""
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=params.lora_rank,
            lora_alpha=params.lora_alpha,
            lora_dropout=params.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(params.target_modules),
        )
    )
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.data = p.data.float()
    return trainable


def lora_state_dict(unet: Any) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def train(components: Components, train_split: Split, val_split: Split, params: TrainParams) -> TrainResult:
    """Fine-tune a LoRA on the UNet; return the adapter with the lowest held-out validation loss."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    torch.manual_seed(params.seed)
    accelerator = Accelerator(mixed_precision=pick_mixed_precision(params.mixed_precision), cpu=False)
    unet = components.unet
    trainable = add_lora(unet, params)
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in unet.parameters())
    print(f"trainable parameters: {n_trainable:,} of {n_total:,} in the UNet ({100 * n_trainable / n_total:.2f}%)")

    # The VAE and text encoder are frozen, so encode every image and caption once instead of every step.
    t0 = time.perf_counter()
    train_latents = encode_images(components.vae, train_split.images)
    train_emb = encode_text(components.tokenizer, components.text_encoder, train_split.captions)
    val_latents = encode_images(components.vae, val_split.images)
    val_emb = encode_text(components.tokenizer, components.text_encoder, val_split.captions)
    encode_seconds = time.perf_counter() - t0

    optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=params.weight_decay)
    lr_scheduler = get_scheduler(
        params.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=params.lr_warmup_steps,
        num_training_steps=max(params.max_steps, 1),
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    scheduler = components.noise_scheduler
    n_train_timesteps = scheduler.config.num_train_timesteps
    generator = torch.Generator("cpu").manual_seed(params.seed)
    live = LiveLog()

    def validate() -> float:
        unet.eval()
        loss = fixed_validation_loss(
            accelerator.unwrap_model(unet),
            scheduler,
            val_latents,
            val_emb,
            n_timesteps=params.validation_timesteps,
            seed=params.seed,
        )
        unet.train()
        return float(loss.mean())

    initial = best = validate()
    best_step, best_state, bad_checks = 0, lora_state_dict(accelerator.unwrap_model(unet)), 0
    history: list[dict[str, float]] = [{"step": 0, "val_loss": initial}]
    stop_reason = f"reached train.max_steps={params.max_steps}"
    order = torch.empty(0, dtype=torch.long)
    images_seen, step = 0, 0
    start = time.perf_counter()
    unet.train()
    bar = tqdm(total=params.max_steps, desc="train", unit="step", mininterval=2, disable=params.max_steps == 0)
    for step in range(1, params.max_steps + 1):
        if len(order) < params.batch_size:  # a new epoch: a fresh seeded permutation
            order = torch.cat([order, torch.randperm(len(train_latents), generator=generator)])
        idx, order = order[: params.batch_size], order[params.batch_size :]
        latents, emb = train_latents[idx], train_emb[idx]

        noise = torch.randn(latents.shape, generator=generator)
        if params.noise_offset:
            # Offset noise (Guttenberg, 2023): a per-channel constant lets the model shift overall brightness.
            noise += params.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        t = torch.randint(0, n_train_timesteps, (len(latents),), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        target = diffusion_target(scheduler, latents, noise, t)

        with accelerator.autocast():
            pred = unet(noisy.to(accelerator.device), t.to(accelerator.device), emb.to(accelerator.device)).sample
        loss = F.mse_loss(pred.float(), target.to(accelerator.device).float())
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        loss_value = loss.detach().item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(
                f"training loss is {loss_value} at step {step}; the best adapter so far is from step {best_step}. "
                "Lower train.learning_rate or set train.max_grad_norm; this run will not be promoted."
            )
        images_seen += len(latents)
        elapsed = time.perf_counter() - start
        record: dict[str, float] = {"step": step, "train_loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{images_seen / elapsed:.1f}")
        bar.update()

        if step % params.validation_every == 0 or step == params.max_steps:
            record["val_loss"] = val = validate()
            if val < best - params.early_stopping_min_delta:
                best, best_step, bad_checks = val, step, 0
                best_state = lora_state_dict(accelerator.unwrap_model(unet))
            else:
                bad_checks += 1
        history.append(record)
        live.metrics(
            {f"train.{k}": v for k, v in record.items() if k != "step"} | {"train.images_per_s": images_seen / elapsed},
            step,
        )
        if params.early_stopping_patience and bad_checks >= params.early_stopping_patience:
            stop_reason = (
                f"early stop at step {step}: validation loss did not improve by more than "
                f"{params.early_stopping_min_delta} for {bad_checks} checks (patience {params.early_stopping_patience})"
            )
            break
    bar.close()
    live.flush()

    seconds = time.perf_counter() - start
    cost = {
        "train_seconds": round(seconds, 3),
        "encode_seconds": round(encode_seconds, 3),
        "images_seen": images_seen,
        "images_per_s": round(images_seen / seconds, 3) if seconds > 0 and images_seen else 0.0,
        "peak_memory_mb": round(_peak_memory_mb(), 1),
        "trainable_parameters": n_trainable,
    }
    return TrainResult(
        lora_state=best_state,
        best_step=best_step,
        best_val_loss=best,
        initial_val_loss=initial,
        steps=step if params.max_steps else 0,
        stop_reason=stop_reason,
        history=history,
        cost=cost,
    )


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_adapter(lora_state: dict[str, torch.Tensor], out: Path) -> Path:
    """Write the adapter in the diffusers LoRA format (`load_lora_weights` reads it), atomically."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        partial, unet_lora_layers=convert_state_dict_to_diffusers(lora_state), safe_serialization=True
    )
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out / ADAPTER_FILE


def write_reports(result: TrainResult, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in asdict(result).items() if k not in ("lora_state", "history")}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(report_dir / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "train_loss", "val_loss", "lr"], restval="")
        writer.writeheader()
        writer.writerows(result.history)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, type=Path, help="output folder of the prepare stage")
    parser.add_argument("--out", required=True, type=Path, help="adapter folder to write")
    parser.add_argument("--report", required=True, type=Path, help="folder for summary.json and curve.csv")
    args = parser.parse_args(argv)
    env.configure()
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    root = Path(args.params).resolve().parent
    components = load_components(resolve_model(params, root), params.base.revision)
    train_split, val_split = read_split(args.prepared / "train"), read_split(args.prepared / "validation")
    try:
        result = train(components, train_split, val_split, params.train)
    except NonFiniteLoss as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    save_adapter(result.lora_state, args.out)
    write_reports(result, args.report)
    print(
        f"best validation loss {result.best_val_loss:.5f} at step {result.best_step} "
        f"(untuned {result.initial_val_loss:.5f}); {result.stop_reason}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
