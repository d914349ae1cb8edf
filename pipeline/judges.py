"""The shape-world judges: a classifier of shape, colour and background, and what it scores (prompt adherence).

The default world (`pipeline/world.py`) has exact ground truth, so a small network trained on its renders can say
what a generated image shows. `ShapeJudge` is that network (shipped pre-trained in `assets/judges/classifier`, built
by `python -m pipeline.pretrain_judges`); its penultimate layer doubles as the image feature extractor of the default
evaluation (KID/FID, precision/recall, density/coverage, memorisation). The tiny CLIP judge beside it
(`assets/judges/clip`) is a stock `transformers.CLIPModel` and needs no code here.

`adherence` compares what the classifier sees with what each prompt asked for: accuracy per attribute and overall,
per-class precision/recall/F1 and confusion matrices. `validation_adherence` is the same for a pipeline at a few fixed
seeds, for a training loop's validation checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import world

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "background")
CLASSES: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES,
    "colour": tuple(world.COLOURS),
    "background": tuple(world.BACKGROUNDS),
}
CLASSIFIER_DESCRIPTION = "shape-world judge classifier features"
CLIP_DESCRIPTION = "shape-world tiny CLIP"


class ShapeJudge(nn.Module):
    """A small CNN with three heads (shape, colour, background) over uint8 images (N, 3, H, W) of any size.

    Images are resized to `input_size` (64) first. `features(images)` is the penultimate layer (N, num_features), the
    same interface as `features.TinyImageFeatures` (torchmetrics' FID/KID accept any module with `num_features`);
    `forward` returns the features too, so the judge can be passed to them as is.
    """

    def __init__(
        self, classes: dict[str, tuple[str, ...]] | None = None, input_size: int = 64, width: int = 16, dim: int = 128
    ) -> None:
        super().__init__()
        self.classes = {k: tuple(v) for k, v in (classes or CLASSES).items()}
        self.input_size = input_size
        self.width = width
        self.num_features = dim

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        w = width
        # 64 -> 32 -> 16 -> 8 -> 4, then global average pooling: position-invariant, as shapes move.
        self.body = nn.Sequential(
            *block(3, w // 2, 2),
            *block(w // 2, w, 1),
            nn.MaxPool2d(2),
            *block(w, 2 * w, 1),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w, 1),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, dim),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(dim, len(names)) for name, names in self.classes.items()})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        return (x - 0.5) / 0.5

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (N, num_features) of uint8 images (N, 3, H, W)."""
        return self.body(self._prepare(images.to(self.heads[ATTRIBUTES[0]].weight.device)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-attribute logits {attribute: (N, n_classes)}."""
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 128) -> list[world.Scene]:
        """The scene the judge sees in each uint8 image (N, 3, H, W)."""
        picked: dict[str, list[int]] = {name: [] for name in self.classes}
        for i in range(0, len(images), batch_size):
            for name, logit in self.logits(images[i : i + batch_size]).items():
                picked[name] += logit.argmax(-1).tolist()
        return [world.Scene(*(self.classes[a][picked[a][i]] for a in ATTRIBUTES)) for i in range(len(images))]

    def config(self) -> dict[str, Any]:
        return {
            "architecture": "ShapeJudge",
            "classes": {k: list(v) for k, v in self.classes.items()},
            "input_size": self.input_size,
            "width": self.width,
            "num_features": self.num_features,
            "input": "uint8 RGB (N, 3, H, W), any H and W (resized to input_size, bilinear with antialiasing)",
        }

    def save_pretrained(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ShapeJudge:
        """Load a judge saved by `save_pretrained` (config.json + model.safetensors), in eval mode, frozen."""
        from safetensors.torch import load_file

        folder = Path(folder)
        config_file, weights = folder / "config.json", folder / "model.safetensors"
        for path in (config_file, weights):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing: the classifier judge folder needs config.json and model.safetensors "
                    "(rebuild with `python -m pipeline.pretrain_judges --out assets/judges`)."
                )
        config = json.loads(config_file.read_text())
        if config.get("architecture") != "ShapeJudge":
            raise ValueError(f"{config_file}: architecture is {config.get('architecture')!r}, expected 'ShapeJudge'.")
        judge = cls(
            classes={k: tuple(v) for k, v in config["classes"].items()},
            input_size=config["input_size"],
            width=config["width"],
            dim=config["num_features"],
        )
        judge.load_state_dict(load_file(weights))
        return judge.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# Prompt adherence
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Adherence:
    """How well images show what their prompts asked for, as the classifier judge sees them.

    `correct[attribute]` and `all_correct` are per-image 0/1 values (for paired bootstraps); `confusion[attribute]` is
    a (n_classes, n_classes) count matrix, rows = asked for, columns = seen.
    """

    classes: dict[str, tuple[str, ...]]
    asked: list[world.Scene] = field(default_factory=list)
    seen: list[world.Scene] = field(default_factory=list)
    correct: dict[str, list[int]] = field(default_factory=dict)
    all_correct: list[int] = field(default_factory=list)
    confusion: dict[str, list[list[int]]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.all_correct)

    def accuracy(self, attribute: str | None = None) -> float:
        values = self.all_correct if attribute is None else self.correct[attribute]
        return sum(values) / len(values) if values else float("nan")

    def per_class(self, attribute: str) -> dict[str, dict[str, float]]:
        """{class: {precision, recall, f1, support}} from the confusion matrix (0 where undefined, as sklearn)."""
        matrix = self.confusion[attribute]
        out = {}
        for i, name in enumerate(self.classes[attribute]):
            tp = matrix[i][i]
            predicted = sum(row[i] for row in matrix)
            support = sum(matrix[i])
            precision = tp / predicted if predicted else 0.0
            recall = tp / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        return out

    def macro_f1(self, attribute: str) -> float:
        """Macro F1 over the classes that were asked for (support > 0) or predicted."""
        matrix = self.confusion[attribute]
        stats = self.per_class(attribute)
        seen = [
            name
            for i, name in enumerate(self.classes[attribute])
            if stats[name]["support"] or sum(row[i] for row in matrix)
        ]
        return sum(stats[name]["f1"] for name in seen) / len(seen) if seen else float("nan")

    def f1(self) -> float:
        """`adherence_f1`: the mean of the three attributes' macro F1."""
        return sum(self.macro_f1(a) for a in ATTRIBUTES) / len(ATTRIBUTES)


def score_adherence(
    asked: list[world.Scene], seen: list[world.Scene], classes: dict[str, tuple[str, ...]] | None = None
) -> Adherence:
    """Compare the scenes prompts asked for with the scenes the judge saw (pure; same order, same length)."""
    if len(asked) != len(seen):
        raise ValueError(f"{len(asked)} prompts but {len(seen)} judged images")
    classes = classes or CLASSES
    result = Adherence(classes=classes, asked=list(asked), seen=list(seen))
    for attribute in ATTRIBUTES:
        names = classes[attribute]
        matrix = [[0] * len(names) for _ in names]
        for want, got in zip(asked, seen, strict=True):
            matrix[names.index(getattr(want, attribute))][names.index(getattr(got, attribute))] += 1
        result.confusion[attribute] = matrix
        pairs = zip(asked, seen, strict=True)
        result.correct[attribute] = [int(getattr(w, attribute) == getattr(g, attribute)) for w, g in pairs]
    result.all_correct = [int(a == s) for a, s in zip(asked, seen, strict=True)]
    return result


def adherence(judge: ShapeJudge, images: torch.Tensor, prompts: list[str]) -> tuple[Adherence, list[int]]:
    """Adherence of uint8 images (N, 3, H, W) to their prompts, over the prompts that parse as world scenes.

    Returns the scores and the indices (into `prompts`) of the images that were judged.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    kept = [i for i, p in enumerate(prompts) if world.parse_caption(p) is not None]
    asked = [world.parse_caption(prompts[i]) for i in kept]
    seen = judge.predict(images[kept]) if kept else []
    return score_adherence(asked, seen, judge.classes), kept  # type: ignore[arg-type]


def adherence_metrics(result: Adherence, prefix: str = "") -> dict[str, float]:
    """Flat metrics: `{prefix}adherence_accuracy`, `{prefix}{attribute}_accuracy`, `{prefix}adherence_f1`."""
    out = {f"{prefix}adherence_accuracy": result.accuracy(), f"{prefix}adherence_f1": result.f1()}
    for attribute in ATTRIBUTES:
        out[f"{prefix}{attribute}_accuracy"] = result.accuracy(attribute)
    return out


def per_class_metrics(result: Adherence, prefix: str = "") -> dict[str, float]:
    """`{prefix}adherence_{precision,recall,f1}_{class}` for every class some prompt asked for (class names are
    distinct across attributes). Classes no prompt asked for are left out, so every model evaluated on the same
    prompts reports the same metric names."""
    out = {}
    for attribute in ATTRIBUTES:
        for name, stats in result.per_class(attribute).items():
            if not stats["support"]:
                continue
            for measure in ("precision", "recall", "f1"):
                out[f"{prefix}adherence_{measure}_{name}"] = stats[measure]
    return out


def write_confusion_csv(result: Adherence, attribute: str, path: Path) -> Path:
    """The confusion matrix of one attribute as CSV: a header of seen classes, one row per asked-for class."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    names = result.classes[attribute]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"{attribute}: asked / seen", *names])
        for name, row in zip(names, result.confusion[attribute], strict=True):
            writer.writerow([name, *row])
    return path


def confusion_image(result: Adherence, attribute: str, cell: int = 52) -> Any:
    """The confusion matrix of one attribute as a small labelled heat map (PIL image; rows asked, columns seen)."""
    from PIL import Image, ImageDraw

    names = result.classes[attribute]
    matrix = result.confusion[attribute]
    left, top = 70, 34
    image = Image.new("RGB", (left + cell * len(names) + 4, top + cell * len(names) + 4), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 2), f"{attribute}: row = asked, column = seen", fill="black")
    peak = max(1, max(max(row) for row in matrix))
    for j, name in enumerate(names):
        draw.text((left + j * cell + 2, top - 14), name[:8], fill="black")
    for i, (name, row) in enumerate(zip(names, matrix, strict=True)):
        draw.text((4, top + i * cell + cell // 2 - 6), name[:10], fill="black")
        for j, count in enumerate(row):
            shade = int(255 - 200 * count / peak)
            colour = (shade, 255, shade) if i == j else (255, shade, shade)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour if count else (245, 245, 245), outline=(200, 200, 200))
            draw.text((box[0] + cell // 2 - 6, box[1] + cell // 2 - 6), str(count), fill="black")
    return image


@torch.no_grad()
def validation_adherence(
    pipe: Any,
    judge: ShapeJudge,
    prompts: list[str],
    seeds: tuple[int, ...] = (0, 1),
    resolution: int = 64,
    steps: int = 20,
    guidance_scale: float = 7.5,
) -> dict[str, float]:
    """Adherence accuracy and F1 of a diffusers text-to-image `pipe` on `prompts` at fixed seeds (pure; no files).

    For validation checks during training: each prompt is generated once per seed with a seeded CPU generator, so two
    calls on the same weights give the same numbers. Prompts that are not world scenes are ignored.
    """
    images = []
    for seed in seeds:
        generator = [torch.Generator("cpu").manual_seed(seed * 100_003 + i) for i in range(len(prompts))]
        out = pipe(
            prompt=list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generator,
            output_type="np",
        ).images
        images.append(torch.from_numpy((out * 255).round().clip(0, 255).astype("uint8")).permute(0, 3, 1, 2))
    result, _ = adherence(judge, torch.cat(images), list(prompts) * len(seeds))
    return adherence_metrics(result)
