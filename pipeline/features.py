"""Feature extractors for the image metrics, chosen in params, and the torchmetrics CLIPScore workaround.

- `evaluate.clip_model`: `judge` | `tiny` | a hub id | a local CLIP folder (text-image scores: CLIP score, zero-shot
  labels).
- `evaluate.image_features`: `judge` | `tiny` | `inception` | `dinov2` | a local transformers vision-model folder | a
  local Inception weights file (`.pth`) (image-set metrics: FID, KID, precision/recall, density/coverage,
  memorisation).

`judge` (the default) is the shape-world judges shipped in `assets/judges/` (`pipeline.pretrain_judges`): a tiny CLIP
and the classifier's penultimate features, trained on renders of `pipeline/world.py`, so on the default world their
numbers mean something; they are checked against their MANIFEST.json before loading.

Real weights come from a local folder or the Hugging Face / torch hub cache, never from a download at run time here:
when they are missing offline, `MissingWeightsError` names the file to place and the folder to put it in. `tiny`
builds small seeded random networks in code, for the embedded demo and the tests; every report that uses them says
their numbers only check the plumbing.

Every image extractor is an `nn.Module` mapping uint8 images (N, 3, H, W) to features (N, D) with a `num_features`
attribute: the interface torchmetrics' FID, KID and MiFID accept in place of Inception.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.assets import ASSETS, verify
from pipeline.config import HUB_ID

TINY = "tiny"
JUDGE = "judge"
JUDGES = ASSETS / "judges"
PLUMBING_ONLY = "tiny random extractor built in code: numbers check the plumbing only, not image quality"

# torch-fidelity's port of the TF Inception (the weights behind published FIDs), as torchmetrics loads it.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
# DINOv2 features make FD/precision/recall rank models more like people do than Inception's (Stein et al. 2023,
# "Exposing flaws of generative model evaluation metrics", NeurIPS). ViT-B/14: a middle ground for CPU evaluation.
DINOV2_HUB_ID = "facebook/dinov2-base"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights are not on this machine; the message names the file and the folder to put it in."""


# --------------------------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------------------------


class PooledCLIP(nn.Module):
    """Make `get_image_features`/`get_text_features` return the pooled tensor again.

    With transformers >= 5 they return an output object, which torchmetrics 1.9.0's CLIPScore cannot normalise
    (Lightning-AI/torchmetrics#3407, fixed after 1.9.0); CLIPScore accepts a callable returning (model, processor).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _pooled(out: Any) -> torch.Tensor:
        return out if torch.is_tensor(out) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._pooled(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._pooled(self.clip.get_text_features(*args, **kwargs))


def tiny_clip(tokenizer: Any, seed: int = 0) -> tuple[PooledCLIP, Any]:
    """A seeded, randomly initialised CLIP (32 px vision tower) sharing the base model's CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    return PooledCLIP(model), processor


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True", "ON", "YES")


def _require_files(name_or_path: str, key: str, needs: list[tuple[str, ...]], what: str) -> None:
    """Raise `MissingWeightsError` unless every group in `needs` has one file in the folder or the hub cache.

    A local folder is checked directly; a hub id is checked in the Hugging Face cache when offline (online,
    from_pretrained downloads what is missing).
    """
    folder = Path(name_or_path)
    if folder.is_dir():
        missing = [group for group in needs if not any((folder / f).is_file() for f in group)]
        where = f"the folder {folder.resolve()}"
    elif HUB_ID.match(name_or_path):
        if not _offline():
            return
        from huggingface_hub import try_to_load_from_cache

        missing = [
            group for group in needs if not any(isinstance(try_to_load_from_cache(name_or_path, f), str) for f in group)
        ]
        repo_folder = _hub_cache() / f"models--{name_or_path.replace('/', '--')}" / "snapshots" / "<revision>"
        where = (
            f"the Hugging Face cache ({repo_folder}; fill it with `HF_HUB_OFFLINE=0 huggingface-cli download "
            f"{name_or_path}` on a machine with internet), or download {name_or_path} into a local folder and set "
            f"{key} to that folder"
        )
    else:
        raise MissingWeightsError(
            f"{key}={name_or_path!r} is neither a local folder nor a hub id (owner/name). Create the folder with "
            f"{what} in it, or use a hub id (owner/name)."
        )
    if missing:
        files = ", ".join(" or ".join(group) for group in missing)
        raise MissingWeightsError(
            f"{what} for {key}={name_or_path!r} are not on this machine (offline). Place {files} in {where}."
        )


def load_clip(name_or_path: str, key: str = "evaluate.clip_model") -> tuple[PooledCLIP, Any]:
    """A real CLIP (model + processor) from a local folder or the Hugging Face cache."""
    from transformers import CLIPModel, CLIPProcessor

    _require_files(
        name_or_path,
        key,
        [
            ("config.json",),
            ("model.safetensors", "pytorch_model.bin"),
            ("preprocessor_config.json", "processor_config.json"),
            ("tokenizer.json", "vocab.json"),
        ],
        "CLIP weights",
    )
    model = CLIPModel.from_pretrained(name_or_path).eval().requires_grad_(False)
    return PooledCLIP(model), CLIPProcessor.from_pretrained(name_or_path)


def load_judge_clip(folder: Path | None = None) -> tuple[PooledCLIP, Any]:
    """The shape-world tiny CLIP judge (`assets/judges/clip`), after checking its files against MANIFEST.json."""
    folder = folder or JUDGES / "clip"
    verify(folder)
    return load_clip(str(folder), key="evaluate.clip_model=judge")


def build_clip(spec: str, tokenizer: Any, seed: int = 0) -> tuple[tuple[PooledCLIP, Any], bool]:
    """((model, processor), is_plumbing_only) for `evaluate.clip_model`."""
    if spec == TINY:
        return tiny_clip(tokenizer, seed), True
    if spec == JUDGE:
        return load_judge_clip(), False
    return load_clip(spec), False


def judges_fingerprint(folder: Path | None = None) -> str:
    """sha256 over the shipped judges' MANIFEST.json files: it changes whenever a judge is rebuilt."""
    import hashlib

    folder = folder or JUDGES
    digest = hashlib.sha256()
    for name in ("classifier", "clip"):
        manifest = folder / name / "MANIFEST.json"
        digest.update(name.encode() + (manifest.read_bytes() if manifest.is_file() else b"missing"))
    return digest.hexdigest()


def describe_clip(spec: str) -> str:
    """What `evaluate.clip_model` is, in words, for reports."""
    if spec == TINY:
        return "tiny random CLIP (plumbing only)"
    if spec == JUDGE:
        from pipeline.judges import CLIP_DESCRIPTION

        return CLIP_DESCRIPTION
    return f"CLIP {spec}"


# --------------------------------------------------------------------------------------------------------------------
# Image features
# --------------------------------------------------------------------------------------------------------------------


class TinyImageFeatures(nn.Module):
    """A seeded random conv net mapping uint8 images (N, 3, H, W) to 64 features, for FID/KID plumbing offline.

    torchmetrics' FID/KID accept any module with a `num_features` attribute in place of Inception.
    """

    num_features = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, self.num_features, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.net(nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True))


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception v3 (torch-fidelity's port of the TF graph): 2048 pool features of uint8 images."""

    num_features = 2048

    def __init__(self, weights: Path) -> None:
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
            )
        except (ImportError, ModuleNotFoundError) as exc:
            raise ModuleNotFoundError(
                "evaluate.image_features=inception needs torch-fidelity (and the torchvision build that matches your "
                f"torch): `pip install torch-fidelity torchvision`. ({exc})"
            ) from exc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).reshape(len(images), -1)


