"""Pre-train the shape-world judges shipped in `assets/judges/`: a classifier and a tiny CLIP.

    python -m pipeline.pretrain_judges --out assets/judges [--seed 0]

Both learn from fresh renders of `pipeline/world.py` (all 24 scenes, purple included), degraded the way generated
images are imperfect: rendered at other sizes and resized, JPEG-compressed, blurred, noised, colour-jittered. The
held-out check uses clean renders and degraded renders from another seed. Run time, one torch thread (`--threads`),
800 classifier steps and 600 CLIP steps: about 2 + 5 minutes on a quiet CPU core; the shipped build took 5 + 10
minutes on 2 cores shared with about 8 other busy processes (build_seconds in each MANIFEST.json records it). The
same seed gives the same losses on the same machine and torch version.

- `classifier/`: `pipeline.judges.ShapeJudge` (config.json + model.safetensors); three heads (shape, colour,
  background), accuracy per head >= 99% required, else the run fails and writes nothing.
- `clip/`: a stock `transformers.CLIPModel` + `CLIPProcessor` (CLIP's real tokenizer, built offline, and a
  64 px image processor); zero-shot retrieval among the 24 captions >= 95% top-1 required.

Each folder is written to a sibling `.partial` folder with its `MANIFEST.json` (sha256 of every file, the command,
the seed, the build time, the held-out accuracies), then renamed into place.
"""

from __future__ import annotations

import argparse
import io
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from pipeline import world
from pipeline.assets import write_manifest
from pipeline.judges import ATTRIBUTES, CLASSES, ShapeJudge

SIZE = 64
RENDER_SIZES = (24, 32, 48, 64, 64, 64, 80, 96, 128)
# OpenAI CLIP's normalisation, which CLIPImageProcessor applies by default.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MIN_CLASSIFIER_ACCURACY = 0.99
MIN_CLIP_TOP1 = 0.95


# --------------------------------------------------------------------------------------------------------------------
# Data: fresh renders, degraded like generated images
# --------------------------------------------------------------------------------------------------------------------


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """A `SIZE` px version of a render, degraded at random: resized, JPEG-soft, blurred, noised, colour-jittered."""
    if rng.random() < 0.3:  # softness: through a smaller size and back
        small = rng.randint(16, 40)
        image = image.resize((small, small), Image.BILINEAR)
    image = image.resize((SIZE, SIZE), rng.choice((Image.BILINEAR, Image.BICUBIC, Image.LANCZOS)))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(20, 90))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    x = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.7:  # colour jitter: gain and offset per channel
        gain = np.array([rng.uniform(0.9, 1.1) for _ in range(3)], dtype=np.float32)
        offset = np.array([rng.uniform(-12, 12) for _ in range(3)], dtype=np.float32)
        x = x * gain + offset
    if rng.random() < 0.5:
        noise = np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 15), x.shape)
        x = x + noise.astype(np.float32)
    return Image.fromarray(x.clip(0, 255).round().astype(np.uint8))


def to_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> uint8 (N, 3, H, W)."""
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()


def batch(picked: list[world.Scene], rng: random.Random, augment: bool = True) -> torch.Tensor:
    """uint8 renders (N, 3, SIZE, SIZE) of `picked`: degraded, or clean at SIZE when `augment` is False."""
    if not augment:
        return to_uint8([world.render(scene, SIZE, rng) for scene in picked])
    return to_uint8([degrade(world.render(scene, rng.choice(RENDER_SIZES), rng), rng) for scene in picked])


def labels(picked: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([CLASSES[a].index(getattr(s, a)) for s in picked]) for a in ATTRIBUTES}


# --------------------------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------------------------


def train_classifier(seed: int, steps: int, batch_size: int = 64, log: Any = print) -> ShapeJudge:
    """Train a `ShapeJudge` on fresh degraded renders (each step a new batch, uniform over the 24 scenes)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = world.scenes()
    judge = ShapeJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    judge.train()
    for step in range(1, steps + 1):
        picked = [rng.choice(pool) for _ in range(batch_size)]
        logits = judge.logits(batch(picked, rng))
        target = labels(picked)
        loss = sum(nn.functional.cross_entropy(logits[a], target[a]) for a in ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"classifier step {step}/{steps} loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(judge: ShapeJudge, n: int, seed: int, augment: bool) -> dict[str, float]:
    """Per-head accuracy on `n` fresh renders from `seed` (clean, or degraded like the training data)."""
    rng = random.Random(seed)
    picked = [rng.choice(world.scenes()) for _ in range(n)]
    seen = judge.predict(batch(picked, rng, augment))
    return {a: sum(getattr(p, a) == getattr(s, a) for p, s in zip(picked, seen, strict=True)) / n for a in ATTRIBUTES}


# --------------------------------------------------------------------------------------------------------------------
# Tiny CLIP
# --------------------------------------------------------------------------------------------------------------------


def clip_config() -> Any:
    from transformers import CLIPConfig

    # vocab_size and positions are CLIP's (the real tokenizer's ids); the towers are tiny. 64 px / 8 px patches =
    # 64 image tokens.
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
    return CLIPConfig(
        text_config={
            **text,
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={**vision, "image_size": SIZE, "patch_size": 8},
        projection_dim=32,
    )


def clip_processor(tokenizer_folder: Path) -> Any:
    from transformers import CLIPImageProcessorPil, CLIPProcessor, CLIPTokenizer

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder))


