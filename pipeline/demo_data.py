"""The embedded demo dataset: purple shapes, a colour the shipped base model never saw, in the `imagefolder` layout.

The base model (`pipeline/pretrain_base.py`) draws red, green and blue shapes; the demo fine-tune should also draw
purple ones, and the judges measure whether it does. Besides 8 purple images of each shape and background, the set
holds 2 images of each scene the base model already knows ("replay", as in continual learning): a fine-tune on purple
alone learns "everything is purple" and forgets the other colours (measured on the shipped base: 7 to 43 points of
colour accuracy lost, by learning rate), while with replay it keeps them. Every caption names what is drawn ("a purple
circle on a white background"). The images are committed under `data/demo/`; this module is how they were made (`sdft
init` regenerates them when the folder is missing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pipeline.world import BACKGROUNDS, BASE_COLOURS, COLOURS, NEW_COLOURS, SHAPES, Scene, draw_shape, render

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "draw_shape", "make_demo_dataset"]


def make_demo_dataset(folder: Path, per_combination: int = 8, replay: int = 2, size: int = 64, seed: int = 0) -> Path:
    """Write `per_combination` images of each purple scene and `replay` of each base scene, and `metadata.jsonl`."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for colours, count in ((NEW_COLOURS, per_combination), (BASE_COLOURS, replay)):
        for colour in colours:
            for shape in SHAPES:
                for background in BACKGROUNDS:
                    scene = Scene(shape, colour, background)
                    for k in range(count):
                        name = f"images/{colour}_{shape}_on_{background}_{k}.png"
                        render(scene, size, rng).save(folder / name)
                        rows.append({"file_name": name, "text": scene.caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder
