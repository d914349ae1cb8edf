"""Stage encode (precomputed latents and text conditioning) and training on images of several sizes (buckets)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline import encoded
from pipeline.config import ParamsError, TrainParams
from pipeline.demo_data import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from pipeline.diffusion import Split, load_components, read_split
from pipeline.encode import WorkCache, encode_splits
from pipeline.encode import main as encode_main
from pipeline.train import LoopState, draw_step, encode_data, train
from pipeline.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
SIZES = [(64, 64), (80, 48), (48, 80)]  # (width, height): three aspect-ratio buckets


def write_split(folder: Path, n: int, seed: int, sizes: list[tuple[int, int]]) -> Path:
    """A prepared split as the prepare stage writes it, its images cycling through `sizes`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        shape, colour, bg = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        image = draw_shape(shape, COLOURS[colour], BACKGROUNDS[bg], max(width, height), rng).crop((0, 0, width, height))
        name = f"{i:03d}.png"
        image.save(folder / name)
        text = f"a {colour} {shape} on a {bg} background"
        rows.append({"file_name": name, "text": text, "sha256": hashlib.sha256(image.tobytes()).hexdigest()})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def make_prepared(root: Path, sizes: list[tuple[int, int]]) -> Path:
    write_split(root / "train", 12, seed=1, sizes=sizes)
    write_split(root / "validation", 5, seed=2, sizes=sizes)
    return root


@pytest.fixture(scope="module")
def square(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("square"), [(64, 64)])


@pytest.fixture(scope="module")
def buckets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("buckets"), SIZES)


def splits_of(prepared: Path) -> tuple[Split, Split]:
    return read_split(prepared / "train"), read_split(prepared / "validation")


def tp(**overrides: Any) -> TrainParams:
    base = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "validation_every": 2, "validation_timesteps": 2}
    return TrainParams(**(base | overrides))


def assert_trains_the_same(tiny_model: Path, prepared: Path, enc: dict) -> None:
    """Training from the precomputed inputs `enc` gives the adapter that in-memory encoding gives."""
    plain = train(load_components(str(tiny_model)), *splits_of(prepared), tp()).lora_state
    pre = train(
        load_components(str(tiny_model)), *splits_of(prepared), tp(), precomputed=(enc["train"], enc["validation"])
    ).lora_state
    for key in plain:
        torch.testing.assert_close(pre[key], plain[key], atol=1e-4, rtol=1e-3)


def write_params(folder: Path, model: Path, prepared: Path, **data: Any) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["model"] = str(model)
    params["data"]["source"] = str(prepared)
    params["data"] |= data
    params["train"] |= {"max_steps": 3, "batch_size": 4, "validation_every": 3, "validation_timesteps": 2}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder / "params.yaml"


# --- precomputed inputs ------------------------------------------------------------------------------------------


def test_precomputed_inputs_equal_in_memory_encoding(tiny_model: Path, square: Path) -> None:
    components = load_components(str(tiny_model))
    enc = encode_splits(components, square, random_flip=True, cache=WorkCache(None, "x"))
    cpu = torch.device("cpu")
    fresh = encode_data(components, *splits_of(square), None, True, cpu, random_flip=True)
    cached = encode_data(components, *splits_of(square), None, True, cpu, True, (enc["train"], enc["validation"]))
    assert cached.precomputed and not fresh.precomputed
    for a, b in ((fresh.latents, cached.latents), (fresh.flipped, cached.flipped)):
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fresh.cond["emb"], cached.cond["emb"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fresh.val_latents, cached.val_latents, atol=1e-5, rtol=1e-4)
    assert_trains_the_same(tiny_model, square, enc)  # trained from either, the adapter is the same


