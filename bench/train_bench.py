"""Training throughput: sdft's train stage against the reference recipe, in one run, on the same model and data.

    python bench/train_bench.py                                  # CPU, tiny model: runs anywhere in ~2 minutes
    python bench/train_bench.py --arch sd15 --resolution 512 --batch-size 16 --steps 40 --compile   # one GPU
    python bench/train_bench.py --arch sdxl --resolution 1024 --batch-size 4 --steps 20
    python bench/train_bench.py --arch sd15 --method full --batch-size 16 --variants recipe,stage-fast   # whole UNet

Each variant runs in its own process (clean peak memory, no shared compile cache) and reports images/s, step time and
peak memory; the GPU variants add MFU from FLOPs counted with `torch.utils.flop_counter` on one training step.
Speed is the steady state: the time between the host syncs at the end of the warm-up steps and at the last step, so
compilation, CUDA-graph recording and allocator warm-up stay out of it (and are reported as `first_step_seconds`).

- `recipe`: the loop of diffusers' `train_text_to_image_lora.py` (`--method full`: `train_text_to_image.py`): the VAE
  and text encoder run on every batch, frozen weights in the mixed-precision dtype, trained weights in fp32, a host
  sync (`.item()`) every step. The in-repo baseline.
- `stage-plain`: `pipeline.train.train`, fp32, no speed options (latents and text embeddings are still cached: the stage
  always does that).
- `stage-fast`: the same stage with mixed precision (auto), frozen weights in that dtype (`--frozen-precision`),
  fused AdamW, channels-last and, with `--compile`, `torch.compile` (`--compile-mode reduce-overhead` for CUDA
  graphs). Its loss curve is compared with `stage-plain`'s (same seed, same data order).

`--method lora` trains a rank-4 UNet LoRA on to_q/to_k/to_v/to_out.0 (the recipe's default); `--method full` the whole
UNet.

The architectures are built from config with random weights (`--arch sd15|sdxl` have the exact SD 1.5 / SDXL shapes),
so nothing is downloaded; the data is synthetic. Results go to `--out` as JSON and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import env  # noqa: E402
from pipeline.train import peak_flops  # noqa: E402

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the LoRA examples' default


# ----------------------------------------------------------------------------------------------------------------------
# Models and data, built from config


def build_components(arch: str, device: str) -> Any:
    """Frozen components with random weights: the tiny default, or the exact SD 1.5 / SDXL architectures."""
    from pipeline.diffusion import load_components
    from pipeline.tiny import build_tiny_sd

    if arch == "tiny":
        components = load_components(str(build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny-sd")))
    else:
        components = build_architecture(arch, device)
    for module in (*components.text_encoders, components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    return components


def build_architecture(arch: str, device: str) -> Any:
    """The exact SD 1.5 or SDXL shapes (UNet, VAE, CLIP text encoders) from config, random weights.

    The models are built on `device`: random initialisation of a billion parameters takes minutes on a CPU and seconds
    on a GPU. The tokenizer and the noise scheduler stay on the CPU, as when they are loaded.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipeline.diffusion import Components
    from pipeline.tiny import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tempfile.mkdtemp())), model_max_length=77)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                           projection_dim=1280)  # fmt: skip
    if arch == "sd15":
        unet_config = dict(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
    else:
        unet_config = dict(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    with torch.device(device):
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.18215 if arch == "sd15" else 0.13025,
        )
        unet = UNet2DConditionModel(**unet_config)
        if arch == "sd15":
            return Components(tokenizer, CLIPTextModel(clip_l), vae, unet, scheduler)
        return Components(
            tokenizer, CLIPTextModel(clip_l), vae, unet, scheduler,
            tokenizer_2=tokenizer, text_encoder_2=CLIPTextModelWithProjection(big_g),
        )  # fmt: skip


def synthetic_split(n: int, sizes: list[tuple[int, int]], seed: int) -> Any:
    """`n` random images of the (height, width) `sizes` in turn, with captions: throughput does not depend on what is
    drawn."""
    from PIL import Image

    from pipeline.diffusion import Split

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]
    captions = [f"a photo of object number {i} on a plain background" for i in range(n)]
    return Split(images=images, captions=captions, hashes=[f"{seed}-{i}" for i in range(n)])


# ----------------------------------------------------------------------------------------------------------------------
# The variants


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def what_trains(method: str) -> dict[str, Any]:
    """The train params of the recipes' choice: a rank-4 LoRA on the attention projections, or the whole UNet."""
    return {"method": method} | (
        {"lora_rank": 4, "lora_alpha": 4, "lora_targets": LORA_TARGETS} if method == "lora" else {}
    )


