"""The train stage on the tiny model: resume after SIGKILL, the objective's knobs, what trains, and its outputs."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipeline import checkpoint
from pipeline.config import ParamsError, TrainParams, parse_params
from pipeline.demo_data import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from pipeline.diffusion import Split, load_components, read_split
from pipeline.train import (
    EMA,
    TRAINING_FILE,
    NonFiniteLoss,
    loss_weights,
    main,
    save_adapter,
    train,
)

REPO = Path(__file__).resolve().parents[1]


def write_split(folder: Path, n: int, seed: int, size: int = 64) -> Path:
    """A prepared split as the prepare stage writes it: PNGs plus metadata.jsonl (file_name, text, sha256)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        shape, colour, bg = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        image = draw_shape(shape, COLOURS[colour], BACKGROUNDS[bg], size, rng)
        name = f"{i:03d}.png"
        image.save(folder / name)
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        rows.append({"file_name": name, "text": f"a {colour} {shape} on a {bg} background", "sha256": digest})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    write_split(root / "train", 12, seed=1)
    write_split(root / "validation", 4, seed=2)
    return root


@pytest.fixture(scope="session")
def splits(prepared: Path) -> tuple[Split, Split]:
    return read_split(prepared / "train"), read_split(prepared / "validation")


def tp(**overrides: Any) -> TrainParams:
    """Small, fast train params for the tiny model."""
    base = {"max_steps": 4, "batch_size": 4, "learning_rate": 1e-2, "validation_every": 2, "validation_timesteps": 2}
    return TrainParams(**(base | overrides))


def write_params(project: Path, model: Path, prepared: Path, **train: Any) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["model"] = str(model)
    params["data"]["source"] = str(prepared)  # only checked to exist: train reads --prepared
    params["train"] |= train
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project / "params.yaml"


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def assert_same_training(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lr: float, steps: int) -> None:
    """Two runs did the same maths: equal weights up to Adam's sign instability.

    Adam's first steps move each weight by about lr * sign(gradient); where a gradient is ~0 (LoRA A while B is still
    ~0), float rounding can flip that sign, so a few elements may differ by up to 2 * lr per step, no more.
    """
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert float((diff > 1e-5).float().mean()) < 0.05, f"{int((diff > 1e-5).sum())} of {diff.numel()} differ"
    assert float(diff.max()) <= 2 * lr * steps + 1e-6


def curve(report: Path) -> list[dict[str, str]]:
    with open(report / "curve.csv") as handle:
        return list(csv.DictReader(handle))


