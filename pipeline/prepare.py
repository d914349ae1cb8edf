"""Stage `prepare`: validate a raw image-caption folder and write a resized, split dataset.

Every item is checked; every rejected, converted or truncated item is listed in `reports/data_validation.json`.
The train/validation split is decided by each image's content hash, so an image keeps its split as the data grows.

Core: `prepare(source, params, count_tokens) -> Prepared`.
CLI: `python -m pipeline.prepare --params params.yaml --source data/demo --out data/prepared
--report reports/data_validation.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from pipeline import env
from pipeline.config import DataParams, ParamsError, load_params
from pipeline.ingest import (
    DataError,
    ItemRejected,
    Rejection,
    check_caption,
    content_hash,
    find_duplicates,
    load_image,
    perceptual_hash,
    read_items,
    resize_and_crop,
    split_of,
)

SPLITS = {"train": "train", "val": "validation"}


@dataclass
class PreparedItem:
    image: Image.Image
    caption: str
    sha256: str
    split: str  # "train" or "validation"
    source: str  # path relative to the source folder


@dataclass
class Prepared:
    layout: str
    items: list[PreparedItem]
    rejected: list[Rejection]
    converted: list[dict[str, Any]] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    found: int = 0

    def digest(self) -> str:
        """Identity of the prepared data: each item's split, content hash and caption."""
        rows = sorted((i.split, i.sha256, i.caption) for i in self.items)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def report(self) -> dict[str, Any]:
        splits = Counter(item.split for item in self.items)
        reasons = Counter(r.reason.split(" (")[0] for r in self.rejected)
        return {
            "layout": self.layout,
            "counts": {
                "found": self.found,
                "accepted": len(self.items),
                "rejected": len(self.rejected),
                "converted": len(self.converted),
                "captions_truncated": len(self.truncated),
                "train": splits["train"],
                "validation": splits["validation"],
            },
            "rejected_by_reason": dict(sorted(reasons.items())),
            "prepared_digest": self.digest(),
            "rejected": [{"path": r.path, "reason": r.reason, "detail": r.detail} for r in self.rejected],
            "converted": self.converted,
            "captions_truncated": self.truncated,
        }


def prepare(source: Path, params: DataParams, count_tokens: Callable[[str], int] | None = None) -> Prepared:
    """Read, validate, de-duplicate, split and resize every item of `source`."""
    manifest = source / params.manifest if params.manifest else None
    raw, rejected, layout = read_items(source, params.layout, params.caption_column, manifest)
    result = Prepared(layout=layout, items=[], rejected=list(rejected), found=len(raw) + len(rejected))
    loaded: dict[str, tuple[Image.Image, str, str, int]] = {}
    for item in tqdm(raw, desc="validate", unit="img", mininterval=2, disable=len(raw) < 200):
        caption, flag = check_caption(item.caption, count_tokens)
        if caption is None:
            result.rejected.append(Rejection(item.rel, flag or "missing caption"))
            continue
        try:
            image = load_image(item.path, params.max_pixels, params.min_size, tuple(params.alpha_background))
        except ItemRejected as exc:
            result.rejected.append(Rejection(item.rel, exc.reason, exc.detail))
            continue
        if image.conversions:
            result.converted.append({"path": item.rel, "conversions": image.conversions})
        if flag:
            result.truncated.append(item.rel)
        loaded[item.rel] = (image.image, caption, content_hash(image.image), perceptual_hash(image.image))

    max_distance = params.near_duplicate_distance if params.near_duplicate_distance > 0 else -1
    duplicates = find_duplicates([(rel, h, p) for rel, (_, _, h, p) in loaded.items()], max_distance)
    for rel, (kind, kept) in sorted(duplicates.items()):
        result.rejected.append(Rejection(rel, kind, f"same picture as {kept}"))

    size = params.resolution
    for rel, (image, caption, digest, _) in sorted(loaded.items()):
        if rel in duplicates:
            continue
        # A random crop is seeded by the image's own hash: the same image always gets the same crop.
        rng = random.Random(digest)
        resized = resize_and_crop(image, size, size, params.crop, rng)
        split = SPLITS[split_of(digest, params.val_fraction, params.split_salt)]
        result.items.append(PreparedItem(resized, caption, digest, split, rel))
    return result


def write_prepared(prepared: Prepared, out: Path) -> None:
    """`<out>/{train,validation}/` in the imagefolder layout, written to a temporary folder then renamed."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rows: dict[str, list[str]] = {split: [] for split in SPLITS.values()}
    for split in rows:
        (partial / split).mkdir(parents=True)
    for item in prepared.items:
        name = f"{item.sha256[:20]}.png"
        item.image.save(partial / item.split / name)
        rows[item.split].append(
            json.dumps({"file_name": name, "text": item.caption, "sha256": item.sha256, "source": item.source})
        )
    for split, lines in rows.items():
        (partial / split / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def clip_token_counter() -> Callable[[str], int]:
    """Token count as CLIP's tokenizer sees it (BOS and EOS included); SD 1.x, 2.x and SDXL share its vocabulary."""
    from transformers import CLIPTokenizer

    from pipeline.tiny import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp)))
    return lambda text: len(tokenizer(text).input_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--source", required=True, type=Path, help="raw image-caption folder")
    parser.add_argument("--out", required=True, type=Path, help="prepared dataset folder to write")
    parser.add_argument("--report", required=True, type=Path, help="data validation report (JSON)")
    args = parser.parse_args(argv)
    env.configure()
    try:
        params = load_params(args.params)
        prepared = prepare(args.source, params.data, clip_token_counter())
    except (ParamsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = prepared.report() | {"source": str(args.source), "on_invalid": params.data.on_invalid}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    counts = report["counts"]
    print(
        f"{args.source} ({prepared.layout} layout): {counts['found']} found, {counts['accepted']} accepted "
        f"({counts['train']} train / {counts['validation']} validation), {counts['rejected']} rejected, "
        f"{counts['converted']} converted; report: {args.report}"
    )
    if prepared.rejected and params.data.on_invalid == "fail":
        first = "; ".join(f"{r.path}: {r.reason}" for r in prepared.rejected[:5])
        print(
            f"error: {len(prepared.rejected)} invalid item(s) and data.on_invalid is 'fail': {first}. "
            f"See {args.report} for the full list; fix or remove them, or set data.on_invalid: skip.",
            file=sys.stderr,
        )
        return 1
    if not any(i.split == "validation" for i in prepared.items) or not any(i.split == "train" for i in prepared.items):
        print(
            f"error: the split has an empty side ({counts['train']} train, {counts['validation']} validation): "
            "add images or change data.val_fraction.",
            file=sys.stderr,
        )
        return 1
    write_prepared(prepared, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
