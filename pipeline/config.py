"""Typed, validated `params.yaml`.

Loaded once per process into frozen pydantic models that reject unknown keys and wrong types; every error names the
file, the dotted key, its line, and what to do, before any work starts.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.gate import GatePolicy

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _escapes(relative: str) -> bool:
    """Whether a relative path leaves its folder (`../x`, `a/../../x`)."""
    return posixpath.normpath(relative.replace("\\", "/")).split("/")[0] == ".."


class ParamsError(ValueError):
    """`params.yaml` is unusable; the message says where and how to fix it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelParams(_Section):
    model: str = Field(
        description="Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) or local diffusers folder."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of base.model.")


class DataParams(_Section):
    class Bucketing(_Section):
        """Aspect-ratio buckets instead of square crops (as kohya-ss/sd-scripts); train batches by bucket."""

        enabled: bool = False
        target_area: Annotated[int, Field(ge=64)] = 512 * 512
        step: Annotated[int, Field(ge=8)] = 64
        min_side: Annotated[int, Field(ge=8)] = 256
        max_side: Annotated[int, Field(ge=8)] = 1024
        max_ratio: Annotated[float, Field(ge=1)] = 2.0

        @model_validator(mode="after")
        def _has_buckets(self) -> DataParams.Bucketing:
            if self.step % 8:
                raise ValueError(f"step must be a multiple of 8 (the VAE downsamples by 8), got {self.step}")
            if self.enabled:
                self.sizes()  # the same rules prepare applies; its ValueError says what to change
            return self

        def sizes(self) -> list[tuple[int, int]]:
            """The (width, height) buckets these settings give."""
            from pipeline.ingest import bucket_sizes  # lazy: params without bucketing need no image libraries

            return bucket_sizes(self.target_area, self.step, self.min_side, self.max_side, self.max_ratio)

    source: str = Field(description="Raw image-caption folder (imagefolder, kohya sidecars, or a manifest).")
    layout: Literal["auto", "imagefolder", "kohya", "manifest"] = "auto"
    manifest: str | None = Field(
        None, description="CSV/JSONL of paths and captions, relative to data.source, when layout is 'manifest'."
    )
    caption_column: str = "text"
    resolution: Annotated[int, Field(ge=8)] = 64
    crop: Literal["center", "random"] = "center"
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="Share of images in the validation split (early stopping, checkpoint choice, tuning)."
    )
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="Share of images in the test split, read only by evaluate and the gate."
    )
    split_salt: str = "sdft"
    on_invalid: Literal["fail", "skip"] = "skip"
    min_size: Annotated[int, Field(ge=1)] = 32
    max_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    near_duplicate_distance: Annotated[int, Field(ge=0, le=64)] = 0
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    bucketing: Bucketing = Bucketing()
    random_flip: bool = Field(
        False, description="Training-time: mirror each image at random (train reads it; prepare does not)."
    )
    precompute: bool = Field(
        True,
        description="Stage encode: store VAE latents and frozen text conditioning of the prepared data, keyed to "
        "the base model, so train does not re-encode them (data/encoded).",
    )

    @field_validator("source")
    @classmethod
    def _local_folder(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(
                "must be a local folder: a DVC stage cannot depend on a URI. Import it first with "
                f"`dvc import-url {value} data/raw` (later `dvc update data/raw.dvc` fetches new files) "
                "and set data.source: data/raw; see docs/data.md"
            )
        return value

    @field_validator("manifest")
    @classmethod
    def _inside_source(cls, value: str | None) -> str | None:
        # DVC tracks data.source (the prepare stage's dep), not a file elsewhere: a manifest outside it would be read,
        # yet editing it would not re-run prepare.
        if value is not None and (PurePosixPath(value).is_absolute() or os.path.isabs(value) or _escapes(value)):
            raise ValueError(
                "must be a path inside data.source, relative to it: DVC tracks data.source, so a manifest elsewhere "
                "would be read but editing it would not re-run prepare. Move the file into data.source"
            )
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _leaves_train_images(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) + test_fraction ({self.test_fraction}) must be below 1, so that "
                "some images are left to train on; lower one of them"
            )
        return self


class PriorPreservationParams(_Section):
    """DreamBooth prior preservation (Ruiz et al. 2023): also fit images of the subject's class, so it stays known."""

    enabled: bool = False
    class_prompt: str = Field("", description="Prompt of the class, e.g. 'a photo of a dog'.")
    class_images_dir: str | None = Field(None, description="Folder of class images; unset: generate them once.")
    num_class_images: Annotated[int, Field(ge=1)] = 50
    prior_loss_weight: Annotated[float, Field(ge=0)] = 1.0
    num_inference_steps: Annotated[int, Field(ge=1)] = 25

    @model_validator(mode="after")
    def _has_prompt(self) -> PriorPreservationParams:
        if self.enabled and not self.class_prompt.strip():
            raise ValueError("class_prompt is required when prior preservation is enabled (e.g. 'a photo of a dog')")
        return self


# LoRA target presets: module-name suffixes in diffusers' UNet2DConditionModel.
LORA_TARGETS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+ffn": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "attention+ffn+conv": [
        *("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
        *("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"),
    ],
}


class TrainParams(_Section):
    seed: int = 0
    max_steps: Annotated[int, Field(ge=0)] = 200
    batch_size: Annotated[int, Field(ge=1)] = 8
    gradient_accumulation_steps: Annotated[int, Field(ge=1)] = 1
    learning_rate: Annotated[float, Field(ge=0)] = 1e-3
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: Annotated[int, Field(ge=0)] = 0
    optimizer: Literal["adamw", "adamw_fused", "adamw8bit"] = "adamw"
    weight_decay: Annotated[float, Field(ge=0)] = 1e-2
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    method: Literal["lora", "full"] = "lora"
    lora_rank: Annotated[int, Field(ge=1)] = 4
    lora_alpha: Annotated[float, Field(gt=0)] = 4.0
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lora_targets: Literal["attention", "attention+ffn", "attention+ffn+conv"] | list[str] = "attention"
    train_blocks: list[str] = Field(default_factory=list, description="method full: UNet name prefixes to train.")
    train_text_encoder: bool = False
    text_encoder_lr: Annotated[float, Field(ge=0)] | None = None
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    snr_gamma: Annotated[float, Field(gt=0)] | None = None
    noise_offset: Annotated[float, Field(ge=0)] = 0.0
    input_perturbation: Annotated[float, Field(ge=0)] = 0.0
    caption_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    prior_preservation: PriorPreservationParams = PriorPreservationParams()
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    frozen_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="method lora: dtype of the frozen weights (auto: the mixed-precision dtype, fp32 on CPU)."
    )
    log_every: Annotated[int, Field(ge=1)] = 10
    validation_every: Annotated[int, Field(ge=1)] = 25
    validation_timesteps: Annotated[int, Field(ge=1)] = 4
    sample_every: Annotated[int, Field(ge=0)] = Field(
        0, description="Steps between sample-image grids (fixed prompts and seeds); 0: none during training."
    )
    sample_prompts: list[str] = Field(
        default_factory=list, description="Prompts of the sample grids ([]: the first 4 held-out captions)."
    )
    sample_steps: Annotated[int, Field(ge=1)] = 20
    sample_guidance_scale: Annotated[float, Field(ge=1)] = 5.0
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    early_stopping_min_delta: Annotated[float, Field(ge=0)] = 0.0
    checkpoint_every: Annotated[int, Field(ge=0)] = 0
    checkpoints_total_limit: Annotated[int, Field(ge=1)] = 2
    export_kohya: bool = False

    @field_validator("lora_targets")
    @classmethod
    def _targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError(f"give a preset ({', '.join(LORA_TARGETS)}) or a non-empty list of module names")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.train_blocks and self.method != "full":
            raise ValueError("train_blocks applies to method 'full' only; LoRA layers are chosen by lora_targets")
        if self.frozen_precision in ("fp16", "bf16") and self.method != "lora":
            raise ValueError(
                "frozen_precision applies to method 'lora': a full fine-tune saves whole models, so their frozen "
                "blocks stay fp32 (set frozen_precision: auto or no)"
            )
        if self.export_kohya and self.method != "lora":
            raise ValueError("export_kohya exports a LoRA: it needs method 'lora' (full fine-tuning saves unet/)")
        return self

    @property
    def lora_target_modules(self) -> list[str]:
        return LORA_TARGETS[self.lora_targets] if isinstance(self.lora_targets, str) else list(self.lora_targets)


