"""Stage `evaluate`: measure the candidate adapter and the untuned base model on identical inputs.

Both models see the same held-out images with the same fixed noise and timesteps (validation loss), and generate
from the same prompts with the same per-image seeds (CPU generators), scheduler and step count (CLIP score, KID).
Per-sample values are kept so the gate can compute paired confidence intervals.

Core: `evaluate_model(pipe, eval_set, ...) -> ModelEval`.
CLI: `python -m pipeline.evaluate --params params.yaml --prepared data/prepared --adapter models/adapter
--out reports/eval --metrics reports/metrics.json` (also `--name champion --no-base` to measure a registered adapter).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline import env
from pipeline.config import EvaluateParams, ParamsError, load_params, resolve_model
from pipeline.diffusion import Split, encode_images, encode_text, fixed_validation_loss, read_split
from pipeline.features import PLUMBING_ONLY, TinyImageFeatures, tiny_clip

GENERATION_BATCH = 8


@dataclass
class EvalSet:
    """Everything that must be identical for two models to be comparable."""

    validation: Split
    prompts: list[str]  # one entry per generated image
    seeds: list[int]
    resolution: int
    params: EvaluateParams

    def digest(self) -> str:
        """Hash of the held-out images, prompts, seeds and evaluation settings: equal digests, comparable results."""
        payload = {
            "images": self.validation.hashes,
            "captions": self.validation.captions,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "resolution": self.resolution,
            "params": self.params.model_dump(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_eval_set(validation: Split, params: EvaluateParams, resolution: int) -> EvalSet:
    """Prompts: each distinct held-out caption, then the fixed `evaluate.prompts`; `images_per_prompt` seeds each."""
    distinct = list(dict.fromkeys(validation.captions)) + list(params.prompts)
    prompts = [p for p in distinct for _ in range(params.images_per_prompt)]
    seeds = [params.seed + i for i in range(len(prompts))]
    return EvalSet(validation, prompts, seeds, resolution, params)


@dataclass
class ModelEval:
    name: str
    values: dict[str, float]
    samples: dict[str, list[float]]
    images: list[Image.Image] = field(repr=False)
    seconds: float = 0.0


@dataclass
class Extractors:
    """Feature extractors, built once and shared by every model evaluated in a process."""

    clip: Any
    image_features: torch.nn.Module
    description: str


def tiny_extractors(tokenizer: Any, seed: int = 0) -> Extractors:
    model, processor = tiny_clip(tokenizer, seed)
    return Extractors(clip=(model, processor), image_features=TinyImageFeatures(seed), description=PLUMBING_ONLY)


def _uint8(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def generate(pipe: Any, eval_set: EvalSet) -> list[Image.Image]:
    """One image per (prompt, seed), in batches; each image's noise comes from its own seeded CPU generator."""
    images: list[Image.Image] = []
    for start in range(0, len(eval_set.prompts), GENERATION_BATCH):
        prompts = eval_set.prompts[start : start + GENERATION_BATCH]
        seeds = eval_set.seeds[start : start + GENERATION_BATCH]
        images += pipe(
            prompt=prompts,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            num_inference_steps=eval_set.params.num_inference_steps,
            guidance_scale=eval_set.params.guidance_scale,
            height=eval_set.resolution,
            width=eval_set.resolution,
            output_type="pil",
        ).images
    return images


def evaluate_model(
    name: str,
    pipe: Any,
    eval_set: EvalSet,
    val_latents: torch.Tensor,
    val_embeddings: torch.Tensor,
    extractors: Extractors,
) -> ModelEval:
    """Validation loss, CLIP score and KID for the model currently loaded in `pipe`."""
    from diffusers import DDPMScheduler
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.multimodal.clip_score import CLIPScore

    start = time.perf_counter()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    val_loss = fixed_validation_loss(
        pipe.unet, noise_scheduler, val_latents, val_embeddings, eval_set.params.val_timesteps, eval_set.params.seed
    )
    images = generate(pipe, eval_set)

    clip_metric = CLIPScore(model_name_or_path=lambda: extractors.clip)
    clip_scores = []
    for image, prompt in zip(_uint8(images), eval_set.prompts, strict=True):
        clip_metric.update(image, prompt)
        clip_scores.append(float(clip_metric.compute()))
        clip_metric.reset()

    # KID is unbiased at small N (FID is not); its subset size cannot exceed either set.
    subset = min(len(eval_set.validation.images), len(images), 50)
    kid = KernelInceptionDistance(feature=extractors.image_features, subset_size=subset, subsets=20)
    kid.update(_uint8(eval_set.validation.images), real=True)
    kid.update(_uint8(images), real=False)
    kid_mean, kid_std = (float(v) for v in kid.compute())

    values = {
        "val_loss": float(val_loss.mean()),
        "clip_score": float(np.mean(clip_scores)),
        "kid": kid_mean,
        "kid_std": kid_std,
    }
    samples = {"val_loss": val_loss.tolist(), "clip_score": clip_scores}
    return ModelEval(name, values, samples, images, seconds=time.perf_counter() - start)


