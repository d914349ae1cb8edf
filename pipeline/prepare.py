"""Stage `prepare`: validate a raw image-caption folder and write a resized, split dataset.

Every item is checked; every rejected, converted or truncated item is listed in `reports/data_validation.json`,
with the identity (digests) of the source and of the prepared data. The train/validation/test split is decided by
each image's content hash, so an image keeps its split as the data grows (`ingest.split_of`). `validation` serves
early stopping, checkpoint choice and tuning; `test` is read only by evaluate and the gate (train never reads it).

Work is cached by content: each source file's sha256 (remembered by size, mtime and inode, as git's index does)
plus the preparation settings name one entry of the cache, holding the prepared PNG and what was learnt about the
image. Adding images to a large source decodes and resizes only the new ones. The cache is a private speed-up:
DVC still versions the whole prepared output, and deleting the cache changes nothing but the time taken.

Core: `prepare(source, params, cache, count_tokens) -> Prepared`.
CLI: `python -m pipeline.prepare --params params.yaml --source data/demo --out data/prepared
--report reports/data_validation.json [--summary reports/data] [--cache .sdft/prepare-cache]`.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, TypeVar

import PIL
import yaml
from tqdm.auto import tqdm

from pipeline import env
from pipeline.config import DataParams, ParamsError, load_params
from pipeline.ingest import (
    DataError,
    ItemRejected,
    Rejection,
    check_caption,
    content_hash,
    file_sha256,
    find_duplicates,
    hidden_entries,
    load_image,
    nearest_bucket,
    perceptual_hash,
    read_items,
    resize_and_crop,
    split_of,
)

# split_of's names -> the prepared folders (the names diffusion.TRAIN / VALIDATION / TEST).
SPLITS = {"train": "train", "val": "validation", "test": "test"}
# Bump when the meaning of a cache entry changes in a way the code digest below would not catch.
CACHE_FORMAT = 1
# Progress bars only for runs this long: a few images finish before a bar would be read.
PROGRESS_MIN_ITEMS = 200
DEFAULT_CACHE = Path(".sdft/prepare-cache")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------
# What one image becomes


@dataclass(frozen=True)
class Job:
    """Everything that decides an item's prepared pixels besides the file itself (part of each cache key)."""

    max_pixels: int
    min_size: int
    background: tuple[int, int, int]
    crop: str
    buckets: tuple[tuple[int, int], ...]  # (width, height); one square size when bucketing is off
    bucketing: bool

    @classmethod
    def from_params(cls, params: DataParams) -> Job:
        if params.bucketing.enabled:
            buckets = tuple(params.bucketing.sizes())
        else:
            buckets = ((params.resolution, params.resolution),)
        return cls(
            params.max_pixels,
            params.min_size,
            tuple(params.alpha_background),
            params.crop,
            buckets,
            params.bucketing.enabled,
        )

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return nearest_bucket(width, height, list(self.buckets)) if self.bucketing else self.buckets[0]


