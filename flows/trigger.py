"""When a retrain runs: the data-arrival check, the retrain history, and one retrain at a time per workspace.

- `data_identity(source)`: a content digest of the raw source folder (relative path, size and sha256 of every file).
  Only files whose size or mtime changed are hashed again, so a check on an unchanged folder costs one `stat` per
  file; a touched or re-cloned file with the same bytes is not a change.
- `.sdft/history.jsonl`: one line per retrain (promoted, rejected, dry run, skipped, failed); the last promoted or
  rejected line is the data the last successful retrain saw.
- `workspace_lock(root)`: an exclusive `flock` on `.sdft/retrain.lock`, so two retrains never run DVC stages in the
  same folder (the kernel releases it when a holder dies, so a killed run never blocks the next).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STATE = Path(".sdft")
HISTORY = STATE / "history.jsonl"
LOCK = STATE / "retrain.lock"
DIGESTS = STATE / "source-digests.json"
# Outcomes after which the data counts as seen: a data trigger with the same data is skipped.
SUCCESS = ("promoted", "rejected")


class WorkspaceBusy(TimeoutError):
    """Another retrain held the workspace for longer than this one would wait."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_identity(source: Path, cache: Path | None = None) -> str:
    """sha256 over (relative path, size, content sha256) of every file under `source`, in path order.

    `cache` keeps each file's digest with the (size, mtime) it was computed at, so only new or modified files are
    read again.
    """
    if not source.is_dir():
        raise FileNotFoundError(f"data.source {source} is not a folder: nothing to check for new data")
    known: dict[str, list[Any]] = {}
    if cache is not None and cache.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            known = json.loads(cache.read_text())
    rows, seen = [], {}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = known.get(rel)
        digest = entry[2] if entry and entry[:2] == stamp else _sha256(path)
        seen[rel] = [*stamp, digest]
        rows.append([rel, stat.st_size, digest])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(seen))
        tmp.replace(cache)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def record(root: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one retrain's outcome to the history (one `write` of one line: safe beside other writers)."""
    line = {"at": datetime.now(UTC).isoformat(timespec="seconds")} | entry
    path = root / HISTORY
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(line) + "\n")
    return line


def history(root: Path) -> list[dict[str, Any]]:
    """Every recorded retrain, oldest first (a torn last line from a killed writer is ignored)."""
    path = root / HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def last_success(root: Path) -> dict[str, Any] | None:
    """The newest promoted or rejected retrain, or None before the first one."""
    return next((e for e in reversed(history(root)) if e.get("outcome") in SUCCESS), None)


def workspace_name(root: Path) -> str:
    """A name for this workspace, the same from every process and host that sees it at the same path."""
    return f"sdft-retrain-{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def workspace_lock(root: Path, wait_s: float, holder: dict[str, Any], on_wait=print) -> Iterator[None]:  # noqa: ANN001
    """Hold the workspace's retrain lock; wait up to `wait_s` seconds for it, then raise `WorkspaceBusy`.

    The lock file names its holder (flow run, pid, host, since when), for the waiting message and for people.
    """
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                current = handle.read().strip() or "unknown holder"
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(f"another retrain holds {path} ({current}); waited {wait_s:.0f} s") from None
                if not waited:
                    on_wait(f"waiting up to {wait_s:.0f} s for the retrain holding {path}: {current}")
                    waited = True
                time.sleep(1)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        handle.truncate(0)
        handle.write(json.dumps(holder | {"pid": os.getpid(), "host": socket.gethostname(), "since": since}))
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
