"""How DVC runs the prepare stage: real git and DVC in tmp_path, with the repository's own prepare stage.

The project copied into tmp_path holds the `pipeline` package, `params.yaml` with test-sized data settings and a
`dvc.yaml` with only the `prepare` stage (and its plots), taken from the repository's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import DataParams
from pipeline.prepare import clip_token_counter

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(".sdft/prepare-cache")  # as the stage's cmd passes it
TRAINING_TIME_KEYS = {"random_flip", "precompute"}  # data keys that encode/train read and prepare does not


def repo_dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_prepare_stage_lists_every_data_key_it_reads():
    """Listing keys one by one keeps train-only keys from rerunning prepare; this catches a key left out."""
    listed = {key.removeprefix("data.") for key in repo_dvc()["stages"]["prepare"]["params"]}
    assert listed == set(DataParams.model_fields) - TRAINING_TIME_KEYS
    encode = set(repo_dvc()["stages"]["encode"]["params"])
    assert {f"data.{key}" for key in TRAINING_TIME_KEYS} <= encode and "base" in encode


def add_images(folder: Path, start: int, n: int) -> None:
    """Noise images i.png with captions appended to folder/metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metadata.jsonl", "a") as rows:
        for i in range(start, start + n):
            pixels = np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
            rows.write(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) + "\n")