# The shape world's defaults (pipeline/world.py): what the demo fine-tune learns (purple), and what the base model
# already knew (red, green, blue), for forgetting.
DEFAULT_EVAL_PROMPTS = ("a purple circle on a white background", "a purple triangle on a black background")
DEFAULT_GENERAL_PROMPTS = tuple(
    f"a {c} {shape} on a {b} background"
    for c in ("red", "green", "blue")
    for shape in ("circle", "square", "triangle")
    for b in ("white", "black")
)


class SearchDimension(_Section):
    """One tuned `train` key: {type: float, low, high, log} | {type: int, low, high, step} | {type: choice, values}."""

    type: Literal["float", "int", "choice"]
    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: Annotated[int, Field(ge=1)] | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _shape(self) -> SearchDimension:
        if self.type == "choice":
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("type choice takes only `values` (no low, high, log or step)")
            if not self.values:
                raise ValueError("type choice needs a non-empty `values` list, e.g. values: [4, 8, 16]")
            if len({repr(v) for v in self.values}) != len(self.values):
                raise ValueError(f"type choice lists a value twice: {self.values}")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type} takes low and high, not `values` (use type: choice for a list)")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type} needs both `low` and `high`")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low}); a log scale cannot reach 0")
        if self.type == "float" and self.step is not None:
            raise ValueError("type float takes no `step` (use type int, or type choice with the values you want)")
        if self.type == "int":
            if not (isinstance(self.low, int) and isinstance(self.high, int)):
                raise ValueError(f"type int needs whole-number bounds, got low {self.low!r}, high {self.high!r}")
            if self.log and self.step not in (None, 1):
                raise ValueError("type int with log: true cannot take a step other than 1 (optuna's rule)")
        return self

    def candidates(self) -> list[Any]:
        """Every value a grid visits: the choices, or low..high by step (floats have no grid)."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, self.step or 1))
        raise ValueError("a float range has no finite grid")


def _train_field(key: str) -> Any:
    """The pydantic field of a (dotted) `train` key, or None."""
    model: Any = TrainParams
    *parents, leaf = key.split(".")
    for part in parents:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if field is None or not (isinstance(annotation, type) and issubclass(annotation, _Section)):
            return None
        model = annotation
    return model.model_fields.get(leaf)


def _tune_error(at: tuple[str, ...], reason: str) -> PydanticCustomError:
    # The reason travels in the context: a template would read its braces as placeholders.
    return PydanticCustomError("sdft_tune", "{reason}", {"reason": reason, "at": at})


# The search params.yaml ships (keep the two identical): learning rate, LoRA capacity and its dropout.
DEFAULT_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "lora_rank": {"type": "choice", "values": [2, 4, 8, 16]},
    "lora_dropout": {"type": "float", "low": 0.0, "high": 0.3},
}


class TuneParams(_Section):
    """Hyperparameter search over `train` keys (pipeline/tune.py, docs/tuning.md); the stages never read it."""

    enabled: bool = Field(False, description="The retrain flow runs the study before train and applies its best.")
    space: dict[str, SearchDimension] = Field(
        default_factory=lambda: {k: SearchDimension(**v) for k, v in DEFAULT_SPACE.items()}
    )
    n_trials: Annotated[int, Field(ge=1)] = Field(20, description="Trials of the whole study (all workers together).")
    max_minutes: Annotated[float, Field(gt=0)] | None = Field(
        None, description="No new trial once the study's trials have run this many minutes in all (null: no limit)."
    )
    max_total_steps: Annotated[int, Field(ge=1)] | None = Field(
        None, description="No new trial once the study's trials have run this many training steps in all."
    )
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    warmup_checks: Annotated[int, Field(ge=0)] = Field(
        2, description="Validation checks of a trial before it may be pruned."
    )
    startup_trials: Annotated[int, Field(ge=0)] = Field(
        5,
        description="First trials: sampled at random (tpe) and never pruned (median), so later ones have a reference.",
    )
    objective: Literal["best_val_loss", "final_val_loss"] = Field(
        "best_val_loss", description="Minimised: the trial's best held-out validation loss (the weights train keeps)."
    )
    seed: int = 0
    storage: str | None = Field(
        None, description="Optuna storage URL (null: sqlite under .sdft/tune/; a database URL for many machines)."
    )
    study_name: str | None = Field(
        None, description="null: named after what the trials depend on (data, base model, untuned train keys, space)."
    )
    heartbeat_seconds: Annotated[int, Field(ge=1)] = Field(
        60, description="A trial whose worker has been silent for twice this is failed and run again once."
    )

    @field_validator("space")
    @classmethod
    def _known_keys(cls, space: dict[str, SearchDimension]) -> dict[str, SearchDimension]:
        if not space:
            raise _tune_error((), "empty: name at least one train key to search, e.g. learning_rate")
        for key, dim in space.items():
            field = _train_field(key.removeprefix("train."))
            if key.startswith("train."):
                raise _tune_error((key,), f"write the train key without its section: '{key.removeprefix('train.')}'")
            if field is None:
                raise _tune_error(
                    (key,),
                    f"no such key in the train section (tunable keys are train's, e.g. {', '.join(DEFAULT_SPACE)})",
                )
            if dim.type == "float" and field.annotation is not None and "float" not in str(field.annotation):
                raise _tune_error((key,), f"train.{key} does not take fractional values: use type int or choice")
        return space

    @model_validator(mode="after")
    def _grid(self) -> TuneParams:
        if self.sampler == "grid":
            floats = [k for k, d in self.space.items() if d.type == "float"]
            if floats:
                raise _tune_error(
                    ("space", floats[0]),
                    "sampler grid needs a finite set of values: use type choice (values: [...]) or type int",
                )
        return self


class EvaluateParams(_Section):
    seed: int = 1234
    val_timesteps: Annotated[int, Field(ge=1)] = 10
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_PROMPTS), description="Fixed prompts, generated for every model."
    )
    images_per_prompt: Annotated[int, Field(ge=1)] = 2
    num_inference_steps: Annotated[int, Field(ge=1)] = 10
    guidance_scale: Annotated[float, Field(ge=1)] = 5.0
    scheduler: Literal["default", "euler", "dpm++"] = Field(
        "dpm++", description="Sampler for every model: the base model's own, Euler, or DPM-Solver++ (fewer steps)."
    )
    batch_size: Annotated[int, Field(ge=1)] = Field(8, description="Images generated per pipeline call.")
    clip_model: Annotated[str, Field(min_length=1)] = Field(
        "judge",
        description="'judge' (the shipped shape-world tiny CLIP, assets/judges/clip), 'tiny' (random, plumbing "
        "only), a hub id or a local CLIP folder.",
    )
    image_features: Annotated[str, Field(min_length=1)] = Field(
        "judge",
        description="'judge' (the shipped shape-world classifier's features, assets/judges/classifier), 'tiny' "
        "(random, plumbing only), 'inception', 'dinov2', a local transformers vision-model folder, or a local "
        "Inception weights file (.pth).",
    )
    fid_min_n: Annotated[int, Field(ge=2)] = Field(
        2048, description="Below this many real or generated images FID is flagged untrusted_small_n."
    )
    precision_recall_k: Annotated[int, Field(ge=1)] = 3
    density_coverage_k: Annotated[int, Field(ge=1)] = 5
    memorisation_worst: Annotated[int, Field(ge=1)] = Field(
        5, description="Generated images with the most similar training image, listed per model."
    )
    general_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_GENERAL_PROMPTS),
        description="Prompts outside the training data (the base model's own vocabulary), for forgetting: "
        "forgetting_clip_score, and base_adherence_* for those that are shape-world scenes.",
    )
    label_vocabulary: list[str] = Field(
        default_factory=list, description="Class words for zero-shot prompt-adherence accuracy (empty: skipped)."
    )
    label_template: str = "a photo of a {label}"
    # The report's intervals are the gate's: gate.bootstrap_resamples, gate.confidence and gate.seed (REMOVED_KEYS).

    @field_validator("label_template")
    @classmethod
    def _has_label(cls, value: str) -> str:
        if "{label}" not in value:
            raise ValueError(f"must contain '{{label}}' where the class word goes, got {value!r}")
        return value


class RegistryParams(_Section):
    model_name: Annotated[str, Field(min_length=1)] = "sdft"
    # auto: a candidate that passes the gate becomes `champion`; manual: it becomes `challenger`, and a person
    # moves `champion` with `sdft approve` (refused if the champion moved since the comparison).
    approval: Literal["auto", "manual"] = "auto"


class OrchestrationParams(_Section):
    """The Prefect flow around the stages (flows/); no stage reads these, so DVC does not track them."""

    stage_timeout_minutes: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict, description="Per dvc.yaml stage: stop it and fail the retrain after this long."
    )
    lock_wait_minutes: Annotated[float, Field(ge=0)] = 120.0


class NotifyParams(_Section):
    """Messages on promotion, rejection and failure (docs/scheduling.md)."""

    webhook_url: str | None = Field(None, description="POST a JSON message here (Slack-style {'text': ...}).")
    block: str | None = Field(None, description="A Prefect notification block, '<block-type>/<name>'.")
    events: list[Literal["promoted", "rejected", "failed", "skipped"]] = ["promoted", "rejected", "failed"]

    @field_validator("webhook_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("block")
    @classmethod
    def _slug(cls, value: str | None) -> str | None:
        if value is not None and value.count("/") != 1:
            raise ValueError(f"must be '<block-type>/<block-name>' (e.g. slack-webhook/ml-team), got {value!r}")
        return value


class Params(_Section):
    base: BaseModelParams
    data: DataParams
    train: TrainParams
    evaluate: EvaluateParams
    gate: GatePolicy
    registry: RegistryParams
    orchestration: OrchestrationParams = OrchestrationParams()
    notify: NotifyParams = NotifyParams()
    tune: TuneParams = TuneParams()

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        if self.data.layout == "manifest" and not self.data.manifest:
            raise ValueError("data.layout is 'manifest' but data.manifest is not set")
        self._space_fits_train()
        return self

    def _space_fits_train(self) -> None:
        """Every bound and choice of tune.space must be a value this train section accepts for its key."""
        base = self.train.model_dump()
        for key, dim in self.tune.space.items():
            probes = dim.values if dim.type == "choice" else [dim.low, dim.high]
            for value in probes or []:
                try:
                    TrainParams.model_validate(with_key(base, key, value))
                except ValidationError as exc:
                    reason = "; ".join(e["msg"] for e in exc.errors())
                    raise _tune_error(
                        ("tune", "space", key), f"{value!r} is not a valid train.{key} here: {reason}"
                    ) from None


def with_key(train: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of a dumped train section with the (dotted) `key` set to `value`."""
    out = copy.deepcopy(train)
    node = out
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    return out


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Line (1-based) of the YAML node at `loc`, or of its closest existing parent."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


