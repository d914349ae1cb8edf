"""Sample images during training: fixed prompts and seeds, so grids from different steps (and retrains) compare.

`sample_grid(components, unet, prompts, ...)` builds a stock diffusers pipeline around the models being trained (no
copy of the weights), generates one image per prompt with its own seeded CPU generator, and lays them out in a row
with each prompt under its image.
"""

from __future__ import annotations

import contextlib
import textwrap
from typing import Any

import torch
from PIL import Image, ImageDraw

from pipeline.diffusion import Components


def sampling_pipeline(components: Components, unet: Any, noise_scheduler: Any) -> Any:
    """SD or SDXL pipeline over the given models; Euler sampling with the training scheduler's betas and prediction
    type (a UNet trained for v-prediction is sampled as such)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = EulerDiscreteScheduler.from_config(noise_scheduler.config)
    if components.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=unet,
            scheduler=scheduler,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


MIN_CELL = 128  # pixels per column, so a caption stays readable under small (e.g. 64 px) images
CHAR_WIDTH = 6  # PIL's default bitmap font


def labelled_row(images: list[Image.Image], labels: list[str]) -> Image.Image:
    """Images side by side, each with its label wrapped to the column's width underneath."""
    w, h = max(i.width for i in images), max(i.height for i in images)
    cell = max(w, MIN_CELL)
    lines = [textwrap.wrap(label, cell // CHAR_WIDTH - 1)[:5] for label in labels]
    text_h = 12 * max((len(x) for x in lines), default=1) + 6
    grid = Image.new("RGB", (cell * len(images), h + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, label_lines) in enumerate(zip(images, lines, strict=True)):
        grid.paste(image, (k * cell + (cell - image.width) // 2, 0))
        for j, line in enumerate(label_lines):
            draw.text((k * cell + 3, h + 3 + 12 * j), line, fill="black")
    return grid


@torch.no_grad()
def sample_grid(
    components: Components,
    unet: Any,
    noise_scheduler: Any,
    prompts: list[str],
    seed: int,
    size: tuple[int, int],
    steps: int,
    guidance_scale: float,
    autocast: Any = None,
) -> Image.Image:
    """One image per prompt (prompt i with seed + i), at `size` (height, width), as a labelled row."""
    pipe = sampling_pipeline(components, unet, noise_scheduler)
    was_training = unet.training
    unet.eval()
    images = []
    with autocast if autocast is not None else contextlib.nullcontext():
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            out = pipe(
                prompt,
                height=size[0],
                width=size[1],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generator,
            )
            images.append(out.images[0])
    unet.train(was_training)
    return labelled_row(images, prompts)
