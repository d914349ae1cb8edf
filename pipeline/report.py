"""The evaluation's HTML report: one self-contained file a reviewer opens before trusting a promotion.

Images are inlined as base64 PNG thumbnails and the training curve as inline SVG, so `report.html` reads the same
from a laptop, a CI artifact or MLflow, with no other file beside it. Sections: a plumbing-only warning when a tiny
random extractor was used, the metric table with paired bootstrap intervals, baseline | candidate images per prompt,
the forgetting prompts, the worst memorisation cases, prompt adherence (the shape-world classifier judge: per attribute
and class, with confusion matrices; zero-shot CLIP per class), the training curve and the cost.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.judges import ATTRIBUTES, confusion_image
from pipeline.metrics import label_key

THUMBNAIL = 256  # longest side of an inlined image, in pixels
DISPLAY = 128  # CSS pixels per image in the grids

# Which way is better, for the verdict column; metrics not listed get no verdict.
HIGHER_IS_BETTER = {
    "clip_score": True,
    "forgetting_clip_score": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "density": True,
    "coverage": True,
    "val_loss": False,
    "fid": False,
    "kid": False,
    "mifid": False,
    "memorisation_similarity": False,
    "memorisation_max": False,
    "zero_shot_accuracy": True,
    **{
        f"{prefix}{name}": True
        for prefix in ("", "base_")
        for name in ("adherence_accuracy", "adherence_f1", *(f"{a}_accuracy" for a in ATTRIBUTES))
    },
}
# Per-class numbers have their own tables, not rows of the metric table.
PER_CLASS = re.compile(r"^(base_)?(adherence|zero_shot)_(precision|recall|f1)_")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.sample { width: DISPLAYpx; height: DISPLAYpx; image-rendering: pixelated; margin: 1px; }
.warning { background: #fff3cd; border: 2px solid #e0a800; padding: 0.8em 1em; font-weight: 600; }
.flag { color: #a60; }
.better { color: #070; } .worse { color: #b00; } .same { color: #666; }
code { font-size: 13px; }
""".replace("DISPLAY", str(DISPLAY))


def png_data_uri(image: Image.Image, max_side: int = THUMBNAIL) -> str:
    """A PNG data URI of `image`, shrunk so its longest side is at most `max_side` pixels."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: Image.Image, title: str) -> str:
    return f'<img class="sample" src="{png_data_uri(image)}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.3e}"
    return html.escape(str(x))


# --------------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------------


def metric_table(
    names: list[str],
    values: dict[str, dict[str, float]],
    cis: dict[str, dict[str, Any]],
    untrusted: dict[str, str] | None = None,
) -> str:
    """Metric | each model | candidate - baseline | paired bootstrap interval | verdict. Per-class adherence numbers
    have their own table; untrusted metrics are marked."""
    untrusted = untrusted or {}
    metrics = [k for k in dict.fromkeys(k for name in names for k in values[name]) if not PER_CLASS.match(k)]
    two = len(names) >= 2
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    if two:
        head += f"<th>{html.escape(names[-1])} &minus; {html.escape(names[0])}</th><th>interval</th><th>verdict</th>"
    rows = []
    for metric in metrics:
        cells = "".join(f'<td class="num">{_fmt(values[n].get(metric))}</td>' for n in names)
        if two:
            first, last = values[names[0]].get(metric), values[names[-1]].get(metric)
            diff = last - first if first is not None and last is not None else None
            ci = cis.get(metric)
            interval, verdict = "", ""
            if ci:
                interval = f"[{_fmt(ci['low'])}, {_fmt(ci['high'])}] ({ci['confidence']:.0%}, n={ci['n']})"
                verdict = _verdict(metric, ci)
            cells += f'<td class="num">{_fmt(diff)}</td><td class="num">{interval}</td><td>{verdict}</td>'
        flag = f' <span class="flag">({untrusted[metric].split(":")[0]})</span>' if metric in untrusted else ""
        rows.append(f"<tr><td><code>{html.escape(metric)}</code>{flag}</td>{cells}</tr>")
    return f'<table id="metrics"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def _verdict(metric: str, ci: dict[str, Any]) -> str:
    if not ci["excludes_zero"]:
        return '<span class="same">no significant difference</span>'
    higher = HIGHER_IS_BETTER.get(metric)
    if higher is None:
        return "significant difference"
    better = (ci["low"] > 0) == higher
    return '<span class="better">better</span>' if better else '<span class="worse">worse</span>'


def sample_table(table_id: str, columns: dict[str, list[Image.Image]], prompts: list[str], seeds: list[int]) -> str:
    """One row per prompt, one cell per model holding that prompt's images (all seeds), side by side."""
    names = list(columns)
    order = list(dict.fromkeys(prompts))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for prompt in order:
        indices = [i for i, q in enumerate(prompts) if q == prompt]
        cells = "".join(
            "<td>" + "".join(_img(columns[n][i], f"{n} #{i} seed {seeds[i]}") for i in indices) + "</td>" for n in names
        )
        rows.append(f"<tr><td>{html.escape(prompt)}</td>{cells}</tr>")
    return f'<table id="{table_id}"><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>'


