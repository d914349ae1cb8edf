"""`sdft models` as a new user reads it: which evaluation set each number comes from, and a last change that is
about the version on its row, cut between words. A real local MLflow store; versions registered with a small LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import describe_change, main, shorten
from pipeline import registry
from tests.mlflow_server import save_test_adapter

GATE_MD = "**Gate: PROMOTE** (candidate vs base model (untuned)). Promoted.\n"


def test_shorten_cuts_between_words() -> None:
    assert shorten("short", 60) == "short"
    text = "the candidate draws blotches on every face, so the previous one goes back"
    cut = shorten(text, 40)
    assert len(cut) <= 40 and cut.endswith("…") and text.startswith(cut[:-1])
    assert text[len(cut) - 1] == " "  # the cut falls on a word boundary


def test_a_change_is_described_from_the_rows_point_of_view() -> None:
    record = {"action": "promote", "who": "alice", "why": "v1 is better", "version": "1", "previous": "2"}
    assert describe_change(record, "1") == "promote by alice: v1 is better"
    assert describe_change(record, "2") == "@champion went to v1 (promote by alice)"


def test_models_lists_eval_sets_and_each_versions_own_change(
    make_project,  # noqa: ANN001
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,  # noqa: ANN001
) -> None:
    project = make_project()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.setenv("SDFT_USER", "alice")
    monkeypatch.chdir(project)
    adapter = save_test_adapter(tiny_model, tmp_path / "adapter")
    for expected, eval_set, loss in ((None, "a" * 64, 0.81), ("1", "b" * 64, 0.25)):
        run_id = registry.start_run("test", {}, {})
        registry.log_metrics(run_id, {"eval.val_loss": loss})
        tags = {"sdft.decision": "promote", "sdft.eval_set_hash": eval_set}
        registry.register(run_id, adapter, str(tiny_model), "sdft-demo", expected, GATE_MD, tags, "auto", "won")
    why = "version 2 was measured on a different evaluation set, so its lower loss means nothing at all here"
    assert main(["promote", "1", "--reason", why]) == 0
    capsys.readouterr()

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "eval set" in lines[1]
    rows = {line.split()[0]: line for line in lines[2:4]}
    assert "bbbbbbbb" in rows["2"] and "0.25" in rows["2"] and "aaaaaaaa" in rows["1"] and "0.81" in rows["1"]
    assert rows["1"].endswith("promote by alice: version 2 was measured on a different evaluation set, so…")
    assert rows["2"].endswith("@champion went to v1 (promote by alice)")  # not v1's promotion told as its own
    assert lines[4].startswith("Note: these metrics come from 2 different evaluation sets")
