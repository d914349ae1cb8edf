"""The flow's console: stage output streamed while the stage runs, progress throttled, known noise only in the logs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from flows.console import Tee, is_noise

# What DVC prints after every stage that ran, and the third-party notices the issue quotes (verbatim).
DVC_HINTS = """Updating lock file 'dvc.lock'

To track the changes with git, run:

\tgit add dvc.lock

To enable auto staging, run:

\tdvc config core.autostage true
Use `dvc push` to send your updates to remote storage.
"""
NOTICES = [
    "[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
    "for backward compatibility. Install torchvision to use the default backend, or import `CLIPImageProcessorPil` "
    "directly to silence this warning.",
    "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe to ignore if LoRA "
    "state dict didn't originally have any CLIPTextModel related params.",
]


def test_known_noise_is_recognised_and_real_messages_are_not() -> None:
    assert all(is_noise(line) for line in DVC_HINTS.splitlines())
    assert all(is_noise(line) for line in NOTICES)
    assert is_noise("2026/12/02 05:57:53 INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring.")
    assert is_noise("WARNING: 'models/checkpoints' is empty.") and is_noise("WARNING: 'models/class_images' is empty.")
    assert not is_noise("WARNING: 'models/adapter' is empty.")
    for real in (
        "Running stage 'train':",
        "> python -m pipeline.train --params params.yaml",
        "error: training loss is nan at step 12",
        "Stage 'prepare' didn't change, skipping",
        "UserWarning: something new",
    ):
        assert not is_noise(real), real


def test_stage_output_is_shown_while_the_stage_runs_and_logged_in_full(tmp_path: Path) -> None:
    """A child that prints, waits, prints: its first line reaches the console before it exits; the log has all."""
    child = (
        "import sys, time\n"
        "print('step 1 of 2', flush=True)\n"
        "print('To track the changes with git, run:', flush=True)\n"
        "sys.stderr.write('train:  50%|#####     | 1/2 [00:01<00:01, 1.0step/s, loss=0.5]\\r'); sys.stderr.flush()\n"
        "time.sleep(3)\n"
        "print('step 2 of 2', flush=True)\n"
    )
    shown: list[tuple[str, bool]] = []
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tee = Tee(lambda line: shown.append((line, process.poll() is None)))
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        tee.start(process.stdout, out)
        tee.start(process.stderr, err)
        process.wait()
        tee.join()
    lines = dict(shown)
    assert lines["step 1 of 2"] is True  # shown while the child was still running
    assert any("1/2" in line and running for line, running in shown)  # the progress bar too
    assert "step 2 of 2" in lines
    assert not any("git" in line for line in lines)  # noise stays off the console...
    assert "To track the changes with git" in (tmp_path / "out").read_text()  # ...and in the log
    assert "1/2 [00:01<00:01" in (tmp_path / "err").read_text()


def test_progress_bars_are_throttled_but_the_end_is_always_shown() -> None:
    now = [0.0]
    shown: list[str] = []
    tee = Tee(shown.append, clock=lambda: now[0])
    for step in range(1, 101):  # one update per 0.5 s over 50 s: one line per 10 s, then the 100% line
        now[0] = step * 0.5
        tee.line(f"train: {step:3d}%|####| {step}/100 [00:{step // 2:02d}<00:10, 2.0step/s, img_s=16.0, loss=0.1]")
    tee.line("train: 100%|####| 100/100 [00:50<00:00, 2.0step/s, img_s=16.0, loss=0.1]")  # tqdm's close repeats it
    assert [line.split("|")[2].split()[0] for line in shown] == ["1/100", "21/100", "41/100", "61/100", "81/100",
                                                                 "100/100"]  # fmt: skip
    tee.line("encode train images:   0%|     | 0/40 [00:00<?, ?img/s]")  # another bar has its own clock
    assert shown[-1].startswith("encode train images")
    for noisy in ("100%|####| 10/10 [00:01<00:00, 9.1it/s]", "\x1b[ALoading weights: 100%|####| 36/36 [00:00<00:00]"):
        tee.line(noisy)  # diffusers' sampling loop (no name) and weight loading: logged, not shown
    assert shown[-1].startswith("encode train images")


def test_a_quiet_child_leaves_no_console_line(tmp_path: Path) -> None:
    shown: list[str] = []
    process = subprocess.Popen([sys.executable, "-c", "pass"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tee = Tee(shown.append)
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        tee.start(process.stdout, out)
        tee.start(process.stderr, err)
        started = time.monotonic()
        process.wait()
        tee.join()
    assert shown == [] and time.monotonic() - started < 10


def test_the_flow_process_sends_known_notices_to_its_log(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import logging
    import warnings

    from flows.console import LOGGED_NOISE, quiet_in_process

    shown: list[str] = []  # what reaches the console's warning printer (restored after the test)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args: shown.append(str(message)))
    log = tmp_path / "logs" / "flow.log"
    quiet_in_process(log)
    quiet_in_process(log)  # twice (a second flow in one process): still one filter per logger
    records: list[logging.LogRecord] = []  # what the logger's handlers get (MLflow's own handler does not propagate)
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    mlflow_logger = logging.getLogger("mlflow.utils.requirements_utils")
    mlflow_logger.addHandler(handler)
    try:
        assert len(mlflow_logger.filters) == 1
        mlflow_logger.warning("Found torch version (2.13.0+cpu) contains a local version label (+cpu). ...")
        mlflow_logger.warning("Something MLflow has not said before")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("The specified dataset source can be interpreted in multiple ways: A, B.", stacklevel=1)
            warnings.warn("a warning worth reading", UserWarning, stacklevel=1)
        assert [r.getMessage() for r in records] == ["Something MLflow has not said before"]
        assert shown == ["a warning worth reading"]
        text = log.read_text()
        assert "local version label" in text and "interpreted in multiple ways" in text
        assert "has not said before" not in text and "worth reading" not in text
    finally:
        mlflow_logger.removeHandler(handler)
        for name in LOGGED_NOISE:
            logging.getLogger(name).filters.clear()
