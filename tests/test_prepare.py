"""Tests of the prepare stage (pipeline.prepare and its summary) on real folders built in tmp_path.

The core `prepare()` is run with a toy token counter (words + BOS + EOS); the CLI `main()` with CLIP's real
tokenizer, built once per session into a folder every test's cache starts from.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import DataParams
from pipeline.prepare import clip_token_counter, dataset_for_mlflow, main, prepare, split_problem, write_prepared

REPO = Path(__file__).resolve().parents[1]
# Thirds, with a salt under which the few images of these tests (6 to 24) fill all three splits.
SPLIT = {"val_fraction": 1 / 3, "test_fraction": 1 / 3, "split_salt": "t0"}
LONG_CAPTION = "word " * 90  # 92 tokens with BOS and EOS, for the toy counter and for CLIP alike


def noise(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def toy_count(text: str) -> int:
    return len(text.split()) + 2


def data_params(**overrides) -> DataParams:
    """Small sizes so tests run in milliseconds: 32 px output, 16 px minimum, 10,000-pixel bomb guard."""
    values = {"source": "unused", "resolution": 32, "min_size": 16, "max_pixels": 10_000}
    values |= SPLIT
    return DataParams.model_validate(values | overrides)


def good_images(root: Path, n: int, start: int = 0) -> list[dict]:
    """`n` distinct noise images g<i>.png of varied sizes, with their metadata rows."""
    rows = []
    for i in range(start, start + n):
        save(noise(40 + 4 * (i % 5), 40 + 2 * (i % 3), seed=i), root / f"g{i}.png")
        rows.append({"file_name": f"g{i}.png", "text": f"picture number {i}"})
    return rows


# Every kind of bad item in one folder, with the reason each must be rejected for.
EXPECTED_REJECTIONS = {
    "nocap.png": "missing caption",
    "blank.png": "empty caption",
    "zero.png": "empty file",
    "text.png": "not an image",
    "cut.png": "unreadable image",
    "tiny.png": "too small",
    "huge.png": "decompression bomb",
    "z_copy.bmp": "exact duplicate",
    "gone.png": "missing file",
    "stray.png": "not in metadata",
    "../outside.png": "path escapes dataset folder",
    "g1.png": "listed twice",
}
EXPECTED_CONVERSIONS = {
    "cmyk.jpg": ["CMYK->RGB"],
    "rgba.png": ["RGBA->RGB (alpha composited on #ffffff)"],
    "grey.png": ["L->RGB"],
    "rotated.jpg": ["EXIF orientation 6 applied"],
}


def mixed_source(root: Path) -> Path:
    """An ImageFolder dataset with 8 good images, 4 that need converting, 1 long caption and every bad case."""
    rows = good_images(root, 8)
    save(Image.new("CMYK", (40, 40), (0, 80, 160, 0)), root / "cmyk.jpg", quality=95)
    save(Image.new("RGBA", (40, 40), (200, 10, 10, 128)), root / "rgba.png")
    save(Image.new("L", (40, 40), 90), root / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(noise(64, 32, seed=50), root / "rotated.jpg", exif=exif, quality=95)
    save(noise(seed=51), root / "long.png")
    rows += [{"file_name": name, "text": f"converted {name}"} for name in EXPECTED_CONVERSIONS]
    rows.append({"file_name": "long.png", "text": LONG_CAPTION})

    save(noise(seed=60), root / "nocap.png")
    save(noise(seed=61), root / "blank.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("not a picture")
    cut = save(noise(seed=62), root / "cut.png").read_bytes()
    (root / "cut.png").write_bytes(cut[: len(cut) // 2])
    save(noise(8, 8, seed=63), root / "tiny.png")
    save(noise(120, 100, seed=64), root / "huge.png")
    save(noise(40, 40, seed=0), root / "z_copy.bmp")  # the same pixels as g0.png
    save(noise(seed=65), root / "stray.png")
    save(noise(seed=66), root.parent / "outside.png")
    rows += [
        {"file_name": "nocap.png"},
        {"file_name": "blank.png", "text": "   "},
        *({"file_name": name, "text": "bad"} for name in ("zero.png", "text.png", "cut.png", "tiny.png")),
        {"file_name": "huge.png", "text": "bad"},
        {"file_name": "z_copy.bmp", "text": "a copy of g0"},
        {"file_name": "gone.png", "text": "deleted"},
        {"file_name": "../outside.png", "text": "outside"},
        {"file_name": "g1.png", "text": "listed again"},
    ]
    write_jsonl(root / "metadata.jsonl", rows)
    return root


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepare cache holding only CLIP's tokenizer, built once per session (about 5 s)."""
    cache = tmp_path_factory.getbasetemp() / "clip-cache"
    if not (cache / "clip-tokenizer" / "tokenizer.json").is_file():
        clip_token_counter(cache)
    return cache