def inception_weights(spec: str) -> Path:
    """The Inception weights file: `spec` itself when it is a .pth path, else torch hub's checkpoint cache."""
    if spec != "inception":
        path = Path(spec)
        if not path.is_file():
            raise MissingWeightsError(
                f"evaluate.image_features={spec!r}: no such file. Place {path.name} in {path.parent.resolve()} "
                f"(Inception weights for FID: {INCEPTION_URL})."
            )
        return path
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise MissingWeightsError(
            f"Inception weights for evaluate.image_features='inception' are not on this machine (offline). Place "
            f"{INCEPTION_WEIGHTS_FILE} in {folder} (download it from {INCEPTION_URL}), or set "
            "evaluate.image_features to the path of that file."
        )
    return path


class HFImageFeatures(nn.Module):
    """A transformers vision backbone (DINOv2, CLIP vision, ViT...) as an image feature extractor.

    Images are resized to the processor's crop size (224 by default) and normalised with its mean and std; the
    feature is the pooled output (DINOv2: the layer-normed CLS token), or the projected image embedding for CLIP.
    """

    def __init__(self, model: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
            return (out if torch.is_tensor(out) else out.pooler_output).float()
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


def load_hf_image_features(name_or_path: str) -> HFImageFeatures:
    from transformers import AutoModel

    _require_files(
        name_or_path,
        "evaluate.image_features",
        [("config.json",), ("model.safetensors", "pytorch_model.bin")],
        "image feature weights",
    )
    model = AutoModel.from_pretrained(name_or_path)
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    processor_file = Path(name_or_path) / "preprocessor_config.json"
    if not processor_file.is_file() and not Path(name_or_path).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "preprocessor_config.json")
        processor_file = Path(cached) if isinstance(cached, str) else processor_file
    if processor_file.is_file():
        config = json.loads(processor_file.read_text())
        crop = config.get("crop_size")
        size = int(crop["height"]) if isinstance(crop, dict) else int(crop or size)
        mean, std = tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std))
    return HFImageFeatures(model, size, mean, std)


def load_judge_classifier(folder: Path | None = None) -> nn.Module:
    """The shape-world classifier judge (`assets/judges/classifier`, a `pipeline.judges.ShapeJudge`), after checking
    its files against MANIFEST.json. As an extractor it gives its penultimate-layer features."""
    from pipeline.judges import ShapeJudge

    folder = folder or JUDGES / "classifier"
    verify(folder)
    return ShapeJudge.from_pretrained(folder)


def build_image_features(spec: str, seed: int = 0) -> tuple[nn.Module, bool]:
    """(extractor, is_plumbing_only) for `evaluate.image_features`."""
    if spec == TINY:
        return TinyImageFeatures(seed), True
    if spec == JUDGE:
        return load_judge_classifier(), False
    if spec == "inception" or spec.endswith((".pth", ".pt")):
        return InceptionFeatures(inception_weights(spec)), False
    if spec == "dinov2":
        return load_hf_image_features(DINOV2_HUB_ID), False
    return load_hf_image_features(spec), False


def describe_image_features(spec: str) -> str:
    """What `evaluate.image_features` is, in words, for reports."""
    if spec == TINY:
        return "tiny random conv features (plumbing only)"
    if spec == JUDGE:
        from pipeline.judges import CLASSIFIER_DESCRIPTION

        return CLASSIFIER_DESCRIPTION
    if spec == "inception" or spec.endswith((".pth", ".pt")):
        return f"Inception v3 pool features ({spec})"
    if spec == "dinov2":
        return f"DINOv2 features ({DINOV2_HUB_ID})"
    return f"vision-model features ({spec})"


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (the CPU for one without any)."""
    return next(module.parameters(), torch.empty(0)).device


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Features (N, D) of uint8 images (N, 3, H, W), in batches on the extractor's device, as float64 on the CPU."""
    device = module_device(extractor)
    out = [extractor(images[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)


class Precomputed(nn.Module):
    """Identity "extractor" for features already extracted: torchmetrics' FID/KID/MiFID then only do statistics.

    Each image set is run through the real extractor once (`extract`) and its features shared by every metric and
    both models, instead of every metric re-extracting them.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
