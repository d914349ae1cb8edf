"""Read a raw image-caption folder, validate every item and preprocess it.

A pure library for the `prepare` stage: no params, no MLflow, no file layout of its own. Nothing is dropped
silently: every item that cannot be used becomes a `Rejection(path, reason, detail)`, so the stage can count
the reasons and write them all out.

Three layouts are understood:
- "imagefolder": `metadata.jsonl` or `metadata.csv` at the root with a `file_name` column (paths relative to the
  root, subfolders allowed) and a caption column, as in Hugging Face `datasets`' ImageFolder.
- "kohya": image files anywhere under the root, each captioned by a `.txt` file of the same stem next to it, as
  in kohya-ss/sd-scripts. Folder names such as `10_cat` are not interpreted (no repeats).
- "manifest": a CSV/JSONL file named by the user, with the same columns as the ImageFolder metadata; paths in it
  are relative to the dataset root. Used only when passed explicitly.
Scans skip names that start with "." (`.git`, `.dvc`, `.ipynb_checkpoints`, macOS `._x.jpg` files) and do not
follow symlinked folders; a file listed in a metadata file is read wherever it is, as long as it is inside the root.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import random
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
FILE_COLUMN = "file_name"
LAYOUTS = ("imagefolder", "kohya", "manifest")

# 8192 x 8192: far above any SD training resolution, far below what exhausts memory when decoded (~200 MB as RGB).
DEFAULT_MAX_PIXELS = 8192 * 8192
# The smallest side of the default buckets (see bucket_sizes); smaller images would be upscaled more than 2x at 512.
DEFAULT_MIN_SIZE = 256


class DataError(ValueError):
    """The dataset as a whole cannot be read (no layout, malformed metadata file): the user must fix it."""


class ItemRejected(Exception):
    """One item cannot be used; `reason` is a short category to count, `detail` says what exactly."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RawItem:
    """One listed image: absolute `path`, posix `rel` path under the root, caption as found, metadata line."""

    path: Path
    rel: str
    caption: str | None
    line: int | None


@dataclass(frozen=True)
class Rejection:
    """An item left out, with the path as the user wrote it (or relative to the root) and why."""

    path: str
    reason: str
    detail: str = ""


@dataclass
class LoadedImage:
    """A fully decoded RGB image and the conversions that made it RGB, upright, without alpha."""

    image: Image.Image
    conversions: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _scan(root: Path) -> list[str]:
    """All files under `root` as sorted posix paths relative to it, skipping names that start with '.'."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if not name.startswith("."):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(found)


def hidden_entries(root: Path) -> list[str]:
    """What `_scan` leaves out: files and folders whose name starts with '.' (`.DS_Store`, macOS `._x.jpg`,
    `.ipynb_checkpoints/`), as posix paths relative to `root`, a hidden folder once (not its contents)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(dirnames) + sorted(filenames):
            if name.startswith("."):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def _has_sidecar_captions(root: Path) -> bool:
    files = set(_scan(root))
    return any(_is_image_name(f) and str(PurePosixPath(f).with_suffix(".txt")) in files for f in files)


