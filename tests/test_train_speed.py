"""Speed settings change how fast training runs, never what it computes."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.config import ParamsError
from pipeline.diffusion import load_components
from pipeline.train import train
from tests.test_train import assert_same_training, prepared, splits, tp  # noqa: F401  (fixtures)


def _lora(tiny_model: Path, splits, **kw) -> dict[str, torch.Tensor]:  # noqa: F811
    return train(load_components(str(tiny_model)), *splits, tp(max_steps=2, validation_every=2, **kw)).lora_state


def test_checkpointing_channels_last_and_fused_adamw_keep_the_numbers(tiny_model: Path, splits) -> None:  # noqa: F811
    plain = _lora(tiny_model, splits)
    fast = _lora(tiny_model, splits, gradient_checkpointing=True, channels_last=True, optimizer="adamw_fused")
    assert_same_training(fast, plain, lr=tp().learning_rate, steps=2)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_adamw8bit_without_bitsandbytes_says_what_to_do(tiny_model: Path, splits) -> None:  # noqa: F811
    with pytest.raises(ParamsError, match="bitsandbytes is not installed"):
        _lora(tiny_model, splits, optimizer="adamw8bit")


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler"
)
def test_compiled_unet_trains_to_the_same_weights(tiny_model: Path, splits) -> None:  # noqa: F811
    plain = _lora(tiny_model, splits)
    compiled = _lora(tiny_model, splits, compile=True)
    assert_same_training(compiled, plain, lr=tp().learning_rate, steps=2)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="torch.compile needs a C compiler"
)
def test_compiled_graphs_are_cached_for_the_next_run(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:  # noqa: F811
    import json
    import os
    import subprocess
    import sys

    from tests.test_train import REPO, write_params

    params = write_params(tmp_path, tiny_model, prepared, max_steps=2, batch_size=4, compile=True, sample_every=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR")}
    cache = tmp_path / ".sdft" / "compile-cache"

    def run(n: int) -> tuple[set[Path], dict]:
        out, report = tmp_path / f"out{n}", tmp_path / f"report{n}"
        cmd = [sys.executable, "-m", "pipeline.train", "--params", str(params), "--prepared", str(prepared)]
        done = subprocess.run(
            [*cmd, "--out", str(out), "--report", str(report)], env=env, cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return {p for p in cache.rglob("*") if p.is_file()}, json.loads((report / "summary.json").read_text())

    first, summary = run(1)
    assert first, "the first compiled run wrote nothing to .sdft/compile-cache"
    assert summary["cost"]["first_step_seconds"] > 0 and "warmup_seconds" in summary["cost"]
    second, _ = run(2)
    # Same model, shapes and code: the second process finds every compiled graph and writes no new one.
    fx_graphs = lambda files: {p for p in files if "fxgraph" in p.parts}  # noqa: E731
    assert fx_graphs(first) and fx_graphs(second) == fx_graphs(first)


def test_channels_last_with_frozen_leading_blocks_trains_on_cpu(tiny_model: Path, splits, capsys) -> None:  # noqa: F811
    # torch's CPU GroupNorm backward crashes the process on channels-last inputs that need no gradient: train skips the
    # layout there (a GPU optimisation) rather than dying, and says so.
    params = tp(max_steps=2, validation_every=2, method="full", train_blocks=["up_blocks.1"], channels_last=True)
    result = train(load_components(str(tiny_model)), *splits, params)
    assert result.steps == 2 and "channels_last is skipped on the CPU" in capsys.readouterr().out
