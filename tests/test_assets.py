"""The committed pre-trained base model (assets/tiny-shapes-sd): intact, standard, drawing, and installed by init."""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.assets import ASSETS, AssetError, verify
from pipeline.world import BASE_COLOURS, NEW_COLOURS, dominant_colour, judge_pixels, sample

BASE = ASSETS / "tiny-shapes-sd"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_committed_base_matches_its_manifest() -> None:
    manifest = verify(BASE)
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= set(
        manifest["files"]
    )
    assert "text_encoder/model.safetensors" in manifest["files"] and "tokenizer/tokenizer.json" in manifest["files"]
    assert manifest["command"].startswith("python -m pipeline.pretrain_base --out assets/tiny-shapes-sd")


def test_a_flipped_byte_is_caught_naming_the_file(tmp_path: Path) -> None:
    copy = shutil.copytree(BASE, tmp_path / "copy")
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="unet/diffusion_pytorch_model.safetensors does not match"):
        verify(copy)


def test_it_loads_as_stock_sd15_components(pipe) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler) and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # real CLIP ids
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on its own latents, not copied from SD


def test_the_purple_token_is_still_its_random_initialisation(pipe) -> None:
    """Pre-training never showed purple: its embedding row is the seeded init, bit for bit; red's moved."""
    from pipeline.pretrain_base import build_models

    _, fresh, _ = build_models(seed=0)
    trained = pipe.text_encoder.get_input_embeddings().weight
    initial = fresh.get_input_embeddings().weight
    (purple,) = pipe.tokenizer(list(NEW_COLOURS)[0], add_special_tokens=False).input_ids
    (red,) = pipe.tokenizer("red", add_special_tokens=False).input_ids
    assert torch.equal(trained[purple], initial[purple])
    assert not torch.allclose(trained[red], initial[red])


def test_the_pixel_judge_reads_true_renders() -> None:
    for image, scene in sample(60, 64, random.Random(0)):
        assert judge_pixels(image) == (scene.shape, scene.colour, scene.background)


def test_it_draws_the_asked_colour_and_background(pipe) -> None:
    # The evaluate stage's sampler settings: the model folder's scheduler, 10 steps, guidance 5.
    prompts = ["a red square on a black background", "a green circle on a black background"]
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=10, guidance_scale=5.0, generator=generators, height=64, width=64).images
    assert [dominant_colour(im) for im in images] == [("red", "black"), ("green", "black")]
    assert set(BASE_COLOURS) >= {"red", "green"}


def test_init_installs_the_pretrained_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import cmd_init

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert cmd_init(argparse.Namespace(project=str(tmp_path))) == 0
    model = tmp_path / "models" / "tiny-sd"
    assert verify(model)["files"] == verify(BASE)["files"]
    assert not model.with_name("tiny-sd.partial").exists()
    out = capsys.readouterr().out
    assert "installed" in out and "never seen purple" in out
    assert (tmp_path / "data" / "demo" / "metadata.jsonl").is_file()
