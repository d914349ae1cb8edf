"""The `data:` section of params.yaml: what is accepted, and the sentence a mistake gets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


def write_params(root: Path, **data) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= data
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def error(path: Path, paths: bool = False) -> str:
    with pytest.raises(ParamsError) as exc:
        load_params(path, paths=paths)
    return str(exc.value)


def test_the_repository_params_have_bucketing_off_and_no_flip():
    data = load_params(REPO / "params.yaml", paths=False).data
    assert data.bucketing.enabled is False and data.random_flip is False
    # 64 * 64 pixels at most, sides multiples of 8, at most 2:1 (40x96 would be 2.4:1).
    assert data.bucketing.sizes() == [(48, 80), (56, 72), (64, 64), (72, 56), (80, 48)]


@pytest.mark.parametrize("uri", ["s3://bucket/images", "https://example.com/data"])
def test_a_uri_source_says_to_import_it_with_dvc(tmp_path, uri):
    message = error(write_params(tmp_path, source=uri))
    assert f"{tmp_path / 'params.yaml'}:" in message and "'data.source'" in message
    assert f"`dvc import-url {uri} data/raw`" in message and "data.source: data/raw" in message


@pytest.mark.parametrize(
    ("bucketing", "expected"),
    [
        ({"enabled": True, "min_side": 250}, "multiples of step 64"),
        ({"enabled": True, "target_area": 100 * 100}, "no bucket fits area 10000"),
        ({"step": 12}, "step must be a multiple of 8"),
        ({"enabled": True, "max_ratio": 0.5}, "greater than or equal to 1"),
        ({"enabld": True}, "unknown key 'data.bucketing.enabld'"),
    ],
)
def test_bad_bucketing_is_named(tmp_path, bucketing, expected):
    message = error(write_params(tmp_path, bucketing=bucketing))
    assert "data.bucketing" in message and expected in message


def test_manifest_is_found_relative_to_the_source(tmp_path):
    (tmp_path / "models" / "tiny-sd").mkdir(parents=True)
    (tmp_path / "models" / "tiny-sd" / "model_index.json").write_text("{}")
    (tmp_path / "data" / "raw").mkdir(parents=True)
    path = write_params(tmp_path, source="data/raw", layout="manifest", manifest="list.csv")

    message = error(path, paths=True)
    assert "'data.manifest' is 'list.csv', which is not a file in data/raw" in message

    (tmp_path / "data" / "raw" / "list.csv").write_text("file_name,text\n")
    assert load_params(path).data.manifest == "list.csv"


@pytest.mark.parametrize("manifest", ["../list.jsonl", "sub/../../list.jsonl", "/abs/list.jsonl"])
def test_a_manifest_outside_the_source_is_refused(tmp_path, manifest):
    # DVC tracks data.source only: a manifest elsewhere would be read, but editing it would not re-run prepare.
    path = write_params(tmp_path, source="data/raw", layout="manifest", manifest=manifest)
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if row.strip().startswith("manifest:"))
    message = error(path)
    assert f"{path}:{line}: 'data.manifest': Value error, must be a path inside data.source" in message
    assert "Move the file into data.source" in message


def test_a_manifest_in_a_subfolder_of_the_source_is_fine(tmp_path):
    path = write_params(tmp_path, source="data/raw", layout="manifest", manifest="lists/../lists/a.csv")
    assert load_params(path, paths=False).data.manifest == "lists/../lists/a.csv"