def memorisation_table(name: str, cases: list[dict[str, Any]], images: list[Image.Image]) -> str:
    """The generated images most similar to a training image: both images, the similarity and both paths."""
    rows = []
    for case in cases:
        index = int(Path(case["generated"]).stem)
        nearest = Path(case["nearest_train"])
        train_img = _img(Image.open(nearest), str(nearest)) if nearest.is_file() else "(file not found)"
        rows.append(
            f"<tr><td>{_img(images[index], case['generated'])}</td><td>{train_img}</td>"
            f'<td class="num">{case["similarity"]:.4f}</td><td>{html.escape(case["prompt"])}</td>'
            f"<td><code>{html.escape(case['generated'])}</code><br><code>{html.escape(str(nearest))}</code></td></tr>"
        )
    return (
        f'<h3>{html.escape(name)}</h3><table class="memorisation"><tr><th>generated</th><th>nearest training image'
        f"</th><th>cosine similarity</th><th>prompt</th><th>paths</th></tr>{''.join(rows)}</table>"
    )


def adherence_table(
    names: list[str],
    values: dict[str, dict[str, float]],
    vocabulary: list[str],
    prefix: str = "zero_shot_",
    table_id: str = "adherence",
) -> str:
    """Per class: each model's precision, recall and F1 (`{prefix}{measure}_{class}`), then the accuracy."""
    head = "".join(f"<th>{html.escape(n)} precision</th><th>recall</th><th>F1</th>" for n in names)
    rows = []
    for label in vocabulary:
        key = label_key(label)
        cells = "".join(
            "".join(
                f'<td class="num">{_fmt(values[n].get(f"{prefix}{m}_{key}"))}</td>'
                for m in ("precision", "recall", "f1")
            )
            for n in names
        )
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    acc = "".join(f'<td class="num" colspan="3">{_fmt(values[n].get(f"{prefix}accuracy"))}</td>' for n in names)
    rows.append(f"<tr><td><b>accuracy</b></td>{acc}</tr>")
    return f'<table id="{table_id}"><tr><th>class</th>{head}</tr>{"".join(rows)}</table>'


def judge_section(results: list[Any]) -> list[str]:
    """Adherence as the classifier judge sees it: per attribute and class, and each model's confusion matrices."""
    names = [r.name for r in results]
    values = {r.name: r.values for r in results}
    out = []
    for key, prefix, title in (
        ("prompts", "", "own prompts (held-out captions and evaluate.prompts)"),
        ("general_prompts", "base_", "base-vocabulary prompts (evaluate.general_prompts, for forgetting)"),
    ):
        judged = [r for r in results if key in r.adherence]
        if not judged:
            continue
        first = judged[0].adherence[key]
        out.append(f"<h3>{html.escape(title)}: {first.n} images per model</h3>")
        head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
        rows = "".join(
            f"<tr><td><code>{prefix}{m}</code></td>"
            + "".join(f'<td class="num">{_fmt(values[n].get(f"{prefix}{m}"))}</td>' for n in names)
            + "</tr>"
            for m in ("adherence_accuracy", "adherence_f1", *(f"{a}_accuracy" for a in ATTRIBUTES))
        )
        out.append(f'<table id="{prefix}judge-adherence"><tr><th>metric</th>{head}</tr>{rows}</table>')
        classes = [c for a in ATTRIBUTES for c in first.classes[a]]
        out.append(adherence_table(names, values, classes, f"{prefix}adherence_", f"{prefix}judge-per-class"))
        for r in judged:
            images = "".join(
                f'<img src="{png_data_uri(confusion_image(r.adherence[key], a), 512)}" alt="{html.escape(r.name)} '
                f'{a} confusion" title="{html.escape(r.name)}: {a}" style="margin: 2px">'
                for a in ATTRIBUTES
            )
            out.append(f'<p class="confusion"><b>{html.escape(r.name)}</b><br>{images}</p>')
    return out