def env() -> dict[str, str]:
    return os.environ | {
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        # `python` in the stage's cmd is this interpreter, as in the project's virtual environment.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run(project: Path, *command: str) -> str:
    done = subprocess.run(command, cwd=project, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dvc(project: Path, *args: str) -> str:
    return run(project, str(Path(sys.executable).parent / "dvc"), *args)


def set_param(project: Path, dotted: str, value) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    *parents, leaf = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLIP's tokenizer as the stage caches it, built once per session (shared with test_prepare)."""
    cache = tmp_path_factory.getbasetemp() / "clip-cache"
    if not (cache / "clip-tokenizer" / "tokenizer.json").is_file():
        clip_token_counter(cache)
    return cache / "clip-tokenizer"


@pytest.fixture
def project(tmp_path: Path, tokenizer: Path) -> Path:
    """A git + DVC repository with the pipeline code, the repo's prepare stage and 6 images in data/raw."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    stages = repo_dvc()
    plots = [p for p in stages["plots"] if str(next(iter(p)) if isinstance(p, dict) else p).startswith("reports/data")]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stages["stages"]["prepare"]}, "plots": plots}))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    # Thirds: under the default salt, every set of these tests (4 to 7 images) fills all three splits.
    data = {"source": "data/raw", "resolution": 32, "min_size": 16, "val_fraction": 1 / 3, "test_fraction": 1 / 3}
    for key, value in data.items():
        set_param(root, f"data.{key}", value)
    add_images(root / "data" / "raw", 0, 6)
    # The tokenizer is built once per session; the stage would otherwise build it in each new project (5 s).
    shutil.copytree(tokenizer, root / CACHE / "clip-tokenizer")
    (root / ".gitignore").write_text("/data/prepared\n/reports/\n/.sdft/\n__pycache__/\n")
    git = ("git", "-c", "user.email=test@sdft", "-c", "user.name=test")
    run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    run(root, *git, "add", "-A")
    run(root, *git, "commit", "-qm", "project")
    return root


def report(project: Path) -> dict:
    return json.loads((project / "reports" / "data_validation.json").read_text())


def test_repro_runs_prepare_once_and_again_only_when_the_data_changes(project):
    out = dvc(project, "repro")
    assert "Running stage 'prepare'" in out
    assert report(project)["work"]["images_decoded"] == 6
    assert len(list((project / "data" / "prepared").rglob("*.png"))) == 6
    assert (project / "reports" / "data" / "contact_sheet.png").is_file()

    out = dvc(project, "repro")
    assert "Running stage" not in out and "up to date" in out

    set_param(project, "train.max_steps", 7)  # another stage's knob
    set_param(project, "data.random_flip", True)  # read by train, not by prepare
    out = dvc(project, "repro")
    assert "Running stage" not in out

    add_images(project / "data" / "raw", 6, 1)
    out = dvc(project, "repro")
    assert "Running stage 'prepare'" in out
    # Only the new image was decoded; DVC still versions the whole output.
    assert report(project)["work"] == {"files_hashed": 1, "images_decoded": 1, "cache_reused": 6}
    assert len(list((project / "data" / "prepared").rglob("*.png"))) == 7
    assert "up to date" in dvc(project, "status")

    set_param(project, "data.resolution", 24)  # a data knob reruns it
    assert "Running stage 'prepare'" in dvc(project, "repro")


def test_a_failed_prepare_loses_data_prepared_under_dvc_and_restore_outputs_brings_it_back(project):
    from flows.retrain import restore_outputs

    dvc(project, "repro")
    before = {p.relative_to(project).as_posix(): p.read_bytes() for p in (project / "data" / "prepared").rglob("*")
              if p.is_file()}  # fmt: skip
    (project / "data" / "raw" / "broken.png").write_bytes(b"not a png")
    with open(project / "data" / "raw" / "metadata.jsonl", "a") as rows:
        rows.write(json.dumps({"file_name": "broken.png", "text": "a broken file"}) + "\n")
    set_param(project, "data.on_invalid", "fail")
    failed = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "repro"], cwd=project, env=env(), capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "by hand run `dvc checkout prepare`" in failed.stderr  # the stage's message says how to get it back
    assert not (project / "data" / "prepared").exists()  # DVC removed it before running the stage

    assert restore_outputs(project, "prepare") == "restored the last good outputs of 'prepare' (dvc checkout prepare)"
    after = {p.relative_to(project).as_posix(): p.read_bytes() for p in (project / "data" / "prepared").rglob("*")
             if p.is_file()}  # fmt: skip
    assert after == before


def test_a_remote_folder_imported_with_dvc_is_a_source_and_dvc_update_brings_new_files(project, tmp_path):
    # A local folder stands in for s3://bucket/images: `dvc import-url` treats both the same way.
    remote = tmp_path / "bucket" / "images"
    add_images(remote, 100, 4)
    run(project, "git", "rm", "-rq", "--cached", "data/raw")  # DVC, not git, tracks an imported folder
    shutil.rmtree(project / "data" / "raw")
    dvc(project, "import-url", str(remote), "data/raw")
    assert report_after_repro(project)["source_uri"] == str(remote)
    assert report(project)["counts"]["accepted"] == 4

    add_images(remote, 104, 2)
    assert "Running stage" not in dvc(project, "repro")  # nothing new until the import is updated
    dvc(project, "update", "data/raw.dvc")
    assert report_after_repro(project)["counts"]["accepted"] == 6
    assert report(project)["work"]["images_decoded"] == 2


def report_after_repro(project: Path) -> dict:
    assert "Running stage 'prepare'" in dvc(project, "repro")
    return report(project)


def test_new_images_rerun_every_stage_downstream_and_nothing_else_does(tmp_path: Path, tiny_model: Path) -> None:
    from tests.conftest import new_project

    tiny = {"train.max_steps": 2, "train.validation_every": 2, "train.sample_every": 0, "train.sample_steps": 2}
    tiny |= {"evaluate.images_per_prompt": 1, "evaluate.num_inference_steps": 2, "evaluate.val_timesteps": 2}
    tiny |= {"gate.bootstrap_resamples": 200, "evaluate.prompts": ["a red circle"], "evaluate.general_prompts": []}
    tiny |= {"gate.guardrails": []}  # no shape-world prompts here, so no adherence to guard
    project = new_project(tmp_path / "project", tiny_model, tiny)
    dvc(project, "init", "-q")
    stages = ("prepare", "encode", "train", "evaluate")
    out = dvc(project, "repro")
    assert all(f"Running stage '{s}'" in out for s in stages), out
    assert "Running stage" not in dvc(project, "repro")  # nothing changed: nothing runs
    # `dvc plots show` of every declared plot needs no network: image plots only, no Vega from a CDN.
    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()
    assert not re.search(r"<script[^>]*src=[\"']?https?:", page) and "cdn" not in page.lower()
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    assert declared and all(isinstance(p, str) and p.endswith((".svg", ".png")) for p in declared)
    assert all((project / p).is_file() and Path(p).name in page for p in declared), declared
    prepared = project / "data" / "prepared"
    add_images(project / "data" / "demo", 1000, 1)  # one new image and caption in the source folder
    out = dvc(project, "repro")
    assert all(f"Running stage '{s}'" in out for s in stages), out
    assert "picture number 1000" in (prepared / "train" / "metadata.jsonl").read_text()  # (its content hash says)
    # A new test image changes what evaluate measures on, not what train reads: encode and train do not re-run.
    add_images(project / "data" / "demo", 1015, 1)
    out = dvc(project, "repro")
    assert "picture number 1015" in (prepared / "test" / "metadata.jsonl").read_text()
    assert "Running stage 'prepare'" in out and "Running stage 'evaluate'" in out, out
    assert "Running stage 'encode'" not in out and "Running stage 'train'" not in out, out