def detect_layout(root: str | Path) -> str:
    """Return "imagefolder" or "kohya" for the folder `root`; a manifest is never detected, only passed."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder {root} does not exist or is not a folder.")
    present = [name for name in METADATA_NAMES if (root / name).is_file()]
    if len(present) > 1:
        raise DataError(f"{root} has both {' and '.join(present)}; keep one of them so captions have one source.")
    if present:
        return "imagefolder"
    if _has_sidecar_captions(root):
        return "kohya"
    raise DataError(
        f"Cannot tell the layout of {root}: looked for {' or '.join(METADATA_NAMES)} at its root (ImageFolder) "
        "and for images with .txt captions of the same name (kohya), and found neither. Add one of them, "
        "or pass a manifest CSV/JSONL with 'file_name' and caption columns."
    )


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: spreadsheet programs often save a byte-order mark at the start.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from e


def _check_columns(path: Path, columns: Iterable[str], caption_column: str) -> None:
    columns = list(columns)
    if FILE_COLUMN not in columns:
        raise DataError(
            f"{path} has no '{FILE_COLUMN}' column (found: {columns}); name the image path column '{FILE_COLUMN}'."
        )
    if caption_column not in columns:
        raise DataError(
            f"{path} has no caption column '{caption_column}' (found: {columns}); "
            "set caption_column to the column that holds the captions."
        )


def _read_jsonl(path: Path, caption_column: str) -> list[tuple[int, str, object]]:
    """Rows (line number, file_name, caption value) of a JSONL table; blank lines are allowed."""
    rows, columns = [], set()
    for line_no, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                f'object such as {{"{FILE_COLUMN}": "a.png", "{caption_column}": "a cat"}}.'
            ) from e
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, not an object with '{FILE_COLUMN}'.")
        if not isinstance(record.get(FILE_COLUMN), str) or not record[FILE_COLUMN]:
            raise DataError(f"{where} has no '{FILE_COLUMN}' string (keys: {sorted(record)}).")
        caption = record.get(caption_column)  # a number or a list: rejected with its item, not the whole file
        columns.update(record)
        rows.append((line_no, record[FILE_COLUMN], caption))
    if not rows:
        raise DataError(f"{path} lists no images.")
    _check_columns(path, sorted(columns), caption_column)
    return rows


def _read_csv(path: Path, caption_column: str) -> list[tuple[int, str, object]]:
    """Rows (line number, file_name, caption value) of a CSV table with a header line.

    The line number is where the row ends: the same as where it starts unless a quoted caption spans lines.
    """
    # newline="": only \n, \r\n and \r end rows, as the csv module documents (str.splitlines also splits on
    # \u2028 and other Unicode separators that may sit inside a caption).
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    if reader.fieldnames is None:
        raise DataError(f"{path} is empty; it needs a header line with '{FILE_COLUMN}' and '{caption_column}'.")
    _check_columns(path, reader.fieldnames, caption_column)
    rows = []
    for record in reader:
        line = reader.line_num
        if None in record:
            raise DataError(
                f"{path} line {line} has more fields than the header; quote captions that contain "
                'commas, e.g. a.png,"a cat, sitting".'
            )
        if not record[FILE_COLUMN]:
            raise DataError(f"{path} line {line} has an empty '{FILE_COLUMN}'.")
        rows.append((line, record[FILE_COLUMN], record[caption_column]))
    if not rows:
        raise DataError(f"{path} lists no images.")
    return rows


def _locate(root: Path, entry: str) -> tuple[str, Path]:
    """(posix path relative to `root`, absolute path) of a listed file, or ItemRejected. `root` is resolved."""
    if PurePosixPath(entry).is_absolute() or PureWindowsPath(entry).anchor:
        raise ItemRejected("path escapes dataset folder", f"absolute path; write it relative to {root}")
    rel = posixpath.normpath(entry)
    if rel == ".." or rel.startswith("../"):
        raise ItemRejected("path escapes dataset folder", f"points above {root}")
    path = root / rel
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise ItemRejected("missing file", f"cannot resolve: {e}") from e
    if not real.is_relative_to(root):
        raise ItemRejected("path escapes dataset folder", f"symlink to {real}, outside {root}")
    if not path.is_file():
        hint = "; use / between folders" if "\\" in entry else ""
        raise ItemRejected("missing file", f"no file {rel} under {root}{hint}")
    return rel, path


def _read_table_items(root: Path, table: Path, caption_column: str) -> tuple[list[RawItem], list[Rejection]]:
    if not table.is_file():
        raise DataError(f"Manifest {table} does not exist.")
    suffix = table.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"{table} must be a .jsonl or .csv file (got '{suffix}').")
    rows = _read_jsonl(table, caption_column) if suffix == ".jsonl" else _read_csv(table, caption_column)

    items, rejections, first_line = [], [], {}
    listed = set()  # every entry, kept or rejected, so a rejected one is not also reported as unlisted
    for line, entry, caption in rows:
        listed.add(posixpath.normpath(entry))
        try:
            rel, path = _locate(root, entry)
        except ItemRejected as e:
            rejections.append(Rejection(entry, e.reason, f"{table.name} line {line}: {e.detail}"))
            continue
        if rel in first_line:
            detail = f"{table.name} lines {first_line[rel]} and {line}; the first is used"
            rejections.append(Rejection(rel, "listed twice", detail))
            continue
        first_line[rel] = line
        if caption is not None and not isinstance(caption, str):
            kind = type(caption).__name__
            detail = (
                f"{table.name} line {line}: '{caption_column}' is {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                f"({caption!r}), not a string; quote it"
            )
            rejections.append(Rejection(rel, "caption not text", detail))
            continue
        items.append(RawItem(path, rel, caption, line))

    # An image in the folder that the table does not list is reported, never silently left out.
    for rel in _scan(root):
        if _is_image_name(rel) and rel not in listed:
            detail = f"not listed in {table.name}; add a line for it or move it out of the dataset folder"
            rejections.append(Rejection(rel, "not in metadata", detail))
    return items, rejections


def _read_kohya_items(root: Path) -> tuple[list[RawItem], list[Rejection]]:
    files = _scan(root)
    file_set = set(files)
    items, rejections, stems = [], [], set()
    for rel in filter(_is_image_name, files):
        stem = PurePosixPath(rel).with_suffix("")
        stems.add(stem)
        sidecar = str(stem.with_suffix(".txt"))
        try:
            _, path = _locate(root, rel)
            caption = _read_text(_locate(root, sidecar)[1]) if sidecar in file_set else None
        except ItemRejected as e:
            rejections.append(Rejection(rel, e.reason, e.detail))
            continue
        except DataError as e:
            rejections.append(Rejection(rel, "unreadable caption", str(e)))
            continue
        items.append(RawItem(path, rel, caption, None))
    for rel in files:
        if rel.endswith(".txt") and PurePosixPath(rel).with_suffix("") not in stems:
            rejections.append(Rejection(rel, "caption without image", "no image file of the same name next to it"))
    return items, rejections


def read_items(
    root: str | Path,
    layout: str = "auto",
    caption_column: str = "text",
    manifest: str | Path | None = None,
) -> tuple[list[RawItem], list[Rejection], str]:
    """List the items of a dataset folder: (items to validate further, rejections, layout used).

    `layout="auto"` uses the manifest when one is given, else `detect_layout`. Paths in a manifest are relative to
    `root`. Raises DataError when the folder or its metadata file cannot be read at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset folder {root} does not exist or is not a folder.")
    if layout == "auto":
        layout = "manifest" if manifest is not None else detect_layout(root)
    if layout not in LAYOUTS:
        raise DataError(f"Unknown layout '{layout}'; use one of {', '.join(LAYOUTS)} or 'auto'.")
    real_root = root.resolve()

    if layout == "kohya":
        items, rejections = _read_kohya_items(real_root)
    elif layout == "manifest":
        if manifest is None:
            raise DataError("layout 'manifest' needs the manifest file: pass manifest=<path to a .csv or .jsonl>.")
        items, rejections = _read_table_items(real_root, Path(manifest), caption_column)
    else:
        present = [real_root / name for name in METADATA_NAMES if (real_root / name).is_file()]
        if len(present) != 1:
            raise DataError(f"layout 'imagefolder' needs exactly one of {' or '.join(METADATA_NAMES)} in {root}.")
        items, rejections = _read_table_items(real_root, present[0], caption_column)
    return items, rejections, layout


