"""Feature extractors chosen in params: real loading paths on tiny saved models, and the offline messages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from pipeline import features, metrics
from pipeline.features import (
    INCEPTION_WEIGHTS_FILE,
    MissingWeightsError,
    Precomputed,
    TinyImageFeatures,
    build_clip,
    build_image_features,
    extract,
)


def _images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture
def hub_dir(tmp_path: Path):
    """An empty torch hub folder, restored afterwards."""
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield tmp_path / "torch-hub"
    torch.hub.set_dir(before)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_missing_inception_weights_name_the_file_and_the_folder(hub_dir: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        build_image_features("inception")
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message
    assert str(hub_dir / "checkpoints") in message


def test_missing_inception_weights_file_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=f"Place {INCEPTION_WEIGHTS_FILE} in {tmp_path}"):
        build_image_features(str(tmp_path / INCEPTION_WEIGHTS_FILE))


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_what_to_install(hub_dir: Path) -> None:
    (hub_dir / "checkpoints").mkdir(parents=True)
    (hub_dir / "checkpoints" / INCEPTION_WEIGHTS_FILE).write_bytes(b"not read: the import fails first")
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        build_image_features("inception")


def test_missing_dinov2_offline_names_the_files_and_the_cache_folder(empty_hf_cache: Path) -> None:
    with pytest.raises(MissingWeightsError) as err:
        build_image_features("dinov2")
    message = str(err.value)
    assert "config.json" in message and "model.safetensors" in message
    assert str(empty_hf_cache / "models--facebook--dinov2-base") in message


def test_missing_clip_hub_id_offline_names_the_cache_folder(empty_hf_cache: Path) -> None:
    with pytest.raises(MissingWeightsError, match="models--openai--clip-vit-base-patch32"):
        build_clip("openai/clip-vit-base-patch32", tokenizer=None)


def test_incomplete_local_clip_folder_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError) as err:
        build_clip(str(tmp_path), tokenizer=None)
    # config.json is there, so the list of files to place starts with the weights.
    assert "Place model.safetensors or pytorch_model.bin, preprocessor_config.json" in str(err.value)
    assert f"in the folder {tmp_path.resolve()}" in str(err.value)


def test_local_dinov2_folder_is_loaded_with_from_pretrained(tmp_path: Path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 32, "width": 32}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}'
    )
    extractor, plumbing_only = build_image_features(str(tmp_path / "dino"))
    assert not plumbing_only
    assert extractor.num_features == 32 and extractor.size == 32
    images = _images(5)
    feats = extract(extractor, images, batch_size=2)
    assert feats.shape == (5, 32) and feats.dtype == torch.float64
    assert torch.allclose(feats, extract(extractor, images, batch_size=5))  # batching does not change features
    assert not torch.allclose(feats[0], feats[1])


def test_local_clip_folder_scores_like_torchmetrics_clipscore(tmp_path: Path) -> None:
    """A saved CLIP loads through `evaluate.clip_model: <folder>`, and our batched per-image score is torchmetrics'."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPTokenizer

    from pipeline.tiny import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    model, processor = features.tiny_clip(tokenizer, seed=3)
    model.clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    (clip, proc), plumbing_only = build_clip(str(tmp_path / "clip"), tokenizer=None)
    assert not plumbing_only

    images, prompts = _images(3, size=40), ["a red circle", "a blue square on a black background", "a triangle"]
    ours = metrics.clip_scores(
        metrics.image_embeddings(clip, proc, images, batch_size=2), metrics.text_embeddings(clip, proc, prompts)
    )
    reference = CLIPScore(model_name_or_path=lambda: (clip, proc))
    for image, prompt, score in zip(images, prompts, ours, strict=True):
        reference.update(image, prompt)
        assert float(reference.compute()) == pytest.approx(score, abs=1e-4)
        reference.reset()


def test_tiny_extractors_are_flagged_plumbing_only() -> None:
    extractor, plumbing_only = build_image_features("tiny", seed=1)
    assert plumbing_only and isinstance(extractor, TinyImageFeatures)
    again, _ = build_image_features("tiny", seed=1)
    assert torch.equal(extract(extractor, _images(2)), extract(again, _images(2)))  # seeded


def test_precomputed_features_give_torchmetrics_fid_unchanged() -> None:
    """FID on features extracted once equals torchmetrics extracting them itself."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = TinyImageFeatures(seed=0)
    real, fake = _images(12, seed=1), _images(10, seed=2)
    direct = FrechetInceptionDistance(feature=extractor)
    direct.update(real, real=True)
    direct.update(fake, real=False)
    shared = metrics.fid(extract(extractor, real), extract(extractor, fake))
    assert shared == pytest.approx(float(direct.compute()), rel=1e-4)
    assert Precomputed(7)(torch.ones(2, 7)).shape == (2, 7)