# --- checkpoint and resume ---------------------------------------------------------------------------------------


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:
    settings = {
        "max_steps": 12,
        "batch_size": 4,
        "learning_rate": 0.01,
        "lora_dropout": 0.1,  # exercises torch's global RNG, which the checkpoint must restore too
        "validation_every": 5,
        "validation_timesteps": 2,
        "checkpoint_every": 2,
        "checkpoints_total_limit": 2,
        "log_every": 3,
        "export_kohya": True,
    }
    params = write_params(tmp_path, tiny_model, prepared, **settings)
    ckpts = tmp_path / "checkpoints"
    cmd = [sys.executable, "-m", "pipeline.train", "--params", str(params), "--prepared", str(prepared)]
    cmd += ["--checkpoints", str(ckpts)]
    killed_out = tmp_path / "adapter"
    env = os.environ | {"PYTHONPATH": str(REPO)}

    proc = subprocess.Popen(
        [*cmd, "--out", str(killed_out), "--report", str(tmp_path / "report")],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not checkpoint.step_dirs(ckpts) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = checkpoint.step_dirs(ckpts)[-1][0]
    assert 0 < killed_at < settings["max_steps"]
    assert not killed_out.exists()

    resumed = subprocess.run(
        [*cmd, "--out", str(killed_out), "--report", str(tmp_path / "report")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["resumed_from_step"] >= killed_at
    assert len(checkpoint.step_dirs(ckpts)) == 2  # rotation keeps checkpoints_total_limit

    clean_out = tmp_path / "clean"
    clean = ["--params", str(params), "--prepared", str(prepared), "--out", str(clean_out)]
    assert main([*clean, "--report", str(tmp_path / "r2")]) == 0
    assert (clean_out / "adapter_kohya.safetensors").is_file()
    assert "Base model" in (clean_out / "README.md").read_text()
    a, b = adapter_tensors(killed_out), adapter_tensors(clean_out)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    resumed_curve, clean_curve = curve(tmp_path / "report"), curve(tmp_path / "r2")
    assert [r["step"] for r in resumed_curve] == [r["step"] for r in clean_curve]
    # Training time, at each step the losses reached the host, runs on across the kill (from the checkpoint's clock).
    seconds = [float(r["seconds"]) for r in resumed_curve if r["seconds"]]
    assert len(seconds) >= 4 and seconds == sorted(seconds) and seconds[0] > 0
    for x, y in zip(resumed_curve, clean_curve, strict=True):
        for column in ("train_loss", "val_loss"):
            if x[column] or y[column]:
                assert float(x[column]) == pytest.approx(float(y[column]), rel=1e-4), (x, y)


def test_checkpoint_of_other_params_is_not_resumed(tmp_path: Path, tiny_model: Path, splits) -> None:
    train_split, val_split = splits
    params = tp(max_steps=2, checkpoint_every=2)
    train(load_components(str(tiny_model)), train_split, val_split, params, checkpoints=tmp_path, fingerprint="a")
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2]
    found, reason, skipped = checkpoint.load_newest(tmp_path, "b")
    assert found is None and "fingerprint mismatch" in reason and skipped == []
    result = train(
        load_components(str(tiny_model)), train_split, val_split, tp(max_steps=1), checkpoints=tmp_path, fingerprint="b"
    )
    assert result.resumed_from_step is None and result.steps == 1
    assert checkpoint.step_dirs(tmp_path) == []  # the other run's checkpoints were cleared


def test_a_truncated_checkpoint_is_skipped_and_the_older_intact_one_resumed(
    tmp_path: Path, tiny_model: Path, splits, capsys: pytest.CaptureFixture[str]
) -> None:
    train_split, val_split = splits
    params = tp(max_steps=4, checkpoint_every=2, checkpoints_total_limit=2)
    train(load_components(str(tiny_model)), train_split, val_split, params, checkpoints=tmp_path, fingerprint="a")
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [2, 4]
    newest = tmp_path / "step-000004" / checkpoint.TENSORS
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # e.g. a disk that filled up mid-copy
    capsys.readouterr()

    result = train(
        load_components(str(tiny_model)), train_split, val_split, tp(max_steps=6, checkpoint_every=2,
        checkpoints_total_limit=2), checkpoints=tmp_path, fingerprint="a",
    )  # fmt: skip
    assert result.resumed_from_step == 2 and result.steps == 6
    err = capsys.readouterr().err
    assert f"skipped damaged checkpoint {tmp_path / 'step-000004'}: tensors.safetensors unreadable" in err
    assert checkpoint.load(tmp_path / "step-000004").step == 4  # written again, whole, by the resumed run


def test_a_full_disk_during_a_checkpoint_write_is_a_clear_error_and_leaves_no_partial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import safetensors.torch

    tensors = {"w": torch.ones(256, 256)}
    checkpoint.save(tmp_path, 2, tensors, {}, keep=3, run_fingerprint="a")

    def disk_full(data: dict, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\0" * 1000)  # half a file, as a full disk leaves it
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError) as failed:
        checkpoint.save(tmp_path, 4, tensors, {}, keep=3, run_fingerprint="a")
    message = str(failed.value)
    assert f"could not write checkpoint {tmp_path / 'step-000004'} (No space left on device)" in message
    assert "MiB free on that disk" in message and "needs about 0.2 MiB" in message
    assert failed.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]  # no partial folder left behind
    assert checkpoint.load(tmp_path / "step-000002").step == 2


def test_fingerprint_ignores_bookkeeping_only() -> None:
    base = tp().model_dump()
    fp = checkpoint.fingerprint(base, "m", {"d": 1})
    assert checkpoint.fingerprint(base | {"checkpoint_every": 7, "log_every": 3}, "m", {"d": 1}) == fp
    assert checkpoint.fingerprint(base | {"learning_rate": 0.5}, "m", {"d": 1}) != fp
    assert checkpoint.fingerprint(base, "m", {"d": 2}) != fp
    assert checkpoint.fingerprint(base, "other", {"d": 1}) != fp


def test_optimizer_state_round_trips_through_safetensors() -> None:
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    tensors, meta = checkpoint.flatten_optimizer(opt.state_dict())
    meta = json.loads(json.dumps(meta))  # what state.json stores
    restored = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    restored.load_state_dict(checkpoint.unflatten_optimizer(tensors, meta))
    for key, value in opt.state_dict()["state"][0].items():
        torch.testing.assert_close(restored.state_dict()["state"][0][key], value)


# --- the objective -----------------------------------------------------------------------------------------------


def test_min_snr_weights_for_epsilon_and_v_prediction() -> None:
    from diffusers import DDPMScheduler

    t = torch.tensor([0, 500, 999])
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind
        )
        a = scheduler.alphas_cumprod[t]
        snr = a / (1 - a)
        weights = loss_weights(scheduler, t, torch.zeros(3, dtype=torch.bool), tp(snr_gamma=5.0))
        expected = torch.minimum(snr, torch.tensor(5.0)) / (snr if kind == "epsilon" else snr + 1)
        torch.testing.assert_close(weights, expected)
        assert weights[0] < 0.01 and weights[2] == pytest.approx(1.0 if kind == "epsilon" else snr[2] / (snr[2] + 1))
    half = tp(prior_preservation={"prior_loss_weight": 0.5})
    prior = loss_weights(scheduler, t, torch.tensor([False, True, True]), half)
    assert prior.tolist() == [1.0, 0.5, 0.5]


