"""The shipped shape-world judges: they load with stock classes, match their manifests, judge correctly, and the
evaluate stage writes the adherence metrics they give.

Accuracy checks use fresh renders from seeds the pre-training never used (it trains on `--seed 0` streams and checks
on seed 1_000_003 and 1_000_004).
"""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline import evaluate, judges, metrics, world
from pipeline.assets import AssetError, verify
from pipeline.features import (
    JUDGES,
    build_clip,
    build_image_features,
    describe_clip,
    describe_image_features,
    load_judge_classifier,
    load_judge_clip,
)
from pipeline.judges import ATTRIBUTES, ShapeJudge

UNSEEN_SEED = 424_242


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def classifier() -> ShapeJudge:
    return load_judge_classifier()


def renders(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, list[world.Scene]]:
    """`n` fresh renders (uint8 (n, 3, size, size)) of random scenes, and the scenes."""
    pairs = world.sample(n, size, random.Random(seed))
    images = torch.from_numpy(np.stack([np.asarray(im) for im, _ in pairs])).permute(0, 3, 1, 2)
    return images, [scene for _, scene in pairs]


# --------------------------------------------------------------------------------------------------------------------
# Loading and integrity
# --------------------------------------------------------------------------------------------------------------------


def test_judges_match_their_manifests_and_load_with_stock_classes() -> None:
    from transformers import CLIPModel, CLIPProcessor

    for name in ("classifier", "clip"):
        manifest = verify(JUDGES / name)
        assert manifest["seed"] == 0 and manifest["files"] and manifest["held_out"]
    judge = ShapeJudge.from_pretrained(JUDGES / "classifier")
    assert set(judge.classes) == set(ATTRIBUTES) and "purple" in judge.classes["colour"]
    for size in (32, 64, 96):  # any size in, (N, num_features) out, as torchmetrics' FID/KID expect
        feats = judge(torch.zeros(2, 3, size, size, dtype=torch.uint8))
        assert feats.shape == (2, judge.num_features)
    model = CLIPModel.from_pretrained(JUDGES / "clip")
    processor = CLIPProcessor.from_pretrained(JUDGES / "clip")
    ids = processor.tokenizer("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's real tokenizer
    assert model.config.vision_config.image_size == processor.image_processor.crop_size["height"]
    # `judge` as evaluate.clip_model / evaluate.image_features: real (not plumbing-only) extractors, named as such.
    (clip, _), clip_plumbing = build_clip("judge", tokenizer=None)
    features, features_plumbing = build_image_features("judge")
    assert not clip_plumbing and not features_plumbing and isinstance(features, ShapeJudge)
    assert describe_clip("judge") == "shape-world tiny CLIP"
    assert describe_image_features("judge") == "shape-world judge classifier features"


def test_a_corrupted_copy_is_caught_naming_the_file(tmp_path: Path) -> None:
    for name, loader in (("classifier", load_judge_classifier), ("clip", load_judge_clip)):
        copy = shutil.copytree(JUDGES / name, tmp_path / name)
        weights = copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        with pytest.raises(AssetError, match="model.safetensors does not match its sha256"):
            loader(copy)
    (tmp_path / "classifier" / "config.json").unlink()
    with pytest.raises(AssetError, match="config.json is missing"):
        verify(tmp_path / "classifier")


# --------------------------------------------------------------------------------------------------------------------
# Accuracy on unseen renders
# --------------------------------------------------------------------------------------------------------------------


def test_classifier_is_at_least_99_percent_right_per_attribute_on_unseen_renders(classifier: ShapeJudge) -> None:
    images, truth = renders(300, UNSEEN_SEED)
    small, small_truth = renders(60, UNSEEN_SEED + 1, size=40)  # another size, resized by the judge
    seen = classifier.predict(images) + classifier.predict(small)
    truth += small_truth
    for attribute in ATTRIBUTES:
        accuracy = np.mean([getattr(s, attribute) == getattr(t, attribute) for s, t in zip(seen, truth, strict=True)])
        assert accuracy >= 0.99, (attribute, accuracy)


def test_clip_judge_ranks_the_true_caption_first() -> None:
    """Zero-shot retrieval among the 24 captions, through the evaluation's own embedding functions."""
    clip, processor = load_judge_clip()
    images, truth = renders(300, UNSEEN_SEED + 2)
    captions = [s.caption for s in world.scenes()]
    similarity = (
        metrics.image_embeddings(clip, processor, images) @ metrics.text_embeddings(clip, processor, captions).T
    )
    top1 = np.mean([captions[i] == t.caption for i, t in zip(similarity.argmax(-1).tolist(), truth, strict=True)])
    assert top1 >= 0.95, top1


# --------------------------------------------------------------------------------------------------------------------
# Adherence on known answers
# --------------------------------------------------------------------------------------------------------------------


def test_renders_of_what_was_asked_score_perfect_adherence(classifier: ShapeJudge) -> None:
    images, truth = renders(48, UNSEEN_SEED + 3)
    prompts = [s.caption for s in truth] + ["a photo of a dog"]  # not a world scene: not judged
    images = torch.cat([images, torch.zeros(1, 3, 64, 64, dtype=torch.uint8)])
    result, judged = judges.adherence(classifier, images, prompts)
    assert judged == list(range(48)) and result.n == 48
    scores = judges.adherence_metrics(result)
    assert scores == {
        "adherence_accuracy": 1.0,
        "adherence_f1": 1.0,
        "shape_accuracy": 1.0,
        "colour_accuracy": 1.0,
        "background_accuracy": 1.0,
    }
    per_class = judges.per_class_metrics(result)
    assert per_class and all(v == 1.0 for v in per_class.values())
    asked = {getattr(s, a) for s in truth for a in ATTRIBUTES}
    assert {k.rsplit("_", 1)[1] for k in per_class} == asked  # only classes some prompt asked for


def test_renders_of_the_wrong_colour_land_in_the_right_confusion_cells(classifier: ShapeJudge, tmp_path: Path):
    """Asked for red, shown blue (and asked for purple, shown green): colour is always wrong, shape and background
    always right, and the confusion matrix counts each image at (asked, seen)."""
    rng = random.Random(UNSEEN_SEED + 4)
    swap = {"red": "blue", "purple": "green"}
    asked, shown = [], []
    for colour, wrong in swap.items():
        for shape in world.SHAPES:
            for background in world.BACKGROUNDS:
                asked.append(world.Scene(shape, colour, background))
                shown.append(world.Scene(shape, wrong, background))
    images = torch.from_numpy(np.stack([np.asarray(world.render(s, 64, rng)) for s in shown])).permute(0, 3, 1, 2)
    result, _ = judges.adherence(classifier, images, [s.caption for s in asked])
    scores = judges.adherence_metrics(result)
    assert scores["colour_accuracy"] == 0.0 and scores["adherence_accuracy"] == 0.0
    assert scores["shape_accuracy"] == 1.0 and scores["background_accuracy"] == 1.0
    colours = list(classifier.classes["colour"])
    expected = [[0] * len(colours) for _ in colours]
    for colour, wrong in swap.items():
        expected[colours.index(colour)][colours.index(wrong)] = 6
    assert result.confusion["colour"] == expected
    assert result.per_class("colour")["red"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 6}
    path = judges.write_confusion_csv(result, "colour", tmp_path / "colour.csv")
    rows = list(csv.reader(path.open()))
    assert rows[0][1:] == colours and rows[1 + colours.index("red")][1 + colours.index("blue")] == "6"
    assert judges.confusion_image(result, "colour").size[0] > 100


def test_score_adherence_macro_f1_by_hand() -> None:
    """Two circles asked, one seen as a square: shape F1 circle 2/3, square 0 -> macro (2/3 + 0) / 2."""
    red = "red"
    asked = [world.Scene("circle", red, "white"), world.Scene("circle", red, "white")]
    seen = [world.Scene("circle", red, "white"), world.Scene("square", red, "white")]
    result = judges.score_adherence(asked, seen)
    assert result.all_correct == [1, 0] and result.correct["shape"] == [1, 0]
    assert result.macro_f1("shape") == pytest.approx(1 / 3)
    assert result.f1() == pytest.approx((1 / 3 + 1 + 1) / 3)


# --------------------------------------------------------------------------------------------------------------------
# The evaluate stage with the judges
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The evaluate CLI on the tiny random SD model, with the default (judge) extractors."""
    from diffusers import StableDiffusionPipeline

    from pipeline.tiny import build_tiny_sd
    from tests.test_evaluate import _write_split, save_adapter, write_params

    root = tmp_path_factory.mktemp("judged")
    tiny_sd = build_tiny_sd(root / "tiny-sd")
    validation = [("purple", "circle", "white"), ("purple", "square", "black"), ("purple", "triangle", "white")]
    _write_split(root / "prepared" / "test", validation * 2, seed=1)
    _write_split(root / "prepared" / "train", validation * 2, seed=2)
    overrides = {
        "clip_model": "judge",
        "image_features": "judge",
        "prompts": ["a purple circle on a black background", "a photo of a dog"],
        "general_prompts": ["a red square on a black background", "a green circle on a white background"],
        "label_vocabulary": [],
    }
    write_params(root, tiny_sd, overrides)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    adapter = save_adapter(pipe, root / "adapter", std=0.5)
    args = ["--params", str(root / "params.yaml"), "--prepared", str(root / "prepared"), "--adapter", str(adapter)]
    assert evaluate.main([*args, "--out", str(root / "eval"), "--metrics", str(root / "metrics.json")]) == 0
    return root


def test_evaluate_with_judges_writes_the_adherence_metrics(judged_run: Path) -> None:
    summary = json.loads((judged_run / "metrics.json").read_text())
    samples = json.loads((judged_run / "eval" / "samples.json").read_text())
    ev = summary["evaluation"]
    assert not ev["plumbing_only"] and len(ev["judges"]) == 64
    assert "shape-world tiny CLIP" in ev["extractors"] and "shape-world judge classifier features" in ev["extractors"]
    # 3 held-out captions + 1 world prompt judged (the dog prompt is not a scene), 2 seeds each; 2 general x 2.
    per_sample = {"adherence_accuracy": 8, "base_adherence_accuracy": 4}
    per_sample |= {f"{prefix}{a}_accuracy": n for prefix, n in (("", 8), ("base_", 4)) for a in ATTRIBUTES}
    for model in ("base", "candidate"):
        values = summary[model]
        for metric, n in per_sample.items():
            assert len(samples[model][metric]) == n and set(samples[model][metric]) <= {0.0, 1.0}, metric
            assert values[metric] == pytest.approx(np.mean(samples[model][metric]), abs=1e-6)
        for metric in ("adherence_f1", "base_adherence_f1", "adherence_f1_purple", "adherence_recall_circle"):
            assert 0.0 <= values[metric] <= 1.0, metric
        for metric in ("kid", "fid", "clip_score", "forgetting_clip_score", "precision", "coverage"):
            assert np.isfinite(values[metric]), metric
        assert not any(k.startswith("zero_shot_") for k in values)
    intervals = json.loads((judged_run / "eval" / "intervals.json").read_text())
    assert intervals["adherence_accuracy"]["n"] == 8 and intervals["base_adherence_accuracy"]["n"] == 4
    for model in ("base", "candidate"):
        for key in ("prompts", "general_prompts"):
            for attribute in ATTRIBUTES:
                path = judged_run / "eval" / "confusion" / model / f"{key}_{attribute}.csv"
                rows = list(csv.reader(path.open()))
                assert sum(int(c) for row in rows[1:] for c in row[1:]) == (8 if key == "prompts" else 4)
                assert path.with_suffix(".png").is_file()
    with open(judged_run / "eval" / "per_prompt.csv") as handle:
        rows = list(csv.DictReader(handle))
    judged = [r["judged_scene"] for r in rows if r["prompt"] != "a photo of a dog"]
    assert all(world.parse_caption(s) for s in judged) and all(
        r["judged_scene"] == "" for r in rows if "dog" in r["prompt"]
    )
    html = (judged_run / "eval" / "report.html").read_text()
    assert 'id="judge-adherence"' in html and 'id="base_judge-adherence"' in html and 'id="judges-note"' in html
    assert 'id="plumbing-warning"' not in html and html.count('class="confusion"') == 4


def test_validation_adherence_is_deterministic_for_a_pipeline(classifier: ShapeJudge, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from pipeline.tiny import build_tiny_sd

    pipe = StableDiffusionPipeline.from_pretrained(
        str(build_tiny_sd(tmp_path / "sd")), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a purple circle on a white background", "a red square on a black background"]
    kwargs: dict[str, Any] = {"seeds": (0,), "resolution": 32, "steps": 2}
    first = judges.validation_adherence(pipe, classifier, prompts, **kwargs)
    assert set(first) == {"adherence_accuracy", "adherence_f1", *(f"{a}_accuracy" for a in ATTRIBUTES)}
    assert first == judges.validation_adherence(pipe, classifier, prompts, **kwargs)


def test_adherence_is_skipped_and_refused_as_a_gate_metric_without_shape_world_prompts() -> None:
    from pipeline.config import EvaluateParams
    from pipeline.diffusion import Split

    params = EvaluateParams(prompts=["a photo of a dog"], general_prompts=["a bowl of fruit"])
    eval_set = evaluate.build_eval_set(Split([], ["a cat on a sofa"], ["h"]), params, 64)
    skipped = evaluate.skipped_metrics(eval_set)
    assert {"adherence_accuracy", "adherence_f1", "colour_accuracy", "base_adherence_accuracy"} <= set(skipped)
    problems = metrics.gate_metric_problems(["adherence_f1", "base_adherence_accuracy"], {}, skipped)
    assert len(problems) == 2 and "shape-world scene" in problems[0]
    world_set = evaluate.build_eval_set(Split([], ["a red circle on a white background"], ["h"]), params, 64)
    assert "adherence_f1" not in evaluate.skipped_metrics(world_set)
