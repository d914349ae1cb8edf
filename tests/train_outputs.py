"""Real train outputs for evaluate and registry tests: a few steps of `pipeline.train.train` on a tiny base, saved
with `save_adapter` exactly as the train stage saves them (weights + training.json).

Not a test module: imported by tests/test_evaluate_outputs.py and tests/test_registry_outputs.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import TrainParams
from pipeline.diffusion import load_components, read_split
from pipeline.train import TrainResult, save_adapter, train

# Validation settings equal to the evaluate params of tests/test_evaluate.py (seed, val_timesteps), so the train
# stage's validation loss and evaluate's are the same computation on the same held-out set.
VAL_SEED, VAL_TIMESTEPS = 1234, 2


def train_output(base: Path, prepared: Path, out: Path, **overrides: Any) -> TrainResult:
    """Train `overrides` (method, prediction_type, ...) for 3 steps on `prepared` and save the output to `out`."""
    settings = {
        "seed": VAL_SEED,
        "max_steps": 3,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "validation_every": 1,
        "validation_timesteps": VAL_TIMESTEPS,
        "log_every": 1,
    }
    params = TrainParams(**(settings | overrides))
    splits = read_split(prepared / "train"), read_split(prepared / "validation")
    result = train(load_components(str(base)), *splits, params)
    save_adapter(result, out, {"base_model": str(base), "base_revision": None})
    return result
