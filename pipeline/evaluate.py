"""Stage `evaluate`: measure the candidate and the untuned base model on identical inputs.

The candidate is any train output (`pipeline.candidate`): a LoRA or a full fine-tune, of an SD 1.x/2.x or an SDXL
base. The base loads as the pipeline class its `model_index.json` names; a LoRA is loaded and fused into it, a full
fine-tune's trained sub-models (`unet/`, `text_encoder/`, `text_encoder_2/`) replace the base's. The candidate's
scheduler, for generation and for the validation-loss target, predicts what `training.json` says the UNet was
trained to predict (e.g. v_prediction trained on an epsilon base); the untuned base keeps its own. An output without
`training.json` (older adapters) is an SD LoRA with the base scheduler. The validation loss conditions SDXL as
training does (both text encoders, pooled text, size/crop ids).

The held-out images are the prepared `test` split (data.test_fraction): no training step, early stop or checkpoint
choice read them (those use `validation`), so the gate, which reads these numbers, does not judge a model on the
images that chose it. Both models see the same test images with the same fixed noise and timesteps (val_loss), and
generate from the same prompts with the same per-image seeds (CPU generators), scheduler and step count. Per-sample
values are kept wherever a metric has them, so the gate and the report can compute paired confidence intervals.

Metrics per model (functions and citations in `pipeline.metrics`):
- `val_loss`: fixed-noise denoising loss per test image (train's computation, named as there; train's own val_loss
  is on the validation split);
- `clip_score`: CLIP text-image agreement per generated image; `forgetting_clip_score`: the same on
  `evaluate.general_prompts`, unrelated to the training data (candidate below base: the model forgot);
- `adherence_*` (own prompts) and `base_adherence_*` (`evaluate.general_prompts`): for every prompt that is a
  shape-world scene (`pipeline/world.py`), whether the classifier judge sees the shape, colour and background it
  asked for: accuracy overall and per attribute (per-image 0/1, so paired), per-class precision/recall/F1, macro F1,
  and confusion matrices (`pipeline.judges`);
- `zero_shot_*`: zero-shot CLIP classification of each generated image over `evaluate.label_vocabulary`;
- `fid`, `kid`, `precision`/`recall`/`f1`, `density`/`coverage`: generated vs held-out real image features;
- `mifid`, `memorisation_similarity`: generated vs training image features.
Cost (images, seconds, images/s, seconds per metric) goes to `evaluation.cost`.

Speed: images are generated `evaluate.batch_size` at a time. Fewer scheduler steps (`num_inference_steps`) keep the
comparison fair, since both models use the same scheduler, steps and seeds (paired), but absolute FID/KID values then
differ from published ones; SD 1.x with its default PNDM scheduler is close to converged at 25-30 steps, and 10 is
enough to catch a broken adapter.

Core: `evaluate_model(name, pipe, eval_set, reference, extractors) -> ModelEval`.
CLI: `python -m pipeline.evaluate --params params.yaml --prepared data/prepared --adapter models/adapter
--out reports/eval --metrics reports/metrics.json [--train-curve reports/train/curve.csv]` (also `--name champion
--no-base --base-model B` to measure a registered version). `--adapter` is the train output folder.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

from pipeline import candidate, charts, env, judges, metrics, world
from pipeline.assets import AssetError
from pipeline.config import EvaluateParams, ParamsError, load_params, resolve_model
from pipeline.diffusion import (
    TEST,
    TRAIN,
    VALIDATION,
    Components,
    Split,
    compute_device,
    encode_conditioning,
    encode_image_list,
    fixed_validation_loss,
    read_rows,
    read_split,
    stack_if_one_size,
)
from pipeline.features import (
    JUDGE,
    PLUMBING_ONLY,
    MissingWeightsError,
    build_clip,
    build_image_features,
    describe_clip,
    describe_image_features,
    extract,
    judges_fingerprint,
    load_judge_classifier,
    module_device,
)
from pipeline.stats import paired_bootstrap

# Settings that change the report, not any model's values or per-sample numbers.
REPORT_ONLY = {"memorisation_worst"}


class Bootstrap(NamedTuple):
    """The paired bootstrap of the report's intervals: the gate's settings (gate.bootstrap_resamples, gate.confidence,
    gate.seed), so that the report and the gate show the same interval for the same comparison."""

    resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0


# Which data each metric is measured on, written into metrics.json beside the numbers (`metric_data`).
METRIC_DATA = {
    "val_loss": "fixed-noise denoising loss on the test split's images (train's val_loss is on the validation split)",
    "clip_score": "images generated from the test split's captions and evaluate.prompts",
    "adherence_*": "images generated from the test split's captions and evaluate.prompts",
    "forgetting_clip_score": "images generated from evaluate.general_prompts",
    "fid, kid, precision, recall, f1, density, coverage": "generated images vs the test split's images",
    "mifid, memorisation_*": "generated images vs the train split's images",
}


class MissingSplitError(FileNotFoundError):
    """The prepared data has no test split: it was written before data.test_fraction existed."""


def read_test_split(prepared: Path) -> Split:
    """The prepared `test` split, the only held-out data evaluate measures on; a clear error when there is none."""
    folder = prepared / TEST
    if not (folder / "metadata.jsonl").is_file() and (prepared / VALIDATION / "metadata.jsonl").is_file():
        raise MissingSplitError(
            f"{prepared} has no '{TEST}' split: it was prepared before data.test_fraction existed (two splits, "
            f"train and validation). Evaluate measures on the test split only, so that the gate does not judge a "
            f"model on the validation images that chose it: re-run prepare (`dvc repro prepare`, or `dvc repro`), "
            f"which splits the data in three; the test split is the former validation images when data.test_fraction "
            f"equals the former data.val_fraction."
        )
    return read_split(folder)


@dataclass
class EvalSet:
    """Everything that must be identical for two models to be comparable."""

    validation: Split  # the held-out images: the prepared `test` split (see `split`), never train's validation
    train: Split
    prompts: list[str]  # one entry per generated image
    seeds: list[int]
    general_prompts: list[str]  # one entry per generated image, for forgetting
    general_seeds: list[int]
    resolution: int
    params: EvaluateParams
    split: str = TEST  # the prepared split `validation` (the held-out images) was read from

    def digest(self) -> str:
        """Hash of the held-out and training images, prompts, seeds and every evaluation setting that changes a
        model's numbers (extractors, k, prompt lists...): equal digests, comparable results. Report-only settings
        are left out, so changing them does not force the gate to re-evaluate a cached champion."""
        payload = {
            "split": self.split,
            "images": self.validation.hashes,
            "captions": self.validation.captions,
            "train_images": self.train.hashes,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "general_prompts": self.general_prompts,
            "general_seeds": self.general_seeds,
            "resolution": self.resolution,
            "params": self.params.model_dump(exclude=REPORT_ONLY),
        }
        if uses_judges(self):  # retrained judges change the numbers: cached champion results must not match
            payload["judges"] = judges_fingerprint()
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_eval_set(validation: Split, params: EvaluateParams, resolution: int, train: Split | None = None) -> EvalSet:
    """Prompts: each distinct held-out caption, then the fixed `evaluate.prompts`; `images_per_prompt` seeds each.
    General prompts (forgetting) get `images_per_prompt` seeds each too, numbered after the others."""
    distinct = list(dict.fromkeys(validation.captions)) + list(params.prompts)
    prompts = [p for p in distinct for _ in range(params.images_per_prompt)]
    seeds = [params.seed + i for i in range(len(prompts))]
    general = [p for p in params.general_prompts for _ in range(params.images_per_prompt)]
    general_seeds = [params.seed + len(prompts) + i for i in range(len(general))]
    train = train if train is not None else Split([], [], [])
    return EvalSet(validation, train, prompts, seeds, general, general_seeds, resolution, params)


def world_prompts(prompts: list[str]) -> bool:
    """Whether any prompt is a shape-world scene, so the classifier judge can score adherence to it."""
    return any(world.parse_caption(q) is not None for q in prompts)


def uses_judges(eval_set: EvalSet) -> bool:
    """Whether this evaluation's numbers come (partly) from the shipped shape-world judges."""
    p = eval_set.params
    return JUDGE in (p.clip_model, p.image_features) or world_prompts(eval_set.prompts + eval_set.general_prompts)


