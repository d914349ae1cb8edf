"""A summary of the prepared data for people: histograms as CSV and as SVG charts (declared as DVC plots), and a
contact sheet.

`dvc plots show` shows the charts (offline too); `contact_sheet.png` shows sample prepared images with their
captions, so a wrong crop, a caption column mix-up or a bad conversion is visible at a glance. Written by the
`prepare` stage.
"""

from __future__ import annotations

import bisect
import csv
import shutil
import textwrap
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline import charts

if TYPE_CHECKING:
    from pipeline.prepare import Prepared

# Shorter side of the source images, in pixels; SD trains at 512 (1.x), 768 (2.x), 1024 (XL).
SIDE_EDGES = [128, 256, 384, 512, 768, 1024, 1536, 2048, 4096]
# Width / height; 0.95..1.05 counts as square.
ASPECT_EDGES = [1 / 2, 2 / 3, 4 / 5, 0.95, 1.05, 5 / 4, 3 / 2, 2]
ASPECT_NAMES = ["taller than 1:2", "1:2 to 2:3", "2:3 to 4:5", "4:5 to square", "square (within 5%)"]
ASPECT_NAMES += ["square to 5:4", "5:4 to 3:2", "3:2 to 2:1", "wider than 2:1"]
# CLIP reads 77 tokens (BOS and EOS included); longer captions are cut at training time.
TOKEN_EDGES = [10, 20, 30, 40, 50, 60, 70, 78]
SHEET_ITEMS = 24
TITLES = {
    "counts.csv": "Data - items found, accepted, rejected (by reason) and converted",
    "resolution.csv": "Data - shorter side of the source images",
    "aspect.csv": "Data - aspect ratio of the source images",
    "caption_tokens.csv": "Data - caption length in CLIP tokens (77 are read)",
    "buckets.csv": "Data - prepared size (aspect-ratio bucket) of the images",
}
SHEET_COLUMNS = 6
THUMB = 144


def _numbered(labels: list[str]) -> list[str]:
    """Prefix bin labels with their position: DVC's bar chart sorts its axis as text."""
    return [f"{i + 1:02d} {label}" for i, label in enumerate(labels)]


def _ranges(edges: list[int], unit: str) -> list[str]:
    """'01 <128 px', '02 128-255 px', ..., '10 >=4096 px' for integer values."""
    inner = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]
    return _numbered([f"{label}{unit}" for label in (f"<{edges[0]}", *inner, f">={edges[-1]}")])


def histogram(values: list[float], edges: list, labels: list[str]) -> list[tuple[str, int]]:
    """(label, count) for every bin, empty bins included; bin i holds edges[i-1] <= value < edges[i]."""
    counts = Counter(bisect.bisect_right(edges, value) for value in values)
    return [(label, counts[i]) for i, label in enumerate(labels)]


def tables(prepared: Prepared) -> dict[str, tuple[list[str], list[tuple[str, int]]]]:
    """Every CSV of the summary: file name -> (header, rows)."""
    items = prepared.items
    counts = prepared.counts()
    reasons = Counter(r.reason.split(" (")[0] for r in prepared.rejected)
    upscaled = sum(max(i.width / i.original_size[0], i.height / i.original_size[1]) > 1 for i in items)
    rows = [(name, counts[name]) for name in ("found", "accepted", "train", "validation", "test", "rejected")]
    rows += [(f"rejected: {reason}", n) for reason, n in sorted(reasons.items())]
    rows += [("converted", counts["converted"]), ("captions truncated", counts["captions_truncated"])]
    rows += [("upscaled to the training size", upscaled)]
    out = {
        "counts.csv": (["category", "items"], rows),
        "resolution.csv": (
            ["shorter_side_px", "images"],
            histogram([min(i.original_size) for i in items], SIDE_EDGES, _ranges(SIDE_EDGES, " px")),
        ),
        "aspect.csv": (
            ["aspect_ratio", "images"],
            histogram([w / h for w, h in (i.original_size for i in items)], ASPECT_EDGES, _numbered(ASPECT_NAMES)),
        ),
    }
    tokens = [i.tokens for i in items if i.tokens is not None]
    if tokens:
        labels = _ranges(TOKEN_EDGES, " tokens")
        labels[-1] += " (truncated)"
        out["caption_tokens.csv"] = (["tokens", "captions"], histogram(tokens, TOKEN_EDGES, labels))
    # One square size when bucketing is off: the file is always there for `dvc plots`.
    sizes = Counter((i.width, i.height) for i in items)
    out["buckets.csv"] = (["bucket", "images"], [(f"{w}x{h}", n) for (w, h), n in sorted(sizes.items())])
    return out


def contact_sheet(prepared: Prepared, n: int = SHEET_ITEMS, columns: int = SHEET_COLUMNS) -> Image.Image:
    """A grid of up to `n` prepared images with their captions and splits, chosen by content hash (stable)."""
    sample = sorted(prepared.items, key=lambda i: i.sha256)[:n]
    font = ImageFont.load_default(11)
    line_height, text_lines, pad = 13, 3, 8
    cell_w, cell_h = THUMB + pad, THUMB + pad + line_height * text_lines + 4
    rows = max(1, -(-len(sample) // columns))
    header = 24
    sheet = Image.new("RGB", (columns * cell_w + pad, header + rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    counts = prepared.counts()
    draw.text(
        (pad, 6),
        f"{counts['accepted']} images ({counts['train']} train / {counts['validation']} validation / "
        f"{counts['test']} test), "
        f"{counts['rejected']} rejected; showing {len(sample)}",
        fill=(0, 0, 0),
        font=ImageFont.load_default(13),
    )
    for k, item in enumerate(sample):
        x, y = pad + (k % columns) * cell_w, header + (k // columns) * cell_h
        with Image.open(item.png) as image:
            thumb = ImageOps.contain(image.convert("RGB"), (THUMB, THUMB), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        short = {"validation": "val"}.get(item.split, item.split)
        label = f"[{short} {item.width}x{item.height}] {item.caption}"
        lines = textwrap.wrap(label, width=26)
        if len(lines) > text_lines:
            lines = [*lines[: text_lines - 1], lines[text_lines - 1][:23] + "..."]
        for j, line in enumerate(lines):
            draw.text((x, y + THUMB + 2 + j * line_height), line, fill=(40, 40, 40), font=font)
    return sheet


def write_summary(prepared: Prepared, folder: Path) -> None:
    """Write the CSVs and `contact_sheet.png` into `folder`, replacing what a previous run left there."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, (header, rows) in tables(prepared).items():
        with open(partial / name, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
        # The same table as a chart: `dvc plots show` draws it without Vega's CDN (dvc.yaml declares the SVGs).
        chart = charts.bar_chart([(str(label), value) for label, value in rows], TITLES[name], header[1])
        charts.write_svg(partial / name.replace(".csv", ".svg"), chart)
    contact_sheet(prepared).save(partial / "contact_sheet.png")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
