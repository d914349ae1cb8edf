"""What the train stage wrote, and how to turn it and its base model into a generating pipeline.

Shared by `evaluate` (the candidate, and a champion re-evaluated from the registry), the registry's pyfunc model
(`pipeline.pyfunc_model`, for what `mlflow.diffusers` cannot log) and `lineage` (which files hold the weights).
Standard library only at module level and no other `pipeline` import: the registry ships this file with a logged
model (MLflow `code_paths`), so a machine that serves it needs no sdft checkout.

A train output folder (`python -m pipeline.train ... --out models/adapter`) holds, written atomically:
- method `lora`: `pytorch_lora_weights.safetensors` (diffusers LoRA format: `unet`, and for SDXL possibly
  `text_encoder`/`text_encoder_2` keys);
- method `full`: the changed sub-models in the diffusers layout (`unet/`, and `text_encoder/`, `text_encoder_2/`
  when the text encoders trained), each loadable with `<Class>.from_pretrained(folder, subfolder=name)`;
- `training.json`: format_version, method, architecture (sd | sdxl), prediction_type (what the UNet was trained to
  predict, which can differ from the base scheduler's), trained, base_model, base_revision.
A folder without `training.json` (adapters from before it existed) is an SD LoRA used with the base scheduler.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINING_FILE = "training.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
SUBMODELS = ("unet", "text_encoder", "text_encoder_2")
METHODS = ("lora", "full")
ARCHITECTURES = ("sd", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
FORMAT_VERSION = 1
FIX = "run the train stage again (`dvc repro train`)"


class OutputError(ValueError):
    """A train output folder that is missing, incomplete or unreadable (the message names it and the fix)."""


@dataclass(frozen=True)
class TrainOutput:
    folder: Path
    method: str  # "lora" or "full"
    architecture: str | None  # "sd" or "sdxl"; None for an older output (no training.json)
    prediction_type: str | None  # what the UNet predicts; None: the base scheduler's (older output)
    trained: tuple[str, ...]  # sub-models that changed
    base_model: str | None = None
    base_revision: str | None = None

    def describe(self) -> dict[str, Any]:
        """The facts a report or a registry tag needs (no paths)."""
        return {
            "method": self.method,
            "architecture": self.architecture,
            "prediction_type": self.prediction_type,
            "trained": list(self.trained),
            "has_training_json": self.architecture is not None,
        }


def read_output(folder: Path | str) -> TrainOutput:
    """Read and check a train output folder; OutputError names the folder, what is wrong and the fix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise OutputError(f"no train output at {folder}: the folder does not exist; {FIX}.")
    info_file = folder / TRAINING_FILE
    if not info_file.is_file():
        if (folder / LORA_FILE).is_file():
            return TrainOutput(folder, "lora", None, None, ("unet",))
        raise OutputError(
            f"{folder} is not a train output: it holds neither {TRAINING_FILE} nor {LORA_FILE} (an interrupted or "
            f"foreign folder?); {FIX}."
        )
    try:
        info = json.loads(info_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{info_file} is unreadable ({exc}); {FIX}.") from exc
    if not isinstance(info, dict):
        raise OutputError(f"{info_file} must hold a JSON object, not {type(info).__name__}; {FIX}.")
    if info.get("format_version") != FORMAT_VERSION:
        raise OutputError(
            f"{info_file}: format_version {info.get('format_version')!r} is not one this code reads "
            f"({FORMAT_VERSION}); update sdft, or {FIX}."
        )
    for key, allowed in (("method", METHODS), ("architecture", ARCHITECTURES), ("prediction_type", PREDICTION_TYPES)):
        if info.get(key) not in allowed:
            raise OutputError(f"{info_file}: {key} is {info.get(key)!r}, expected one of {list(allowed)}; {FIX}.")
    trained = info.get("trained")
    if not isinstance(trained, list) or not trained or any(name not in SUBMODELS for name in trained):
        raise OutputError(
            f"{info_file}: trained is {trained!r}, expected a non-empty list of {list(SUBMODELS)}; {FIX}."
        )
    if info["architecture"] == "sd" and "text_encoder_2" in trained:
        raise OutputError(f"{info_file}: an 'sd' output cannot have trained text_encoder_2 (SDXL only); {FIX}.")
    output = TrainOutput(
        folder,
        info["method"],
        info["architecture"],
        info["prediction_type"],
        tuple(trained),
        info.get("base_model"),
        info.get("base_revision"),
    )
    if output.method == "lora" and not (folder / LORA_FILE).is_file():
        raise OutputError(f"{folder}: {TRAINING_FILE} says method lora but {LORA_FILE} is missing; {FIX}.")
    if output.method == "full":
        missing = [name for name in output.trained if not (folder / name / "config.json").is_file()]
        if missing:
            raise OutputError(
                f"{folder}: {TRAINING_FILE} says method full but {', '.join(f'{m}/' for m in missing)} "
                f"(config.json and weights) is missing; {FIX}."
            )
    return output


def weight_files(output: TrainOutput) -> list[Path]:
    """The safetensors files holding the trained weights, sorted by their path relative to the folder.

    LoRA (and older outputs): the top-level files, as before (the LoRA and, with train.export_kohya, its kohya copy).
    Full: each trained sub-model's weights (`unet/diffusion_pytorch_model.safetensors`, ...).
    """
    if output.method == "lora":
        return sorted(output.folder.glob("*.safetensors"))
    files = [f for name in output.trained for f in (output.folder / name).glob("*.safetensors")]
    return sorted(files, key=lambda f: f.relative_to(output.folder).as_posix())


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def load_base(model: str, revision: str | None = None, **kwargs: Any) -> Any:
    """The base model as a pipeline of the class its `model_index.json` names (SD 1.x/2.x or SDXL alike).

    SD pipelines list a safety checker; it is turned off (evaluation and the tiny models have none)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(model, revision=revision)
    if "safety_checker" in index:
        kwargs = {"safety_checker": None, "requires_safety_checker": False} | kwargs
    pipe = DiffusionPipeline.from_pretrained(model, revision=revision, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def architecture_of(pipe: Any) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def check_base(pipe: Any, output: TrainOutput) -> None:
    """OutputError when the output was trained on another architecture than the loaded base model's.

    A full fine-tune's UNet says what it is (SDXL's has the "text_time" added embedding); for a LoRA, training.json
    is the record.
    """
    base, trained_on = architecture_of(pipe), output.architecture
    if output.method == "full" and "unet" in output.trained:
        config = json.loads((output.folder / "unet" / "config.json").read_text())
        trained_on = "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"
    if trained_on and trained_on != base:
        raise OutputError(
            f"{output.folder} was trained on an {trained_on!r} base ({output.base_model}), but the base model loaded "
            f"is {base!r}: point base.model (or --base-model) at the model it was trained on, or {FIX}."
        )


def apply_output(pipe: Any, output: TrainOutput, fuse: bool = True) -> Any:
    """Turn the base pipeline into the trained model, in place, and return it.

    LoRA: `load_lora_weights`, through `diffusion.load_lora` for text-encoder LoRA on stacks whose transformers
    refuses the installed peft (+ `fuse_lora`: the same function, without LoRA's extra matmuls). Full: the trained
    sub-models replace the base's. Then the scheduler predicts what the UNet was trained to predict: a base's own
    scheduler says epsilon, but a UNet trained with `train.prediction_type: v_prediction` outputs velocity, and
    sampling it as noise gives garbage. The base model is evaluated before this is called, so it keeps its own.
    """
    check_base(pipe, output)
    if output.method == "lora":
        from pipeline.diffusion import load_lora

        load_lora(pipe, output.folder, weight_name=LORA_FILE)
        if fuse:
            pipe.fuse_lora()
    else:
        for name in output.trained:
            current = getattr(pipe, name, None)
            if current is None:
                raise OutputError(f"{output.folder}/{name}/ was trained, but the base pipeline has no {name}.")
            # safetensors only: an output pulled back from the registry is never unpickled.
            model = type(current).from_pretrained(
                str(output.folder), subfolder=name, torch_dtype=current.dtype, use_safetensors=True
            )
            model.requires_grad_(False)
            model.eval()
            setattr(pipe, name, model.to(current.device))
    if output.prediction_type and output.prediction_type != pipe.scheduler.config.prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=output.prediction_type)
    return pipe


def load_trained(output: TrainOutput, base_model: str, revision: str | None = None, **kwargs: Any) -> Any:
    """The base model with the train output applied: what the registry serves and evaluate measures."""
    return apply_output(load_base(base_model, revision, **kwargs), output)
