"""Pre-train the shipped base model once: a tiny SD 1.x-shaped pipeline that draws the shape world (pipeline/world.py).

Rebuild (the committed `assets/tiny-shapes-sd` came from exactly this command; time measured on 2 shared CPU cores is
in its MANIFEST.json: 24 minutes, 1456 s = VAE 872 s + text encoder and UNet 565 s + quality check 14 s, on one
thread of a 2-core machine shared with niced jobs, load average 13-17):

    python -m pipeline.pretrain_base --out assets/tiny-shapes-sd --seed 0

Standard classes only (`AutoencoderKL`, `CLIPTextModel` with CLIP's real tokenizer, `UNet2DConditionModel`, SD 1.5's
PNDM scheduler config), saved as a `StableDiffusionPipeline` in the diffusers layout, so everything downstream loads
it with `from_pretrained` exactly like SD 1.5. Three phases, like SD itself:

1. the VAE (8x: 64 px -> 8x8x4 latents) on renders of MANY colours (random RGB fills and backgrounds as well as the
   world's palette), so the shared autoencoder can also encode purple; L1 + a small KL term, then
   `scaling_factor` = 1 / std of the latents (SD's 0.18215 came from the same rule);
2. the text encoder and UNet jointly, epsilon prediction, on fresh renders of the BASE colours only (red, green,
   blue: purple never appears, so its token embedding never receives a gradient; checked), 10% of captions dropped to
   the empty prompt so classifier-free guidance works, EMA of the weights;
3. a quality check: images for every base scene and for the purple scenes with the sampler settings evaluation uses,
   judged by the pixel judge (`pipeline.world.judge_pixels`); the numbers go into MANIFEST.json.

Measured on the committed build (72 images, 4 per base scene; pixel judge): 20 sampling steps: colour 97%,
background 100%, shape 64%; 10 steps (evaluate's setting): colour 74% (blue drifts towards violet), background 100%,
shape 46%; purple prompts at 10 steps: 0% purple (it draws red/orange/green). Known limit, measured with
`bench/demo_feasibility.py`: fine-tuning on the purple-only demo data moves red towards magenta (the unseen word
"purple" encodes close to "red"), so learning purple costs 28-44 points of base-colour accuracy in every train
configuration tried; see the report of the run that built it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.world import BACKGROUNDS, BASE_COLOURS, NEW_COLOURS, SHAPES, Scene, draw_shape, judge_pixels, render

SIZE = 64  # params.yaml data.resolution
EMPTY_PROMPT_SHARE = 0.1  # caption dropout for classifier-free guidance (as SD 1.5's fine-tunes used)
RANDOM_SHARE = 0.25  # VAE renders with random RGB fill and background; the rest use the palette (purple included)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], as the VAE expects."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def many_colour_renders(n: int, rng: random.Random) -> list[Image.Image]:
    """Shapes of any colour on any background: half random RGB, half the world's palette (purple included)."""
    palette = [*BASE_COLOURS.values(), *NEW_COLOURS.values()]
    images = []
    for _ in range(n):
        if rng.random() < RANDOM_SHARE:
            fill = tuple(rng.randint(0, 255) for _ in range(3))
            background = tuple(rng.randint(0, 255) for _ in range(3))
        else:
            fill, background = rng.choice(palette), rng.choice(list(BACKGROUNDS.values()))
        images.append(draw_shape(rng.choice(SHAPES), fill, background, SIZE, rng))
    return images


def base_renders(n: int, rng: random.Random) -> tuple[list[Image.Image], list[Scene]]:
    """Fresh renders of random base-colour scenes (never purple)."""
    picked = [
        Scene(rng.choice(SHAPES), rng.choice(list(BASE_COLOURS)), rng.choice(list(BACKGROUNDS))) for _ in range(n)
    ]
    return [render(scene, SIZE, rng) for scene in picked], picked


