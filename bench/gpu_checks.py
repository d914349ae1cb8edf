"""Does every stage and training option run on the GPU? The tiny models, a few steps each (2 minutes on 2 CPUs).

    python bench/gpu_checks.py                 # on a GPU machine (bench/gpu.sh checks runs it with the wheels)
    python bench/gpu_checks.py --device cpu    # the same checks on the CPU

The test suite runs on CPUs, where every tensor is on one device; this runs the same code where the models are on a
GPU and the draws, the files read and the generators' noise start on the host, which is where device mix-ups and
hidden host syncs show. It checks:

- training in process, one run per group of options (LoRA and full fine-tuning, SD and SDXL, text-encoder LoRA,
  min-SNR, offset noise, input perturbation, caption dropout, random flips, v-prediction, EMA, gradient accumulation,
  buckets of two sizes, fp16 with loss scaling, gradient checkpointing, channels-last, compile, sample grids,
  checkpoint and resume);
- host syncs per training step, counted with `torch.cuda.set_sync_debug_mode` as the difference between a long and a
  short run (so setup, validation and the final save cancel out), with the lines they come from;
- the stage commands in a scratch project: prepare, encode, train (reading the encoded inputs, class images for prior
  preservation generated on the GPU), evaluate.

It prints one line per check (ok or FAIL, seconds, detail), writes `gpu_checks.json` to $OUT (or bench/results), and
exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.train_bench import synthetic_split  # noqa: E402
from pipeline import env  # noqa: E402

# Each group of options trains for a few steps; together they cover every option that moves tensors between devices.
TRAIN_GROUPS: dict[str, dict[str, Any]] = {
    "lora (defaults)": {},
    "lora: snr, offset noise, perturbation, caption dropout, flips": {
        "snr_gamma": 5.0, "noise_offset": 0.05, "input_perturbation": 0.1, "caption_dropout": 0.3, "_flip": True,
    },
    "lora: v-prediction, EMA, accumulation 2, dropout": {
        "prediction_type": "v_prediction", "ema_decay": 0.9, "gradient_accumulation_steps": 2, "lora_dropout": 0.1,
    },
    "lora + text-encoder lora": {"train_text_encoder": True},
    "full: one block, checkpointing, channels-last, fused AdamW": {
        "method": "full", "train_blocks": ["up_blocks.1"], "gradient_checkpointing": True, "channels_last": True,
        "optimizer": "adamw_fused",
    },
    "lora: fp16 (loss scaling)": {"mixed_precision": "fp16", "_gpu_only": True},
    "lora: buckets of two sizes": {"_buckets": True},
    "lora: sample grids, checkpoint, resume": {"sample_every": 2, "_resume": True},
    "lora: compile": {"compile": True},
    "lora: compile reduce-overhead (CUDA graphs)": {"compile": True, "compile_mode": "reduce-overhead"},
    "sdxl lora + text-encoder lora": {"_sdxl": True, "train_text_encoder": True},
}  # fmt: skip


class SyncCounter:
    """Host syncs by source line, from the warnings `torch.cuda.set_sync_debug_mode("warn")` emits."""

    def __enter__(self) -> collections.Counter:
        self.counts: collections.Counter = collections.Counter()
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self.counts

    def __exit__(self, *exc: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        for w in self._records:
            if "synchroniz" in str(w.message):
                self.counts[f"{Path(w.filename).name}:{w.lineno}"] += 1
        self._catch.__exit__(*exc)


def train_once(models: dict[str, Path], options: dict[str, Any], steps: int, work: Path) -> Any:
    from pipeline.config import TrainParams
    from pipeline.diffusion import load_components
    from pipeline.train import train

    options = dict(options)
    sdxl, flip, buckets, resume = (options.pop(k, False) for k in ("_sdxl", "_flip", "_buckets", "_resume"))
    if options.pop("_gpu_only", False) and not torch.cuda.is_available():
        return {"skipped": "needs a GPU"}
    sizes = [(64, 64), (64, 96)] if buckets else [(64, 64)]
    train_split, val_split = synthetic_split(8, sizes, seed=0), synthetic_split(4, sizes, seed=1)
    base = dict(max_steps=steps, batch_size=2, learning_rate=1e-3, validation_every=2, validation_timesteps=2)
    params = TrainParams(**(base | ({"checkpoint_every": 2} if resume else {}) | options))
    components = load_components(str(models["sdxl" if sdxl else "sd"]))
    checkpoints = work / "checkpoints" if resume else None
    result = train(components, train_split, val_split, params, checkpoints=checkpoints, random_flip=flip)
    if resume:  # a longer run picks up from the last checkpoint of the first
        longer = params.model_copy(update={"max_steps": steps + 2})
        result = train(load_components(str(models["sd"])), train_split, val_split, longer, checkpoints=checkpoints)
        assert result.resumed_from_step == steps, f"resumed from {result.resumed_from_step}, expected {steps}"
    losses = [row["train_loss"] for row in result.history if "train_loss" in row]
    assert losses and all(map(lambda x: x == x and abs(x) < 1e4, losses)), f"training losses {losses}"
    return result


def host_syncs_per_step(models: dict[str, Path], work: Path) -> dict[str, Any]:
    """Syncs of 12 more steps, per step: the same run at 4 and 16 steps (one log and one validation each)."""
    counts = {}
    for steps in (4, 16):
        options = {"log_every": 100, "validation_every": 1000}
        with SyncCounter() as counted:
            train_once(models, options, steps, work)
        counts[steps] = counted
    extra = counts[16] - counts[4]  # Counter subtraction keeps the lines that synced more often in the longer run
    return {"per_step": round(sum(extra.values()) / 12, 2), "lines": dict(extra.most_common(6))}


def run_stage(project: Path, *args: str) -> None:
    env_vars = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", *args], cwd=project, env=env_vars, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed:\n{(out.stderr or out.stdout)[-2500:]}")


def stage_chain(models: dict[str, Path], work: Path, prior: bool) -> None:
    """prepare → encode → train (encoded inputs; with `prior`, class images generated first) → evaluate."""
    project = work / ("project-prior" if prior else "project")
    project.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["model"] = str(models["sd"])
    params["data"]["source"] = str(REPO / "data" / "demo")
    params["train"] |= {"max_steps": 6, "validation_every": 3, "sample_every": 3, "batch_size": 4}
    if prior:
        params["train"]["prior_preservation"] |= {"enabled": True, "num_class_images": 4, "class_prompt": "a shape"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = ["--params", "params.yaml"]
    run_stage(project, "pipeline.prepare", *p, "--source", str(REPO / "data" / "demo"), "--out", "data/prepared",
              "--report", "reports/data_validation.json", "--summary", "reports/data")  # fmt: skip
    run_stage(project, "pipeline.encode", *p, "--prepared", "data/prepared", "--out", "data/encoded")
    run_stage(project, "pipeline.train", *p, "--prepared", "data/prepared", "--encoded", "data/encoded", "--out",
              "models/adapter", "--report", "reports/train", "--class-images", "models/class_images")  # fmt: skip
    if not prior:
        run_stage(project, "pipeline.evaluate", *p, "--prepared", "data/prepared", "--adapter", "models/adapter",
                  "--out", "reports/eval", "--metrics", "reports/metrics.json")  # fmt: skip
        metrics = json.loads((project / "reports" / "metrics.json").read_text())
        assert metrics, "evaluate wrote an empty reports/metrics.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", help="run only the checks whose name contains this text")
    args = parser.parse_args()
    env.configure()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # accelerate and the stages pick the CPU
        os.environ["SDFT_DEVICE"] = "cpu"
    from pipeline.tiny import build_tiny_sd, build_tiny_sdxl

    work = Path(tempfile.mkdtemp(prefix="sdft-gpu-checks-"))
    models = {"sd": build_tiny_sd(work / "tiny-sd"), "sdxl": build_tiny_sdxl(work / "tiny-sdxl")}
    checks: dict[str, Callable[[Path], Any]] = {
        f"train: {name}": (lambda w, o=options: train_once(models, o, 4, w)) for name, options in TRAIN_GROUPS.items()
    }
    checks["host syncs per training step"] = lambda w: host_syncs_per_step(models, w)
    checks["stages: prepare, encode, train, evaluate"] = lambda w: stage_chain(models, w, prior=False)
    checks["stages: train with prior preservation"] = lambda w: stage_chain(models, w, prior=True)

    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gpu checks on {device}, torch {torch.__version__}; scratch: {work}", flush=True)
    results = []
    for i, (name, check) in enumerate(checks.items()):
        if args.only and args.only not in name:
            continue
        start, detail, ok = time.perf_counter(), "", True
        try:
            value = check(work / f"check-{i}")
            detail = json.dumps(value) if isinstance(value, dict) else ""
        except Exception as exc:  # report every failure, then go on with the other checks
            ok, detail = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        seconds = time.perf_counter() - start
        results.append({"check": name, "ok": ok, "seconds": round(seconds, 1), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {seconds:6.1f} s  {name}  {detail[:300]}", flush=True)

    out = Path(os.environ.get("OUT", REPO / "bench" / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_checks.json").write_text(json.dumps({"device": device, "results": results}, indent=2) + "\n")
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed on {device}" + (
        f"; failed: {', '.join(failed)}" if failed else ""))  # fmt: skip
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