# ---------------------------------------------------------------------------------------------------------------
# Captions


def check_caption(
    caption: str | None,
    count_tokens: Callable[[str], int] | None = None,
    max_tokens: int = 77,
) -> tuple[str | None, str | None]:
    """Return (cleaned caption, None), (cleaned caption, flag) when kept with a warning, or (None, reason).

    Cleaning collapses runs of whitespace (newlines in sidecar files) to one space. `count_tokens` counts tokens
    as the text encoder will, BOS/EOS included (77 for CLIP); a longer caption is kept and flagged, because the
    tokenizer truncates it at training time and the user should know the end is not seen.
    """
    if caption is None:
        return None, "missing caption"
    cleaned = " ".join(caption.split())
    if not cleaned:
        return None, "empty caption"
    if count_tokens is not None and count_tokens(cleaned) > max_tokens:
        return cleaned, f"caption truncated to {max_tokens} tokens"
    return cleaned, None


# ---------------------------------------------------------------------------------------------------------------
# Images

# Modes that carry alpha; La and RGBa (premultiplied) are un-premultiplied by convert("RGBA").
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, MemoryError)


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale ("I;16*", or "I" holding 0..65535) to "L": round(v / 257), since 65535 = 255 * 257."""
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ItemRejected(
            "unsupported pixel format", f"mode {image.mode} with values outside 0..65535; save it as 8- or 16-bit"
        )
    return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> tuple[Image.Image, list[str]]:
    """Convert any Pillow mode to RGB, compositing alpha on `background`; return the image and what was done."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, []
    if mode.startswith("I;16") or mode == "I":
        return _to_8bit(image).convert("RGB"), [f"{mode}->RGB (scaled 16-bit to 8-bit)"]
    if mode == "F":
        raise ItemRejected("unsupported pixel format", "32-bit float pixels; save it as 8- or 16-bit")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # A palette or colour-key transparency becomes a real alpha channel first, so it can be composited.
        via = "" if mode in _ALPHA_MODES else "->RGBA"
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        hex_bg = "#{:02x}{:02x}{:02x}".format(*background)
        composited = Image.alpha_composite(base, rgba).convert("RGB")
        return composited, [f"{mode}{via}->RGB (alpha composited on {hex_bg})"]
    try:
        # CMYK, P, L, 1, YCbCr, LAB, HSV. CMYK without its ICC profile applied is an approximation.
        return image.convert("RGB"), [f"{mode}->RGB"]
    except ValueError as e:
        raise ItemRejected("unsupported pixel format", f"mode {mode}: {e}") from e


