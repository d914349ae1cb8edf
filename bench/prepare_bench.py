"""Benchmark of the prepare stage: synthesise N photo-like JPEGs at 768 px, prepare them at 512 px, print images/s.

Runs the stage's CLI (`pipeline.prepare.main`) as DVC would, twice: cold (empty work cache), then incremental after
adding 10% new images (only those are decoded). Usage:

    python bench/prepare_bench.py --n 1000 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.prepare import clip_token_counter, main  # noqa: E402


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus sensor-like noise: decodes and compresses about like a photograph."""
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    image = image + rng.normal(0, 6, image.shape).astype(np.int16)
    return Image.fromarray(image.clip(0, 255).astype(np.uint8))


def synthesise(folder: Path, start: int, n: int, size: int) -> None:
    """Images start..start+n-1, mostly 4:3 landscape at `size` px on the shorter side, appended to metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(size * 4 // 3, size), (size, size * 4 // 3), (size, size), (size * 16 // 9, size)]
    with open(folder / "metadata.jsonl", "a") as rows:
        for i in range(start, start + n):
            rng = np.random.default_rng(i)
            width, height = shapes[i % len(shapes)]
            photo(rng, width, height).save(folder / f"{i:06d}.jpg", quality=90)
            rows.write(json.dumps({"file_name": f"{i:06d}.jpg", "text": f"a synthetic photo, number {i}"}) + "\n")


def run_stage(work: Path, workers: int) -> tuple[float, dict]:
    argv = ["--params", str(work / "params.yaml"), "--source", str(work / "raw"), "--out", str(work / "prepared")]
    argv += ["--report", str(work / "report.json"), "--summary", str(work / "summary")]
    argv += ["--cache", str(work / "cache"), "--workers", str(workers)]
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"prepare failed with exit code {code}")
    return seconds, json.loads((work / "report.json").read_text())


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images in the cold run")
    parser.add_argument("--size", type=int, default=768, help="shorter side of the synthetic images")
    parser.add_argument("--resolution", type=int, default=512, help="data.resolution to prepare at")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--bucketing", action="store_true", help="aspect-ratio buckets instead of square crops")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    shutil.rmtree(work / "raw", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["data"] |= {"source": str(work / "raw"), "resolution": args.resolution, "min_size": 256}
    if args.bucketing:
        side = args.resolution
        params["data"]["bucketing"] = {"enabled": True, "target_area": side * side, "step": 64}
        params["data"]["bucketing"] |= {"min_side": side // 2, "max_side": side * 2, "max_ratio": 2.0}
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    t = time.perf_counter()
    synthesise(work / "raw", 0, args.n, args.size)
    print(f"synthesised {args.n} JPEGs at {args.size} px in {time.perf_counter() - t:.1f} s ({work / 'raw'})")
    clip_token_counter(work / "cache")  # built once per cache; not part of the stage's per-image cost

    cold, report = run_stage(work, args.workers)
    n = report["counts"]["accepted"]
    print(f"cold: {n} images in {cold:.1f} s = {n / cold:.1f} images/s ({args.workers} workers)")

    added = max(1, args.n // 10)
    synthesise(work / "raw", args.n, added, args.size)
    warm, report = run_stage(work, args.workers)
    n, decoded = report["counts"]["accepted"], report["work"]["images_decoded"]
    print(
        f"incremental: {n} images ({decoded} decoded, {report['work']['cache_reused']} from the cache) in "
        f"{warm:.1f} s = {n / warm:.1f} images/s"
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main_bench()