# Keys that existed once, and what replaced them: an old params.yaml gets a sentence saying what to delete.
REMOVED_KEYS = {
    "evaluate.bootstrap_resamples": "gate.bootstrap_resamples",
    "evaluate.confidence": "gate.confidence",
}


def _describe(error: dict[str, Any], path: Path, text: str) -> str:
    loc = tuple(part for part in error["loc"] if part not in ("function-after",))
    loc += tuple((error.get("ctx") or {}).get("at", ()))  # tune.space checks name the key they refuse
    key = ".".join(str(part) for part in loc) or "(top level)"
    line = _line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    if error["type"] == "extra_forbidden" and key in REMOVED_KEYS:
        return (
            f"{where}: '{key}' was removed: the report's intervals and the gate's are one set now, from "
            f"'{REMOVED_KEYS[key]}' (with gate.seed). Delete '{key}' from {path.name}."
        )
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key '{key}'. Remove it, or check its spelling against the documented keys."
    if error["type"] == "missing":
        return f"{where}: missing key '{key}'. Add it (see README, 'params.yaml')."
    if error["type"] == "sdft_tune":
        return f"{where}: '{key}': {error['msg']} (docs/tuning.md)."
    got = "" if "got " in error["msg"] else f" (got {error.get('input')!r})"  # a validator's message may say it
    return f"{where}: '{key}': {error['msg']}{got}."


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML itself keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key '{key}' (first at line {seen[key]}); keep one of the two",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def parse_params(text: str, path: Path) -> Params:
    """Validate YAML text; raise `ParamsError` with every problem listed."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ParamsError(f"{where}: {exc.problem}.") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections (base, data, train, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, path, text) for err in exc.errors()]
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(lines)) from None


def is_remote(uri: str) -> bool:
    return "://" in uri


def check_paths(params: Params, path: Path, root: Path) -> None:
    """Fail early, naming the key, when a local path in `params` does not exist."""
    text = path.read_text()
    problems = []
    source = params.data.source
    if not is_remote(source) and not (root / source).is_dir():
        line = _line_of(text, ("data", "source"))
        problems.append(
            f"{path}:{line}: 'data.source' is {source!r}, which is not a folder under {root}. "
            "Point it at your image-caption folder (run `sdft init` for the embedded demo data)."
        )
    if params.data.manifest and not (root / source / params.data.manifest).is_file():  # relative to the source
        line = _line_of(text, ("data", "manifest"))
        problems.append(f"{path}:{line}: 'data.manifest' is {params.data.manifest!r}, which is not a file in {source}.")
    model = params.base.model
    if (root / model).is_dir() and not (root / model / "model_index.json").is_file():
        line = _line_of(text, ("base", "model"))
        problems.append(
            f"{path}:{line}: 'base.model' is {model!r}, a folder without model_index.json: not a diffusers model. "
            "Point it at a folder saved by `StableDiffusionPipeline.save_pretrained` (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/), or at a hub id."
        )
    elif not (root / model).is_dir() and not _cached_on_hub(model, params.base.revision):
        line = _line_of(text, ("base", "model"))
        problems.append(
            f"{path}:{line}: 'base.model' is {model!r}: no such local folder"
            + (" and not in the Hugging Face cache" if HUB_ID.match(model) else "")
            + ". Run `sdft init` to build the tiny default model, point it at a local diffusers folder, or set "
            "HF_HUB_OFFLINE=0 to download a hub model."
        )
    if problems:
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(problems))


def _cached_on_hub(model: str, revision: str | None) -> bool:
    if not HUB_ID.match(model):
        return False
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True"):
        return True  # online: from_pretrained will download it
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "model_index.json", revision=revision), str)


def resolve_model(params: Params, root: Path) -> str:
    """`base.model` as from_pretrained wants it: an absolute folder when local, else the hub id."""
    local = root / params.base.model
    return str(local.resolve()) if local.is_dir() else params.base.model


def load_params(path: str | Path = "params.yaml", *, paths: bool = True) -> Params:
    """Read and validate `params.yaml`; with `paths`, also check the local paths it names exist."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file. Run sdft from the project folder, or pass --params.")
    params = parse_params(path.read_text(), path)
    if paths:
        check_paths(params, path, path.resolve().parent)
    return params
