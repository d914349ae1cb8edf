"""Live logging from inside a stage to the MLflow run that the flow opened.

The flow opens one MLflow run per retrain and passes its id to the DVC stages in `MLFLOW_RUN_ID`. A stage run by hand
(`dvc repro`) has no run id and logs nothing: its numbers still land in `reports/`, which the flow logs afterwards.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from typing import Any


class LiveLog:
    """Batches metrics to the run in `MLFLOW_RUN_ID`; a no-op when there is none."""

    def __init__(self, flush_every: int = 20) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID") or None
        self.flush_every = flush_every
        self._pending: list[Any] = []
        self._client = None
        if self.run_id:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient()

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self._client:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in values.items() if math.isfinite(float(v))]
        if len(self._pending) >= self.flush_every:
            self.flush()

    def image(self, image: Any, key: str, step: int) -> None:
        """A PIL image under `key` at `step` (the MLflow UI shows the steps of a key as a slider)."""
        if self._client:
            self._client.log_image(self.run_id, image, key=key, step=step)

    def flush(self) -> None:
        if self._client and self._pending:
            # MLflow accepts at most 1,000 metrics per batch.
            for start in range(0, len(self._pending), 1000):
                self._client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
            self._pending = []


@contextlib.contextmanager
def system_metrics(interval_s: float = 10.0) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) for the run in `MLFLOW_RUN_ID`,
    sampled while the block runs; nothing without a run. Several stages append to the same series (resume_logging).
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, overrides interval_s (MLflow reads it).
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
