"""The evaluate stage on the tiny SD model: the CLI contract the gate reads, and paired intervals that can be trusted.

Bootstrap checks: a model compared with itself (a LoRA whose B matrices are zero) gives intervals containing 0 on
every per-sample metric; a visibly degraded copy (a LoRA of large random weights) gives a val_loss interval that
excludes 0 on the bad side.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import evaluate
from pipeline.config import load_params
from pipeline.demo_data import BACKGROUNDS, COLOURS, draw_shape
from pipeline.diffusion import Split, read_split

RESOLUTION = 32
# The held-out images evaluate measures on: written as the prepared `test` split (the name predates three splits).
VALIDATION = [("red", "circle", "white"), ("blue", "square", "black"), ("green", "triangle", "white")] * 2
# Train's own validation split: other images, of another count, which evaluate must not read.
TRAIN_VALIDATION = [("purple", "square", "white"), ("red", "triangle", "black"), ("blue", "circle", "white")]
TRAIN = [(c, s, b) for c in ("red", "purple") for s in ("circle", "square", "triangle") for b in ("white", "black")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("evaluate-base") / "tiny-sd")


def _write_split(folder: Path, items: list[tuple[str, str, str]], seed: int) -> None:
    """A prepared split as the prepare stage writes it: images at the resolution and metadata.jsonl."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for k, (colour, shape, background) in enumerate(items):
        image = draw_shape(shape, COLOURS[colour], BACKGROUNDS[background], RESOLUTION, rng)
        name = f"{k:03d}.png"
        image.save(folder / name)
        digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        rows.append({"file_name": name, "text": f"a {colour} {shape} on a {background} background", "sha256": digest})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> Path:
    """A folder with params.yaml, a prepared dataset and the tiny base model."""
    root = tmp_path_factory.mktemp("evaluate-project")
    _write_split(root / "prepared" / "test", VALIDATION, seed=1)
    _write_split(root / "prepared" / "validation", TRAIN_VALIDATION, seed=3)
    _write_split(root / "prepared" / "train", TRAIN, seed=2)
    write_params(root, tiny_sd)
    return root