def load_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    background: tuple[int, int, int] = (255, 255, 255),
) -> LoadedImage:
    """Fully decode an image file to upright RGB, or raise ItemRejected saying why it cannot be used.

    The pixel count is checked from the header before any decoding. Pillow's own decompression-bomb error
    (at 2 * Image.MAX_IMAGE_PIXELS, about 179 MP) still applies above that and is reported the same way.
    """
    path = Path(path)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code; ingest needs it "
            "False to reject truncated files. Do not set it in the pipeline process."
        )
    if path.stat().st_size == 0:
        raise ItemRejected("empty file", "0 bytes")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels decides below; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ItemRejected(
                        "decompression bomb", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
                    )
                if min(width, height) < min_size:
                    raise ItemRejected("too small", f"{width}x{height}, shorter side < min_size {min_size}")
                conversions = []
                frames = getattr(opened, "n_frames", 1)
                if frames > 1:
                    conversions.append(f"first of {frames} frames used")
                opened.load()  # decode every pixel now: a truncated or corrupt file fails here, not in training
                orientation = opened.getexif().get(0x0112, 1)  # EXIF tag 274, Orientation
                image = ImageOps.exif_transpose(opened)  # a copy, also when already upright
    except UnidentifiedImageError as e:
        raise ItemRejected("not an image", f"Pillow cannot identify this {path.suffix} file") from e
    except Image.DecompressionBombError as e:
        raise ItemRejected("decompression bomb", str(e)) from e
    except _UNREADABLE as e:
        raise ItemRejected("unreadable image", f"{type(e).__name__}: {e}") from e
    if orientation in range(2, 9):  # 1 is upright; exif_transpose ignores values outside 1..8
        conversions.append(f"EXIF orientation {orientation} applied")
    image, converted = _to_rgb(image, background)  # exif_transpose returned a copy: nothing refers to the file
    return LoadedImage(image, conversions + converted)


# ---------------------------------------------------------------------------------------------------------------
# Hashes and duplicates


