"""The training benchmark runs each variant as asked, and measures what it says it measures (CPU, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "result.json"
    command = [sys.executable, str(REPO / "bench" / "train_bench.py"), "--steps", "2", "--warmup", "2"]
    run = subprocess.run([*command, "--batch-size", "2", "--out", str(out), *args], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_each_variant_process_gets_the_options_it_was_asked_for(tmp_path: Path) -> None:
    lora = bench(tmp_path / "lora", "--variants", "recipe,stage-fast", "--frozen-precision", "no", "--compile-mode",
                 "max-autotune")  # fmt: skip
    options = lora["results"]["stage-fast"]["options"]
    assert options["method"] == "lora" and options["frozen_precision"] == "no"
    assert options["compile_mode"] == "max-autotune" and options["compile"] is False  # no --compile: mode unused
    full = bench(tmp_path / "full", "--variants", "stage-plain", "--method", "full")
    assert full["results"]["stage-plain"]["options"]["method"] == "full"

    # The FLOP-counting process builds the same step as the stage: its count matches the stage's own, per method.
    for report, variant in ((lora, "stage-fast"), (full, "stage-plain")):
        counted, stage = report["flops_per_image"]["train_step"], report["results"][variant]["stage_flops_per_image"]
        assert stage == pytest.approx(counted, rel=0.05)
    # Speed over the timed steps (after 2 warm-up steps, each variant's losses cover both), as a ratio to the recipe.
    recipe, stage = lora["results"]["recipe"], lora["results"]["stage-fast"]
    assert len(stage["losses"]) == 4 and stage["warmup_steps_seconds"] > 0
    assert stage["speedup_vs_recipe"] == pytest.approx(stage["images_per_s"] / recipe["images_per_s"], abs=0.01)
    # Training the whole UNet computes weight gradients for every layer: more work per image than a LoRA.
    assert full["flops_per_image"]["train_step"] > 1.2 * lora["flops_per_image"]["train_step"]
