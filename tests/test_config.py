"""params.yaml validation: every problem is named with its file, key and line, before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_repository_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml", paths=False)
    assert params.base.model == "models/tiny-sd"
    assert params.train.max_steps > 0
    assert params.gate.primary[0].metric == "val_loss"


def test_unknown_key_names_file_key_and_line(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text().replace("  learning_rate:", "  lerning_rate:")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "lerning_rate" in row)
    with pytest.raises(ParamsError) as exc:
        load_params(path, paths=False)
    assert f"{path}:{line}: unknown key 'train.lerning_rate'" in str(exc.value)


@pytest.mark.parametrize("key", ["bootstrap_resamples", "confidence"])
def test_a_removed_key_says_what_replaced_it_and_to_delete_it(tmp_path: Path, key: str) -> None:
    """The report's intervals became the gate's: an old params.yaml with evaluate.<key> is told what to do."""
    text = (REPO / "params.yaml").read_text().replace("  label_template:", f"  {key}: 0.5\n  label_template:")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith(f"  {key}: 0.5"))
    with pytest.raises(ParamsError) as exc:
        load_params(path, paths=False)
    assert f"{path}:{line}: 'evaluate.{key}' was removed" in str(exc.value)
    assert f"from 'gate.{key}'" in str(exc.value) and f"Delete 'evaluate.{key}' from params.yaml" in str(exc.value)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "max_steps", "many", "'train.max_steps'"),
        ("train", "max_steps", -1, "greater than or equal to 0"),
        ("data", "resolution", 60, "multiple of 8"),
        ("data", "on_invalid", "ignore", "'data.on_invalid'"),
        ("train", "mixed_precision", "fp8", "'train.mixed_precision'"),
        ("data", "test_fraction", 0, "'data.test_fraction'"),
        ("data", "test_fraction", 0.8, "val_fraction (0.2) + test_fraction (0.8) must be below 1"),
    ],
)
def test_wrong_values_are_errors(tmp_path: Path, section: str, key: str, value: object, expected: str) -> None:
    params = repo_params()
    params[section][key] = value
    with pytest.raises(ParamsError) as exc:
        load_params(write(tmp_path, params), paths=False)
    assert expected in str(exc.value)
    assert str(tmp_path / "params.yaml") in str(exc.value)


def test_missing_section_is_named(tmp_path: Path) -> None:
    params = repo_params()
    del params["registry"]
    with pytest.raises(ParamsError, match="missing key 'registry'"):
        load_params(write(tmp_path, params), paths=False)


def test_missing_paths_are_named_with_the_fix(tmp_path: Path) -> None:
    params = repo_params()
    params["data"]["source"] = "no/such/folder"
    params["base"]["model"] = "models/not-built"
    with pytest.raises(ParamsError) as exc:
        load_params(write(tmp_path, params))
    message = str(exc.value)
    assert "'data.source' is 'no/such/folder'" in message
    assert "'base.model' is 'models/not-built'" in message
    assert "sdft init" in message


def test_local_paths_that_exist_pass(tmp_path: Path) -> None:
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "models" / "tiny-sd").mkdir(parents=True)
    (tmp_path / "models" / "tiny-sd" / "model_index.json").write_text("{}")
    params = load_params(write(tmp_path, repo_params()))
    assert params.data.source == "data/demo"


def test_a_folder_that_is_not_a_diffusers_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "models" / "tiny-sd" / "unet").mkdir(parents=True)  # e.g. a half-copied or wrong folder
    path = write(tmp_path, repo_params())
    line = next(i for i, row in enumerate(path.read_text().splitlines(), 1) if row.strip().startswith("model:"))
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    assert f"{path}:{line}: 'base.model' is 'models/tiny-sd', a folder without model_index.json" in str(exc.value)


def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path: Path) -> None:
    text = (REPO / "params.yaml").read_text()
    first = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  max_steps:"))
    rows = text.splitlines()
    rows.insert(first, "  max_steps: 7")  # the same key again, right after: YAML alone would keep 7
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(ParamsError) as exc:
        load_params(path, paths=False)
    assert (
        str(exc.value) == f"{path}:{first + 1}: duplicate key 'max_steps' (first at line {first}); keep one of the two."
    )


def test_a_validator_message_says_got_once(tmp_path: Path) -> None:
    params = repo_params()
    params["data"]["resolution"] = 100
    with pytest.raises(ParamsError) as exc:
        load_params(write(tmp_path, params), paths=False)
    assert str(exc.value).count("got 100") == 1


def test_manifest_layout_requires_a_manifest() -> None:
    params = repo_params()
    params["data"]["layout"] = "manifest"
    with pytest.raises(ParamsError, match="data.manifest is not set"):
        parse_params(yaml.safe_dump(params), Path("params.yaml"))


def test_not_a_mapping() -> None:
    with pytest.raises(ParamsError, match="expected a mapping"):
        parse_params("- just\n- a list\n", Path("params.yaml"))


def test_params_are_frozen() -> None:
    params = load_params(REPO / "params.yaml", paths=False)
    with pytest.raises(ValueError):
        params.train.max_steps = 3  # type: ignore[misc]
