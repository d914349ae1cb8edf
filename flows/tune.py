"""A tuning worker as a Prefect flow: deploy it to a GPU work pool and run it N times to share one study.

Each run is one worker of the study that params.yaml's `tune` section describes (pipeline/tune.py); they meet in
`tune.storage`, which must then be a database every worker reaches (docs/tuning.md). The data must be there already
(`dvc pull` in the job's image or start command); the worker neither re-runs DVC stages nor edits params.yaml.

    prefect deploy flows/tune.py:tune_worker --name gpu --pool sdft-k8s-gpu
    for i in 1 2 3 4; do prefect deployment run tune-worker/gpu --param project=/workspace; done
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow

from flows.retrain import tune_study
from pipeline import env
from pipeline.config import load_params


@flow(name="tune-worker", log_prints=True)
def tune_worker(project: str = ".") -> dict[str, Any]:
    """Pull trials of the study until its n_trials or budget are spent; return the study's best so far."""
    root = Path(project).resolve()
    os.environ["SDFT_ROOT"] = str(root)
    env.configure()
    load_params(root / "params.yaml")  # a malformed file stops here, naming the key
    return tune_study(root, apply=False)


if __name__ == "__main__":
    tune_worker()
