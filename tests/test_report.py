"""The HTML evaluation report: its content, and that a real browser (headless Chromium) renders its images.

The Chromium test needs Debian's `chromium` package (`apt-get update && apt-get install -y chromium`); it is skipped,
saying so, only when no chromium binary is on PATH.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import evaluate
from pipeline.config import EvaluateParams
from pipeline.demo_data import BACKGROUNDS, COLOURS, draw_shape
from pipeline.diffusion import Split
from pipeline.report import curve_svg, read_curve

# 3 prompts (1 held-out caption + 2 fixed) x 2 seeds x 2 models, 2 general images x 2 models, and 2 memorisation
# cases x 2 models x (generated + training image).
N_IMAGES = 3 * 2 * 2 + 2 * 2 + 2 * 2 * 2
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _shape(shape: str, colour: str, seed: int, size: int = 64) -> Image.Image:
    return draw_shape(shape, COLOURS[colour], BACKGROUNDS["white"], size, random.Random(seed))


def _model(name: str, prompts: list[str], general: list[str], shift: float, train_file: str) -> evaluate.ModelEval:
    rng = np.random.default_rng(len(name))
    n = len(prompts)
    samples = {
        "val_loss": list(1.0 + shift + rng.normal(0, 0.01, 6)),
        "clip_score": list(25.0 - 10 * shift + rng.normal(0, 0.5, n)),
        "forgetting_clip_score": list(20.0 + rng.normal(0, 0.5, len(general))),
        "memorisation_similarity": list(np.linspace(0.9, 0.5, n)),
    }
    values = {k: float(np.mean(v)) for k, v in samples.items()} | {"fid": 12.5, "kid": 0.01, "kid_std": 0.001}
    values |= {"zero_shot_accuracy": 0.5, "zero_shot_precision_circle": 1.0, "zero_shot_recall_circle": 0.5}
    memorised = [
        {"generated": f"images/{name}/{i:03d}.png", "prompt": prompts[i], "nearest_train": train_file,
         "nearest_index": 0, "similarity": samples["memorisation_similarity"][i]}
        for i in range(2)
    ]  # fmt: skip
    return evaluate.ModelEval(
        name,
        values,
        samples,
        images=[_shape("circle" if i % 2 else "square", "red" if shift else "blue", i) for i in range(n)],
        general_images=[_shape("triangle", "green", 10 + i) for i in range(len(general))],
        per_image={"nearest_train": [train_file] * n},  # one training image: everybody's nearest
        memorised=memorised,
        seconds=1.5,
        timings={"generation": 1.0, "fid": 0.1},
    )


@pytest.fixture
def report(tmp_path: Path) -> Path:
    """A report written by the evaluate stage's `write_outputs` for two models (no diffusion model needed)."""
    train_file = tmp_path / "train" / "000.png"
    train_file.parent.mkdir()
    _shape("circle", "red", 99).save(train_file)
    params = EvaluateParams(
        prompts=["a red circle", "a blue square"],
        general_prompts=["a photo of a dog"],
        label_vocabulary=["circle", "square"],
        images_per_prompt=2,
        precision_recall_k=1,
        density_coverage_k=1,
    )
    validation = Split([_shape("circle", "red", i) for i in range(6)], ["a red circle on white"] * 6, ["h"] * 6)
    train = Split([_shape("circle", "red", 99)], ["a red circle"], ["t"])
    eval_set = evaluate.build_eval_set(validation, params, 64, train)
    results = [
        _model(name, eval_set.prompts, eval_set.general_prompts, shift, str(train_file))
        for name, shift in (("base", 0.0), ("candidate", 0.5))
    ]
    extractors = evaluate.Extractors(clip=(None, None), image_features=torch.nn.Identity(), plumbing_only=["tiny"])
    empty = torch.zeros(0, 2)
    reference = evaluate.Reference(empty, empty, empty, [str(train_file)], seconds=0.2)
    curve = tmp_path / "curve.csv"
    curve.write_text("step,train_loss,val_loss,lr\n0,,1.2,\n1,1.1,,0.001\n2,1.0,,0.001\n3,0.9,0.95,0.001\n")
    bootstrap = evaluate.Bootstrap(resamples=200, confidence=0.95, seed=0)
    evaluate.write_outputs(results, eval_set, extractors, reference, tmp_path / "eval", 3.0, curve, bootstrap)
    return tmp_path / "eval" / "report.html"


