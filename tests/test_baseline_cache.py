"""The gate's cache of champion metrics is keyed by what the champion version is, not by its number: two real SQLite
tracking stores each hold a different "v1", and neither may reuse the other's numbers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import lineage, promotion, registry
from pipeline.config import load_params
from tests.conftest import REPO
from tests.mlflow_server import save_test_adapter

NAME = "sdft-cache-test"
EVAL_HASH = "ab" * 32


def use_store(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Point sdft at a SQLite store (and its artifact root) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("SDFT_ROOT", str(folder))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}")
    (folder / "mlflow").mkdir(exist_ok=True)


def register_v1(adapter: Path, base: Path) -> registry.Champion:
    run_id = registry.start_run("test", {}, {})
    tags = lineage.adapter_digests(adapter)
    version = registry.register(run_id, adapter, str(base), NAME, None, "test", tags, "auto", "first version")
    registry.end_run(run_id)
    assert version == "1"
    champion = registry.champion(NAME)
    assert champion is not None and champion.version == "1"
    return champion


@pytest.mark.slow  # three registrations in fresh SQLite stores: about a minute on 2 cores
def test_another_store_or_a_recreated_one_does_not_reuse_v1_numbers(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    params = load_params(REPO / "params.yaml", paths=False)
    params = params.model_copy(update={"registry": params.registry.model_copy(update={"model_name": NAME})})
    first = save_test_adapter(tiny_model, tmp_path / "adapter-a", seed=0)
    second = save_test_adapter(tiny_model, tmp_path / "adapter-b", seed=1)

    use_store(monkeypatch, tmp_path / "store-a")
    champion_a = register_v1(first, tiny_model)
    promotion.write_baseline_cache(project, NAME, champion_a, EVAL_HASH, {"val_loss": 0.1}, {"val_loss": [0.1]})
    metrics, from_cache = promotion.champion_metrics(params, project, project / "data", champion_a, EVAL_HASH)
    assert from_cache and metrics.values == {"val_loss": 0.1}

    # Another store whose v1 holds other weights: same number, different identity, no cached numbers.
    use_store(monkeypatch, tmp_path / "store-b")
    champion_b = register_v1(second, tiny_model)
    assert champion_b.adapter_sha256 != champion_a.adapter_sha256
    assert promotion.baseline_cache_file(project, NAME, champion_b, EVAL_HASH) != promotion.baseline_cache_file(
        project, NAME, champion_a, EVAL_HASH
    )
    assert promotion.read_baseline_cache(project, NAME, champion_b, EVAL_HASH) is None

    # Store A deleted and recreated at the same URI, its new v1 from the same adapter: a new run, so measured again.
    # (In a new process: MLflow keeps one database engine per URI for the life of a process.)
    shutil.rmtree(tmp_path / "store-a")
    script = (
        "import sys; from pathlib import Path; from pipeline import promotion; "
        "from tests.test_baseline_cache import NAME, EVAL_HASH, register_v1; "
        "c = register_v1(Path(sys.argv[1]), Path(sys.argv[2])); "
        "print(c.run_id, promotion.read_baseline_cache(Path(sys.argv[3]), NAME, c, EVAL_HASH))"
    )
    use_store(monkeypatch, tmp_path / "store-a")
    again = subprocess.run(
        [sys.executable, "-c", script, str(first), str(tiny_model), str(project)],
        capture_output=True, text=True, env=os.environ.copy(), cwd=REPO, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    run_id, cached = again.stdout.split()[-2:]
    assert run_id != champion_a.run_id and cached == "None"

    # A file at the right name that records another champion (an older sdft's, or a hand copy) is not trusted.
    stale = promotion.baseline_cache_file(project, NAME, champion_b, EVAL_HASH)
    shutil.copy(promotion.baseline_cache_file(project, NAME, champion_a, EVAL_HASH), stale)
    assert promotion.read_baseline_cache(project, NAME, champion_b, EVAL_HASH) is None