@functools.cache
def _code_digest() -> str:
    """The code that turns a file into a prepared PNG (this module and ingest) and the Pillow that encodes it."""
    import pipeline.ingest

    digest = hashlib.sha256(f"{CACHE_FORMAT}:{PIL.__version__}:".encode())
    for module in (__file__, pipeline.ingest.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()


def settings_key(job: Job) -> str:
    return hashlib.sha256(json.dumps([_code_digest(), asdict(job)]).encode()).hexdigest()


def item_key(file_sha: str, settings: str) -> str:
    return hashlib.sha256(f"{file_sha}:{settings}".encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write then rename, so a reader (or a run killed half-way) never sees half a file."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_bytes(data)
    os.replace(partial, path)


def _entry(store: Path, key: str) -> Path:
    return store / key[:2] / key


def prepare_image(path: Path, key: str, job: Job, store: Path) -> dict[str, Any]:
    """Decode, check, hash and resize one image file; store `<key>.png` and `<key>.json`; return the record.

    A rejection is stored too: the same bytes with the same settings are rejected again without decoding.
    Runs in worker processes, so it takes and returns plain values.
    """
    entry = _entry(store, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        loaded = load_image(path, job.max_pixels, job.min_size, job.background)
    except ItemRejected as exc:
        record: dict[str, Any] = {"rejected": [exc.reason, exc.detail]}
    else:
        image = loaded.image
        digest = content_hash(image)
        width, height = job.size_for(image.width, image.height)
        # A random crop is seeded by the image's own hash: the same image always gets the same crop.
        resized = resize_and_crop(image, width, height, job.crop, random.Random(digest))
        buffer = io.BytesIO()
        # zlib level 1: about 15% larger than the default 6 on photographs, and 3 to 6 times faster to write.
        resized.save(buffer, format="PNG", compress_level=1)
        png = buffer.getvalue()
        _write_atomic(entry.with_suffix(".png"), png)
        record = {
            "sha256": digest,
            "phash": f"{perceptual_hash(image):016x}",
            "conversions": loaded.conversions,
            "original_size": [image.width, image.height],
            "size": [width, height],
            "png_sha256": hashlib.sha256(png).hexdigest(),
        }
    _write_atomic(entry.with_suffix(".json"), json.dumps(record).encode())
    return record


def _cached_record(store: Path, key: str) -> dict[str, Any] | None:
    entry = _entry(store, key)
    try:
        record = json.loads(entry.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if "rejected" not in record and not entry.with_suffix(".png").is_file():
        return None
    return record


class FileIndex:
    """sha256 of source files, remembered by (size, mtime, inode), so unchanged files are not read again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, list[Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.seen: dict[str, list[Any]] = {}
        self.hashed = 0

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self.known.get(str(file))
        if entry is not None and entry[:3] == stamp:
            digest = entry[3]
        else:
            digest = file_sha256(file)
            self.hashed += 1
        self.seen[str(file)] = [*stamp, digest]
        return digest

    def save(self) -> None:
        """Keep the files of this run only, so the index does not grow with files long deleted."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path, json.dumps(self.seen).encode())


def _progress(items: Iterable[T], desc: str, total: int) -> Iterator[T]:
    # Without a terminal (DVC in CI, Prefect logs) a bar redraws into one long line: print every 30 s instead.
    interval = 2 if sys.stderr.isatty() else 30
    yield from tqdm(items, desc=desc, total=total, unit="img", mininterval=interval, disable=total < PROGRESS_MIN_ITEMS)


def _process(todo: dict[str, Path], job: Job, store: Path, workers: int) -> dict[str, dict[str, Any]]:
    """Run `prepare_image` on every (key, path) not in the cache, in `workers` processes when it pays off."""
    keys, paths = list(todo), list(todo.values())
    if workers <= 1 or len(keys) < 4 * workers:
        results: Iterable[dict[str, Any]] = map(prepare_image, paths, keys, repeat(job), repeat(store))
        return dict(zip(keys, _progress(results, "prepare", len(keys)), strict=True))
    # spawn: the parent may hold torch or tokenizer threads, which a fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    chunk = max(1, min(16, len(keys) // (8 * workers)))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        try:
            results = pool.map(prepare_image, paths, keys, repeat(job), repeat(store), chunksize=chunk)
            return dict(zip(keys, _progress(results, "prepare", len(keys)), strict=True))
        except BaseException:  # SIGTERM (env.exit_on_sigterm), Ctrl-C, an error: the workers stop with us
            for worker in multiprocessing.active_children():
                worker.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ---------------------------------------------------------------------------------------------------------------
# The stage core


@dataclass(frozen=True)
class PreparedItem:
    """One accepted item: its prepared PNG (in the cache) and what the prepared dataset says about it."""

    png: Path
    png_sha256: str
    caption: str
    sha256: str  # content hash of the decoded source pixels
    split: str  # "train", "validation" or "test"
    source: str  # path relative to the source folder
    width: int
    height: int
    original_size: tuple[int, int]
    tokens: int | None  # caption length in tokens, BOS and EOS included, when a counter was given

    @property
    def file_name(self) -> str:
        return f"{self.sha256[:20]}.png"

    def row(self) -> dict[str, Any]:
        """The item's line in `<split>/metadata.jsonl`."""
        return {
            "file_name": self.file_name,
            "text": self.caption,
            "sha256": self.sha256,
            "source": self.source,
            "width": self.width,
            "height": self.height,
            # SDXL conditions on the source size (Podell et al. 2023, "micro-conditioning").
            "original_width": self.original_size[0],
            "original_height": self.original_size[1],
        }


@dataclass
class Prepared:
    layout: str
    items: list[PreparedItem]
    rejected: list[Rejection]
    found: int
    source_digest: str
    bucketing: bool = False
    converted: list[dict[str, Any]] = field(default_factory=list)
    truncated: list[dict[str, Any]] = field(default_factory=list)
    hidden: list[str] = field(default_factory=list)  # names starting with '.', not read (.DS_Store, ._x.jpg)
    work: dict[str, int] = field(default_factory=dict)  # files hashed, images decoded, cache entries reused

    def digest(self) -> str:
        """Identity of the prepared data: every row of every split and its PNG's bytes."""
        rows = sorted((i.split, i.file_name, i.caption, i.png_sha256, i.width, i.height, i.sha256) for i in self.items)
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()

    def counts(self) -> dict[str, int]:
        splits = Counter(item.split for item in self.items)
        kinds = Counter(r.reason.split(" (")[0] for r in self.rejected)
        return {
            "found": self.found,
            "accepted": len(self.items),
            "rejected": len(self.rejected),
            "exact_duplicates": kinds["exact duplicate"],
            "near_duplicates": kinds["near duplicate"],
            "converted": len(self.converted),
            "captions_truncated": len(self.truncated),
            "train": splits["train"],
            "validation": splits["validation"],
            "test": splits["test"],
        }

    def report(self) -> dict[str, Any]:
        reasons = Counter(r.reason.split(" (")[0] for r in self.rejected)
        counts = self.counts()
        report = {
            "layout": self.layout,
            "counts": counts,
            "identity": {
                "source_digest": self.source_digest,
                "prepared_digest": self.digest(),
                "items": counts["accepted"],
                "train": counts["train"],
                "validation": counts["validation"],
                "test": counts["test"],
            },
            "rejected_by_reason": dict(sorted(reasons.items())),
            "rejected": [{"path": r.path, "reason": r.reason, "detail": r.detail} for r in self.rejected],
            "converted": self.converted,
            "captions_truncated": self.truncated,
            "not_read": [{"path": p, "reason": "hidden (the name starts with '.')"} for p in self.hidden],
            "work": self.work,
        }
        if self.bucketing:
            sizes = Counter(f"{i.width}x{i.height}" for i in self.items)
            report["buckets"] = dict(sorted(sizes.items()))
        return report


def source_digest(rows: Iterable[tuple[str, str | None]]) -> str:
    """Identity of the raw items: each listed file's sha256 and its caption as found (not where they are)."""
    return hashlib.sha256(json.dumps(sorted(rows, key=lambda r: (r[0], r[1] or ""))).encode()).hexdigest()


def prepare(
    source: Path,
    params: DataParams,
    cache: Path,
    count_tokens: Callable[[str], int] | None = None,
    workers: int = 1,
) -> Prepared:
    """Read, validate, de-duplicate, split and resize every item of `source`, reusing `cache` where it can."""
    manifest = source / params.manifest if params.manifest else None
    raw, rejected, layout = read_items(source, params.layout, params.caption_column, manifest)
    found = len(raw) + len(rejected)
    rejected = list(rejected)
    job = Job.from_params(params)
    settings = settings_key(job)
    store = cache / "items"

    # 1. Hash every listed file (unchanged files: from the index) and check its caption.
    index = FileIndex(cache / "files.json")
    wanted = []
    raw_rows = []
    for item in _progress(raw, "hash", len(raw)):
        try:
            file_sha = index.sha256(item.path)
        except OSError as exc:
            rejected.append(Rejection(item.rel, "unreadable file", f"{type(exc).__name__}: {exc}"))
            continue
        raw_rows.append((file_sha, item.caption))
        caption, flag = check_caption(item.caption, count_tokens)
        if caption is None:
            rejected.append(Rejection(item.rel, flag or "missing caption"))
            continue
        wanted.append((item, caption, flag, item_key(file_sha, settings)))
    index.save()

    # 2. Decode and resize only what the cache does not hold (the same bytes listed twice are done once).
    records: dict[str, dict[str, Any]] = {}
    todo: dict[str, Path] = {}
    for item, _, _, key in wanted:
        if key in records or key in todo:
            continue
        record = _cached_record(store, key)
        if record is None:
            todo[key] = item.path
        else:
            records[key] = record
    reused = len(records)
    records |= _process(todo, job, store, workers)

    # 3. Reject what cannot be used, then duplicates; split the rest by content hash.
    loaded = {}
    for item, caption, flag, key in wanted:
        record = records[key]
        if "rejected" in record:
            rejected.append(Rejection(item.rel, *record["rejected"]))
        else:
            loaded[item.rel] = (caption, flag, key, record)
    max_distance = params.near_duplicate_distance if params.near_duplicate_distance > 0 else -1
    hashes = [(rel, r["sha256"], int(r["phash"], 16)) for rel, (_, _, _, r) in loaded.items()]
    duplicates = find_duplicates(hashes, max_distance)
    for rel, (kind, kept) in sorted(duplicates.items()):
        rejected.append(Rejection(rel, kind, f"same picture as {kept}"))

    result = Prepared(layout, [], rejected, found, source_digest(raw_rows), job.bucketing)
    result.hidden = hidden_entries(source)
    result.work = {"files_hashed": index.hashed, "images_decoded": len(todo), "cache_reused": reused}
    for rel, (caption, flag, key, record) in sorted(loaded.items()):
        if rel in duplicates:
            continue
        tokens = count_tokens(caption) if count_tokens else None
        if record["conversions"]:
            result.converted.append({"path": rel, "conversions": record["conversions"]})
        if flag:
            result.truncated.append({"path": rel, "tokens": tokens, "detail": flag})
        width, height = record["size"]
        result.items.append(
            PreparedItem(
                png=_entry(store, key).with_suffix(".png"),
                png_sha256=record["png_sha256"],
                caption=caption,
                sha256=record["sha256"],
                split=SPLITS[split_of(record["sha256"], params.val_fraction, params.split_salt, params.test_fraction)],
                source=rel,
                width=width,
                height=height,
                original_size=tuple(record["original_size"]),
                tokens=tokens,
            )
        )
    return result


def split_problem(counts: dict[str, int], params: DataParams) -> str | None:
    """Why these split counts cannot be trained and evaluated (an empty split), naming the key to change; else None.

    Each split needs an image: train fits, validation chooses (early stopping, checkpoints), test judges (the gate).
    """
    n = counts["accepted"]
    if n < 3:
        return (
            f"{n} image(s) accepted, but train, validation and test need at least one each: add images "
            f"(a few dozen give usable splits; see reports/data_validation.json for what was rejected)."
        )
    empty = [split for split in ("train", "validation", "test") if not counts[split]]
    if not empty:
        return None
    fractions = f"data.val_fraction: {params.val_fraction}, data.test_fraction: {params.test_fraction}"
    split = empty[0]
    if split == "train":
        fix = "lower data.val_fraction or data.test_fraction"
    else:
        fix = f"raise data.{'val' if split == 'validation' else 'test'}_fraction"
    shares = ", ".join(f"{counts[s]} {s}" for s in ("train", "validation", "test"))
    return (
        f"the {split} split is empty: {n} images accepted ({shares}) with {fractions}. "
        f"Add images, {fix}, or change data.split_salt to draw the split again."
    )


def write_prepared(prepared: Prepared, out: Path) -> None:
    """`<out>/{train,validation,test}/` in the imagefolder layout, written to a temporary folder then renamed."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rows: dict[str, list[str]] = {split: [] for split in SPLITS.values()}
    for split in rows:
        (partial / split).mkdir(parents=True)
    for item in prepared.items:
        shutil.copyfile(item.png, partial / item.split / item.file_name)
        rows[item.split].append(json.dumps(item.row()))
    for split, lines in rows.items():
        (partial / split / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def dvc_import_url(source: Path) -> str | None:
    """Where `source` was imported from, when it is a DVC import (`<source>.dvc` next to it), else None."""
    dvc_file = source.with_name(source.name + ".dvc")
    try:
        dep = yaml.safe_load(dvc_file.read_text())["deps"][0]
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
    if isinstance(dep.get("repo"), dict):  # `dvc import <git repo> <path>`
        rev = dep["repo"].get("rev_lock") or dep["repo"].get("rev")
        return f"{dep['repo']['url']}#{dep['path']}" + (f"@{rev}" if rev else "")
    return dep.get("path")  # `dvc import-url <url>`


def dataset_for_mlflow(report: dict[str, Any]) -> tuple[str, str, str, dict[str, Any]]:
    """(name, digest, source, profile) of the prepared data, as `mlflow.data` datasets take them.

    name: the source folder's name, so versions of one dataset share it. digest: the prepared digest cut to 10 hex
    digits, the length MLflow recommends (its store keeps at most 36 characters; the full digests are in the
    profile). source: the URL the data was imported from when it is a DVC import, else the source folder.
    profile: counts and both digests, all JSON values. MLflow stores one dataset per (experiment, name, digest):
    the first logged source and profile stay.
    """
    identity = report["identity"]
    name = Path(report["source"]).name or "data"
    profile = {
        "source_digest": identity["source_digest"],
        "prepared_digest": identity["prepared_digest"],
        "layout": report["layout"],
        **{key: report["counts"][key] for key in ("found", "accepted", "rejected", "train", "validation", "test")},
    }
    if "buckets" in report:
        profile["buckets"] = report["buckets"]
    return name, identity["prepared_digest"][:10], report.get("source_uri") or report["source"], profile


# ---------------------------------------------------------------------------------------------------------------
# CLI


def clip_token_counter(cache: Path) -> Callable[[str], int]:
    """Token count as CLIP's tokenizer sees it (BOS and EOS included); SD 1.x, 2.x and SDXL share its vocabulary.

    The tokenizer is built once into the cache and read back with `tokenizers` alone (0.3 s instead of 5 s for
    importing transformers); it encodes exactly as `transformers.CLIPTokenizer` does.
    """
    import tokenizers

    folder = cache / "clip-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        from pipeline.tiny import write_clip_tokenizer

        partial = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
        write_clip_tokenizer(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text).ids)


def notes(prepared: Prepared, report: Path) -> list[str]:
    """Lines for what was left out or lost without being an error: hidden files, frames of animations."""
    lines = []
    if prepared.hidden:
        shown = ", ".join(prepared.hidden[:3]) + (
            f" and {len(prepared.hidden) - 3} more" if len(prepared.hidden) > 3 else ""
        )
        lines.append(f"note: {len(prepared.hidden)} hidden file(s) or folder(s) not read ({shown}): names "
                     f"starting with '.' are skipped (.DS_Store, ._x.jpg); see not_read in {report}")  # fmt: skip
    animated = [c["path"] for c in prepared.converted if any("frames used" in x for x in c["conversions"])]
    if animated:
        shown = ", ".join(animated[:3]) + (f" and {len(animated) - 3} more" if len(animated) > 3 else "")
        lines.append(f"note: {len(animated)} animated image(s) ({shown}): only the first frame is used, the other "
                     f"frames are dropped; listed under converted in {report}")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--source", required=True, type=Path, help="raw image-caption folder")
    parser.add_argument("--out", required=True, type=Path, help="prepared dataset folder to write")
    parser.add_argument("--report", required=True, type=Path, help="data validation report (JSON)")
    parser.add_argument("--summary", type=Path, help="folder for the data summary (CSV plots, contact sheet)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"work cache (default {DEFAULT_CACHE})")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decoding processes")
    args = parser.parse_args(argv)
    env.configure()
    env.exit_on_sigterm()  # its worker processes stop with it
    try:
        # Only the data section matters here: the base model need not exist yet to prepare data.
        params = load_params(args.params, paths=False)
        prepared = prepare(args.source, params.data, args.cache, clip_token_counter(args.cache), args.workers)
    except (ParamsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = prepared.report() | {
        "source": str(args.source),
        "source_uri": dvc_import_url(args.source),
        "on_invalid": params.data.on_invalid,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    if args.summary:
        from pipeline.datasummary import write_summary

        write_summary(prepared, args.summary)
    counts, work = report["counts"], report["work"]
    print(
        f"{args.source} ({prepared.layout} layout): {counts['found']} found, {counts['accepted']} accepted "
        f"({counts['train']} train / {counts['validation']} validation / {counts['test']} test), "
        f"{counts['rejected']} rejected, "
        f"{counts['converted']} converted, {counts['captions_truncated']} captions truncated; "
        f"{work['images_decoded']} images decoded, {work['cache_reused']} from the cache; report: {args.report}"
    )
    for line in notes(prepared, args.report):
        print(line)
    if prepared.rejected and params.data.on_invalid == "fail":
        first = "; ".join(f"{r.path}: {r.reason}" for r in prepared.rejected[:5])
        more = f" and {len(prepared.rejected) - 5} more" if len(prepared.rejected) > 5 else ""
        print(
            f"error: {len(prepared.rejected)} invalid item(s) and data.on_invalid is 'fail': {first}{more}. "
            f"See {args.report} for the full list; fix or remove them, or set data.on_invalid: skip. "
            f"{env.nothing_written(args.out, 'prepare')}",
            file=sys.stderr,
        )
        return 1
    problem = split_problem(counts, params.data)
    if problem:
        print(f"error: {problem} {env.nothing_written(args.out, 'prepare')}", file=sys.stderr)
        return 1
    write_prepared(prepared, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