def read_curve(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{column: [(step, value)]} from the train stage's curve.csv, skipping empty cells."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for column in ("train_loss", "val_loss"):
                if row.get(column) not in (None, ""):
                    series.setdefault(column, []).append((float(row["step"]), float(row[column])))
    return series


def curve_svg(series: dict[str, list[tuple[float, float]]], width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart of the loss series (no plotting library needed)."""
    points = [p for values in series.values() for p in values]
    if not points:
        return "<p>The training curve is empty.</p>"
    left, right, top, bottom = 60, 20, 36, 40  # the legend is a row in the top margin, above every line
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)

    def xy(step: float, value: float) -> str:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = top + (1 - (value - y0) / (y1 - y0)) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    colours = {"train_loss": "#1f77b4", "val_loss": "#d62728"}
    parts = [
        f'<svg id="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" fill="none" '
        'stroke="#999"/>',
        f'<text x="{left}" y="{height - 22}" font-size="11">{_fmt(x0)}</text>',
        f'<text x="{width - right}" y="{height - 22}" font-size="11" text-anchor="end">{_fmt(x1)}</text>',
        f'<text x="{(width + left) // 2}" y="{height - 6}" font-size="12" text-anchor="middle">step</text>',
        f'<text x="{left - 4}" y="{top + 10}" font-size="11" text-anchor="end">{_fmt(y1)}</text>',
        f'<text x="{left - 4}" y="{height - bottom}" font-size="11" text-anchor="end">{_fmt(y0)}</text>',
    ]
    for k, (name, values) in enumerate(series.items()):
        colour = colours.get(name, "#555")
        marker = (
            "".join(
                f'<circle cx="{xy(*p).split(",")[0]}" cy="{xy(*p).split(",")[1]}" r="2.5" fill="{colour}"/>'
                for p in values
            )
            if len(values) <= 40
            else ""
        )
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{" ".join(xy(*p) for p in values)}"/>'
            + marker
        )
        parts.append(
            f'<text x="{left + 10 + 110 * k}" y="{top - 10}" font-size="12" fill="{colour}">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def cost_table(cost: dict[str, Any]) -> str:
    rows = []
    for name, c in cost["models"].items():
        per_metric = ", ".join(f"{k} {v:.2f} s" for k, v in c["seconds_per_metric"].items())
        rows.append(
            f'<tr><td>{html.escape(name)}</td><td class="num">{c["images_generated"]}</td>'
            f'<td class="num">{c["seconds"]:.2f}</td><td class="num">{_fmt(c["generation_images_per_second"])}</td>'
            f"<td>{html.escape(per_metric)}</td></tr>"
        )
    return (
        '<table id="cost"><tr><th>model</th><th>images generated</th><th>seconds</th><th>generation images/s</th>'
        f"<th>seconds per metric</th></tr>{''.join(rows)}</table>"
        f"<p>Whole evaluation: {cost['images_generated']} images in {cost['wall_seconds']:.1f} s wall time "
        f"({_fmt(cost['images_per_second'])} images/s, model loading and reference features included; reference "
        f"features {cost['reference_seconds']:.2f} s).</p>"
    )


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------


def render(results: list[Any], eval_set: Any, summary: dict[str, Any], cis: dict[str, Any], curve: Path | None) -> str:
    """The whole report as one HTML string. `results` are `pipeline.evaluate.ModelEval`s (baseline first)."""
    ev = summary["evaluation"]
    names = [r.name for r in results]
    values = {r.name: r.values for r in results}
    p = eval_set.params
    out = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f"<title>sdft evaluation: {html.escape(' vs '.join(names))}</title><style>{STYLE}</style></head><body>",
        f"<h1>Evaluation: {html.escape(' vs '.join(names))}</h1>",
    ]
    if ev.get("judges"):
        out.append(
            '<p id="judges-note">Judges: the shape-world judges shipped in <code>assets/judges/</code> (a classifier '
            "and a tiny CLIP trained on renders of <code>pipeline/world.py</code>; <code>python -m "
            "pipeline.pretrain_judges</code>). They score images of that world only.</p>"
        )
    if ev["plumbing_only"]:
        out.append(
            '<p class="warning" id="plumbing-warning">Warning: this evaluation used '
            f"{html.escape(ev['extractors'])}. CLIP scores, FID, KID, precision/recall, density/coverage, "
            "memorisation and adherence below say nothing about image quality; set evaluate.clip_model and "
            "evaluate.image_features to real models for numbers you can act on. val_loss is meaningful.</p>"
        )
    out.append(
        f"<p>Evaluation set <code>{ev['eval_set_hash'][:16]}</code>: {ev['n_test_images']} held-out images "
        f"from the <b>{html.escape(ev['split'])}</b> split (never read by training, early stopping or checkpoint "
        f"choice), {ev['n_train_images']} training images, {ev['n_generated_per_model']} generated images per model "
        f"({p.images_per_prompt} seeds per prompt) + {ev['n_general_per_model']} for forgetting, "
        f"{p.num_inference_steps} scheduler steps, guidance {p.guidance_scale}. Extractors: CLIP "
        f"<code>{html.escape(p.clip_model)}</code>, image features <code>{html.escape(p.image_features)}</code> "
        f"({html.escape(ev['extractors'])}).</p>"
    )
    out.append(f'<h2 id="metrics">Metrics (on the {html.escape(ev["split"])} split)</h2>')
    if len(names) >= 2:
        out.append(
            f"<p>Intervals: paired percentile bootstrap of the mean per-sample difference {html.escape(names[-1])} "
            f"&minus; {html.escape(names[0])} ({ev['bootstrap']['resamples']} resamples, seed "
            f"{ev['bootstrap']['seed']}, the gate's settings; Efron &amp; "
            "Tibshirani 1993), over the same held-out images, prompts and seeds. Metrics without per-sample values "
            "(FID, KID, MiFID) have none.</p>"
        )
    out.append(metric_table(names, values, cis, ev["untrusted"]))
    if len(names) >= 2:
        out.append(
            '<p id="verdicts">The verdicts compare these two models only. A promotion is decided by the gate '
            "(<code>reports/gate.md</code>): only the metrics under <code>gate:</code> in params.yaml count, each "
            "within its rule's tolerance, against the champion (or the untuned base model on the first run). A metric "
            "marked worse here that is not a gate rule, or is within its guardrail's tolerance, does not block a "
            "promotion.</p>"
        )
    notes = [f"<li><code>{m}</code>: {html.escape(why)}</li>" for m, why in ev["untrusted"].items()]
    notes += [f"<li><code>{m}</code> not computed: {html.escape(why)}</li>" for m, why in ev["skipped"].items()]
    if notes:
        out.append(f'<ul class="flag" id="flags">{"".join(notes)}</ul>')

    out.append("<h2>Samples: same prompt, same seed</h2>")
    out.append(sample_table("samples", {r.name: r.images for r in results}, eval_set.prompts, eval_set.seeds))
    if eval_set.general_prompts:
        out.append("<h2>Forgetting: general prompts unrelated to the training data</h2>")
        columns = {r.name: r.general_images for r in results}
        out.append(sample_table("general", columns, eval_set.general_prompts, eval_set.general_seeds))

    if any(r.memorised for r in results):
        out.append("<h2>Memorisation: generated images closest to a training image</h2>")
        out.append(
            "<p>Cosine similarity of image features to the nearest training image; near 1 suggests a copy. Each "
            "training image is listed once, with the generated image most similar to it.</p>"
        )
        for r in results:
            if not r.memorised:
                continue
            out.append(memorisation_table(r.name, r.memorised, r.images))
            nearest = r.per_image.get("nearest_train", [])
            similarity = r.samples.get("memorisation_similarity", [])
            if len(nearest) > 1 and len(set(nearest)) == 1:
                out.append(
                    f'<p class="flag">All {len(nearest)} images of {html.escape(r.name)} have the same nearest '
                    "training image: the image features do not tell these images apart"
                    + (" (random features: evaluate.image_features=tiny)" if ev["plumbing_only"] else "")
                    + ", so this table says nothing about copying.</p>"
                )
            elif ev["plumbing_only"] and similarity:
                out.append(
                    f'<p class="flag">Random image features (evaluate.image_features=tiny) make every image look '
                    f"alike (similarities {min(similarity):.3f} to {max(similarity):.3f}, {len(set(nearest))} distinct "
                    "nearest training images): this table checks the plumbing, not copying.</p>"
                )

    if any(getattr(r, "adherence", None) for r in results):
        out.append("<h2>Prompt adherence (shape-world classifier judge)</h2>")
        out.append(
            "<p>For every prompt that is a shape-world scene, whether the classifier judge sees the shape, colour "
            "and background it asked for. Confusion matrices: rows are what the prompt asked for, columns what the "
            "judge saw (also as CSV in <code>confusion/</code>).</p>"
        )
        out += judge_section(results)
    if p.label_vocabulary and any("zero_shot_accuracy" in v for v in values.values()):
        out.append("<h2>Prompt adherence (zero-shot CLIP over the label vocabulary)</h2>")
        out.append(adherence_table(names, values, p.label_vocabulary))

    out.append("<h2>Training curve (train loss on the train split, val_loss on the validation split)</h2>")
    if curve is not None and curve.is_file():
        out.append(curve_svg(read_curve(curve)))
    else:
        out.append("<p>No training curve was given (<code>--train-curve</code>).</p>")

    out.append("<h2>Cost</h2>")
    out.append(cost_table(ev["cost"]))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(
    path: Path,
    results: list[Any],
    eval_set: Any,
    summary: dict[str, Any],
    cis: dict[str, Any],
    curve: Path | None = None,
) -> Path:
    path.write_text(render(results, eval_set, summary, cis, curve), encoding="utf-8")
    return path