def make_trainable(components: Any, method: str) -> list[torch.nn.Parameter]:
    """Adapt or unfreeze what the recipe trains, as the stage does (fp32 trained weights)."""
    from pipeline.config import TrainParams
    from pipeline.train import select_trainable

    return list(select_trainable(components, TrainParams(**what_trains(method))).values())


def run_recipe(components: Any, split: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The reference loop: encode images and captions on every step, as diffusers' examples do."""
    import torch.nn.functional as F

    from pipeline.diffusion import encode_conditioning, pixels, predict

    device = args.device
    dtype = {"cuda": torch.bfloat16, "cpu": torch.float32}[device]
    for module in (*components.text_encoders, components.vae, components.unet):
        module.to(dtype=dtype)
    trainable = make_trainable(components, args.method)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    scheduler = components.noise_scheduler
    generator = torch.Generator("cpu").manual_seed(0)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        idx = torch.randint(0, len(split.images), (args.batch_size,), generator=generator).tolist()
        with torch.no_grad():
            batch = pixels([split.images[i] for i in idx]).to(device, dtype)
            latents = components.vae.encode(batch).latent_dist.sample() * components.vae.config.scaling_factor
            cond = encode_conditioning(components, [split.captions[i] for i in idx], args.resolution)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t.to(device))
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            pred = predict(components.unet, noisy, t.to(device), {k: v.to(device, dtype) for k, v in cond.items()})
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # the examples' --max_grad_norm default
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the recipe logs the loss every step: a host sync
        _sync(device)
        if step == 0:
            first_step = time.perf_counter() - start
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {"images_per_s": args.batch_size / step_s, "step_seconds": step_s, "peak_memory_mb": _peak_mb(device),
            "first_step_seconds": first_step}  # fmt: skip


def run_stage(components: Any, split: Any, args: argparse.Namespace, fast: bool) -> dict[str, Any]:
    """sdft's own train stage core, one run of warm-up + timed steps; speed over the timed steps alone."""
    from pipeline.config import TrainParams
    from pipeline.train import train

    val = synthetic_split(4, [(args.resolution, args.resolution)], seed=1)
    lora = args.method == "lora"
    options = what_trains(args.method) | {
        "mixed_precision": "auto" if fast else "no",
        "optimizer": "adamw_fused" if fast and args.device == "cuda" else "adamw",
        "channels_last": fast and args.device == "cuda",
        "compile": fast and args.compile,
        "compile_mode": args.compile_mode,
        # auto: a LoRA's frozen weights in the mixed-precision dtype (bf16 on a GPU), its own weights fp32; "no" keeps
        # them fp32. A full fine-tune keeps fp32 weights under autocast.
        "frozen_precision": args.frozen_precision if fast and lora else "auto",
        # The loss comes to the host every `warmup` steps (the stage's default is 10): a sync right where timing starts.
        "log_every": args.warmup,
    }
    params = TrainParams(
        max_steps=args.warmup + args.steps, batch_size=args.batch_size, learning_rate=1e-4,
        validation_every=10**6, validation_timesteps=1, **options,
    )  # fmt: skip
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(components, split, val, params)
    synced = {int(row["step"]): row["seconds"] for row in result.history if "seconds" in row}
    seconds = synced[args.warmup + args.steps] - synced[args.warmup]
    losses = [row["train_loss"] for row in result.history if "train_loss" in row]
    return {
        "images_per_s": args.steps * args.batch_size / seconds,
        "step_seconds": seconds / args.steps,
        "end_to_end_images_per_s": result.cost["images_per_s"],
        "encode_seconds": result.cost["encode_seconds"],
        # The first step's time: compilation, allocator and autotuning warm-up included.
        "first_step_seconds": result.cost.get("first_step_seconds"),
        "warmup_steps_seconds": synced[args.warmup],
        "stage_flops_per_image": result.cost["flops_per_image"],
        "peak_memory_mb": _peak_mb(args.device),
        "losses": losses,
        "options": options,
    }