def test_gradient_accumulation_matches_the_big_batch(tiny_model: Path, splits) -> None:
    train_split, val_split = splits
    runs = {}
    for name, batch, accumulate in (("big", 8, 1), ("accumulated", 4, 2)):
        result = train(
            load_components(str(tiny_model)),
            train_split,
            val_split,
            tp(max_steps=2, batch_size=batch, gradient_accumulation_steps=accumulate),
            fingerprint=name,
        )
        runs[name] = result
    assert runs["accumulated"].cost["effective_batch_size"] == 8
    assert_same_training(runs["accumulated"].lora_state, runs["big"].lora_state, lr=tp().learning_rate, steps=2)
    assert [r.get("train_loss") for r in runs["big"].history] == pytest.approx(
        [r.get("train_loss") for r in runs["accumulated"].history], rel=1e-5
    )


def test_regularisers_change_training_and_stay_reproducible(tiny_model: Path, splits) -> None:
    train_split, val_split = splits

    def run(**kw: Any) -> dict[str, torch.Tensor]:
        params = tp(max_steps=1, validation_timesteps=1, **kw)
        return train(load_components(str(tiny_model)), train_split, val_split, params).lora_state

    plain = run()
    for knobs in (
        {"snr_gamma": 5.0},
        {"input_perturbation": 0.1},
        {"caption_dropout": 0.5},
        {"noise_offset": 0.1},
        {"prediction_type": "v_prediction"},
        {"ema_decay": 0.9},
    ):
        tuned = run(**knobs)
        assert any(not torch.allclose(tuned[k], plain[k]) for k in tuned), f"{knobs} changed nothing"
    # Every draw comes from the seeded generator: the same knobs give the same weights.
    first, second = run(caption_dropout=0.5, input_perturbation=0.1), run(caption_dropout=0.5, input_perturbation=0.1)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_random_flip_mirrors_half_the_images(tiny_model: Path, splits) -> None:
    from pipeline.train import LoopState, draw_step, encode_data

    components = load_components(str(tiny_model))
    data = encode_data(components, *splits, None, True, torch.device("cpu"), random_flip=True)
    (latents,), (flipped,) = data.latents, data.flipped  # one image size: one group
    assert flipped.shape == latents.shape and not torch.allclose(flipped, latents)
    draw = draw_step(LoopState(), data, tp(), 400, torch.Generator().manual_seed(0), 1000)
    assert 0.4 < float(draw["flip"].float().mean()) < 0.6
    plain = train(load_components(str(tiny_model)), *splits, tp(max_steps=1)).lora_state
    flipped = train(load_components(str(tiny_model)), *splits, tp(max_steps=1), random_flip=True).lora_state
    assert any(not torch.allclose(plain[k], flipped[k]) for k in plain)