def test_work_cache_encodes_only_new_images(tmp_path: Path, tiny_model: Path, square: Path) -> None:
    components = load_components(str(tiny_model))
    cache_root = tmp_path / "cache"
    first = WorkCache(cache_root, encoded.model_fingerprint(components))
    encode_splits(components, square, random_flip=False, cache=first)
    assert first.hits["image"] == 0
    grown = tmp_path / "grown"
    shutil.copytree(square, grown)
    extra = write_split(tmp_path / "extra", 1, seed=9, sizes=[(64, 64)])
    shutil.copy(extra / "000.png", grown / "train" / "new.png")
    row = json.loads((extra / "metadata.jsonl").read_text()) | {"file_name": "new.png"}
    with open(grown / "train" / "metadata.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    second = WorkCache(cache_root, encoded.model_fingerprint(components))
    again = encode_splits(components, grown, random_flip=False, cache=second)
    assert second.hits["image"] == 12 + 5  # all but the new image
    fresh = encode_splits(components, grown, random_flip=False, cache=WorkCache(None, "x"))
    for a, b in zip(again["train"].latents, fresh["train"].latents, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_encode_stage_output_is_used_only_when_it_matches(
    tmp_path: Path, tiny_model: Path, square: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = write_params(tmp_path / "p", tiny_model, square)
    out = tmp_path / "encoded"
    assert encode_main(["--params", str(params), "--prepared", str(square), "--out", str(out)]) == 0
    index = encoded.read_index(out)
    assert index["enabled"] and index["splits"]["train"]["rows"] == 12 and (out / "train.safetensors").is_file()

    def train_log(prepared: Path, params_file: Path = params) -> str:
        args = ["--params", str(params_file), "--prepared", str(prepared), "--encoded", str(out)]
        assert train_main([*args, "--out", str(tmp_path / "adapter"), "--report", str(tmp_path / "report")]) == 0
        summary = json.loads((tmp_path / "report" / "summary.json").read_text())
        return capsys.readouterr().out + f"precomputed_inputs={summary['cost']['precomputed_inputs']}"

    assert "reading precomputed latents and text conditioning" in (log := train_log(square))
    assert "precomputed_inputs=1" in log
    # Other prepared data (one image changed): not used, and the log says why.
    changed = tmp_path / "changed"
    shutil.copytree(square, changed)
    shutil.copy(changed / "train" / "001.png", changed / "train" / "000.png")
    log = train_log(changed)
    assert "encoding in memory: precomputed inputs were made from other prepared data (train split" in log
    assert "precomputed_inputs=0" in log
    # Another base model (other weights, same architecture): not used either.
    from pipeline.tiny import build_tiny_sd

    other = build_tiny_sd(tmp_path / "other-sd", seed=1)
    log = train_log(square, write_params(tmp_path / "q", other, square))
    assert "made with another base model" in log and "precomputed_inputs=0" in log


def test_precompute_off_writes_only_an_index(tmp_path: Path, tiny_model: Path, square: Path) -> None:
    params = write_params(tmp_path, tiny_model, square, precompute=False)
    out = tmp_path / "encoded"
    assert encode_main(["--params", str(params), "--prepared", str(square), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [encoded.INDEX_FILE]
    assert encoded.usable(encoded.read_index(out), "", {}, False) == (
        False,
        "precomputed inputs are off (data.precompute: false)",
    )


# --- aspect-ratio buckets ----------------------------------------------------------------------------------------


def test_training_batches_by_bucket(tiny_model: Path, buckets: Path) -> None:
    components = load_components(str(tiny_model))
    data = encode_data(components, *splits_of(buckets), None, True, torch.device("cpu"))
    assert sorted(tuple(x.shape[2:]) for x in data.latents) == [(6, 10), (8, 8), (10, 6)]
    assert sorted(len(r) for r in data.bucket_rows) == [4, 4, 4]
    assert isinstance(data.val_latents, list)  # held-out images of three sizes
    state, generator = LoopState(), torch.Generator().manual_seed(0)
    seen, drawn = set(), []
    for _ in range(30):
        draw = draw_step(state, data, tp(), 4, generator, 1000)
        bucket = int(draw["bucket"][0])
        assert (draw["bucket"] == bucket).all()
        assert draw["noise"].shape[1:] == data.latents[bucket].shape[1:]
        assert torch.equal(data.bucket_rows[bucket][draw["pos"]], draw["idx"])
        seen.add(bucket)
        drawn += draw["idx"].tolist()
    assert seen == {0, 1, 2}
    # Every image is drawn, about equally often (each bucket's own permutation).
    counts = torch.bincount(torch.tensor(drawn), minlength=12)
    assert counts.min() >= 5 and counts.max() <= 15
    assert set(state.bucket_orders) <= {"0", "1", "2"}
    json.dumps(state.bucket_orders)  # the checkpoint keeps it in its JSON state

    result = train(load_components(str(tiny_model)), *splits_of(buckets), tp(max_steps=6, validation_every=3))
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(h.get("val_loss", 0.0))) for h in result.history)
    assert result.best_val_loss < result.initial_val_loss * 2


def test_buckets_train_from_precomputed_inputs_too(tiny_model: Path, buckets: Path) -> None:
    components = load_components(str(tiny_model))
    enc = encode_splits(components, buckets, random_flip=False, cache=WorkCache(None, "x"))
    assert_trains_the_same(tiny_model, buckets, enc)


def test_sdxl_trains_on_buckets_with_per_image_size_ids(tmp_path: Path, buckets: Path) -> None:
    from pipeline.tiny import build_tiny_sdxl

    components = load_components(str(build_tiny_sdxl(tmp_path / "xl")))
    data = encode_data(components, *splits_of(buckets), None, True, torch.device("cpu"))
    sizes = {tuple(row[4:].int().tolist()) for row in data.time_ids}
    assert sizes == {(64, 64), (48, 80), (80, 48)}  # target (height, width) of each training image
    result = train(components, *splits_of(buckets), tp(max_steps=2))
    assert result.steps == 2 and result.best_val_loss == result.best_val_loss


def test_prior_preservation_with_buckets_is_refused(tiny_model: Path, buckets: Path, square: Path) -> None:
    class_split = read_split(square / "validation")
    params = tp(prior_preservation={"enabled": True, "class_prompt": "a shape"})
    with pytest.raises(ParamsError, match="prior_preservation needs one image size"):
        train(load_components(str(tiny_model)), *splits_of(buckets), params, class_split=class_split)
