"""Feature extractors for image metrics, and the torchmetrics CLIPScore workaround for transformers 5.

Real evaluations use real weights from the local cache or a hub id (`evaluate.clip_model`). Offline, and for the
embedded tiny default, a small seeded extractor is built in code; every report that uses it says its numbers only
check the plumbing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TINY = "tiny"
PLUMBING_ONLY = "tiny random extractor built in code: numbers check the plumbing only, not image quality"


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


def load_clip(name_or_path: str) -> tuple[PooledCLIP, Any]:
    """A real CLIP from a local folder or the Hugging Face cache; a clear message when it is not there offline."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return PooledCLIP(CLIPModel.from_pretrained(name_or_path).eval()), CLIPProcessor.from_pretrained(name_or_path)
    except OSError as exc:
        raise FileNotFoundError(
            f"CLIP weights for evaluate.clip_model={name_or_path!r} are not available offline. Place the model "
            f"folder (config.json, model.safetensors, tokenizer and preprocessor files) at a local path and set "
            f"evaluate.clip_model to it, or run once with HF_HUB_OFFLINE=0 to fill the Hugging Face cache "
            f"(~/.cache/huggingface/hub). Original error: {exc}"
        ) from exc


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