def test_ema_tracks_and_swaps_back() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA({"p": p}, decay=0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update({"p": p}, step=100)  # decay min(0.5, 101/110) = 0.5
    torch.testing.assert_close(ema.shadow["p"], torch.full((2,), 0.5))
    with ema.applied({"p": p}):
        torch.testing.assert_close(p.detach(), torch.full((2,), 0.5))
    torch.testing.assert_close(p.detach(), torch.ones(2))


def test_caption_dropout_uses_the_empty_prompt(tiny_model: Path, splits) -> None:
    from pipeline.train import batch_conditioning, encode_data

    components = load_components(str(tiny_model))
    data = encode_data(components, *splits, None, True, torch.device("cpu"))
    rows = {"idx": torch.tensor([0, 1, 2]), "drop": torch.tensor([True, False, True])}
    cond = batch_conditioning(components, data, rows, torch.device("cpu"))
    torch.testing.assert_close(cond["emb"][0], data.empty_cond["emb"][0])
    torch.testing.assert_close(cond["emb"][1], data.cond["emb"][1])
    torch.testing.assert_close(cond["emb"][2], data.empty_cond["emb"][0])


def test_non_finite_loss_stops_with_the_step(tiny_model: Path, splits) -> None:
    train_split, val_split = splits
    params = tp(max_steps=20, learning_rate=1e12, max_grad_norm=1e30, log_every=5, validation_every=100)
    with pytest.raises(NonFiniteLoss, match=r"at step \d+"):
        train(load_components(str(tiny_model)), train_split, val_split, params)


# --- what trains -------------------------------------------------------------------------------------------------


def test_max_steps_zero_saves_an_adapter_equal_to_the_base(tmp_path: Path, tiny_model: Path, splits) -> None:
    result = train(load_components(str(tiny_model)), *splits, tp(max_steps=0))
    assert result.steps == 0 and result.best_step == 0
    counts = result.parameters
    assert counts["trainable"] == counts["per_model"]["unet"]["trainable"] > 0
    assert counts["frozen"] > 100 * counts["trainable"]
    save_adapter(result, tmp_path / "adapter")
    ups = [v for k, v in adapter_tensors(tmp_path / "adapter").items() if "lora.up" in k or "lora_B" in k]
    assert ups and all(torch.count_nonzero(v) == 0 for v in ups)


def test_lora_presets_and_alpha_survive_saving(tmp_path: Path, tiny_model: Path, splits) -> None:
    from diffusers import StableDiffusionPipeline

    result = train(
        load_components(str(tiny_model)),
        *splits,
        tp(max_steps=2, lora_targets="attention+ffn+conv", lora_rank=2, lora_alpha=8),
    )
    keys = set(result.lora_state)
    assert any(".ff.net.2." in k for k in keys) and any(".conv1." in k for k in keys)
    save_adapter(result, tmp_path / "adapter")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    pipe.load_lora_weights(str(tmp_path / "adapter"))
    # Loaded with alpha / rank = 4 (from the saved LoRA config), the UNet matches the trained one.
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = result.models["unet"](x, t, emb).sample
        torch.testing.assert_close(pipe.unet(x, t, emb).sample, expected, atol=1e-5, rtol=1e-4)


def test_full_finetune_trains_only_the_named_blocks(tmp_path: Path, tiny_model: Path, splits) -> None:
    from diffusers import UNet2DConditionModel

    components = load_components(str(tiny_model))
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    result = train(components, *splits, tp(max_steps=2, method="full", train_blocks=["up_blocks.1", "mid_block"]))
    unet_counts = result.parameters["per_model"]["unet"]
    expected = sum(
        p.numel() for n, p in components.unet.named_parameters() if n.startswith(("up_blocks.1.", "mid_block."))
    )
    assert unet_counts["trainable"] == expected > 0
    save_adapter(result, tmp_path / "out")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "out", subfolder="unet").state_dict()
    changed = {k for k in before if not torch.equal(before[k], saved[k])}
    assert changed and all(k.startswith(("up_blocks.1.", "mid_block.")) for k in changed)
    described = json.loads((tmp_path / "out" / TRAINING_FILE).read_text())
    assert described["method"] == "full" and described["trained"] == ["unet"]
    assert described["architecture"] == "sd" and described["prediction_type"] == "epsilon"


def test_train_blocks_that_match_nothing_is_an_error(tiny_model: Path, splits) -> None:
    with pytest.raises(ParamsError, match="matches no UNet parameter"):
        train(load_components(str(tiny_model)), *splits, tp(method="full", train_blocks=["upblocks.9"]))