@dataclass
class Extractors:
    """Feature extractors, built once and shared by every model evaluated in a process."""

    clip: tuple[Any, Any]  # (PooledCLIP, processor)
    image_features: torch.nn.Module
    plumbing_only: list[str]  # which of evaluate.clip_model / evaluate.image_features are the tiny random ones
    names: dict[str, str] = field(default_factory=dict)  # what each extractor is, in words
    classifier: judges.ShapeJudge | None = None  # the shape-world classifier judge, for adherence

    @property
    def description(self) -> str:
        said = "; ".join(f"{key}: {name}" for key, name in self.names.items()) or "extractors"
        if not self.plumbing_only:
            return said
        return f"{said} ({' and '.join(self.plumbing_only)}: {PLUMBING_ONLY})"


def build_extractors(
    params: EvaluateParams, tokenizer: Any, device: torch.device | None = None, adherence: bool = False
) -> Extractors:
    """The extractors `evaluate.clip_model` and `evaluate.image_features` name (MissingWeightsError when absent,
    AssetError when a shipped judge does not match its manifest), on `device` (default: the CPU). `adherence`: also
    load the classifier judge (the image-feature extractor itself when that is `judge`)."""
    clip, clip_tiny = build_clip(params.clip_model, tokenizer, seed=params.seed)
    image_features, features_tiny = build_image_features(params.image_features, seed=params.seed)
    classifier = None
    if adherence:
        is_judge = isinstance(image_features, judges.ShapeJudge)
        classifier = image_features if is_judge else load_judge_classifier()
    if device is not None:
        clip[0].to(device)
        image_features.to(device)
        if classifier is not None:
            classifier.to(device)
    tiny = [key for key, is_tiny in (("clip_model", clip_tiny), ("image_features", features_tiny)) if is_tiny]
    names = {
        "CLIP": describe_clip(params.clip_model),
        "image features": describe_image_features(params.image_features),
    }
    return Extractors(clip, image_features, [f"evaluate.{key}=tiny" for key in tiny], names, classifier)