@pytest.fixture
def cache(tmp_path: Path, tokenizer_cache: Path) -> Path:
    """A fresh prepare cache for one test, with the tokenizer already in it."""
    shutil.copytree(tokenizer_cache / "clip-tokenizer", tmp_path / "cache" / "clip-tokenizer")
    return tmp_path / "cache"


def write_params(path: Path, **data_overrides) -> Path:
    """The repository's params.yaml with test-sized data settings."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= {"resolution": 32, "min_size": 16, "max_pixels": 10_000}
    params["data"] |= SPLIT
    params["data"] |= data_overrides
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_cli(tmp_path: Path, source: Path, cache: Path, *extra: str, **data_overrides) -> int:
    params = write_params(tmp_path / "params.yaml", source=str(source), **data_overrides)
    argv = ["--params", str(params), "--source", str(source), "--out", str(tmp_path / "prepared")]
    argv += ["--report", str(tmp_path / "reports" / "data_validation.json"), "--cache", str(cache)]
    argv += ["--workers", "1", *extra]  # one process: spawning workers costs more than these few images
    return main(argv)


def read_prepared(out: Path) -> dict[str, list[dict]]:
    return {
        split: [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]
        for split in ("train", "validation", "test")
    }


# ---------------------------------------------------------------------------------------------------------------
# Validation: every bad case, both policies


def test_prepare_rejects_each_bad_item_for_its_reason_and_keeps_the_rest(tmp_path):
    source = mixed_source(tmp_path / "raw")

    result = prepare(source, data_params(), tmp_path / "cache", toy_count)

    assert {r.path: r.reason for r in result.rejected} == EXPECTED_REJECTIONS
    assert all(r.detail for r in result.rejected if r.reason not in ("missing caption", "empty caption"))
    kept = {item.source for item in result.items}
    assert kept == {f"g{i}.png" for i in range(8)} | set(EXPECTED_CONVERSIONS) | {"long.png"}
    assert {c["path"]: c["conversions"] for c in result.converted} == EXPECTED_CONVERSIONS
    assert result.truncated == [{"path": "long.png", "tokens": 92, "detail": "caption truncated to 77 tokens"}]
    counts = result.counts()
    assert counts["found"] == 25  # 24 metadata lines, of which g1.png twice, and the unlisted stray.png
    assert counts["accepted"] == 13 and counts["rejected"] == 12 and counts["exact_duplicates"] == 1
    assert counts["converted"] == 4 and counts["captions_truncated"] == 1
    assert counts["train"] + counts["validation"] + counts["test"] == 13
    assert counts["train"] and counts["validation"] and counts["test"]
    assert all((item.width, item.height) == (32, 32) for item in result.items)
    assert result.layout == "imagefolder"


def test_cli_fail_policy_stops_names_the_first_bad_files_and_writes_nothing(tmp_path, cache, capsys):
    source = mixed_source(tmp_path / "raw")

    code = run_cli(tmp_path, source, cache, on_invalid="fail")

    assert code == 1
    err = capsys.readouterr().err
    report_path = tmp_path / "reports" / "data_validation.json"
    assert "12 invalid item(s) and data.on_invalid is 'fail'" in err
    assert "../outside.png: path escapes dataset folder" in err and "gone.png: missing file" in err
    assert "and 7 more" in err and str(report_path) in err
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "prepared.partial").exists()
    report = json.loads(report_path.read_text())
    assert {r["path"]: r["reason"] for r in report["rejected"]} == EXPECTED_REJECTIONS
    assert report["on_invalid"] == "fail"


def test_cli_fail_policy_leaves_the_previous_prepared_data_as_it_was(tmp_path, cache):
    source = tmp_path / "raw"
    rows = good_images(source, 8)
    write_jsonl(source / "metadata.jsonl", rows)
    assert run_cli(tmp_path, source, cache, on_invalid="fail") == 0
    before = {p: p.read_bytes() for p in (tmp_path / "prepared").rglob("*") if p.is_file()}

    (source / "zero.png").write_bytes(b"")
    write_jsonl(source / "metadata.jsonl", [*rows, *good_images(source, 2, start=8), {"file_name": "zero.png"}])
    assert run_cli(tmp_path, source, cache, on_invalid="fail") == 1

    assert {p: p.read_bytes() for p in (tmp_path / "prepared").rglob("*") if p.is_file()} == before


def test_near_duplicates_are_found_also_from_the_cache(tmp_path):
    source = tmp_path / "raw"
    small = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    scene = Image.fromarray(small).resize((96, 64), Image.Resampling.BICUBIC)  # smooth, as pHash needs
    save(scene, source / "a.png")
    save(scene.resize((90, 60), Image.Resampling.LANCZOS), source / "b.jpg", quality=70)
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "b.jpg", "text": "b"}]
    write_jsonl(source / "metadata.jsonl", [*rows, *good_images(source, 4)])
    params = data_params(near_duplicate_distance=6)

    for run in ("cold", "cached"):
        result = prepare(source, params, tmp_path / "cache", toy_count)
        assert result.work["images_decoded"] == (6 if run == "cold" else 0)
        assert [(r.path, r.reason.split(" (")[0], r.detail) for r in result.rejected] == [
            ("b.jpg", "near duplicate", "same picture as a.png")
        ]
        assert result.counts()["near_duplicates"] == 1


def test_cli_skip_policy_writes_the_good_items_and_reports_every_rejection(tmp_path, cache, capsys):
    source = mixed_source(tmp_path / "raw")

    assert run_cli(tmp_path, source, cache, on_invalid="skip") == 0

    out = capsys.readouterr().out
    assert f"{source} (imagefolder layout): 25 found, 13 accepted" in out and "12 rejected" in out
    report = json.loads((tmp_path / "reports" / "data_validation.json").read_text())
    assert {r["path"]: r["reason"] for r in report["rejected"]} == EXPECTED_REJECTIONS
    assert report["rejected_by_reason"]["missing caption"] == 1
    assert report["counts"]["converted"] == 4
    assert [t["path"] for t in report["captions_truncated"]] == ["long.png"]  # CLIP counts 92 tokens too
    assert report["layout"] == "imagefolder" and report["source"] == str(source)

    prepared = read_prepared(tmp_path / "prepared")
    rows = prepared["train"] + prepared["validation"] + prepared["test"]
    assert len(rows) == 13 and {r["source"] for r in rows} >= {"cmyk.jpg", "long.png"}
    rotated = next(r for r in rows if r["source"] == "rotated.jpg")
    assert (rotated["original_width"], rotated["original_height"]) == (32, 64)  # as displayed, EXIF applied
    for split, split_rows in prepared.items():
        for row in split_rows:
            assert set(row) == {"file_name", "text", "sha256", "source", "width", "height"} | {
                "original_width",
                "original_height",
            }
            with Image.open(tmp_path / "prepared" / split / row["file_name"]) as image:
                assert image.size == (32, 32) == (row["width"], row["height"]) and image.mode == "RGB"
    assert report["identity"]["items"] == 13
    assert report["identity"]["train"] == len(prepared["train"])


def test_cli_notes_hidden_files_and_dropped_frames_and_skips_a_numeric_caption(tmp_path, cache, capsys):
    source = tmp_path / "raw"
    rows = good_images(source, 6)
    frames = [noise(48, 40, seed=100 + i) for i in range(3)]
    frames[0].save(source / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    save(noise(seed=50), source / "number.png")
    rows += [{"file_name": "anim.gif", "text": "an animation"}, {"file_name": "number.png", "text": 42}]
    write_jsonl(source / "metadata.jsonl", rows)
    (source / ".DS_Store").write_bytes(b"Bud1")
    (source / "._g0.png").write_bytes(b"apple double")

    assert run_cli(tmp_path, source, cache, on_invalid="skip") == 0  # the numeric caption drops its item only

    report_file = tmp_path / "reports" / "data_validation.json"
    out = capsys.readouterr().out
    assert (
        f"note: 2 hidden file(s) or folder(s) not read (.DS_Store, ._g0.png): names starting with '.' are skipped "
        f"(.DS_Store, ._x.jpg); see not_read in {report_file}"
    ) in out
    assert (
        f"note: 1 animated image(s) (anim.gif): only the first frame is used, the other frames are dropped; listed "
        f"under converted in {report_file}"
    ) in out
    report = json.loads(report_file.read_text())
    assert [r["path"] for r in report["not_read"]] == [".DS_Store", "._g0.png"]
    assert {r["path"]: r["reason"] for r in report["rejected"]} == {"number.png": "caption not text"}
    assert report["counts"]["accepted"] == 7


def test_cli_bad_source_is_a_data_error(tmp_path, cache, capsys):
    assert run_cli(tmp_path, tmp_path / "nope", cache) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_too_few_images_for_three_splits_is_an_error_that_asks_for_images(tmp_path, cache, capsys):
    source = tmp_path / "raw"
    write_jsonl(source / "metadata.jsonl", good_images(source, 1))  # one image cannot be split in three

    assert run_cli(tmp_path, source, cache) == 1

    err = capsys.readouterr().err
    assert "1 image(s) accepted, but train, validation and test need at least one each: add images" in err
    assert "fraction" not in err  # no fraction setting can split one image: do not send the user there
    assert "Nothing was written" in err and not (tmp_path / "prepared").exists()


def test_cli_empty_test_split_names_test_fraction_and_the_image_count(tmp_path, cache, capsys):
    source = tmp_path / "raw"
    write_jsonl(source / "metadata.jsonl", good_images(source, 6))

    assert run_cli(tmp_path, source, cache, val_fraction=0.4, test_fraction=0.001) == 1

    err = capsys.readouterr().err
    assert "the test split is empty: 6 images accepted (" in err and "0 test)" in err
    assert "data.test_fraction: 0.001" in err and "raise data.test_fraction" in err
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({"train": 5, "validation": 0, "test": 2}, "the validation split is empty: 7 images accepted"),
        ({"train": 0, "validation": 2, "test": 2}, "lower data.val_fraction or data.test_fraction"),
        ({"train": 2, "validation": 0, "test": 1}, "raise data.val_fraction"),
        ({"train": 0, "validation": 1, "test": 0}, "1 image(s) accepted, but train, validation and test need"),
        ({"train": 3, "validation": 1, "test": 1}, None),
    ],
)
def test_split_problem_names_the_empty_split_and_what_to_change(counts, expected):
    problem = split_problem(counts | {"accepted": sum(counts.values())}, data_params())
    assert problem is None if expected is None else expected in problem


# ---------------------------------------------------------------------------------------------------------------
# Layouts


def layout_source(root: Path, layout: str) -> tuple[Path, dict]:
    """The same 6 captioned images in one of the four layouts; returns (root, extra data params)."""
    root.mkdir(parents=True)
    rows = good_images(root / "img", 6)
    for row in rows:
        row["file_name"] = f"img/{row['file_name']}"
    if layout == "imagefolder-jsonl":
        write_jsonl(root / "metadata.jsonl", rows)
    elif layout == "imagefolder-csv":
        lines = ["file_name,caption"] + [f'{r["file_name"]},"{r["text"]}, in a csv"' for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
        return root, {"caption_column": "caption"}
    elif layout == "kohya":
        for row in rows:
            (root / row["file_name"]).with_suffix(".txt").write_text(row["text"] + "\n")
    else:
        write_jsonl(root / "list.jsonl", rows)
        return root, {"layout": "manifest", "manifest": "list.jsonl"}
    return root, {}


@pytest.mark.parametrize(
    ("layout", "reported"),
    [
        ("imagefolder-jsonl", "imagefolder"),
        ("imagefolder-csv", "imagefolder"),
        ("kohya", "kohya"),
        ("manifest", "manifest"),
    ],
)
def test_each_layout_gives_the_same_images(tmp_path, layout, reported):
    source, extra = layout_source(tmp_path / "raw", layout)

    result = prepare(source, data_params(**extra), tmp_path / "cache", toy_count)

    assert result.layout == reported and result.rejected == []
    assert sorted(i.source for i in result.items) == [f"img/g{i}.png" for i in range(6)]
    assert all(i.caption.startswith("picture number") for i in result.items)
    if layout == "imagefolder-csv":
        assert all(i.caption.endswith(", in a csv") for i in result.items)
    reference = prepare(*layout_source(tmp_path / "ref", "kohya")[:1], data_params(), tmp_path / "c2", toy_count)
    assert {i.sha256 for i in result.items} == {i.sha256 for i in reference.items}


def test_cli_says_which_layout_was_used(tmp_path, cache, capsys):
    source, extra = layout_source(tmp_path / "raw", "kohya")
    assert run_cli(tmp_path, source, cache, **extra) == 0
    assert "(kohya layout)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# Split stability, identity, incremental work


def split_by_hash(out: Path) -> dict[str, str]:
    return {row["sha256"]: split for split, rows in read_prepared(out).items() for row in rows}


def test_images_keep_their_split_when_the_source_grows(tmp_path, cache):
    source = tmp_path / "raw"
    rows = good_images(source, 12)
    write_jsonl(source / "metadata.jsonl", rows)
    assert run_cli(tmp_path, source, cache) == 0
    before = split_by_hash(tmp_path / "prepared")

    write_jsonl(source / "metadata.jsonl", rows + good_images(source, 12, start=12))
    assert run_cli(tmp_path, source, cache) == 0
    after = split_by_hash(tmp_path / "prepared")

    assert len(before) == 12 and len(after) == 24
    assert {h: after[h] for h in before} == before
    assert set(before.values()) == set(after.values()) == {"train", "validation", "test"}


def test_second_run_decodes_only_new_or_changed_images(tmp_path):
    source = tmp_path / "raw"
    rows = good_images(source, 10)
    write_jsonl(source / "metadata.jsonl", rows)
    params, cache = data_params(), tmp_path / "cache"

    cold = prepare(source, params, cache, toy_count)
    assert cold.work == {"files_hashed": 10, "images_decoded": 10, "cache_reused": 0}

    write_jsonl(source / "metadata.jsonl", rows + good_images(source, 3, start=10))
    save(noise(48, 40, seed=99), source / "g0.png")  # changed in place: new bytes, new entry
    grown = prepare(source, params, cache, toy_count)
    assert grown.work == {"files_hashed": 4, "images_decoded": 4, "cache_reused": 9}

    again = prepare(source, params, cache, toy_count)
    assert again.work == {"files_hashed": 0, "images_decoded": 0, "cache_reused": 13}
    # The cache changes only the time taken: a cold run gives the same prepared data, byte for byte.
    fresh = prepare(source, params, tmp_path / "other-cache", toy_count)
    assert again.digest() == fresh.digest() == grown.digest() != cold.digest()
    write_prepared(again, tmp_path / "a")
    write_prepared(fresh, tmp_path / "b")
    for split in ("train", "validation", "test"):
        for file in (tmp_path / "a" / split).iterdir():
            assert file.read_bytes() == (tmp_path / "b" / split / file.name).read_bytes()

    # Settings that change the pixels are part of the key; the split and captions are not.
    assert prepare(source, data_params(resolution=24), cache, toy_count).work["images_decoded"] == 13
    assert prepare(source, data_params(val_fraction=0.3), cache, toy_count).work["images_decoded"] == 0
    assert prepare(source, data_params(test_fraction=0.1), cache, toy_count).work["images_decoded"] == 0


def test_rejected_files_are_remembered_too(tmp_path):
    source = tmp_path / "raw"
    (source / "text.png").parent.mkdir(parents=True)
    (source / "text.png").write_text("not a picture")
    write_jsonl(source / "metadata.jsonl", [*good_images(source, 2), {"file_name": "text.png", "text": "x"}])
    prepare(source, data_params(), tmp_path / "cache", toy_count)

    again = prepare(source, data_params(), tmp_path / "cache", toy_count)

    assert again.work["images_decoded"] == 0 and [r.reason for r in again.rejected] == ["not an image"]


def test_processes_give_the_same_result_as_one(tmp_path):
    source = tmp_path / "raw"
    write_jsonl(source / "metadata.jsonl", good_images(source, 10))

    pooled = prepare(source, data_params(), tmp_path / "c1", toy_count, workers=2)
    inline = prepare(source, data_params(), tmp_path / "c2", toy_count, workers=1)

    assert pooled.work["images_decoded"] == 10 and pooled.digest() == inline.digest()


def test_identity_follows_content_and_captions_not_file_names(tmp_path):
    source = tmp_path / "raw"
    rows = good_images(source, 6)
    write_jsonl(source / "metadata.jsonl", rows)
    params, cache = data_params(), tmp_path / "cache"
    first = prepare(source, params, cache, toy_count)

    (source / "g0.png").rename(source / "renamed.png")
    rows[0]["file_name"] = "renamed.png"
    write_jsonl(source / "metadata.jsonl", rows)
    renamed = prepare(source, params, cache, toy_count)
    assert (renamed.source_digest, renamed.digest()) == (first.source_digest, first.digest())

    rows[1]["text"] = "a new caption"
    write_jsonl(source / "metadata.jsonl", rows)
    recaptioned = prepare(source, params, cache, toy_count)
    assert recaptioned.source_digest != first.source_digest and recaptioned.digest() != first.digest()

    resized = prepare(source, data_params(resolution=24), cache, toy_count)
    assert resized.source_digest == recaptioned.source_digest and resized.digest() != recaptioned.digest()


def test_report_identity_and_the_mlflow_dataset_fields(tmp_path, cache):
    source = tmp_path / "shapes"
    write_jsonl(source / "metadata.jsonl", good_images(source, 8))
    assert run_cli(tmp_path, source, cache) == 0
    report = json.loads((tmp_path / "reports" / "data_validation.json").read_text())

    identity = report["identity"]
    assert set(identity) == {"source_digest", "prepared_digest", "items", "train", "validation", "test"}
    assert len(identity["source_digest"]) == len(identity["prepared_digest"]) == 64

    name, digest, uri, profile = dataset_for_mlflow(report)
    assert (name, digest, uri) == ("shapes", identity["prepared_digest"][:10], str(source))
    assert profile["source_digest"] == identity["source_digest"] and profile["accepted"] == 8
    assert json.loads(json.dumps(profile)) == profile


def test_a_dvc_import_is_reported_with_its_url(tmp_path, cache):
    source = tmp_path / "raw"
    write_jsonl(source / "metadata.jsonl", good_images(source, 8))
    # What `dvc import-url s3://bucket/images raw` writes next to the folder (DVC 3 format).
    dvc_file = {
        "md5": "0" * 32,
        "frozen": True,
        "deps": [{"path": "s3://bucket/images", "etag": "x"}],
        "outs": [{"path": "raw", "hash": "md5"}],
    }
    (tmp_path / "raw.dvc").write_text(yaml.safe_dump(dvc_file))

    assert run_cli(tmp_path, source, cache) == 0

    report = json.loads((tmp_path / "reports" / "data_validation.json").read_text())
    assert report["source_uri"] == "s3://bucket/images" == dataset_for_mlflow(report)[2]


# ---------------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def test_bucketing_resizes_each_image_to_its_nearest_bucket(tmp_path, cache):
    source = tmp_path / "raw"
    sizes = {"wide": (96, 48), "tall": (40, 80), "square": (60, 60), "slightly_wide": (70, 56)}
    rows = []
    for k, (name, (w, h)) in enumerate(sizes.items()):
        for copy in range(2):
            save(noise(w, h, seed=10 * k + copy), source / f"{name}{copy}.png")
            rows.append({"file_name": f"{name}{copy}.png", "text": name})
    write_jsonl(source / "metadata.jsonl", rows)
    # Buckets of at most 48 * 48 pixels, sides multiples of 8: 32x64, 40x56, 48x48, 56x40, 64x32.
    bucketing = {"enabled": True, "target_area": 48 * 48, "step": 8, "min_side": 16, "max_side": 96}

    assert run_cli(tmp_path, source, cache, bucketing=bucketing) == 0

    expected = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48), "slightly_wide": (56, 40)}
    prepared = read_prepared(tmp_path / "prepared")
    for split, rows in prepared.items():
        for row in rows:
            assert (row["width"], row["height"]) == expected[row["text"]]
            with Image.open(tmp_path / "prepared" / split / row["file_name"]) as image:
                assert image.size == expected[row["text"]]
    report = json.loads((tmp_path / "reports" / "data_validation.json").read_text())
    assert report["buckets"] == {"32x64": 2, "48x48": 2, "56x40": 2, "64x32": 2}


def test_bucketing_is_off_by_default():
    params = data_params()
    assert params.bucketing.enabled is False and params.random_flip is False


# ---------------------------------------------------------------------------------------------------------------
# Summary for people


def read_csv(path: Path) -> dict[str, int]:
    with open(path, newline="") as handle:
        return {row[0]: int(row[1]) for row in list(csv.reader(handle))[1:]}


def test_summary_csvs_and_contact_sheet(tmp_path, cache):
    source = mixed_source(tmp_path / "raw")

    assert run_cli(tmp_path, source, cache, "--summary", str(tmp_path / "reports" / "data")) == 0

    folder = tmp_path / "reports" / "data"
    counts = read_csv(folder / "counts.csv")
    assert counts["accepted"] == 13 and counts["rejected"] == 12 and counts["rejected: exact duplicate"] == 1
    assert counts["captions truncated"] == 1 and counts["upscaled to the training size"] == 0
    resolution, aspect = read_csv(folder / "resolution.csv"), read_csv(folder / "aspect.csv")
    assert resolution["01 <128 px"] == 13 and sum(resolution.values()) == 13
    assert aspect["05 square (within 5%)"] == 5  # g0 (40x40), g1 (44x42) and the three 40x40 conversions
    assert sum(aspect.values()) == 13 and aspect["02 1:2 to 2:3"] == 1  # rotated.jpg: 32x64 once upright
    tokens = read_csv(folder / "caption_tokens.csv")
    assert tokens["09 >=78 tokens (truncated)"] == 1 and sum(tokens.values()) == 13
    assert read_csv(folder / "buckets.csv") == {"32x32": 13}
    with Image.open(folder / "contact_sheet.png") as sheet:
        assert sheet.width > 6 * 144 and sheet.height > 3 * 144
        # Thumbnails are drawn: the sheet is not blank white.
        assert np.asarray(sheet.convert("L")).min() < 100
    # Each table is also a chart (the DVC image plots): its bars carry the table's labels and values.
    for name in ("counts", "resolution", "aspect", "caption_tokens", "buckets"):
        svg = (folder / f"{name}.svg").read_text()
        labels = read_csv(folder / f"{name}.csv")
        assert svg.startswith("<svg") and all(f">{html.escape(label)}<" in svg for label in labels), name
    assert ">accepted<" in (folder / "counts.svg").read_text() and ">13<" in (folder / "counts.svg").read_text()


def test_clip_token_counter_counts_as_transformers_clip_does(tokenizer_cache):
    from transformers import CLIPTokenizer

    count = clip_token_counter(tokenizer_cache)
    reference = CLIPTokenizer.from_pretrained(tokenizer_cache / "clip-tokenizer")
    captions = ["a photo of a cat", "Ünïcödé CAFÉ, naïve!! 123 😀", "日本語", LONG_CAPTION]
    assert [count(c) for c in captions] == [len(reference(c).input_ids) for c in captions]
    assert count("a photo of a cat") == 7
