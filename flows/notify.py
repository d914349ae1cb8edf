"""Messages on promotion, rejection and failure: a JSON POST to `notify.webhook_url` and/or a Prefect notification
block named by `notify.block`. A message that cannot be delivered is logged, never raised: it must not turn a
promotion that already happened into a failed run.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import NotifyParams


def post_json(url: str, payload: dict[str, Any], attempts: int = 3, first_wait: float = 1.0) -> None:
    """POST `payload`; retry with backoff on connection errors and 5xx answers (a 4xx is an answer: not retried)."""
    body = json.dumps(payload).encode()
    wait = first_wait
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=10):
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == attempts:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == attempts:
                raise
        time.sleep(wait)
        wait *= 2


def send(settings: NotifyParams, event: str, text: str, details: dict[str, Any], log=print) -> list[str]:  # noqa: ANN001
    """Deliver one message to every configured channel; return the channels that failed (already logged)."""
    if event not in settings.events:
        return []
    failed = []
    if settings.webhook_url:
        try:
            post_json(settings.webhook_url, {"text": text, "event": event} | details)
        except Exception as exc:  # noqa: BLE001 - any delivery error is reported the same way
            log(f"notification to notify.webhook_url failed: {exc}")
            failed.append("webhook")
    if settings.block:
        try:
            from prefect.blocks.core import Block

            Block.load(settings.block).notify(body=text, subject=f"sdft: {event}")
        except Exception as exc:  # noqa: BLE001
            log(f"notification through Prefect block '{settings.block}' failed: {exc}")
            failed.append("block")
    return failed


def settings_of(project: Path) -> NotifyParams:
    """The `notify` section alone, so a failure caused by a broken params.yaml can still be reported."""
    try:
        raw = yaml.safe_load((project / "params.yaml").read_text()) or {}
        return NotifyParams.model_validate(raw.get("notify") or {})
    except Exception:  # noqa: BLE001 - no valid settings: nobody to tell
        return NotifyParams(events=[])