def build_models(seed: int) -> tuple[Any, Any, Any]:
    """The untrained VAE, text encoder and UNet (shapes chosen for 2-core CPU speed, see the module docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # Three 2x downsamples: SD's 8x factor, so 64 px images give 8x8x4 latents.
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),  # narrow at full resolution: the 64 px convolutions dominate the cost
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        # Few groups: with one channel per group the last GroupNorm removes each channel's mean over the image, and
        # the decoder can no longer say which colour a flat image is (measured: grey reconstructions).
        norm_num_groups=4,
        sample_size=SIZE,
    )
    with torch.no_grad():
        # Start the posterior's log-variance at -6 (std 0.05) instead of 0, so sampling noise does not drown the
        # small initial latents; the KL term then decides how far it grows.
        vae.quant_conv.bias[4:] = -6.0
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="quick_gelu",  # SD 1.x's text encoder (OpenAI CLIP ViT-L/14)
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,  # 4+ channels per group (SD: 320 / 32 = 10), so the output can shift channel means
    )
    return vae, text_encoder, unet


def sd15_scheduler() -> Any:
    from diffusers import PNDMScheduler

    # SD 1.5's own scheduler configuration (as in pipeline/tiny.py).
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae: Any, steps: int, batch: int, lr: float, kl_weight: float, rng: random.Random) -> dict[str, float]:
    """Phase 1: reconstruct many-colour renders (MSE + kl_weight * KL); returns the final losses.

    MSE rather than L1: measured on this VAE, colour (not only brightness) came back about twice as fast."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    recon = kl = 0.0
    for step in (bar := tqdm(range(steps), desc="vae", mininterval=10, file=sys.stdout)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=50)
        x = to_tensor(many_colour_renders(batch, rng))
        posterior = vae.encode(x).latent_dist
        out = vae.decode(posterior.sample()).sample
        loss_recon = F.mse_loss(out, x)
        loss_kl = posterior.kl().mean() / x[0].numel()  # per pixel, comparable to the L1 term
        loss = loss_recon + kl_weight * loss_kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 10.0)
        optimizer.step()
        recon, kl = 0.95 * recon + 0.05 * loss_recon.item(), 0.95 * kl + 0.05 * loss_kl.item()
        bar.set_postfix(mse=f"{recon:.4f}", kl=f"{kl:.2f}", refresh=False)
    vae.eval()
    return {"vae_mse": round(recon, 5), "vae_kl_per_pixel": round(kl, 4)}


@torch.no_grad()
def latent_std(vae: Any, rng: random.Random, n: int = 512) -> float:
    """Std of sampled latents of base renders: SD sets scaling_factor = 1 / this, so latents have unit variance."""
    images, _ = base_renders(n, rng)
    return vae.encode(to_tensor(images)).latent_dist.sample().std().item()


