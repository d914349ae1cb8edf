"""The embedded demo dataset: captioned coloured shapes in the Hugging Face `imagefolder` layout.

Every caption names what is drawn ("a red circle on a white background"), so prompt-alignment metrics have something
real to check. The images are committed under `data/demo/`; this module is how they were made (`sdft make-demo-data`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(
    shape: str, colour: tuple[int, int, int], background: tuple[int, int, int], size: int, rng: random.Random
) -> Image.Image:
    """One shape of random size and position, fully inside a `size` x `size` canvas."""
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


def make_demo_dataset(folder: Path, per_combination: int = 2, size: int = 96, seed: int = 0) -> Path:
    """Write `len(COLOURS) * len(SHAPES) * len(BACKGROUNDS) * per_combination` images and `metadata.jsonl`."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for background, bg_rgb in BACKGROUNDS.items():
                for k in range(per_combination):
                    name = f"images/{colour}_{shape}_on_{background}_{k}.png"
                    draw_shape(shape, rgb, bg_rgb, size, rng).save(folder / name)
                    rows.append({"file_name": name, "text": f"a {colour} {shape} on a {background} background"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