def test_report_content(report: Path) -> None:
    html = report.read_text()
    assert 'id="plumbing-warning"' in html and "plumbing only" in html
    assert html.count('src="data:image/png;base64,') == N_IMAGES
    tables = ('id="metrics"', 'id="samples"', 'id="general"', 'class="memorisation"', 'id="adherence"', 'id="cost"')
    assert all(table in html for table in tables)
    # val_loss went up by 0.5 with a tight spread: its interval excludes 0 and the verdict says "worse".
    row = re.search(r"<tr><td><code>val_loss</code></td>(.*?)</tr>", html).group(1)
    assert '<span class="worse">worse</span>' in row and "(95%, n=6)" in row
    assert "not a gate rule, or is within its guardrail's tolerance, does not block" in html  # why worse may pass
    assert "All 6 images of candidate have the same nearest training image" in html
    assert "(random features: evaluate.image_features=tiny)" in html
    assert "(untrusted_small_n)" in html  # FID on 6 images is marked in the table
    assert html.count("<polyline") == 2 and "train_loss" in html and "val_loss" in html


def test_memorisation_lists_each_training_image_once() -> None:
    similarity = np.array([0.99, 0.98, 0.97, 0.5, 0.96])
    nearest = np.array([7, 7, 7, 3, 2])  # one hub image nearest to most generated images
    assert evaluate.most_similar_per_train_image(similarity, nearest, 5) == [0, 4, 3]
    assert evaluate.most_similar_per_train_image(similarity, nearest, 2) == [0, 4]


def test_report_and_gate_show_the_same_interval(report: Path) -> None:
    """One bootstrap (the gate's settings) for both: the report's val_loss interval is the gate's, digit for digit."""
    from pipeline.gate import GatePolicy, MetricSet, decide

    samples = json.loads((report.parent / "samples.json").read_text())
    metrics = json.loads((report.parent / "intervals.json").read_text())
    rule = {"metric": "val_loss", "greater_is_better": False, "min_relative_change": 0.0, "require_significant": True}
    policy = GatePolicy(primary=[rule], bootstrap_resamples=200, confidence=0.95, seed=0)
    sets = {n: MetricSet({"val_loss": float(np.mean(s["val_loss"]))}, s, n) for n, s in samples.items()}
    (check,) = decide(sets["candidate"], sets["base"], policy).checks
    assert check.interval == (metrics["val_loss"]["low"], metrics["val_loss"]["high"])
    assert "200 resamples, seed 0, the gate's settings" in report.read_text()


def test_curve_svg_scales_points_into_the_plot() -> None:
    svg = curve_svg({"train_loss": [(0.0, 2.0), (10.0, 1.0)]}, width=200, height=100)
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    (x0, y0), (x1, y1) = (tuple(map(float, p.split(","))) for p in points)
    assert x0 == 60 and x1 == 180  # left margin 60, right margin 20
    assert y0 == 36 and y1 == 60  # highest loss at the top margin, lowest at the bottom of the plot area
    (legend,) = re.findall(r'<text x="[\d.]+" y="([\d.]+)" font-size="12" fill="#1f77b4">train_loss<', svg)
    assert float(legend) < 36  # the legend sits above the plot area, so no line runs through it


def test_read_curve_skips_empty_cells(tmp_path: Path) -> None:
    path = tmp_path / "curve.csv"
    path.write_text("step,train_loss,val_loss,lr\n0,,1.5,\n5,1.2,,0.1\n")
    assert read_curve(path) == {"val_loss": [(0.0, 1.5)], "train_loss": [(5.0, 1.2)]}


CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    tables: Array.from(document.querySelectorAll("table")).map((t) => t.id || t.className),
    curve_lines: document.querySelectorAll("svg#curve polyline").length,
    warning: !!document.getElementById("plumbing-warning"),
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", f"--user-data-dir={user_data}", "--virtual-time-budget=10000",
    ]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get update && apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Every image decodes in a real browser (naturalWidth > 0), the tables and the curve are there, and the page
    is not blank."""
    probe = report.with_name("report_probe.html")
    probe.write_text(report.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    result = _chromium("--dump-dom", probe.as_uri(), user_data=tmp_path / "chromium-profile")
    match = re.search(r'<pre id="browser-check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"no check result in the dumped DOM; chromium said: {result.stderr[-2000:]}"
    check = json.loads(match.group(1).replace("&amp;", "&"))
    assert check["images"] == N_IMAGES
    assert check["loaded"] == check["images"]
    assert {"metrics", "samples", "general", "memorisation", "adherence", "cost"} <= set(check["tables"])
    assert check["curve_lines"] == 2 and check["warning"]

    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri(), user_data=tmp_path / "profile-2")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10  # text, tables and pictures, not a blank page
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 500  # the red shapes drawn in the candidate's images are on screen
