"""Shared fixtures: a throwaway sdft project (a real git repo with DVC) and the tiny base model, built once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.env import OFFLINE_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
# The whole test session is offline, as CI is: no hub downloads, no telemetry.
for _key, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
PROJECT_FILES = ["dvc.yaml", "params.yaml", "pipeline", "flows", "data/demo", "assets/judges"]
# A retrain in about a minute on 2 cores: short training, few generated images and steps.
FAST = {
    "train.max_steps": 60,
    "train.validation_every": 20,
    "evaluate.images_per_prompt": 1,
    "evaluate.num_inference_steps": 4,
    "evaluate.val_timesteps": 6,
}
MODEL = "sdft-demo"  # registry.model_name in params.yaml


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default base model, built once per session (deterministic, about 5 s)."""
    from pipeline.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("base") / "tiny-sd")


def set_params(project: Path, overrides: dict[str, Any]) -> None:
    """Set dotted keys in the project's params.yaml (`{"train.max_steps": 0}`)."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def sdft_env(project: Path) -> dict[str, str]:
    """A clean environment: the project's own MLflow store and Prefect home, offline switches on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SDFT_"))}
    env |= {
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # MLflow system metrics every second (10 s by default), so even the tiny stages record some.
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
    }
    return env


def new_project(project: Path, tiny_model: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Copy the project files into a fresh, committed git repo at `project`; apply `overrides` to params.yaml."""
    for rel in PROJECT_FILES:
        src, dst = REPO / rel, project / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    shutil.copytree(tiny_model, project / "models" / "tiny-sd")
    shutil.copy2(REPO / ".gitignore", project / ".gitignore")
    set_params(project, overrides or {})
    git = ["git", "-c", "user.email=test@sdft", "-c", "user.name=test"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "project"], cwd=project, check=True)
    return project


@pytest.fixture
def make_project(tmp_path: Path, tiny_model: Path) -> Callable[..., Path]:
    """Factory for `new_project` under this test's tmp_path."""
    return lambda overrides=None, name="project": new_project(tmp_path / name, tiny_model, overrides)


def run_sdft(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run the `sdft` command on `project` as a user would, in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "--project", str(project), *args],
        cwd=project,
        env=sdft_env(project),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dvc(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    dvc = str(Path(sys.executable).parent / "dvc")
    return subprocess.run([dvc, *args], cwd=project, env=sdft_env(project), capture_output=True, text=True)