def write_params(
    root: Path, base_model: Path, evaluate_overrides: dict[str, Any] | None = None, gate: dict | None = None
) -> Path:
    """params.yaml for a small evaluation: 4 prompts x 2 seeds, 2 scheduler steps, 32 px, the tiny random extractors
    (fast; tests/test_judges.py runs the shipped judges)."""
    (root / "raw").mkdir(exist_ok=True)
    params = {
        "base": {"model": str(base_model)},
        "data": {"source": "raw", "resolution": RESOLUTION},
        "train": {},
        "evaluate": {
            "seed": 1234,
            "val_timesteps": 2,
            "prompts": ["a yellow circle on a black background"],  # yellow: not a shape-world colour
            "images_per_prompt": 2,
            "num_inference_steps": 2,
            "guidance_scale": 2.0,
            "batch_size": 4,
            "general_prompts": ["a photo of a dog"],
            "clip_model": "tiny",
            "image_features": "tiny",
            "label_vocabulary": ["circle", "square", "triangle"],
            "precision_recall_k": 2,
            "density_coverage_k": 2,
            "memorisation_worst": 3,
            **(evaluate_overrides or {}),
        },
        "gate": gate
        or {
            "primary": [{"metric": "val_loss", "greater_is_better": False, "min_relative_change": 0.0}],
            "bootstrap_resamples": 200,
        },
        "registry": {"model_name": "test"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def save_adapter(pipe: Any, folder: Path, std: float, seed: int = 0) -> Path:
    """A LoRA on the UNet's attention and output convolution, saved as the train stage saves it. std 0 keeps PEFT's
    init (B = 0: the adapter changes nothing); a large std gives a visibly degraded model (random weights on the
    attention alone can even lower the loss of the random tiny UNet, so the output convolution is perturbed too)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_out"]))
    if std:
        generator = torch.Generator().manual_seed(seed)
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.data = torch.randn(param.shape, generator=generator) * std
    # PEFT key names as they are: diffusers' converter renames attention keys but not conv ones, and a mix of the
    # two formats silently loads only part of the adapter.
    layers = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipe(tiny_sd: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def degraded_adapter(tmp_path_factory: pytest.TempPathFactory, pipe: Any) -> Path:
    return save_adapter(pipe, tmp_path_factory.mktemp("degraded"), std=2.0)


# --------------------------------------------------------------------------------------------------------------------
# The CLI contract
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(project: Path, degraded_adapter: Path) -> Path:
    curve = project / "curve.csv"
    curve.write_text("step,train_loss,val_loss,lr\n0,,1.2,\n1,1.1,,0.001\n2,1.0,0.9,0.001\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = evaluate.main(
            [
                "--params", str(project / "params.yaml"), "--prepared", str(project / "prepared"),
                "--adapter", str(degraded_adapter), "--out", str(project / "reports" / "eval"),
                "--metrics", str(project / "reports" / "metrics.json"), "--train-curve", str(curve),
            ]
        )  # fmt: skip
    assert code == 0
    (project / "evaluate-stdout.txt").write_text(printed.getvalue())
    return project / "reports"


def test_cli_prints_the_gate_metrics_not_every_metric(cli_run: Path) -> None:
    lines = (cli_run.parent / "evaluate-stdout.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["base", "candidate"]
    assert all(", " not in line and "val_loss" in line for line in lines[:2])  # the gate's one metric, not 24
    assert lines[2].startswith("all ") and str(cli_run / "metrics.json") in lines[2] and "report.html" in lines[2]


def test_cli_writes_what_the_gate_reads(cli_run: Path) -> None:
    summary = json.loads((cli_run / "metrics.json").read_text())
    samples = json.loads((cli_run / "eval" / "samples.json").read_text())
    assert set(summary) == {"base", "candidate", "evaluation"}
    ev = summary["evaluation"]
    assert len(ev["eval_set_hash"]) == 64
    assert ev["n_generated_per_model"] == 8 and ev["n_general_per_model"] == 2  # (3 captions + 1 prompt) x 2 seeds
    n_per_metric = {"val_loss": 6, "clip_score": 8, "forgetting_clip_score": 2, "zero_shot_accuracy": 8}
    # The classifier judge scores the 3 held-out captions (shape-world scenes) x 2 seeds, not the yellow prompt.
    n_per_metric |= {f"{m}_accuracy": 6 for m in ("adherence", "shape", "colour", "background")}
    n_per_metric |= {"precision": 8, "density": 8, "memorisation_similarity": 8, "recall": 6, "coverage": 6, "kid": 8}
    for model in ("base", "candidate"):
        assert set(samples[model]) == set(n_per_metric)
        for metric, n in n_per_metric.items():
            assert len(samples[model][metric]) == n, metric
            # The reported value is the mean of the per-sample values, so the gate's interval is about that number.
            assert summary[model][metric] == pytest.approx(np.mean(samples[model][metric]), abs=1e-6)
        for metric in ("fid", "kid", "mifid", "f1", "memorisation_max", "zero_shot_f1_circle", "adherence_f1_circle"):
            assert np.isfinite(summary[model][metric]), metric
    # FID on 6 real images is reported, flagged, and the tiny extractors are called what they are.
    assert ev["fid_n_real"] == 6 and ev["untrusted"]["fid"].startswith("untrusted_small_n")
    assert ev["plumbing_only"] and "plumbing only" in ev["extractors"]
    cost = ev["cost"]
    assert cost["images_generated"] == 20 and cost["images_per_second"] > 0
    assert {"val_loss", "generation", "clip_score", "fid", "kid", "memorisation"} <= set(
        cost["models"]["candidate"]["seconds_per_metric"]
    )


def test_cli_side_outputs(cli_run: Path, project: Path) -> None:
    out = cli_run / "eval"
    assert len(list((out / "images" / "candidate").glob("[0-9]*.png"))) == 8
    assert len(list((out / "images" / "base").glob("general_*.png"))) == 2
    with open(out / "per_prompt.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {r["predicted_label"] for r in rows} <= {"circle", "square", "triangle"}
    worst = json.loads((out / "memorisation.json").read_text())["candidate"]
    assert 1 <= len(worst) <= 3 and len({w["nearest_train"] for w in worst}) == len(worst)  # each train image once
    assert [w["similarity"] for w in worst] == sorted((w["similarity"] for w in worst), reverse=True)
    train_files = {str(project / "prepared" / "train" / f"{k:03d}.png") for k in range(len(TRAIN))}
    assert all(w["nearest_train"] in train_files and (out / w["generated"]).is_file() for w in worst)
    intervals = json.loads((out / "intervals.json").read_text())
    assert intervals["val_loss"]["n"] == 6 and intervals["val_loss"]["n_resamples"] == 200
    html = (out / "report.html").read_text()
    assert 'id="plumbing-warning"' in html and 'id="curve"' in html and html.count("data:image/png;base64,") >= 20


def test_cli_measures_on_the_test_split_and_says_so(cli_run: Path) -> None:
    """Every number comes from the 6 test images, not the 3 validation ones train chose with; each output says so."""
    summary = json.loads((cli_run / "metrics.json").read_text())
    ev = summary["evaluation"]
    assert ev["split"] == "test" and ev["n_test_images"] == 6 and ev["fid_n_real"] == 6
    assert "test split" in ev["metric_data"]["val_loss"] and "validation split" in ev["metric_data"]["val_loss"]
    samples = json.loads((cli_run / "eval" / "samples.json").read_text())
    assert len(samples["candidate"]["val_loss"]) == len(samples["base"]["val_loss"]) == 6
    html = (cli_run / "eval" / "report.html").read_text()
    assert '<h2 id="metrics">Metrics (on the test split)</h2>' in html
    assert "6 held-out images from the <b>test</b> split" in html
    assert "val_loss on the validation split" in html  # the training curve's heading


def test_eval_set_hash_covers_the_split(project: Path) -> None:
    """A baseline measured on another split (e.g. validation, before the test split existed) never matches."""
    params = load_params(project / "params.yaml").evaluate
    eval_set = evaluate.build_eval_set(read_split(project / "prepared" / "test"), params, RESOLUTION)
    assert eval_set.split == "test"
    assert dataclasses.replace(eval_set, split="validation").digest() != eval_set.digest()


def test_prepared_data_without_a_test_split_says_to_rerun_prepare(
    tmp_path: Path, project: Path, degraded_adapter: Path, capsys
) -> None:
    """A workspace prepared before data.test_fraction existed (train and validation only): a message, not a crash."""
    old = tmp_path / "prepared"
    for split in ("train", "validation"):
        shutil.copytree(project / "prepared" / split, old / split)
    args = ["--params", str(project / "params.yaml"), "--prepared", str(old), "--adapter", str(degraded_adapter)]
    assert evaluate.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {old} has no 'test' split: it was prepared before data.test_fraction existed" in err
    assert "re-run prepare (`dvc repro prepare`" in err
    assert not (tmp_path / "out").exists()


def test_champion_run_is_comparable_with_the_candidate_run(cli_run: Path, project: Path, degraded_adapter: Path):
    """What the gate does for a champion: --no-base --name champion on the same set gives the same hash and values."""
    out = project / "champion"
    code = evaluate.main(
        [
            "--params", str(project / "params.yaml"), "--prepared", str(project / "prepared"),
            "--adapter", str(degraded_adapter), "--out", str(out / "eval"), "--metrics", str(out / "metrics.json"),
            "--name", "champion", "--no-base",
        ]
    )  # fmt: skip
    assert code == 0
    champion = json.loads((out / "metrics.json").read_text())
    candidate = json.loads((cli_run / "metrics.json").read_text())
    assert set(champion) == {"champion", "evaluation"}
    assert champion["evaluation"]["eval_set_hash"] == candidate["evaluation"]["eval_set_hash"]
    samples = json.loads((out / "eval" / "samples.json").read_text())["champion"]
    assert samples == json.loads((cli_run / "eval" / "samples.json").read_text())["candidate"]


def test_gate_on_small_n_fid_stops_before_any_work(
    tmp_path: Path, project: Path, tiny_sd: Path, degraded_adapter: Path, capsys
) -> None:
    gate = {"primary": [{"metric": "fid", "greater_is_better": False, "min_absolute_change": 0.0}]}
    params = write_params(tmp_path, tiny_sd, gate=gate)
    args = ["--params", str(params), "--prepared", str(project / "prepared"), "--adapter", str(degraded_adapter)]
    code = evaluate.main([*args, "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "gate rule on 'fid'" in err and "untrusted_small_n" in err and "must not decide a promotion" in err
    assert not (tmp_path / "out").exists()


def test_missing_real_extractor_weights_stop_the_cli_with_the_file_to_place(
    tmp_path: Path, project: Path, tiny_sd: Path, degraded_adapter: Path, capsys
) -> None:
    params = write_params(tmp_path, tiny_sd, {"image_features": str(tmp_path / "weights" / "inception.pth")})
    args = ["--params", str(params), "--prepared", str(project / "prepared"), "--adapter", str(degraded_adapter)]
    assert evaluate.main([*args, "--out", str(tmp_path / "out")]) == 2
    assert f"Place inception.pth in {tmp_path / 'weights'}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------------
# Paired bootstrap checks on real evaluations
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(project: Path, pipe: Any) -> dict[str, Any]:
    params = load_params(project / "params.yaml").evaluate
    validation = read_split(project / "prepared" / "test")
    train = read_split(project / "prepared" / "train")
    eval_set = evaluate.build_eval_set(validation, params, RESOLUTION, train)
    extractors = evaluate.build_extractors(params, pipe.tokenizer)
    files = evaluate.split_files(project / "prepared" / "train")
    reference = evaluate.build_reference(pipe, eval_set, extractors, files)
    base = evaluate.evaluate_model("base", pipe, eval_set, reference, extractors)
    return {"eval_set": eval_set, "extractors": extractors, "reference": reference, "base": base}


def _evaluate_with(pipe: Any, adapter: Path, harness: dict[str, Any]) -> evaluate.ModelEval:
    pipe.load_lora_weights(str(adapter))
    try:
        return evaluate.evaluate_model(
            "candidate", pipe, harness["eval_set"], harness["reference"], harness["extractors"]
        )
    finally:
        pipe.unload_lora_weights()


def test_identical_models_give_intervals_containing_zero(pipe: Any, harness: dict, tmp_path: Path) -> None:
    same = _evaluate_with(pipe, save_adapter(pipe, tmp_path, std=0.0), harness)
    cis = evaluate.intervals([harness["base"], same], evaluate.Bootstrap(200))
    assert set(cis) == set(same.samples)  # every per-sample metric gets an interval
    for metric, ci in cis.items():
        assert ci["low"] <= 0.0 <= ci["high"], metric
        assert not ci["excludes_zero"], metric
    assert same.samples == harness["base"].samples  # seeded per image: the evaluation itself adds no noise


def test_degraded_model_gives_a_val_loss_interval_excluding_zero(
    pipe: Any, harness: dict, degraded_adapter: Path
) -> None:
    worse = _evaluate_with(pipe, degraded_adapter, harness)
    cis = evaluate.intervals([harness["base"], worse], evaluate.Bootstrap(200))
    assert cis["val_loss"]["low"] > 0.0, cis["val_loss"]  # candidate - base: the loss went up, beyond noise
    assert worse.values["val_loss"] > 1.5 * harness["base"].values["val_loss"]
    # The generated images changed too (paired per prompt and seed), so image metrics moved.
    assert worse.samples["clip_score"] != harness["base"].samples["clip_score"]


def test_eval_set_hash_follows_metric_settings_not_report_settings(project: Path) -> None:
    params = load_params(project / "params.yaml").evaluate
    validation = read_split(project / "prepared" / "test")
    train = read_split(project / "prepared" / "train")

    def digest(**changes: Any) -> str:
        return evaluate.build_eval_set(validation, params.model_copy(update=changes), RESOLUTION, train).digest()

    assert digest() == digest(memorisation_worst=10)
    for change in ({"image_features": "dinov2"}, {"precision_recall_k": 3}, {"general_prompts": ["a cat"]}):
        assert digest(**change) != digest(), change
    assert evaluate.build_eval_set(validation, params, RESOLUTION, Split([], [], [])).digest() != digest()