def contact_grid(columns: dict[str, list[Image.Image]], prompts: list[str], per_prompt: int) -> Image.Image:
    """One row per prompt (its first seed), one column per model, labelled."""
    names = list(columns)
    rows = list(range(0, len(prompts), per_prompt))
    size = columns[names[0]][0].width
    cell, label_w, head = max(size, 96), 260, 18
    grid = Image.new("RGB", (label_w + cell * len(names), head + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(names):
        draw.text((label_w + c * cell + 4, 2), name, fill="black")
    for r, index in enumerate(rows):
        draw.text((4, head + r * cell + cell // 2 - 6), prompts[index][:40], fill="black")
        for c, name in enumerate(names):
            grid.paste(columns[name][index].resize((cell, cell), Image.NEAREST), (label_w + c * cell, head + r * cell))
    return grid


def write_outputs(results: list[ModelEval], eval_set: EvalSet, extractors: Extractors, out: Path) -> dict[str, Any]:
    """Images, per-sample values, per-prompt CSV and a side-by-side grid under `out`; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        folder = out / "images" / result.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            image.save(folder / f"{i:03d}.png")
    (out / "samples.json").write_text(json.dumps({r.name: r.samples for r in results}, indent=1) + "\n")
    with open(out / "per_prompt.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "index", "prompt", "seed", "clip_score"])
        for r in results:
            for i, (prompt, seed) in enumerate(zip(eval_set.prompts, eval_set.seeds, strict=True)):
                writer.writerow([r.name, i, prompt, seed, round(r.samples["clip_score"][i], 5)])
    grid = contact_grid({r.name: r.images for r in results}, eval_set.prompts, eval_set.params.images_per_prompt)
    grid.save(out / "grid.png")
    summary: dict[str, Any] = {r.name: {k: round(v, 6) for k, v in r.values.items()} for r in results}
    summary["evaluation"] = {
        "eval_set_hash": eval_set.digest(),
        "n_validation_images": len(eval_set.validation.images),
        "n_generated_per_model": len(eval_set.prompts),
        "num_inference_steps": eval_set.params.num_inference_steps,
        "extractors": extractors.description,
        "seconds": round(sum(r.seconds for r in results), 3),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, type=Path)
    parser.add_argument("--adapter", required=True, type=Path, help="LoRA folder (diffusers format)")
    parser.add_argument("--out", required=True, type=Path, help="folder for images, samples and the grid")
    parser.add_argument("--metrics", type=Path, help="summary JSON to write (default: <out>/metrics.json)")
    parser.add_argument("--name", default="candidate", help="what to call the adapter in the outputs")
    parser.add_argument("--no-base", action="store_true", help="skip the untuned base model")
    parser.add_argument("--base-model", help="base model the adapter was trained on (default: base.model)")
    args = parser.parse_args(argv)
    env.configure()
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not (args.adapter / "pytorch_lora_weights.safetensors").is_file():
        print(f"error: no adapter at {args.adapter}: run the train stage first (`dvc repro train`).", file=sys.stderr)
        return 2
    from diffusers import StableDiffusionPipeline

    model = args.base_model or resolve_model(params, Path(args.params).resolve().parent)
    pipe = StableDiffusionPipeline.from_pretrained(
        model, revision=params.base.revision, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    validation = read_split(args.prepared / "validation")
    eval_set = build_eval_set(validation, params.evaluate, params.data.resolution)
    extractors = tiny_extractors(pipe.tokenizer, seed=params.evaluate.seed)
    # The VAE and text encoder are frozen and shared, so held-out latents are the same for every model.
    val_latents = encode_images(pipe.vae, validation.images)
    val_embeddings = encode_text(pipe.tokenizer, pipe.text_encoder, validation.captions)

    results = []
    if not args.no_base:
        results.append(evaluate_model("base", pipe, eval_set, val_latents, val_embeddings, extractors))
    pipe.load_lora_weights(str(args.adapter))
    results.append(evaluate_model(args.name, pipe, eval_set, val_latents, val_embeddings, extractors))

    summary = write_outputs(results, eval_set, extractors, args.out)
    metrics_path = args.metrics or args.out / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        print(f"{r.name:>10}: " + ", ".join(f"{k}={v:.5f}" for k, v in r.values.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