def test_params_reject_inconsistent_train_settings() -> None:
    text = (REPO / "params.yaml").read_text()
    params = yaml.safe_load(text)
    for bad, message in (
        ({"train_blocks": ["mid_block"]}, "method 'full' only"),
        ({"lora_targets": "everything"}, "lora_targets"),
        ({"prior_preservation": {"enabled": True}}, "class_prompt is required"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
    ):
        broken = params | {"train": params["train"] | bad}
        with pytest.raises(ParamsError, match=message):
            parse_params(yaml.safe_dump(broken), Path("params.yaml"))


def test_text_encoder_lora_trains_and_loads_with_its_alpha(tmp_path: Path, tiny_model: Path, splits) -> None:
    from diffusers import StableDiffusionPipeline

    from pipeline.diffusion import load_lora

    params = tp(max_steps=2, train_text_encoder=True, text_encoder_lr=1e-2, lora_rank=2, lora_alpha=8)
    result = train(load_components(str(tiny_model)), *splits, params)
    assert result.parameters["per_model"]["text_encoder"]["trainable"] > 0
    save_adapter(result, tmp_path / "adapter")
    keys = adapter_tensors(tmp_path / "adapter").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model))
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        load_lora(pipe, tmp_path / "adapter")  # stock load_lora_weights where this stack's versions allow it
        loaded, trained = pipe.text_encoder(ids)[0], result.models["text_encoder"](ids)[0]
    assert not torch.allclose(base, loaded, atol=1e-4)
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)  # alpha / rank = 4 applied on load
    x, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, emb).sample, result.models["unet"](x, t, emb).sample, atol=1e-5, rtol=1e-4
        )
    pipe.fuse_lora()  # as evaluate does: merged into the weights, the same function
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], trained, atol=1e-4, rtol=1e-3)


def test_full_text_encoder_trains_per_step_and_saves_whole(tmp_path: Path, tiny_model: Path, splits) -> None:
    from transformers import CLIPTextModel

    components = load_components(str(tiny_model))
    before = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
    params = tp(max_steps=2, method="full", train_blocks=["mid_block"], train_text_encoder=True, text_encoder_lr=1e-3)
    result = train(components, *splits, params)
    assert set(result.models) == {"unet", "text_encoder"}
    save_adapter(result, tmp_path / "out")
    saved = CLIPTextModel.from_pretrained(tmp_path / "out", subfolder="text_encoder").state_dict()
    assert any(not torch.equal(before[k], saved[k]) for k in before if k in saved)


def test_prior_preservation_generates_class_images_once(tmp_path: Path, tiny_model: Path, splits) -> None:
    from pipeline.config import PriorPreservationParams
    from pipeline.prior import class_images

    prior = PriorPreservationParams(enabled=True, class_prompt="a shape", num_class_images=3, num_inference_steps=2)
    first = class_images(prior, str(tiny_model), None, 64, tmp_path, tmp_path / "cache")
    (folder,) = (tmp_path / "cache").iterdir()
    mtimes = [p.stat().st_mtime_ns for p in sorted(folder.iterdir())]
    second = class_images(prior, str(tiny_model), None, 64, tmp_path, tmp_path / "cache")
    assert [p.stat().st_mtime_ns for p in sorted(folder.iterdir())] == mtimes  # reused, not regenerated
    assert first.hashes == second.hashes and len(first.images) == 3 and set(first.captions) == {"a shape"}

    params = tp(max_steps=2, prior_preservation=prior.model_dump())
    result = train(load_components(str(tiny_model)), *splits, params, class_split=first)
    assert result.cost["images_seen"] == 2 * 2 * params.batch_size  # one class image per instance image


# --- speed settings and what a run costs ---------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: reset it around a test that trains in another precision."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield lambda: AcceleratorState._reset_state(reset_partial_state=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_frozen_weights_in_bf16_keep_lora_in_fp32_and_the_same_curve(
    tiny_model: Path, splits, fresh_accelerate_state
) -> None:
    runs = {}
    for frozen in ("no", "auto"):  # auto: bf16, the mixed-precision dtype
        components = load_components(str(tiny_model))
        result = train(components, *splits, tp(max_steps=4, mixed_precision="bf16", frozen_precision=frozen))
        dtypes = {p.dtype for p in components.unet.parameters() if not p.requires_grad}
        assert dtypes == ({torch.float32} if frozen == "no" else {torch.bfloat16})
        assert {v.dtype for v in result.lora_state.values()} == {torch.float32}
        runs[frozen] = [h["val_loss"] for h in result.history if "val_loss" in h]
    # bf16 weights round the frozen model a little: the curve stays within bf16's resolution of the fp32 one.
    torch.testing.assert_close(torch.tensor(runs["auto"]), torch.tensor(runs["no"]), rtol=3e-2, atol=1e-3)
    fresh_accelerate_state()
    with pytest.raises(ParamsError, match="frozen_precision: bf16 needs mixed precision"):
        train(load_components(str(tiny_model)), *splits, tp(mixed_precision="no", frozen_precision="bf16"))


