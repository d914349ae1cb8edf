"""The procedural world of the embedded default: coloured shapes on plain backgrounds, with exact ground truth.

Every image is one shape (circle, square or triangle) of one colour on a white or black background, at a random size
and position, and its caption names all three: "a red circle on a white background". Because the truth of every
image is known, quality on the default is measurable: the judges (a classifier and a tiny CLIP trained on renders of
this world) score whether a generated image shows what its prompt asked for.

- `BASE_COLOURS` are what the shipped base model was pre-trained on (`pipeline/pretrain_base.py`).
- `NEW_COLOURS` (purple) it never saw: the demo data teaches it, and the judges know it, so that a fine-tune that
  learns it is measurably better than the base model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

BASE_COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (150, 40, 200)}
COLOURS: dict[str, tuple[int, int, int]] = {**BASE_COLOURS, **NEW_COLOURS}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

CAPTION = re.compile(r"^an? (?P<colour>\w+) (?P<shape>\w+) on an? (?P<background>\w+) background$")


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def parse_caption(caption: str) -> Scene | None:
    """The scene a caption asks for, or None when it is not a caption of this world."""
    match = CAPTION.match(caption.strip().lower())
    if not match or match["colour"] not in COLOURS or match["shape"] not in SHAPES:
        return None
    if match["background"] not in BACKGROUNDS:
        return None
    return Scene(match["shape"], match["colour"], match["background"])


def scenes(colours: dict[str, tuple[int, int, int]] | None = None) -> list[Scene]:
    """Every combination of shape, colour (default: all of them) and background, in a fixed order."""
    return [Scene(s, c, b) for c in colours or COLOURS for s in SHAPES for b in BACKGROUNDS]


def draw_shape(
    shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int, rng: random.Random
) -> Image.Image:
    """One shape of random size (1/2 to 4/5 of the side) and position, fully inside a `size` x `size` canvas."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 2, size * 4 // 5)
    x0, y0 = rng.randint(2, size - extent - 2), rng.randint(2, size - extent - 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    """A fresh render of `scene` (random size and position drawn from `rng`)."""
    return draw_shape(scene.shape, COLOURS[scene.colour], BACKGROUNDS[scene.background], size, rng)


def sample(n: int, size: int, rng: random.Random, colours: dict | None = None) -> list[tuple[Image.Image, Scene]]:
    """`n` random scenes (uniform over the combinations of `colours`) with their renders."""
    pool = scenes(colours)
    picked = [rng.choice(pool) for _ in range(n)]
    return [(render(scene, size, rng), scene) for scene in picked]


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Index into `palette` of the nearest colour (Euclidean in RGB) for each row of `pixels` (N, 3)."""
    colours = np.array(list(palette.values()), dtype=np.float32)
    return ((pixels[:, None, :] - colours[None, :, :]) ** 2).sum(-1).argmin(1)


def judge_pixels(image: Image.Image, min_share: float = 0.03) -> tuple[str, str, str]:
    """A deterministic pixel judge of one image of this world: (shape, colour, background).

    - background: the palette background nearest to the median of the 2-pixel border;
    - colour: the palette colour most pixels are nearest to, among pixels nearer to a colour than to either
      background ("none" when they cover less than `min_share` of the image);
    - shape: from how much of its bounding box the shape fills: a square 1, a circle pi/4 = 0.79, a triangle 1/2
      ("none" with no shape). A heuristic for flat renders, not a trained judge.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = list(BACKGROUNDS)[_nearest(np.median(border, 0, keepdims=True), BACKGROUNDS)[0]]
    flat = pixels.reshape(-1, 3)
    palette = {**COLOURS, **BACKGROUNDS}
    nearest = _nearest(flat, palette)
    is_shape = nearest < len(COLOURS)
    if is_shape.mean() < min_share:
        return "none", "none", background
    colour = list(COLOURS)[int(np.bincount(nearest[is_shape], minlength=len(COLOURS)).argmax())]
    mask = is_shape.reshape(pixels.shape[:2])
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = mask.sum() / box
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return shape, colour, background


def dominant_colour(image: Image.Image) -> tuple[str, str]:
    """(shape colour, background) of an image by the pixel judge (`judge_pixels`)."""
    _, colour, background = judge_pixels(image)
    return colour, background
