"""Prior-preservation class images (DreamBooth, Ruiz et al. 2023): given in a folder, or generated once and cached.

Generated images are cached in a folder keyed by everything that decides them (base model, revision, prompt, count,
resolution, steps, seed), so the next run with the same settings reuses them instead of sampling again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from PIL import Image

from pipeline.config import ParamsError, PriorPreservationParams
from pipeline.diffusion import Split, compute_device

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def cache_key(params: PriorPreservationParams, model: str, revision: str | None, resolution: int, seed: int) -> str:
    payload = [
        model,
        revision,
        params.class_prompt,
        params.num_class_images,
        resolution,
        params.num_inference_steps,
        seed,
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def class_images(
    params: PriorPreservationParams,
    model: str,
    revision: str | None,
    resolution: int,
    root: Path,
    cache: Path | None,
    seed: int = 0,
) -> Split:
    """The class images as a split whose every caption is the class prompt."""
    if params.class_images_dir:
        folder = root / params.class_images_dir
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise ParamsError(
                f"train.prior_preservation.class_images_dir is {params.class_images_dir!r}, which has no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}). Add images, or unset it to generate them."
            )
        files = files[: params.num_class_images]
    else:
        if cache is None:
            raise ParamsError(
                "train.prior_preservation is enabled without class_images_dir, so class images are generated: "
                "pass --class-images <folder> to cache them (dvc.yaml does)."
            )
        folder = cache / cache_key(params, model, revision, resolution, seed)
        if not folder.is_dir():
            generate(params, model, revision, resolution, folder, seed)
        else:
            print(f"class images: reusing {params.num_class_images} cached in {folder}")
        files = sorted(folder.glob("*.png"))
    images = [_load(path, resolution) for path in files]
    hashes = [hashlib.sha256(path.read_bytes()).hexdigest() for path in files]
    return Split(images=images, captions=[params.class_prompt] * len(images), hashes=hashes)


def generate(
    params: PriorPreservationParams, model: str, revision: str | None, resolution: int, folder: Path, seed: int
) -> None:
    """Sample the class images with the untuned base pipeline; one seeded CPU generator per image."""
    import torch
    from diffusers import AutoPipelineForText2Image

    print(f"class images: generating {params.num_class_images} of {params.class_prompt!r} into {folder}")
    pipe = AutoPipelineForText2Image.from_pretrained(model, revision=revision).to(compute_device())
    pipe.set_progress_bar_config(disable=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for i in range(params.num_class_images):
        image = pipe(
            params.class_prompt,
            num_inference_steps=params.num_inference_steps,
            height=resolution,
            width=resolution,
            generator=torch.Generator("cpu").manual_seed(seed + i),
        ).images[0]
        image.save(partial / f"{i:05d}.png")
    partial.rename(folder)


def _load(path: Path, resolution: int) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    if image.size != (resolution, resolution):
        # Centre crop to a square, then resize: the same framing prepare gives square training images.
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return image