def tokenize(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    # Padded to 77 tokens, exactly as StableDiffusionPipeline and the train stage tokenize.
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_denoiser(
    vae: Any,
    text_encoder: Any,
    unet: Any,
    tokenizer: Any,
    scheduler: Any,
    steps: int,
    batch: int,
    lr: float,
    ema_decay: float,
    rng: random.Random,
) -> tuple[Any, Any, dict[str, float]]:
    """Phase 2: text encoder + UNet, epsilon prediction on fresh base-colour renders; returns the EMA models."""
    text_encoder.train()
    unet.train()
    embedding = text_encoder.get_input_embeddings().weight
    # No weight decay anywhere: AdamW's decoupled decay would move the rows of tokens that never appear (purple).
    params = [*text_encoder.parameters(), *unet.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    ema_params = [*ema_text.parameters(), *ema_unet.parameters()]
    for p in ema_params:
        p.requires_grad_(False)
    alphas = scheduler.alphas_cumprod
    new_ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in NEW_COLOURS]
    new_grad = 0.0
    running = 0.0
    for step in (bar := tqdm(range(steps), desc="unet+text", mininterval=10, file=sys.stdout)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=200)
        images, picked = base_renders(batch, rng)
        captions = ["" if rng.random() < EMPTY_PROMPT_SHARE else s.caption for s in picked]
        with torch.no_grad():
            latents = vae.encode(to_tensor(images)).latent_dist.sample() * vae.config.scaling_factor  # (B, 4, 8, 8)
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # DDPM forward process q(x_t | x_0)
        states = text_encoder(tokenize(tokenizer, captions))[0]  # (B, 77, 32)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=states).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        new_grad = max(new_grad, embedding.grad[new_ids].abs().max().item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # EMA warmup, so early weights fade fast
        with torch.no_grad():
            for e, p in zip(ema_params, params, strict=True):
                e.lerp_(p, 1 - decay)  # exact when e == p: untouched rows (purple) stay bit-identical
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
    return ema_text, ema_unet, {"denoise_loss": round(running, 5), "new_colour_max_grad": new_grad}


def assemble(vae: Any, text_encoder: Any, unet: Any, tokenizer: Any) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def quality(
    pipe: Any, colours: list[str], per_scene: int, steps: int = 10, guidance: float = 5.0, seed: int = 0
) -> tuple[dict[str, float], list[Image.Image]]:
    """Generate `per_scene` images of every scene of `colours` (fixed seeds) and judge them by pixels."""
    scenes = [Scene(s, c, b) for c in colours for s in SHAPES for b in BACKGROUNDS]
    prompts = [sc.caption for sc in scenes for _ in range(per_scene)]
    images = []
    for start in range(0, len(prompts), 24):
        chunk = prompts[start : start + 24]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images += pipe(
            chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, height=SIZE, width=SIZE
        ).images
    truth = [sc for sc in scenes for _ in range(per_scene)]
    judged = [judge_pixels(im) for im in images]
    n = len(images)
    result = {
        "shape": sum(j[0] == t.shape for j, t in zip(judged, truth, strict=True)) / n,
        "colour": sum(j[1] == t.colour for j, t in zip(judged, truth, strict=True)) / n,
        "background": sum(j[2] == t.background for j, t in zip(judged, truth, strict=True)) / n,
        "all_three": sum(j == (t.shape, t.colour, t.background) for j, t in zip(judged, truth, strict=True)) / n,
        "n": n,
    }
    return {k: round(v, 4) for k, v in result.items()}, images


def grid(images: list[Image.Image], columns: int) -> Image.Image:
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * SIZE, rows * SIZE), (128, 128, 128))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * SIZE, (i // columns) * SIZE))
    return sheet


def pretrain(
    out: Path,
    seed: int,
    vae_steps: int,
    vae_batch: int,
    unet_steps: int,
    batch: int,
    per_scene: int,
    grid_path: Path | None,
) -> dict:
    """All three phases; writes the pipeline to `out` atomically and returns the numbers for the manifest."""
    from transformers import CLIPTokenizer

    from pipeline.assets import write_manifest
    from pipeline.tiny import write_clip_tokenizer

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae, text_encoder, unet = build_models(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer"))
    new_ids = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in NEW_COLOURS]
    new_rows = text_encoder.get_input_embeddings().weight[new_ids].detach().clone()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    vae_numbers = train_vae(vae, vae_steps, vae_batch, lr=3e-3, kl_weight=1e-4, rng=rng)
    std = latent_std(vae, rng)
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    if grid_path is not None:
        with torch.no_grad():
            originals = many_colour_renders(12, rng) + base_renders(12, rng)[0]
            decoded = vae.decode(vae.encode(to_tensor(originals)).latent_dist.mode()).sample
        recons = [
            Image.fromarray(a) for a in ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        ]
        grid(originals + recons, columns=24).save(grid_path.with_name(grid_path.stem + "_vae.png"))
    timings["vae_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"phase 1 (VAE): {timings['vae_seconds']} s, {vae_numbers}, scaling_factor {vae.config.scaling_factor}")

    t0 = time.perf_counter()
    vae.requires_grad_(False)
    text_encoder, unet, denoise_numbers = train_denoiser(
        vae, text_encoder, unet, tokenizer, sd15_scheduler(), unet_steps, batch, lr=1e-3, ema_decay=0.995, rng=rng
    )
    timings["denoiser_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"phase 2 (text encoder + UNet): {timings['denoiser_seconds']} s, {denoise_numbers}")
    untouched = torch.equal(text_encoder.get_input_embeddings().weight[new_ids], new_rows)
    if denoise_numbers["new_colour_max_grad"] != 0.0 or not untouched:
        raise RuntimeError(f"the {list(NEW_COLOURS)} token embedding(s) changed in pre-training: a caption leaked")

    t0 = time.perf_counter()
    pipe = assemble(vae, text_encoder, unet, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    checks: dict[str, Any] = {}
    sheets = []
    for steps in (10, 20):
        numbers, images = quality(pipe, list(BASE_COLOURS), per_scene, steps=steps)
        checks[f"base_scenes_{steps}_steps"] = numbers
        sheets.append(images)
        print(f"quality, base scenes, {steps} steps: {numbers}")
    numbers, images = quality(pipe, list(NEW_COLOURS), per_scene, steps=10)
    checks["purple_scenes_10_steps"] = {**numbers, "judged_purple": numbers["colour"]}
    print(f"quality, purple scenes (never trained), 10 steps: judged purple {numbers['colour']}")
    sheets.append(images)
    timings["quality_seconds"] = round(time.perf_counter() - t0, 1)
    if grid_path is not None:
        grid([im for sheet in sheets for im in sheet], columns=24).save(grid_path)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    counts = {
        "unet": sum(p.numel() for p in unet.parameters()),
        "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        "vae": sum(p.numel() for p in vae.parameters()),
    }
    extra = {
        "what": "tiny SD 1.x-shaped pipeline pre-trained on the shape world (pipeline/world.py): red/green/blue "
        "circles/squares/triangles on white/black at 64 px; never saw purple (NEW_COLOURS)",
        "parameters": counts,
        "steps": {"vae": vae_steps, "vae_batch": vae_batch, "denoiser": unet_steps, "batch": batch},
        "timings": {**timings, "threads": torch.get_num_threads()},
        **vae_numbers,
        **denoise_numbers,
        "scaling_factor": vae.config.scaling_factor,
        "quality": checks,
        "judge": "pipeline.world.judge_pixels (border-median background, majority palette colour, bbox fill shape)",
    }
    command = f"python -m pipeline.pretrain_base --out {out.as_posix()} --seed {seed}"
    write_manifest(partial, command, seed, time.perf_counter() - started, extra=extra)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=4000)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--per-scene", type=int, default=4, help="images judged per scene in the quality check")
    # One thread: on a shared 2-core machine two OpenMP threads per process were 20-60x slower (busy-waiting).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it in the last bits)")
    parser.add_argument("--grid", type=Path, default=None, help="also save a PNG of every judged image")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    extra = pretrain(
        args.out, args.seed, args.vae_steps, args.vae_batch, args.unet_steps, args.batch, args.per_scene, args.grid
    )
    print(json.dumps({"quality": extra["quality"], "parameters": extra["parameters"], **extra["timings"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
