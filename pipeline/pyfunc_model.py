"""The registry's MLflow pyfunc model for the train outputs that the `mlflow.diffusers` flavor cannot log.

Why not the built-in flavor: `mlflow.diffusers` logs a LoRA adapter only (`adapter_type` must be "lora": one
safetensors file applied with `load_lora_weights`), so a full fine-tune's `unet/` (and text-encoder) folders have no
place in it; and its pyfunc samples with the base model's own scheduler, so a LoRA trained for another prediction
type (`train.prediction_type`) would be served wrong. This model keeps that flavor's contract:
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(pd.DataFrame({"prompt": [...]}),
params={"num_inference_steps": ..., "guidance_scale": ..., "height": ..., "width": ..., "negative_prompt": ...})`
returns one PNG (bytes) per prompt, and `model_config={"base_model": "<hub id or folder>"}` at load time points at a
base model that has moved.

Logged by `pipeline.registry` with the train output folder as the artifact `train_output`, the base-model reference
in the model config, and this file and `candidate.py` as code (no other sdft module is needed to serve it).
"""

from __future__ import annotations

import io
from typing import Any

from mlflow.pyfunc import PythonModel

from pipeline import candidate

ARTIFACT = "train_output"
# The generation parameters the diffusers flavor's pyfunc passes on to the pipeline (mlflow/diffusers/wrapper.py).
PARAM_KEYS = ("num_inference_steps", "guidance_scale", "height", "width", "negative_prompt")


class TrainedPipeline(PythonModel):
    """A base model plus a train output (full fine-tune, or LoRA): `predict` generates from prompts."""

    def load_context(self, context: Any) -> None:
        from pipeline.diffusion import compute_device

        config = dict(context.model_config or {})
        output = candidate.read_output(context.artifacts[ARTIFACT])
        pipe = candidate.load_trained(output, config["base_model"], config.get("base_revision"))
        self.pipe = pipe.to(config.get("device") or compute_device())  # model_config's device, else SDFT_DEVICE

    # No type hint on model_input: MLflow would read one as an input schema; the logged signature is the schema.
    def predict(self, context: Any, model_input, params: dict[str, Any] | None = None) -> list[bytes]:  # noqa: ANN001
        prompts = prompts_of(model_input)
        kwargs = {k: v for k, v in (params or {}).items() if k in PARAM_KEYS}
        if kwargs.get("negative_prompt") == "":
            del kwargs["negative_prompt"]  # the signature's default: the pipeline's own
        images = self.pipe(prompt=prompts, **kwargs).images
        out = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.append(buffer.getvalue())
        return out


def prompts_of(data: Any) -> list[str]:
    """Prompts from what pyfunc passes after schema enforcement: a DataFrame with a `prompt` column (cells may be
    lists), a dict, a list or a string."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if "prompt" not in data.columns and len(data.columns) != 1:
            raise ValueError(f"the input needs a 'prompt' column; got columns {list(data.columns)}")
        values = (data["prompt"] if "prompt" in data.columns else data.iloc[:, 0]).tolist()
    elif isinstance(data, dict):
        if "prompt" not in data:
            raise ValueError(f"the input needs a 'prompt' key; got keys {list(data)}")
        values = data["prompt"] if isinstance(data["prompt"], list) else [data["prompt"]]
    elif isinstance(data, str):
        values = [data]
    else:
        values = list(data)
    prompts = [p for v in values for p in (v if isinstance(v, list) else [v])]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return prompts