def content_hash(image: Image.Image) -> str:
    """sha256 of the size and decoded RGB pixels: the same picture saved as PNG and as BMP hashes the same."""
    if image.mode != "RGB":
        raise ValueError(f"content_hash expects an RGB image (got mode {image.mode}); load it with load_image.")
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    """Unnormalised DCT-II as a matrix, D[k, i] = 2 cos(pi k (2i + 1) / 2n), the same as scipy.fftpack.dct."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash).

    Definition (Zauner 2010, "Implementation and Benchmarking of Perceptual Image Hash Functions"; as in the
    `imagehash` package's `phash`): greyscale, resize to 32x32, 2-D DCT-II, keep the top-left 8x8 low frequencies
    (DC term included), set a bit where a coefficient is above their median. Bits are read row by row, first bit
    most significant, so the value equals int(str(imagehash.phash(image)), 16).
    """
    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    coefficients = _DCT32 @ pixels @ _DCT32.T  # DCT along columns, then along rows
    low = coefficients[:8, :8].ravel()
    bits = low > np.median(low)
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Bits set in each uint64 (numpy >= 2 has bitwise_count; the SWAR fallback is Hacker's Delight 5-1)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (x * np.uint64(0x0101010101010101)) >> np.uint64(56)


def find_duplicates(hashes: list[tuple[str, str, int]], max_distance: int) -> dict[str, tuple[str, str]]:
    """Map each duplicate item key to (kind, key of the item kept instead).

    `hashes` holds (key, content hash, perceptual hash) per item. Items are visited in sorted key order and the
    first of a group is kept, so the result does not depend on input order. An item whose content hash was seen
    is an "exact duplicate"; otherwise one whose pHash is within `max_distance` bits of a kept item is a
    "near duplicate (distance d)" of the closest one. Only kept items are compared against, so chains of small
    differences do not remove a whole series. A negative `max_distance` checks exact duplicates only.
    Comparison is all-pairs against the kept items (vectorised): fine for tens of thousands of images.
    """
    keys = [key for key, _, _ in hashes]
    if len(set(keys)) != len(keys):
        raise ValueError("find_duplicates got the same key twice; keys must be unique (use relative paths).")
    duplicates: dict[str, tuple[str, str]] = {}
    first_by_content: dict[str, str] = {}
    kept_keys: list[str] = []
    kept_phash = np.empty(len(hashes), dtype=np.uint64)
    for key, chash, phash in sorted(hashes):
        if chash in first_by_content:
            duplicates[key] = ("exact duplicate", first_by_content[chash])
            continue
        first_by_content[chash] = key
        if max_distance >= 0 and kept_keys:
            distances = _popcount64(kept_phash[: len(kept_keys)] ^ np.uint64(phash))
            closest = int(np.argmin(distances))  # argmin takes the first of equals: the earliest kept key
            if distances[closest] <= max_distance:
                duplicates[key] = (f"near duplicate (distance {int(distances[closest])})", kept_keys[closest])
                continue
        kept_phash[len(kept_keys)] = phash
        kept_keys.append(key)
    return duplicates


# ---------------------------------------------------------------------------------------------------------------
# Split


def split_of(
    content_hash: str, val_fraction: float, salt: str = "", test_fraction: float = 0.0
) -> Literal["train", "val", "test"]:
    """ "test" for about `test_fraction` of items, "val" for about `val_fraction`, "train" for the rest, decided by
    the item's own hash alone.

    sha256(salt + hash) read as a number u in [0, 1) is uniform, so each item's split never changes when other items
    are added or removed (unlike a shuffled list cut at a fraction). Change `salt` for a new split. The bands:

        test: u < test_fraction  |  val: test_fraction <= u < test_fraction + val_fraction  |  train: the rest

    Test comes first so that changing val_fraction never moves a test image (the gate's set stays put). Without a
    test band (test_fraction 0) val is u < val_fraction, the two-split layout of earlier versions: with equal
    fractions the new test set is exactly the former validation set, which the earlier champion never trained on.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {fraction}.")
    if val_fraction + test_fraction > 1.0:
        raise ValueError(f"val_fraction + test_fraction must be at most 1, got {val_fraction} + {test_fraction}.")
    point = int.from_bytes(hashlib.sha256((salt + content_hash).encode()).digest(), "big")
    if point < test_fraction * 2**256:
        return "test"
    return "val" if point < (test_fraction + val_fraction) * 2**256 else "train"


# ---------------------------------------------------------------------------------------------------------------
# Resize, crop and aspect-ratio buckets


def resize_and_crop(
    image: Image.Image,
    width: int,
    height: int,
    crop: str = "center",
    rng: random.Random | None = None,
) -> Image.Image:
    """Scale `image` (LANCZOS) so it covers width x height, then crop the overflow of the longer side."""
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got '{crop}'.")
    if crop == "random" and rng is None:
        raise ValueError("crop='random' needs rng=random.Random(seed) so crops are reproducible.")
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}.")
    scale = max(width / image.width, height / image.height)
    # max(): rounding must never leave the scaled image a pixel short of the target.
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if crop == "center":
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
    return image.crop((left, top, left + width, top + height))


def bucket_sizes(
    target_area: int = 512 * 512,
    step: int = 64,
    min_side: int = 256,
    max_side: int = 1024,
    max_ratio: float = 2.0,
) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (width, height), sorted: sides are multiples of `step`, width * height <= target_area.

    As kohya-ss/sd-scripts `make_bucket_resolutions`: for each width, the tallest height that fits the area, plus
    the square; buckets more elongated than `max_ratio` are left out. Defaults give 384x640 .. 640x384.
    """
    if step <= 0 or min_side % step or max_side % step or not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, both multiples of step {step} (got {min_side}, {max_side}).")
    if max_ratio < 1.0:
        raise ValueError(f"max_ratio is long side / short side, so at least 1 (got {max_ratio}).")
    square = math.isqrt(target_area) // step * step
    buckets = {(square, square)} if min_side <= square <= max_side else set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, target_area // width // step * step)
        if height >= min_side and max(width, height) / min(width, height) <= max_ratio:
            buckets |= {(width, height), (height, width)}
    if not buckets:
        raise ValueError(
            f"no bucket fits area {target_area} with sides {min_side}..{max_side} and ratio <= {max_ratio}."
        )
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in aspect ratio, compared as |log(w/h)| so 2:1 and 1:2 are equally far from 1:1."""
    if not buckets:
        raise ValueError("nearest_bucket needs at least one bucket.")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}.")
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))