def clip_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, SIZE, SIZE) -> CLIP pixel values, as the processor makes them for SIZE px images."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def train_clip(seed: int, steps: int, processor: Any, per_scene: int = 4, log: Any = print) -> Any:
    """Contrastive training: each batch holds `per_scene` fresh renders of each of the 24 scenes and their captions.

    The loss is CLIP's symmetric cross-entropy, with every render of a scene a positive for its caption: images ->
    the 24 captions (one target each), captions -> the batch's images (uniform over the caption's renders, so that
    term cannot go below ln(per_scene), the entropy of its target).
    """
    from transformers import CLIPModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    pool = world.scenes()
    model = CLIPModel(clip_config())
    text = processor.tokenizer([s.caption for s in pool], padding=True, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    scene_of_image = torch.arange(len(pool)).repeat_interleave(per_scene)
    image_targets = nn.functional.one_hot(scene_of_image, len(pool)).T.float() / per_scene  # (24, B)
    model.train()
    for step in range(1, steps + 1):
        picked = [pool[i] for i in scene_of_image.tolist()]
        pixels = clip_pixels(batch(picked, rng))
        out = model(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
        to_text = nn.functional.cross_entropy(out.logits_per_image, scene_of_image)
        to_image = nn.functional.cross_entropy(out.logits_per_text, image_targets)
        loss = (to_text + to_image) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(
                f"clip step {step}/{steps} image->text {to_text.item():.4f} text->image {to_image.item():.4f} (floor "
                f"ln {per_scene} = {math.log(per_scene):.4f}) scale {model.logit_scale.exp().item():.1f}"
            )
    return model.eval().requires_grad_(False)


@torch.no_grad()
def clip_top1(folder: Path, n: int, seed: int, augment: bool, size: int = SIZE) -> float:
    """Zero-shot retrieval among the 24 captions on `n` fresh renders, with stock CLIPModel/CLIPProcessor loading."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    pool = world.scenes()
    rng = random.Random(seed)
    picked = [rng.choice(pool) for _ in range(n)]
    if augment:
        images = [degrade(world.render(s, rng.choice(RENDER_SIZES), rng), rng) for s in picked]
    else:
        images = [world.render(s, size, rng) for s in picked]
    inputs = processor(text=[s.caption for s in pool], images=images, return_tensors="pt", padding=True)
    logits = model(**inputs).logits_per_image
    truth = torch.tensor([pool.index(s) for s in picked])
    return (logits.argmax(-1) == truth).float().mean().item()


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def _publish(partial: Path, dest: Path) -> None:
    """Replace `dest` with the finished `partial` folder (the old one is removed only once the new one is whole)."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    partial.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets/judges"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classifier-steps", type=int, default=800)
    parser.add_argument("--clip-steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("classifier", "clip"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m pipeline.pretrain_judges " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    held_out = args.seed + 1_000_003  # never a training seed

    if args.only in (None, "classifier"):
        start = time.monotonic()
        judge = train_classifier(args.seed, args.classifier_steps)
        clean = classifier_accuracy(judge, 2000, held_out, augment=False)
        degraded = classifier_accuracy(judge, 2000, held_out + 1, augment=True)
        print(f"classifier held-out accuracy: clean {clean}, degraded {degraded}")
        if min(clean.values()) < MIN_CLASSIFIER_ACCURACY:
            raise SystemExit(f"classifier below {MIN_CLASSIFIER_ACCURACY:.0%} on clean renders: {clean}; not written")
        partial = args.out / "classifier.partial"
        shutil.rmtree(partial, ignore_errors=True)
        judge.save_pretrained(partial)
        extra = {"held_out": {"seed": held_out, "n": 2000, "clean_accuracy": clean, "degraded_accuracy": degraded}}
        write_manifest(partial, command, args.seed, time.monotonic() - start, extra)
        _publish(partial, args.out / "classifier")

    if args.only in (None, "clip"):
        from pipeline.tiny import write_clip_tokenizer

        start = time.monotonic()
        partial = args.out / "clip.partial"
        shutil.rmtree(partial, ignore_errors=True)
        processor = clip_processor(write_clip_tokenizer(partial / "_tokenizer"))
        model = train_clip(args.seed, args.clip_steps, processor)
        shutil.rmtree(partial / "_tokenizer")
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
        top1 = {
            "clean": clip_top1(partial, 1000, held_out, augment=False),
            "clean_128px": clip_top1(partial, 500, held_out + 2, augment=False, size=128),
            "degraded": clip_top1(partial, 1000, held_out + 1, augment=True),
        }
        print(f"clip zero-shot top-1 among the 24 captions: {top1}")
        if top1["clean"] < MIN_CLIP_TOP1:
            raise SystemExit(f"tiny CLIP below {MIN_CLIP_TOP1:.0%} top-1 on clean renders: {top1}; not written")
        extra = {"held_out": {"seed": held_out, "zero_shot_top1": top1}}
        write_manifest(partial, command, args.seed, time.monotonic() - start, extra)
        _publish(partial, args.out / "clip")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
