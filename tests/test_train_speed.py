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
