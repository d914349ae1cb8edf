"""Training checkpoints: everything needed to resume a run exactly, in safetensors and JSON only.

A checkpoint is a folder `<checkpoints>/step-000050/` holding
- `tensors.safetensors`: trained weights, optimizer state (flattened), EMA and best-so-far weights, RNG tensors;
- `state.json`: step, counters, history, scheduler state, optimizer hyper-parameters, RNG states, and the run's
  fingerprint (a hash of the train params, the base model and the prepared data).
It is written to a temporary sibling and renamed, so a killed run leaves either a whole checkpoint or none. Nothing
is ever unpickled: a checkpoint folder may come from anywhere (a shared cache, a DVC remote).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d{6,})$")
TENSORS = "tensors.safetensors"
STATE = "state.json"
# Settings that change how often a run is saved or logged, never what it computes: a run that only differs in these
# may resume from the other's checkpoint.
BOOKKEEPING_PARAMS = ("checkpoint_every", "checkpoints_total_limit", "export_kohya", "log_every")


def fingerprint(train_params: dict[str, Any], base_model: str, data: dict[str, Any]) -> str:
    """Identity of a run: only a checkpoint with the same fingerprint is resumed."""
    params = {k: v for k, v in train_params.items() if k not in BOOKKEEPING_PARAMS}
    payload = {"train": params, "base": base_model, "data": data}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first (temporary folders of an interrupted write are skipped)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the path and the free space."""


def load_newest(folder: Path, run_fingerprint: str) -> tuple[Checkpoint | None, str, list[str]]:
    """The newest intact checkpoint of this run, the sentence saying what happens, and one line per damaged checkpoint
    skipped on the way (a truncated or corrupt file, e.g. from a full disk or a copy cut short): an older intact one
    is used instead, so one bad checkpoint does not block every later run."""
    dirs = step_dirs(folder)
    if not dirs:
        return None, f"no checkpoint in {folder}", []
    skipped: list[str] = []
    ours = 0
    for _, path in reversed(dirs):
        try:
            state = json.loads((path / STATE).read_text())
        except (OSError, ValueError) as exc:
            skipped.append(f"skipped damaged checkpoint {path}: {STATE} unreadable ({type(exc).__name__}: {exc})")
            continue
        if not isinstance(state, dict) or state.get("fingerprint") != run_fingerprint:
            continue
        ours += 1
        try:
            return load(path), f"resuming from {path}", skipped
        except Exception as exc:  # safetensors raises its own SafetensorError; also OSError, KeyError, ValueError
            skipped.append(f"skipped damaged checkpoint {path}: {TENSORS} unreadable ({type(exc).__name__}: {exc})")
    if ours:
        return None, f"no intact checkpoint of this run in {folder}", skipped
    return (
        None,
        (
            f"the {len(dirs)} checkpoint(s) in {folder} come from different train params, base model or data "
            "(fingerprint mismatch)"
        ),
        skipped,
    )


def save(
    folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], keep: int, run_fingerprint: str
) -> Path:
    """Write `step-<step>/` atomically, then keep only the newest `keep` checkpoints of this run.

    A failed write (a full disk) removes its partial folder and raises CheckpointWriteError naming the path and the
    free space; the checkpoints written before stay.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    partial = folder / f".step-{step:06d}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial / TENSORS))
        (partial / STATE).write_text(json.dumps(state | {"step": step, "fingerprint": run_fingerprint}))
        for file in (partial / TENSORS, partial / STATE):
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        free = shutil.disk_usage(folder).free
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        raise CheckpointWriteError(
            exc.errno,
            f"could not write checkpoint {final} ({exc.strerror or exc}); {free / 2**20:.1f} MiB free on that disk, "
            f"the checkpoint needs about {size / 2**20:.1f} MiB. The partial write was removed; earlier checkpoints "
            "are intact. Free space there, lower train.checkpoints_total_limit or pass another --checkpoints folder.",
        ) from exc
    if final.exists():  # the same step of the same run, written again after a resume: identical content
        shutil.rmtree(final)
    partial.rename(final)
    for _, old in step_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    state = json.loads((path / STATE).read_text())
    return Checkpoint(path=path, step=int(state["step"]), tensors=load_file(str(path / TENSORS)), state=state)


def clear(folder: Path) -> None:
    """Remove every checkpoint and leftover partial write in `folder` (checkpoints of another run)."""
    for _, path in step_dirs(folder):
        shutil.rmtree(path, ignore_errors=True)
    if folder.is_dir():
        for path in folder.glob(".step-*.partial-*"):
            shutil.rmtree(path, ignore_errors=True)


# --- optimizer state as tensors + JSON -------------------------------------------------------------------------


def flatten_optimizer(state_dict: dict[str, Any], prefix: str = "optimizer.") -> tuple[dict[str, torch.Tensor], dict]:
    """`optimizer.state_dict()` -> (tensors named `<prefix><param index>.<key>`, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optimizer.") -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            index, key = name[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --- random number generators ------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The run's own generator (batches, noise, timesteps), torch's global one (LoRA dropout), Python's, NumPy's."""
    tensors = {"rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": _jsonable(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def set_rng_state(generator: torch.Generator, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value
