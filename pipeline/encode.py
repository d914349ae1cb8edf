"""Stage `encode`: precompute the VAE latents and frozen text conditioning of the prepared data, once per base model.

Training reads them instead of running the VAE and text encoder(s) on every image at every start: at 512 px a VAE
encode costs about 1.1 TFLOP per image, more than half a LoRA training step (1.7 TFLOP; see bench/). The output is
keyed to the base model's weights and to the prepared data (pipeline/encoded.py), so a stale one is never used.

Core: `encode_splits(components, prepared, random_flip, cache) -> dict[split, EncodedSplit]` (values in, values out).
CLI: `python -m pipeline.encode --params params.yaml --prepared data/prepared --out data/encoded
[--cache .sdft/encode-cache]`. With `data.precompute: false` it writes only an index saying so, and train encodes
in memory as before.

Incremental: with `--cache`, each image's latents (keyed by the prepared PNG's bytes) and each caption's conditioning
(keyed by its text) are kept per base-model fingerprint, so adding a few images encodes only those; DVC still versions
the whole output.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipeline import encoded, env
from pipeline.config import ParamsError, load_params, resolve_model
from pipeline.diffusion import (
    TRAINING_SPLITS,
    Components,
    compute_device,
    encode_conditioning,
    encode_image_list,
    load_components,
    read_rows,
)

# Only what train reads: the test split is evaluate's alone, so no stage before it touches those images.
SPLITS = TRAINING_SPLITS


class WorkCache:
    """Per-item results of earlier runs for one base model: `<root>/<fingerprint[:16]>/<kind>-<key>.safetensors`."""

    def __init__(self, root: Path | None, fingerprint: str) -> None:
        self.folder = root / fingerprint[:16] if root is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.hits: Counter[str] = Counter()  # per kind ("image", "text")

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        path = self.folder / f"{kind}-{key}.safetensors" if self.folder else None
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except Exception:  # a truncated entry (killed mid-write) is recomputed, never trusted
            return None
        self.hits[kind] += 1
        return tensors

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{kind}-{key}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(path)


def encode_split(
    components: Components, folder: Path, random_flip: bool, cache: WorkCache, batch_size: int = 16
) -> encoded.EncodedSplit:
    """Latents (and mirrored latents) of every image and the text conditioning of every caption, row-aligned."""
    rows = read_rows(folder)
    keys = [hashlib.sha256((folder / r["file_name"]).read_bytes()).hexdigest() for r in rows]
    latents: list[torch.Tensor | None] = [None] * len(rows)
    flipped: list[torch.Tensor | None] = [None] * len(rows)
    todo = []
    for i, key in enumerate(keys):
        hit = cache.get("image", key)
        if hit is not None and (not random_flip or "flipped" in hit):
            latents[i], flipped[i] = hit["latents"], hit.get("flipped")
        else:
            todo.append(i)
    bar = tqdm(total=len(todo), desc=f"encode {folder.name} images", unit="img", disable=not todo)
    for start in range(0, len(todo), batch_size * 4):
        chunk = todo[start : start + batch_size * 4]
        images = []
        for i in chunk:
            with Image.open(folder / rows[i]["file_name"]) as image:
                images.append(image.convert("RGB"))
        new = [x.cpu() for x in encode_image_list(components.vae, images, batch_size)]
        # Mirrored images are encoded too (not the latents flipped: the VAE is not exactly flip-equivariant).
        mirrors = [ImageOps.mirror(i) for i in images] if random_flip else []
        mirrored = [x.cpu() for x in encode_image_list(components.vae, mirrors, batch_size)] if random_flip else None
        for j, i in enumerate(chunk):
            latents[i] = new[j]
            entry = {"latents": new[j]}
            if mirrored is not None:
                flipped[i] = entry["flipped"] = mirrored[j]
            cache.put("image", keys[i], entry)
        bar.update(len(chunk))
    bar.close()

    # Text conditioning once per distinct caption; time_ids (SDXL) depend on the image size and are made by train.
    by_key: dict[str, dict[str, torch.Tensor]] = {}
    text_keys = [hashlib.sha256(r["text"].encode()).hexdigest() for r in rows]
    missing = {}
    for row, key in zip(rows, text_keys, strict=True):
        if key not in by_key and key not in missing:
            hit = cache.get("text", key)
            if hit is not None:
                by_key[key] = hit
            else:
                missing[key] = row["text"]
    if missing:
        fresh = {k: v.cpu() for k, v in encode_conditioning(components, list(missing.values()), resolution=8).items()}
        for j, key in enumerate(missing):
            by_key[key] = {k: v[j] for k, v in fresh.items() if k != "time_ids"}
            cache.put("text", key, by_key[key])
    cond_rows = [by_key[key] for key in text_keys]
    cond = {k: torch.stack([c[k] for c in cond_rows]) for k in cond_rows[0]} if rows else None
    return encoded.EncodedSplit(latents=list(latents), flipped=list(flipped) if random_flip else None, cond=cond)


def encode_splits(
    components: Components, prepared: Path, random_flip: bool, cache: WorkCache
) -> dict[str, encoded.EncodedSplit]:
    with torch.inference_mode():
        return {split: encode_split(components, prepared / split, random_flip, cache) for split in SPLITS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", required=True, type=Path, help="output folder of the prepare stage")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (index.json + <split>.safetensors)")
    parser.add_argument("--cache", type=Path, help="work cache of per-item results, reused across runs (optional)")
    args = parser.parse_args(argv)
    env.configure()
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not params.data.precompute:
        encoded.write_disabled(args.out, "data.precompute: false")
        print(f"data.precompute is off: wrote only {args.out / encoded.INDEX_FILE}; train encodes in memory")
        return 0
    try:
        digests = {split: encoded.split_digest(args.prepared / split) for split in SPLITS}
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model = resolve_model(params, Path(args.params).resolve().parent)
    components = load_components(model, params.base.revision)
    fingerprint = encoded.model_fingerprint(components)
    components.to(compute_device())
    cache = WorkCache(args.cache, fingerprint)
    splits = encode_splits(components, args.prepared, params.data.random_flip, cache)
    seconds = time.perf_counter() - started
    index = {
        "enabled": True,
        "fingerprint": fingerprint,
        "base_model": params.base.model,
        "base_revision": params.base.revision,
        "random_flip": params.data.random_flip,
        "splits": {s: {"rows": len(splits[s].latents), "digest": digests[s]} for s in SPLITS},
        "cache_hits": dict(cache.hits),
        "seconds": round(seconds, 3),
    }
    encoded.write(args.out, splits, index)
    n = sum(len(s.latents) for s in splits.values())
    reused = cache.hits["image"]
    print(f"encoded {n} images and captions in {seconds:.1f} s ({reused} images reused from the cache) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