@dataclass
class Reference:
    """What is computed once from real data and shared by every model: held-out latents, image features."""

    val_latents: torch.Tensor | list[torch.Tensor]  # a list when the held-out images differ in size (buckets)
    real_features: torch.Tensor  # held-out images (N_val, D)
    train_features: torch.Tensor  # training images (N_train, D), for memorisation
    train_files: list[str]
    seconds: float = 0.0


def build_reference(pipe: Any, eval_set: EvalSet, extractors: Extractors, train_files: list[str]) -> Reference:
    """Latents of the held-out set, and image features of the held-out and training images."""
    start = time.perf_counter()
    # The VAE is frozen and shared, so held-out latents are the same for every model.
    val_latents = stack_if_one_size(encode_image_list(pipe.vae, eval_set.validation.images))  # buckets: a list
    real = extract(extractors.image_features, uint8(eval_set.validation.images, eval_set.resolution))
    train_images = uint8(eval_set.train.images, eval_set.resolution) if eval_set.train.images else None
    train = extract(extractors.image_features, train_images) if train_images is not None else None
    return Reference(
        val_latents,
        real,
        train if train is not None else torch.zeros(0, real.shape[1], dtype=torch.float64),
        train_files,
        time.perf_counter() - start,
    )


def split_files(folder: Path) -> list[str]:
    """Image paths of a prepared split, in `metadata.jsonl` order (the order `read_split` loads them in)."""
    if not (folder / "metadata.jsonl").is_file():
        return []
    return [str(folder / row["file_name"]) for row in read_rows(folder)]


def skipped_metrics(eval_set: EvalSet) -> dict[str, str]:
    """{metric: why} for metrics this evaluation set is too small (or not configured) to compute."""
    p, n_real, n_fake = eval_set.params, len(eval_set.validation.images), len(eval_set.prompts)
    out = {}
    if not p.precision_recall_k < min(n_real, n_fake):
        why = f"precision_recall_k={p.precision_recall_k} needs more than k held-out and generated images"
        out |= dict.fromkeys(("precision", "recall", "f1"), why)
    if not p.density_coverage_k < n_real:
        why = f"density_coverage_k={p.density_coverage_k} needs more than k held-out images (has {n_real})"
        out |= dict.fromkeys(("density", "coverage"), why)
    if len(eval_set.train.images) == 0:
        out |= dict.fromkeys(("mifid", "memorisation_similarity", "memorisation_max"), "no training images")
    elif min(len(eval_set.train.images), n_fake) < 2:
        out["mifid"] = "needs at least 2 training and 2 generated images"
    if not eval_set.general_prompts:
        out["forgetting_clip_score"] = "evaluate.general_prompts is empty"
    adherence = ("adherence_accuracy", "adherence_f1", *(f"{a}_accuracy" for a in judges.ATTRIBUTES))
    if not world_prompts(eval_set.prompts):
        why = "no held-out caption or evaluate.prompts entry is a shape-world scene"
        out |= dict.fromkeys(adherence, why)
    if not world_prompts(eval_set.general_prompts):
        why = "no evaluate.general_prompts entry is a shape-world scene"
        out |= dict.fromkeys((f"base_{m}" for m in adherence), why)
    if not p.label_vocabulary:
        out["zero_shot_accuracy"] = "evaluate.label_vocabulary is empty"
    elif not any(metrics.label_of(q, p.label_vocabulary) for q in eval_set.prompts):
        out["zero_shot_accuracy"] = "no prompt names exactly one word of evaluate.label_vocabulary"
    if min(n_real, n_fake) < 2:
        out |= dict.fromkeys(("fid", "kid"), "needs at least 2 held-out and 2 generated images")
    return out


@dataclass
class ModelEval:
    name: str
    values: dict[str, float]
    samples: dict[str, list[float]]
    images: list[Image.Image] = field(repr=False)
    general_images: list[Image.Image] = field(default_factory=list, repr=False)
    per_image: dict[str, list[Any]] = field(default_factory=dict)  # extra per-generated-image columns for the CSV
    memorised: list[dict[str, Any]] = field(default_factory=list)  # worst cases, most similar first
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per metric
    model: dict[str, Any] = field(default_factory=dict)  # what was measured: method, architecture, prediction type
    adherence: dict[str, judges.Adherence] = field(default_factory=dict, repr=False)  # "prompts" / "general_prompts"


def uint8(images: list[Image.Image], square: int | None = None) -> torch.Tensor:
    """PIL images -> uint8 tensor (N, 3, H, W), what torchmetrics' image metrics and the extractors take.

    Images of several sizes (aspect-ratio buckets) are centre-cropped and resized to `square` x `square`: the size
    the models generate at, so real and generated images are compared in the same framing.
    """
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    if square is not None and len({im.size for im in images}) > 1:
        images = [ImageOps.fit(im, (square, square), Image.Resampling.BICUBIC) for im in images]
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


@torch.no_grad()
def generate(
    pipe: Any, prompts: list[str], seeds: list[int], params: EvaluateParams, resolution: int
) -> list[Image.Image]:
    """One image per (prompt, seed), `evaluate.batch_size` at a time; each image's noise comes from its own seeded
    CPU generator, so an image does not depend on the batch it falls in."""
    from tqdm.auto import tqdm

    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc="generate", unit="img", mininterval=2, disable=not prompts)  # progress
    for start in range(0, len(prompts), params.batch_size):
        images += pipe(
            prompt=prompts[start : start + params.batch_size],
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + params.batch_size]],
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            height=resolution,
            width=resolution,
            output_type="pil",
        ).images
        bar.update(len(prompts[start : start + params.batch_size]))
    bar.close()
    return images


class _Timer:
    """`with timer("fid"): ...` adds the block's wall time to `timer.seconds["fid"]`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def pipe_components(pipe: Any, noise_scheduler: Any) -> Components:
    """The pipeline's models as `diffusion.Components`, for the validation loss train computes (SD or SDXL)."""
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=noise_scheduler,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
    )


