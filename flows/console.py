"""What a stage shows on the console while it runs: its messages and progress as they happen, without the noise.

The flow runs each stage as `dvc repro <stage>` in a child process. `Tee` copies the child's stdout and stderr, byte
for byte, to `.sdft/logs/<stage>.{out,err}` (the full record) and passes each line to the console as it arrives,
except known noise (`is_noise`): DVC's git and push hints after every stage, and third-party notices that say nothing
about this run. Progress bars (tqdm, which writes `\\r` updates when its output is not a terminal) are shown at most
every `PROGRESS_EVERY_S` seconds per bar, and always at 100%.

`quiet_in_process` does the same for the flow's own process: the known notices that MLflow, diffusers and transformers
log or warn while the flow logs, registers or evaluates go to a log file instead of the console.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PROGRESS_EVERY_S = 10.0

# Matched against one line with surrounding whitespace removed; each is in the logs, never on the console.
NOISE = [
    re.compile(pattern)
    for pattern in (
        r"",  # blank lines
        # DVC, after every stage that ran (the flow does not commit; `dvc push` runs when a remote is set)
        r"To track the changes with git, run:",
        r"git add .*",
        r"To enable auto staging, run:",
        r"dvc config core\.autostage true",
        r"Use `dvc push` to send your updates to remote storage\.",
        r"(Generating|Updating) lock file '.*dvc\.lock'",
        # train's persistent outputs, empty until a run checkpoints or uses prior preservation
        r"WARNING: '.*(checkpoints|class_images)' is empty\.",
        # transformers 5 without torchvision: it falls back to the PIL image processors, which is what sdft uses
        r"\[transformers\] `\w+` requires torchvision .*",
        # diffusers, when a LoRA trains only the UNet: the text encoder has no LoRA keys, as intended
        r".*No LoRA keys associated to CLIPTextModel.*",
        # MLflow's system-metrics monitor starting and stopping in each stage
        r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow\.system_metrics\..*",
    )
]
# Progress bars that are noise: loading weights, and the unnamed ones (diffusers' sampling loop, once per batch).
NOISY_BARS = ("", "Loading pipeline components...", "Loading weights", "Writing model shards")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# tqdm's line: "<desc>:  40%|████      | 60/150 [00:05<00:08, 11.2step/s, loss=0.12]"
BAR = re.compile(r"^(?P<desc>[^|]*?):?\s*(?P<percent>\d+)%\|.*\|")


def is_noise(line: str) -> bool:
    """Whether a line of stage output stays out of the console (it is still in the stage's log)."""
    text = line.strip()
    return any(pattern.fullmatch(text) for pattern in NOISE)


class Tee:
    """Copy a child's output streams to log files and show its lines as they arrive (one thread per stream)."""

    def __init__(self, show: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.show = show
        self.clock = clock
        self._shown: dict[str, tuple[float, bool]] = {}  # progress bar description -> (when, at 100%) last shown
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, stream: IO[bytes], log: IO[bytes]) -> None:
        """Read `stream` (a binary pipe) to its end in a background thread, writing everything to `log`."""
        thread = threading.Thread(target=self._pump, args=(stream, log), daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self, timeout: float = 10.0) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _pump(self, stream: IO[bytes], log: IO[bytes]) -> None:
        pending = b""
        while chunk := stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536):
            log.write(chunk)
            log.flush()
            pending += chunk
            # \r ends a line too: tqdm rewrites its bar with \r when it does not write to a terminal
            *lines, pending = re.split(rb"\r\n|\r|\n", pending)
            for line in lines:
                self.line(line.decode("utf-8", "replace"))
        if pending:
            self.line(pending.decode("utf-8", "replace"), final=True)

    def line(self, text: str, final: bool = False) -> None:
        """Show one line of output unless it is noise or a progress update shown less than PROGRESS_EVERY_S ago."""
        text = ANSI.sub("", text).rstrip()
        if is_noise(text):
            return
        bar = BAR.match(text.strip())
        if bar:
            key, done = bar["desc"].strip(), bar["percent"] == "100"
            if key in NOISY_BARS:
                return
            now = self.clock()
            with self._lock:
                when, was_done = self._shown.get(key, (-math.inf, False))
                recent = now - when < PROGRESS_EVERY_S
                # tqdm's close() writes the 100% line a second time
                if recent and (was_done or not (done or final)):
                    return
                self._shown[key] = (now, done)
        self.show(text)


# The same notices when they come from the flow's own process: logger name -> a part of the message.
LOGGED_NOISE = {
    "transformers.utils.import_utils": "requires torchvision (not installed)",
    "diffusers.loaders.lora_base": "No LoRA keys associated to",
    "diffusers.loaders.peft": "No LoRA keys associated to",
    # torch's "+cpu" build: MLflow pins torch without the label, as it should for a model's requirements
    "mlflow.utils.requirements_utils": "contains a local version label",
}
# Python warnings: a local folder is both a local-artifact and a file dataset source to MLflow; either is right.
WARNED_NOISE = ["The specified dataset source can be interpreted in multiple ways"]


class _ToLog(logging.Filter):
    """Drops a known notice from its logger's output and appends it to the log file instead."""

    def __init__(self, needle: str, log: Path) -> None:
        super().__init__()
        self.needle, self.log = needle, log

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.needle not in message:
            return True
        with open(self.log, "a", encoding="utf-8") as handle:
            handle.write(f"{record.levelname} {record.name}: {message}\n")
        return False


def quiet_in_process(log: Path) -> None:
    """Send this process's known third-party notices (LOGGED_NOISE, WARNED_NOISE) to `log`, not the console."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for name, needle in LOGGED_NOISE.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _ToLog)]  # once, however often called
        logger.addFilter(_ToLog(needle, log))
    shown = getattr(warnings.showwarning, "sdft_original", warnings.showwarning)

    def showwarning(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if any(needle in str(message) for needle in WARNED_NOISE):
            with open(log, "a", encoding="utf-8") as handle:
                handle.write(warnings.formatwarning(message, category, filename, lineno))
            return
        shown(message, category, filename, lineno, *rest)

    showwarning.sdft_original = shown  # type: ignore[attr-defined]
    warnings.showwarning = showwarning