def test_cost_counts_flops_per_image_and_mfu_against_a_given_peak(
    tiny_model: Path, splits, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv("SDFT_PEAK_TFLOPS", "0.5")
    costs = [train(load_components(str(tiny_model)), *splits, tp(batch_size=b)).cost for b in (2, 4)]
    assert costs[0]["flops_per_image"] == pytest.approx(costs[1]["flops_per_image"], rel=1e-6)  # per image
    components = load_components(str(tiny_model))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        components.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    # LoRA's backward computes input gradients through the frozen layers (weights' gradients only for LoRA): about
    # one more forward.
    assert 1.5 < costs[1]["flops_per_image"] / counter.get_total_flops() < 3.5
    cost = costs[1]
    assert cost["mfu"] == pytest.approx(cost["achieved_tflops"] / 0.5, abs=1e-4)  # both rounded
    assert cost["gpu_hours"] == 0.0 and cost["first_step_seconds"] > 0


def test_sample_grids_every_n_steps_and_for_the_best_weights(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:
    from PIL import Image

    from pipeline.samples import MIN_CELL
    from pipeline.train import SAMPLES_FILE

    params = write_params(
        tmp_path / "p", tiny_model, prepared, max_steps=4, batch_size=4, learning_rate=1e-2, validation_every=2,
        validation_timesteps=2, sample_every=2, sample_steps=3, sample_prompts=["a red circle", "a blue square"],
    )  # fmt: skip
    out, report = tmp_path / "adapter", tmp_path / "report"
    args = ["--params", str(params), "--prepared", str(prepared), "--out", str(out), "--report", str(report)]
    assert main(args) == 0
    grids = sorted(p.name for p in (report / "samples").iterdir())
    assert grids == ["best.png", "step_000002.png", "step_000004.png"]
    with Image.open(out / SAMPLES_FILE) as grid, Image.open(report / "samples" / "step_000002.png") as early:
        assert grid.width == early.width == 2 * MIN_CELL  # one column per prompt
        assert grid.height > 64  # the image, then its caption
    # Fixed prompts and seeds: the best weights' grid is the grid drawn at the best step.
    best_step = json.loads((report / "summary.json").read_text())["best_step"]
    assert best_step in (2, 4)
    with Image.open(out / SAMPLES_FILE) as grid, Image.open(report / "samples" / f"step_{best_step:06d}.png") as at:
        assert np.array_equal(np.asarray(grid), np.asarray(at))
    assert "![samples at the best step](samples.png)" in (out / "README.md").read_text()


def test_a_resumed_run_keeps_the_sample_grids_drawn_before(tmp_path: Path, tiny_model: Path, splits) -> None:
    params = tp(max_steps=4, sample_every=2, sample_steps=2, checkpoint_every=2, sample_prompts=["a red circle"])
    ckpts = tmp_path / "ckpts"
    first = train(load_components(str(tiny_model)), *splits, params, checkpoints=ckpts, fingerprint="run-a")
    assert sorted(first.samples) == [2, 4]
    assert sorted(p.name for p in (ckpts / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    # The same run again resumes at its last checkpoint (step 4) and reports the grids it drew before.
    again = train(load_components(str(tiny_model)), *splits, params, checkpoints=ckpts, fingerprint="run-a")
    assert again.resumed_from_step == 4 and sorted(again.samples) == [2, 4]
    assert np.array_equal(np.asarray(again.samples[2]), np.asarray(first.samples[2]))
    # Another run starts fresh: the old grids are not its own.
    other = tp(max_steps=1, sample_every=0, checkpoint_every=1)
    fresh = train(load_components(str(tiny_model)), *splits, other, checkpoints=ckpts, fingerprint="run-b")
    assert fresh.samples == {} and not list((ckpts / "samples").iterdir())