def evaluate_model(name: str, pipe: Any, eval_set: EvalSet, reference: Reference, extractors: Extractors) -> ModelEval:
    """Every metric for the model currently loaded in `pipe`; per-sample values wherever a metric has them."""
    from diffusers import DDPMScheduler

    p, skipped, timer = eval_set.params, skipped_metrics(eval_set), _Timer()
    values: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    per_image: dict[str, list[Any]] = {}
    start = time.perf_counter()

    with timer("val_loss"):
        # The pipeline's scheduler carries the model's prediction type (see candidate.apply_output), so the loss
        # target is what this UNet was trained to predict.
        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        # Conditioning per model: the text encoders may have trained too (train.train_text_encoder). SDXL: both
        # encoders, the pooled text and the size/crop ids, as in training.
        sizes = [(i.height, i.width) for i in eval_set.validation.images]  # SDXL size ids: each image's own
        cond = encode_conditioning(pipe_components(pipe, noise_scheduler), eval_set.validation.captions, sizes)
        loss = fixed_validation_loss(pipe.unet, noise_scheduler, reference.val_latents, cond, p.val_timesteps, p.seed)
        samples["val_loss"] = loss.tolist()

    with timer("generation"):
        images = generate(pipe, eval_set.prompts, eval_set.seeds, p, eval_set.resolution)
        general = generate(pipe, eval_set.general_prompts, eval_set.general_seeds, p, eval_set.resolution)

    clip, processor = extractors.clip
    with timer("clip_score"):
        image_emb = metrics.image_embeddings(clip, processor, uint8(images))
        samples["clip_score"] = metrics.clip_scores(
            image_emb, metrics.text_embeddings(clip, processor, eval_set.prompts)
        )
    if "forgetting_clip_score" not in skipped:
        with timer("forgetting_clip_score"):
            general_emb = metrics.image_embeddings(clip, processor, uint8(general))
            general_text = metrics.text_embeddings(clip, processor, eval_set.general_prompts)
            samples["forgetting_clip_score"] = metrics.clip_scores(general_emb, general_text)
    adherence: dict[str, judges.Adherence] = {}
    for key, prefix, prompts, generated in (
        ("prompts", "", eval_set.prompts, images),
        ("general_prompts", "base_", eval_set.general_prompts, general),
    ):
        if f"{prefix}adherence_accuracy" in skipped:
            continue
        if extractors.classifier is None:  # built without adherence=True: load the shipped judge now, once
            extractors.classifier = load_judge_classifier().to(module_device(extractors.image_features))
        with timer(f"{prefix}adherence"):
            result, judged = judges.adherence(extractors.classifier, uint8(generated), prompts)
            adherence[key] = result
            values |= judges.adherence_metrics(result, prefix)
            values |= judges.per_class_metrics(result, prefix)
            samples[f"{prefix}adherence_accuracy"] = result.all_correct
            for attribute in judges.ATTRIBUTES:
                samples[f"{prefix}{attribute}_accuracy"] = result.correct[attribute]
            if key == "prompts":
                seen = dict(zip(judged, result.seen, strict=True))
                per_image["judged_scene"] = [seen[i].caption if i in seen else "" for i in range(len(prompts))]
    if "zero_shot_accuracy" not in skipped:
        with timer("zero_shot"):
            vocabulary = p.label_vocabulary
            label_emb = metrics.text_embeddings(clip, processor, [p.label_template.format(label=w) for w in vocabulary])
            predicted = metrics.zero_shot_labels(image_emb, label_emb, vocabulary)
            true = [metrics.label_of(q, vocabulary) for q in eval_set.prompts]
            labelled = [i for i, t in enumerate(true) if t is not None]
            report = metrics.classification_report(
                [true[i] for i in labelled], [predicted[i] for i in labelled], vocabulary
            )
            values |= {f"zero_shot_{k}": v for k, v in report.items()}
            samples["zero_shot_accuracy"] = [float(true[i] == predicted[i]) for i in labelled]
            per_image["predicted_label"] = predicted

    with timer("image_features"):
        fake = extract(extractors.image_features, uint8(images))
    if "fid" not in skipped:
        with timer("fid"):
            values["fid"] = metrics.fid(reference.real_features, fake)
        with timer("kid"):
            values["kid"], values["kid_std"] = metrics.kid(reference.real_features, fake, seed=p.seed)
            samples["kid"] = metrics.kid_per_image(reference.real_features, fake)
    with timer("precision_recall_density_coverage"):
        if "precision" not in skipped:
            samples |= metrics.precision_recall(reference.real_features, fake, p.precision_recall_k)
            prec, rec = np.mean(samples["precision"]), np.mean(samples["recall"])
            values["f1"] = float(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
        if "density" not in skipped:
            samples |= metrics.density_coverage(reference.real_features, fake, p.density_coverage_k)
    memorised: list[dict[str, Any]] = []
    if "memorisation_similarity" not in skipped:
        with timer("memorisation"):
            similarity, nearest = metrics.memorisation(fake, reference.train_features)
            samples["memorisation_similarity"] = similarity
            values["memorisation_max"] = float(similarity.max())
            per_image["nearest_train"] = [reference.train_files[j] for j in nearest]
            memorised = [
                {
                    "generated": f"images/{name}/{i:03d}.png",
                    "prompt": eval_set.prompts[i],
                    "nearest_train": reference.train_files[nearest[i]],
                    "nearest_index": int(nearest[i]),
                    "similarity": round(float(similarity[i]), 6),
                }
                for i in most_similar_per_train_image(similarity, nearest, p.memorisation_worst)
            ]
        if "mifid" not in skipped:
            with timer("mifid"):
                values["mifid"] = metrics.mifid(reference.train_features, fake)

    samples = {k: [float(x) for x in v] for k, v in samples.items()}
    # Every metric with per-sample values is reported as their mean, so the gate's interval is about that number.
    values = {k: float(np.mean(v)) for k, v in samples.items()} | values
    seconds = time.perf_counter() - start
    return ModelEval(
        name, values, samples, images, general, per_image, memorised, seconds, timer.seconds, adherence=adherence
    )


# --------------------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------------------


def most_similar_per_train_image(similarity: np.ndarray, nearest: np.ndarray, n: int) -> list[int]:
    """Indices of the `n` generated images most similar to a training image, one per training image: a copy is of a
    particular image, and a list that repeats one training image (random features make one image everybody's
    nearest) says nothing more after its first row."""
    chosen: dict[int, int] = {}
    for i in np.argsort(-similarity, kind="stable"):
        chosen.setdefault(int(nearest[i]), int(i))
        if len(chosen) == n:
            break
    return list(chosen.values())


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


def intervals(results: list[ModelEval], bootstrap: Bootstrap) -> dict[str, dict[str, Any]]:
    """Paired bootstrap interval of (last model - first model) for every metric both have per-sample values of,
    computed as the gate computes its own (`pipeline.gate._significance`)."""
    if len(results) < 2:
        return {}
    baseline, candidate = results[0], results[-1]
    out = {}
    for metric, values in candidate.samples.items():
        other = baseline.samples.get(metric)
        if other is None or len(other) != len(values) or len(values) < 2:
            continue
        interval = paired_bootstrap(values, other, bootstrap.resamples, bootstrap.confidence, seed=bootstrap.seed)
        out[metric] = interval.to_dict()
    return out


def cost(results: list[ModelEval], reference: Reference, total_seconds: float) -> dict[str, Any]:
    """Images generated, wall time, images/s and seconds per metric, per model and in total."""
    per_model = {}
    for r in results:
        n = len(r.images) + len(r.general_images)
        generation = r.timings.get("generation", 0.0)
        per_model[r.name] = {
            "images_generated": n,
            "seconds": round(r.seconds, 3),
            "generation_images_per_second": round(n / generation, 3) if generation else None,
            "seconds_per_metric": {k: round(v, 3) for k, v in r.timings.items()},
        }
    n_total = sum(m["images_generated"] for m in per_model.values())
    return {
        "images_generated": n_total,
        "wall_seconds": round(total_seconds, 3),
        "images_per_second": round(n_total / total_seconds, 3) if total_seconds else None,
        "reference_seconds": round(reference.seconds, 3),
        "models": per_model,
    }


def write_outputs(
    results: list[ModelEval],
    eval_set: EvalSet,
    extractors: Extractors,
    reference: Reference,
    out: Path,
    total_seconds: float = 0.0,
    train_curve: Path | None = None,
    bootstrap: Bootstrap | None = None,
) -> dict[str, Any]:
    """Images, per-sample values, per-prompt CSV, worst memorisation cases, intervals, grid and HTML report under
    `out`; returns the summary that becomes `reports/metrics.json`."""
    from pipeline.report import write_report

    p = eval_set.params
    bootstrap = bootstrap or Bootstrap()
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        folder = out / "images" / result.name
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            image.save(folder / f"{i:03d}.png")
        for i, image in enumerate(result.general_images):
            image.save(folder / f"general_{i:03d}.png")
    (out / "samples.json").write_text(json.dumps({r.name: r.samples for r in results}, indent=1) + "\n")
    with open(out / "per_prompt.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        extra = ["precision", "density", "memorisation_similarity"]
        labels = ("nearest_train", "predicted_label", "judged_scene")
        writer.writerow(["model", "index", "prompt", "seed", "clip_score", *extra, *labels])
        for r in results:
            for i, (prompt, seed) in enumerate(zip(eval_set.prompts, eval_set.seeds, strict=True)):
                cells = [round(r.samples[k][i], 5) if k in r.samples else "" for k in ["clip_score", *extra]]
                cells += [r.per_image[k][i] if k in r.per_image else "" for k in labels]
                writer.writerow([r.name, i, prompt, seed, *cells])
    for result in results:
        for key, adherence in result.adherence.items():
            for attribute in judges.ATTRIBUTES:
                stem = out / "confusion" / result.name / f"{key}_{attribute}"
                judges.write_confusion_csv(adherence, attribute, stem.with_suffix(".csv"))
                judges.confusion_image(adherence, attribute).save(stem.with_suffix(".png"))
    clip = {r.name: list(enumerate(r.samples["clip_score"])) for r in results if "clip_score" in r.samples}
    title = f"CLIP score per generated image ({' vs '.join(clip)})"
    charts.write_svg(out / "per_prompt.svg", charts.line_chart(clip, title, "image index"))  # dvc plots, offline
    (out / "memorisation.json").write_text(json.dumps({r.name: r.memorised for r in results}, indent=1) + "\n")
    grid = contact_grid({r.name: r.images for r in results}, eval_set.prompts, p.images_per_prompt)
    grid.save(out / "grid.png")

    skipped = skipped_metrics(eval_set)
    n_generated = len(eval_set.prompts)
    untrusted = metrics.untrusted_metrics(
        len(eval_set.validation.images), len(eval_set.train.images), n_generated, p.fid_min_n
    )
    summary: dict[str, Any] = {r.name: {k: round(v, 6) for k, v in r.values.items()} for r in results}
    summary["evaluation"] = {
        "eval_set_hash": eval_set.digest(),
        "split": eval_set.split,  # every number above is measured on this prepared split (see metric_data)
        "n_test_images": len(eval_set.validation.images),
        "n_train_images": len(eval_set.train.images),
        "n_generated_per_model": n_generated,
        "n_general_per_model": len(eval_set.general_prompts),
        "num_inference_steps": p.num_inference_steps,
        "extractors": extractors.description,
        "judges": judges_fingerprint() if uses_judges(eval_set) else None,
        "clip_model": p.clip_model,
        "image_features": p.image_features,
        "plumbing_only": bool(extractors.plumbing_only),
        "fid_n_real": len(eval_set.validation.images),
        "fid_n_generated": n_generated,
        "untrusted": untrusted,
        "skipped": skipped,
        "seconds": round(sum(r.seconds for r in results), 3),
        "cost": cost(results, reference, total_seconds or sum(r.seconds for r in results)),
        "models": {r.name: r.model for r in results if r.model},
        "metric_data": METRIC_DATA,
        "bootstrap": bootstrap._asdict(),
    }
    cis = intervals(results, bootstrap)
    (out / "intervals.json").write_text(json.dumps(cis, indent=1) + "\n")
    write_report(out / "report.html", results, eval_set, summary, cis, train_curve)
    return summary


def sampler(name: str, current: Any) -> Any:
    """The sampler every model of this evaluation uses (same betas and prediction type as the model's own).

    DPM-Solver++ (Lu et al. 2022) reaches at 15-20 steps the quality the default PNDM/DDIM samplers need 30-50 for, so
    `evaluate.num_inference_steps` can drop with it; the comparison stays paired either way (same sampler, steps and
    seeds for every model).
    """
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kind = {"euler": EulerDiscreteScheduler, "dpm++": DPMSolverMultistepScheduler}[name]
    return kind.from_config(current.config)


def main(argv: list[str] | None = None) -> int:
    from pipeline.tracking import system_metrics

    with system_metrics():  # MLflow's CPU/GPU/memory series of the flow's run, while evaluating
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, type=Path)
    parser.add_argument("--adapter", required=True, type=Path, help="train output folder (LoRA or full fine-tune)")
    parser.add_argument("--out", required=True, type=Path, help="folder for images, samples, grid and report.html")
    parser.add_argument("--metrics", type=Path, help="summary JSON to write (default: <out>/metrics.json)")
    parser.add_argument("--name", default="candidate", help="what to call the adapter in the outputs")
    parser.add_argument("--no-base", action="store_true", help="skip the untuned base model")
    parser.add_argument("--base-model", help="base model the output was trained on (default: base.model)")
    parser.add_argument("--train-curve", type=Path, help="training curve CSV to draw in the report (optional)")
    args = parser.parse_args(argv)
    env.configure()
    started = time.perf_counter()
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        output = candidate.read_output(args.adapter)
    except candidate.OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.base_model is None and output.base_model is not None:
        trained_on = (output.base_model, output.base_revision)
        if trained_on != (params.base.model, params.base.revision):
            print(
                f"error: {args.adapter} was trained on {_at(*trained_on)}, but params.yaml `base:` is now "
                f"{_at(params.base.model, params.base.revision)}: run the train stage again (`dvc repro train`).",
                file=sys.stderr,
            )
            return 2
    try:
        validation = read_test_split(args.prepared)  # held out from everything train chose; named as EvalSet's field
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train_dir = args.prepared / TRAIN
    train = read_split(train_dir) if (train_dir / "metadata.jsonl").is_file() else Split([], [], [])
    eval_set = build_eval_set(validation, params.evaluate, params.data.resolution, train)
    # Before any work: a gate rule on a number this evaluation cannot vouch for is a configuration error.
    gate_rules = [r.metric for r in (*params.gate.primary, *params.gate.guardrails, *params.gate.floors)]
    untrusted = metrics.untrusted_metrics(
        len(validation.images), len(train.images), len(eval_set.prompts), params.evaluate.fid_min_n
    )
    problems = metrics.gate_metric_problems(gate_rules, untrusted, skipped_metrics(eval_set))
    if problems:
        print("error: params.yaml `gate:`\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    model = args.base_model or resolve_model(params, Path(args.params).resolve().parent)
    device = compute_device()
    pipe = candidate.load_base(model, params.base.revision).to(device)
    if params.evaluate.scheduler != "default":
        pipe.scheduler = sampler(params.evaluate.scheduler, pipe.scheduler)
    try:
        candidate.check_base(pipe, output)  # before any work
    except candidate.OutputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base_info = {
        "architecture": candidate.architecture_of(pipe),
        "prediction_type": pipe.scheduler.config.prediction_type,
    }
    try:
        adherence = world_prompts(eval_set.prompts + eval_set.general_prompts)
        extractors = build_extractors(params.evaluate, pipe.tokenizer, device, adherence=adherence)
    except (MissingWeightsError, ModuleNotFoundError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if extractors.plumbing_only:
        print(f"note: {extractors.description}", file=sys.stderr)
    reference = build_reference(pipe, eval_set, extractors, split_files(train_dir))

    results = []
    if not args.no_base:
        results.append(evaluate_model("base", pipe, eval_set, reference, extractors))
        results[-1].model = {"method": "none"} | base_info
    # The base first: it keeps its own scheduler; the trained model gets the prediction type it was trained for.
    candidate.apply_output(pipe, output)
    results.append(evaluate_model(args.name, pipe, eval_set, reference, extractors))
    results[-1].model = output.describe() | {
        "architecture": candidate.architecture_of(pipe),
        "prediction_type": pipe.scheduler.config.prediction_type,
    }

    bootstrap = Bootstrap(params.gate.bootstrap_resamples, params.gate.confidence, params.gate.seed)
    summary = write_outputs(
        results, eval_set, extractors, reference, args.out, time.perf_counter() - started, args.train_curve, bootstrap
    )
    metrics_path = args.metrics or args.out / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(summary, indent=2) + "\n")
    # The gate's metrics on the console; every metric is in the metrics file and the report.
    shown = list(dict.fromkeys(["val_loss", *gate_rules]))
    for r in results:
        print(f"{r.name}: " + ", ".join(f"{k} {r.values[k]:.5g}" for k in shown if k in r.values))
    print(f"all {len(results[-1].values)} metrics of each model: {metrics_path}; report: {args.out / 'report.html'}")
    return 0


def _at(model: str, revision: str | None) -> str:
    return model + (f" @ {revision}" if revision else "")


if __name__ == "__main__":
    sys.exit(main())