def step_flops(components: Any, args: argparse.Namespace) -> dict[str, float]:
    """FLOPs per image of one training step (UNet forward + backward, LoRA or whole UNet), a VAE and a text encode."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.diffusion import encode_conditioning, predict

    device, b, r = args.device, 1, args.resolution
    make_trainable(components, args.method)
    latents = torch.randn(b, 4, r // 8, r // 8, device=device)
    cond = {k: v.to(device) for k, v in encode_conditioning(components, ["a photo"], r).items()}
    t = torch.full((b,), 500, device=device)
    with FlopCounterMode(display=False) as unet_count:
        predict(components.unet, latents, t, cond).float().pow(2).mean().backward()
    with FlopCounterMode(display=False) as vae_count, torch.no_grad():
        components.vae.encode(torch.randn(b, 3, r, r, device=device))
    with FlopCounterMode(display=False) as text_count, torch.no_grad():
        encode_conditioning(components, ["a photo"], r)
    return {
        "train_step": unet_count.get_total_flops() / b,
        "vae_encode": vae_count.get_total_flops() / b,
        "text_encode": text_count.get_total_flops() / b,
    }


def child(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its result as JSON on the last line."""
    torch.manual_seed(0)
    components = build_components(args.arch, args.device)
    split = synthetic_split(max(4 * args.batch_size, 16), [(args.resolution, args.resolution)], seed=0)
    if args.variant == "recipe":
        result = run_recipe(components, split, args)
    elif args.variant == "flops":
        result = step_flops(components, args)
    else:
        result = run_stage(components, split, args, fast=args.variant == "stage-fast")
    print(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------------------
# The parent: runs each variant in a fresh process and compares


def spawn(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, "--arch", args.arch, "--method", args.method,
               "--device", args.device, "--resolution", str(args.resolution), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--compile-mode", args.compile_mode,
               "--frozen-precision", args.frozen_precision]  # fmt: skip
    command += ["--compile"] if args.compile else []
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = round(time.perf_counter() - start, 2)
    print(f"  {variant:<12} done in {result['process_seconds']:.0f} s", file=sys.stderr)
    return result


def machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15", "sdxl"], default="tiny")
    parser.add_argument("--method", choices=["lora", "full"], default="lora", help="a UNet LoRA, or the whole UNet")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compile, allocator, caches)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in stage-fast")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="train.compile_mode for stage-fast (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--frozen-precision", default="auto", choices=["auto", "no", "bf16", "fp16"], help="stage-fast's frozen weights"
    )
    parser.add_argument("--variants", default="recipe,stage-plain,stage-fast")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = args.resolution or {"tiny": 64, "sd15": 512, "sdxl": 1024}[args.arch]
    env.configure()
    if args.child:
        args.variant = args.child
        child(args)
        return

    print(f"training benchmark: {args.arch} {args.method} at {args.resolution} px, batch {args.batch_size}, "
          f"{args.device}", file=sys.stderr)  # fmt: skip
    results = {variant: spawn(args, variant) for variant in args.variants.split(",")}
    flops = spawn(args, "flops")
    peak = peak_flops(torch.device(args.device))  # the stage's own table (or SDFT_PEAK_TFLOPS), as in its MFU
    base = results.get("recipe", {}).get("images_per_s")
    for result in results.values():
        result["speedup_vs_recipe"] = round(result["images_per_s"] / base, 2) if base else None
        result["mfu"] = round(flops["train_step"] * result["images_per_s"] / peak, 4) if peak else None
    if "stage-plain" in results and "stage-fast" in results:
        plain, fast = np.array(results["stage-plain"]["losses"]), np.array(results["stage-fast"]["losses"])
        n = min(len(plain), len(fast))
        results["stage-fast"]["loss_curve_max_abs_diff_vs_plain"] = float(np.abs(plain[:n] - fast[:n]).max())
    report = {"config": vars(args) | {"out": str(args.out)}, "machine": machine(args.device), "flops_per_image": flops,
              "peak_flops": peak, "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'variant':<12} {'img/s':>8} {'step s':>8} {'peak MB':>9} {'vs recipe':>9} {'MFU':>6}")
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['speedup_vs_recipe']:.2f}x" if r["speedup_vs_recipe"] else "n/a"  # no recipe in this run
        print(f"{name:<12} {r['images_per_s']:>8.1f} {r['step_seconds']:>8.4f} {r['peak_memory_mb']:>9.0f} "
              f"{ratio:>9} {mfu:>6}")  # fmt: skip
    if "stage-fast" in results and "loss_curve_max_abs_diff_vs_plain" in results["stage-fast"]:
        diff = results["stage-fast"]["loss_curve_max_abs_diff_vs_plain"]
        print(f"loss curve, fast vs plain: max |diff| {diff:.2e}")
    gflops = {k: f"{v / 1e9:,.2f}" for k, v in flops.items()}
    print(f"GFLOP per image: {args.method} step {gflops['train_step']}, VAE encode {gflops['vae_encode']}, "
          f"text encode {gflops['text_encode']}; results: {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
