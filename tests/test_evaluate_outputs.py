"""The evaluate stage on every kind of train output: SDXL LoRA, SD full fine-tune, and a LoRA trained for
v-prediction on an epsilon base; and the errors for a missing, unreadable or mismatched output.

Each output is trained for a few real steps (`pipeline.train.train` + `save_adapter`). Train's validation loss and
evaluate's use the same seed and timesteps on the same held-out images, so evaluate must reproduce train's numbers:
the untuned base gives train's initial loss, the candidate its best loss. That checks the SDXL conditioning, that a
full fine-tune's sub-models replaced the base's, and that the candidate's loss target is its trained prediction type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import candidate, evaluate
from pipeline.diffusion import encode_conditioning, encode_images, fixed_validation_loss, read_split
from pipeline.train import TrainResult
from tests.test_evaluate import RESOLUTION, TRAIN, VALIDATION, _write_split, one_thread, write_params  # noqa: F401
from tests.train_outputs import VAL_SEED, VAL_TIMESTEPS, train_output


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs-prepared")
    _write_split(root / "validation", VALIDATION, seed=1)
    _write_split(root / "train", TRAIN, seed=2)
    # Train validates on `validation`, evaluate measures on `test`: the same images in both, so that evaluate can be
    # checked against train's numbers (the real splits are disjoint).
    shutil.copytree(root / "validation", root / "test")
    return root


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def run_evaluate(tmp: Path, base: Path, prepared: Path, output: Path, *extra: str) -> tuple[int, dict, dict]:
    """evaluate.main on `output`: (exit code, metrics.json, samples.json)."""
    params = write_params(tmp, base, {"val_timesteps": VAL_TIMESTEPS, "seed": VAL_SEED})
    args = ["--params", str(params), "--prepared", str(prepared), "--adapter", str(output), "--out", str(tmp / "eval")]
    code = evaluate.main([*args, *extra])
    if code != 0:
        return code, {}, {}
    return (
        code,
        json.loads((tmp / "eval" / "metrics.json").read_text()),
        json.loads((tmp / "eval" / "samples.json").read_text()),
    )


def assert_reproduces_training(samples: dict, result: TrainResult, base: bool = True) -> None:
    if base:
        assert np.mean(samples["base"]["val_loss"]) == pytest.approx(result.initial_val_loss, rel=1e-5)
    # Fused LoRA and unfused agree to ~1e-6; a full fine-tune's saved weights are the trained ones.
    assert np.mean(samples["candidate"]["val_loss"]) == pytest.approx(result.best_val_loss, rel=1e-4)


def test_sdxl_lora(tmp_path: Path, tiny_sdxl: Path, prepared: Path) -> None:
    # Attention alone does not lower the random tiny SDXL's loss in a few steps; with the FFN and convolutions it does.
    result = train_output(tiny_sdxl, prepared, tmp_path / "adapter", lora_targets="attention+ffn+conv")
    assert result.best_step > 0  # the LoRA changed the model, so base and candidate must differ
    code, summary, samples = run_evaluate(tmp_path, tiny_sdxl, prepared, tmp_path / "adapter")
    assert code == 0
    models = summary["evaluation"]["models"]
    assert models["base"] == {"method": "none", "architecture": "sdxl", "prediction_type": "epsilon"}
    assert models["candidate"]["method"] == "lora" and models["candidate"]["architecture"] == "sdxl"
    assert_reproduces_training(samples, result)
    assert samples["candidate"]["val_loss"] != samples["base"]["val_loss"]
    assert summary["evaluation"]["n_generated_per_model"] == 8
    assert len(list((tmp_path / "eval" / "images" / "candidate").glob("[0-9]*.png"))) == 8


def test_sd_full_fine_tune(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:
    result = train_output(tiny_model, prepared, tmp_path / "full", method="full", learning_rate=1e-3)
    assert result.best_step > 0
    assert (tmp_path / "full" / "unet" / "config.json").is_file()
    assert not (tmp_path / "full" / candidate.LORA_FILE).exists()
    code, summary, samples = run_evaluate(tmp_path, tiny_model, prepared, tmp_path / "full")
    assert code == 0
    assert summary["evaluation"]["models"]["candidate"]["method"] == "full"
    assert summary["evaluation"]["models"]["candidate"]["trained"] == ["unet"]
    assert_reproduces_training(samples, result)
    assert summary["candidate"]["clip_score"] != summary["base"]["clip_score"]  # generation used the new UNet


@pytest.fixture(scope="module")
def v_lora(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, prepared: Path) -> tuple[Path, TrainResult]:
    out = tmp_path_factory.mktemp("v-lora") / "adapter"
    return out, train_output(tiny_model, prepared, out, prediction_type="v_prediction")


def test_v_prediction_lora_on_an_epsilon_base(tmp_path: Path, tiny_model: Path, prepared: Path, v_lora) -> None:  # noqa: ANN001
    out, result = v_lora
    assert result.prediction_type == "v_prediction"
    assert json.loads((out / candidate.TRAINING_FILE).read_text())["prediction_type"] == "v_prediction"
    code, summary, samples = run_evaluate(tmp_path, tiny_model, prepared, out)
    assert code == 0
    models = summary["evaluation"]["models"]
    assert models["base"]["prediction_type"] == "epsilon"  # the untuned base keeps its own
    assert models["candidate"]["prediction_type"] == "v_prediction"
    # Train measured the v-prediction loss; evaluate reproduces it, so its target was the velocity too.
    assert_reproduces_training(samples, result, base=False)
    # The base is scored against its own (noise) target, not the velocity train started from.
    assert np.mean(samples["base"]["val_loss"]) != pytest.approx(result.initial_val_loss, rel=1e-2)

    # The same weights scored against the noise (epsilon) target give another number: the type was not ignored.
    pipe = candidate.load_trained(candidate.read_output(out), str(tiny_model))
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # generation samples velocity
    as_epsilon = _val_loss(pipe, prepared, "epsilon")
    assert float(as_epsilon.mean()) != pytest.approx(result.best_val_loss, rel=1e-2)
    assert float(_val_loss(pipe, prepared, "v_prediction").mean()) == pytest.approx(result.best_val_loss, rel=1e-4)


def _val_loss(pipe: Any, prepared: Path, prediction_type: str) -> torch.Tensor:
    from diffusers import DDPMScheduler

    validation = read_split(prepared / "validation")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    components = evaluate.pipe_components(pipe, scheduler)
    cond = encode_conditioning(components, validation.captions, RESOLUTION)
    latents = encode_images(pipe.vae, validation.images)
    return fixed_validation_loss(pipe.unet, scheduler, latents, cond, VAL_TIMESTEPS, VAL_SEED)


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


def test_missing_output_folder_names_it_and_the_fix(tmp_path: Path, tiny_model: Path, prepared: Path, capsys) -> None:  # noqa: ANN001
    code, _, _ = run_evaluate(tmp_path, tiny_model, prepared, tmp_path / "models" / "adapter")
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "models" / "adapter") in err and "dvc repro train" in err
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is unreadable"),
        ('{"format_version": 1, "method": "dora"}', "method is 'dora'"),
        ('{"format_version": 7}', "format_version 7"),
    ],
)
def test_unreadable_training_json_names_the_file_and_the_fix(
    tmp_path: Path,
    tiny_model: Path,
    prepared: Path,
    capsys,
    content: str,
    message: str,  # noqa: ANN001
) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / candidate.TRAINING_FILE).write_text(content)
    code, _, _ = run_evaluate(tmp_path, tiny_model, prepared, tmp_path / "adapter")
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "adapter" / candidate.TRAINING_FILE) in err and message in err and "dvc repro train" in err


def test_full_output_without_its_unet_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    out.mkdir()
    info = {"format_version": 1, "method": "full", "architecture": "sd", "prediction_type": "epsilon"}
    (out / candidate.TRAINING_FILE).write_text(json.dumps(info | {"trained": ["unet", "text_encoder"]}))
    (out / "unet").mkdir()
    (out / "unet" / "config.json").write_text("{}")
    with pytest.raises(candidate.OutputError, match=r"text_encoder/ .* is missing.*dvc repro train"):
        candidate.read_output(out)


def test_output_of_another_architecture_or_base_is_refused_before_any_work(
    tmp_path: Path,
    tiny_model: Path,
    tiny_sdxl: Path,
    prepared: Path,
    v_lora,
    capsys,  # noqa: ANN001
) -> None:
    out, _ = v_lora
    # training.json says SDXL, the base named with --base-model (as the gate does for a champion) is SD.
    sdxl_out = tmp_path / "sdxl-output"
    shutil.copytree(out, sdxl_out)
    info = json.loads((sdxl_out / candidate.TRAINING_FILE).read_text())
    (sdxl_out / candidate.TRAINING_FILE).write_text(json.dumps(info | {"architecture": "sdxl"}))
    code, _, _ = run_evaluate(tmp_path, tiny_model, prepared, sdxl_out, "--base-model", str(tiny_model))
    assert code == 2
    assert "trained on an 'sdxl' base" in capsys.readouterr().err
    # params.yaml's base.model changed since training: evaluating would compare the wrong models.
    code, _, _ = run_evaluate(tmp_path, tiny_sdxl, prepared, out)
    assert code == 2
    err = capsys.readouterr().err
    assert f"but params.yaml `base:` is now {tiny_sdxl}" in err and "dvc repro train" in err
    assert not (tmp_path / "eval").exists()


def test_older_adapter_without_training_json_is_an_sd_lora_with_the_base_scheduler(tmp_path: Path, v_lora) -> None:  # noqa: ANN001
    out, _ = v_lora
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy2(out / candidate.LORA_FILE, legacy / candidate.LORA_FILE)
    output = candidate.read_output(legacy)
    assert (output.method, output.architecture, output.prediction_type) == ("lora", None, None)
    assert candidate.weight_files(output) == [legacy / candidate.LORA_FILE]


def test_text_encoder_lora(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:
    # The candidate's held-out conditioning comes from its LoRA-adapted text encoder, loaded from the same file.
    result = train_output(tiny_model, prepared, tmp_path / "adapter", train_text_encoder=True, text_encoder_lr=1e-2)
    assert result.best_step > 0
    code, summary, samples = run_evaluate(tmp_path, tiny_model, prepared, tmp_path / "adapter")
    assert code == 0
    assert summary["evaluation"]["models"]["candidate"]["trained"] == ["text_encoder", "unet"]
    assert_reproduces_training(samples, result)


def test_lora_trained_on_aspect_ratio_buckets(tmp_path: Path, tiny_model: Path) -> None:
    from tests.test_encode import SIZES, make_prepared

    buckets = make_prepared(tmp_path / "prepared", SIZES)  # held-out images of three sizes too
    shutil.copytree(buckets / "validation", buckets / "test")  # evaluate's held-out set = train's (see `prepared`)
    result = train_output(tiny_model, buckets, tmp_path / "adapter")
    code, summary, samples = run_evaluate(tmp_path, tiny_model, buckets, tmp_path / "adapter")
    assert code == 0
    assert_reproduces_training(samples, result)
    assert len(samples["candidate"]["val_loss"]) == 5


def test_another_sampler_changes_the_images_not_the_validation_loss(
    tmp_path: Path, tiny_model: Path, prepared: Path, v_lora
) -> None:  # noqa: ANN001, E501
    out, _ = v_lora
    runs = {}
    for name in ("default", "dpm++"):
        (tmp_path / name).mkdir()
        params = write_params(
            tmp_path / name, tiny_model, {"val_timesteps": VAL_TIMESTEPS, "seed": VAL_SEED, "scheduler": name}
        )
        args = ["--params", str(params), "--prepared", str(prepared), "--adapter", str(out)]
        assert evaluate.main([*args, "--out", str(tmp_path / name / "eval")]) == 0
        runs[name] = json.loads((tmp_path / name / "eval" / "samples.json").read_text())
    for model in ("base", "candidate"):  # a sampler plays no part in the fixed-noise loss
        assert runs["dpm++"][model]["val_loss"] == pytest.approx(runs["default"][model]["val_loss"], rel=1e-6)
    assert runs["dpm++"]["candidate"]["clip_score"] != runs["default"]["candidate"]["clip_score"]
