"""Hyperparameter search (pipeline/tune.py): config validation, --apply, pruning, failures, resume and many workers.

Trials run the real train core on the tiny model; the slow tests run `sdft tune` and `python -m pipeline.tune` as
users do, on the embedded demo data.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ParamsError, TuneParams, load_params, parse_params
from pipeline.tune import apply_best, apply_values, run_study
from tests.conftest import run_dvc, run_sdft, sdft_env
from tests.test_train import write_split

REPO = Path(__file__).resolve().parents[1]
PARAMS_TEXT = (REPO / "params.yaml").read_text()


def params_with(**tune: Any) -> str:
    raw = yaml.safe_load(PARAMS_TEXT)
    raw["tune"] |= tune
    return yaml.safe_dump(raw, sort_keys=False)


def refusal(text: str) -> str:
    with pytest.raises(ParamsError) as exc:
        parse_params(text, Path("params.yaml"))
    return str(exc.value)


# --- config --------------------------------------------------------------------------------------------------------


def test_shipped_tune_section_equals_the_config_defaults() -> None:
    params = load_params(REPO / "params.yaml", paths=False)
    assert params.tune == TuneParams()
    assert params.tune.enabled is False


def test_unknown_tune_key_is_named_with_its_line() -> None:
    text = PARAMS_TEXT.replace("  n_trials: 20", "  n_trails: 20")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "n_trails" in row)
    assert f"params.yaml:{line}: unknown key 'tune.n_trails'" in refusal(text)


def test_empty_space_is_refused() -> None:
    message = refusal(params_with(space={}))
    assert "'tune.space': empty" in message


def test_space_over_a_key_train_does_not_have_is_refused() -> None:
    text = PARAMS_TEXT.replace("    lora_rank: {type: choice", "    lora_rnak: {type: choice")
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "lora_rnak" in row)
    assert f"params.yaml:{line}: 'tune.space.lora_rnak': no such key in the train section" in refusal(text)


@pytest.mark.parametrize(
    ("dimension", "expected"),
    [
        ({"type": "float", "low": 0.01, "high": 0.001}, "low (0.01) must be smaller than high (0.001)"),
        ({"type": "float", "low": 0.0, "high": 0.01, "log": True}, "log: true needs low > 0"),
        ({"type": "float", "low": 0.001}, "needs both `low` and `high`"),
        ({"type": "choice", "values": []}, "non-empty `values`"),
        ({"type": "float", "low": 0.0, "high": 2.0, "lowe": 1}, "unknown key 'tune.space.learning_rate.lowe'"),
        ({"type": "float", "low": -1.0, "high": 0.01}, "-1.0 is not a valid train.learning_rate"),
    ],
)
def test_bad_bounds_are_refused_naming_the_key(dimension: dict, expected: str) -> None:
    message = refusal(params_with(space={"learning_rate": dimension}))
    assert expected in message
    assert "tune.space.learning_rate" in message


def test_bounds_must_suit_the_key() -> None:
    assert "does not take fractional values" in refusal(
        params_with(space={"lora_rank": {"type": "float", "low": 2, "high": 8}})
    )
    assert "1.5 is not a valid train.lora_dropout" in refusal(
        params_with(space={"lora_dropout": {"type": "float", "low": 0.0, "high": 1.5}})
    )
    assert "sampler grid needs a finite set" in refusal(params_with(sampler="grid"))


# --- --apply -------------------------------------------------------------------------------------------------------


def test_apply_changes_only_the_tuned_keys_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_TEXT)
    best = {"learning_rate": 0.0031622776601683794, "lora_rank": 16, "lora_dropout": 0.125}
    changed = apply_best(path, best)
    assert changed == {
        "learning_rate": (0.001, best["learning_rate"]),
        "lora_rank": (4, 16),
        "lora_dropout": (0, 0.125),
    }
    before, after = PARAMS_TEXT.splitlines(), path.read_text().splitlines()
    assert len(before) == len(after)
    differing = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [b.split(":")[0].strip() for _, b in differing] == ["learning_rate", "lora_rank", "lora_dropout"]
    lr_before, lr_after = next(d for d in differing if "learning_rate" in d[0])
    comment = lr_before[lr_before.index("#") :]
    assert lr_after.endswith(comment) and lr_after.startswith("  learning_rate: 0.0031622776601683794")
    # The YAML is the old one with these three values, nothing else (train.seed and tune.seed both stay 0).
    old, new = yaml.safe_load(PARAMS_TEXT), yaml.safe_load(path.read_text())
    old["train"] |= best
    assert new == old
    load_params(path, paths=False)
    assert apply_best(path, best) == {}  # applying again changes nothing


def test_apply_reaches_nested_train_keys_only_inside_train() -> None:
    text = apply_values(PARAMS_TEXT, {"prior_preservation.num_inference_steps": 30, "seed": 7})
    new = yaml.safe_load(text)
    assert new["train"]["prior_preservation"]["num_inference_steps"] == 30
    assert new["train"]["seed"] == 7 and new["tune"]["seed"] == 0 and new["evaluate"]["seed"] == 1234


# --- the study's count and budget ------------------------------------------------------------------------------------


def test_the_count_skips_dead_and_dropped_trials_and_budgets_stop_new_ones() -> None:
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from pipeline.tune import NOT_COUNTED, budget_left, counted

    study = optuna.create_study()
    dist = {"learning_rate": FloatDistribution(1e-4, 1e-2)}

    def add(state: TrialState, seconds: float = 60.0, steps: int = 100, **attrs: Any) -> None:
        system = attrs.pop("system", {})
        study.add_trial(
            create_trial(
                state=state, value=1.0 if state == TrialState.COMPLETE else None, params={"learning_rate": 1e-3},
                distributions=dist, user_attrs={"seconds": seconds, "steps": steps, **attrs}, system_attrs=system,
            )
        )  # fmt: skip

    add(TrialState.COMPLETE)  # 0
    add(TrialState.FAIL)  # 1: its worker died ...
    add(TrialState.PRUNED, steps=20)  # 2
    add(TrialState.COMPLETE, system={"failed_trial": 1, "retry_history": [1]})  # 3: ... and 1 ran again as 3
    add(TrialState.FAIL, **{NOT_COUNTED: "over budget"})  # 4: raced past n_trials, never ran
    trials = study.get_trials()
    assert [t.number for t in counted(trials)] == [0, 2, 3]
    tune = TuneParams()
    assert budget_left(trials, tune, total=4) is None
    assert budget_left(trials, tune, total=3) == "the study has its 3 trials"
    assert "max_total_steps=220 spent" in budget_left(trials, tune.model_copy(update={"max_total_steps": 220}), 10)
    assert budget_left(trials, tune.model_copy(update={"max_total_steps": 221}), 10) is None
    assert "max_minutes=3" in budget_left(trials, tune.model_copy(update={"max_minutes": 3}), 10)


# --- trials on the tiny model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune-prepared")
    write_split(root / "train", 8, seed=1)
    write_split(root / "validation", 4, seed=2)
    return root


def small_params(tiny_model: Path, prepared: Path, train: dict[str, Any], tune: dict[str, Any]) -> Any:
    raw = yaml.safe_load(PARAMS_TEXT)
    raw["base"]["model"] = str(tiny_model)
    raw["data"]["source"] = str(prepared)
    raw["train"] |= {"batch_size": 4, "validation_timesteps": 2, "sample_every": 0} | train
    raw["tune"] |= {"heartbeat_seconds": 5} | tune
    return parse_params(yaml.safe_dump(raw), Path("params.yaml"))


def test_pruned_trials_run_fewer_steps_than_complete_ones(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:
    # The current learning rate (0.03) is trial 0; 1e-7 barely moves off the base model, so once trial 0 has
    # finished, such a trial is behind it at its second check and is pruned there.
    params = small_params(
        tiny_model,
        prepared,
        {"learning_rate": 0.03, "max_steps": 12, "validation_every": 2},
        {
            "space": {"learning_rate": {"type": "choice", "values": [0.03, 1e-7]}},
            "n_trials": 4,
            "sampler": "random",
            "startup_trials": 1,
            "warmup_checks": 1,
        },
    )
    lines: list[str] = []
    outcome = run_study(params, prepared, tmp_path / "tune", tracking=False, log=lines.append)
    rows = outcome.trials
    assert len(rows) == 4 and rows[0]["baseline"] and rows[0]["state"] == "complete"
    complete = [r for r in rows if r["state"] == "complete"]
    pruned = [r for r in rows if r["state"] == "pruned"]
    assert pruned, rows
    assert all(r["train.learning_rate"] == 1e-7 for r in pruned)
    assert max(r["steps"] for r in pruned) < min(r["steps"] for r in complete) == 12
    assert all(r["steps"] == 4 for r in pruned)  # step 2 is the warm-up check, step 4 the first that may prune
    assert outcome.best["params"] == {"learning_rate": 0.03}
    # One progress line per trial: "trial n/N ... | state | best ... | ETA ..."
    progress = [line for line in lines if line.startswith("trial ")]
    assert len(progress) == 4 and progress[-1].startswith("trial 4/4") and "ETA" in progress[-1]
    assert any("| pruned at step 4 |" in line for line in progress)
    # Trial outputs stay in the study's folder.
    folder = tmp_path / "tune" / outcome.study_name
    assert sorted(p.name for p in folder.iterdir()) == [f"trial_{n:04d}" for n in range(4)]
    assert (folder / "trial_0000" / "curve.csv").read_text().startswith("step,val_loss")


def test_a_refused_combination_fails_its_trial_and_the_study_goes_on(
    tmp_path: Path, tiny_model: Path, prepared: Path
) -> None:
    # bf16 frozen weights need mixed precision, which the CPU does not have: train refuses with a ParamsError.
    params = small_params(
        tiny_model,
        prepared,
        {"max_steps": 2, "validation_every": 2},
        {"space": {"frozen_precision": {"type": "choice", "values": ["bf16", "auto"]}}, "n_trials": 3},
    )
    outcome = run_study(params, prepared, tmp_path / "tune", tracking=False, log=lambda _: None)
    states = {r["train.frozen_precision"]: r["state"] for r in outcome.trials}
    assert len(outcome.trials) == 3
    assert states == {"auto": "complete", "bf16": "failed"}
    failed = next(r for r in outcome.trials if r["state"] == "failed")
    assert failed["reason"].startswith("refused by the trainer: train.frozen_precision: bf16 needs mixed precision")
    assert outcome.best["params"] == {"frozen_precision": "auto"}


# --- users' runs: the demo data, `sdft tune`, kill and continue, two workers ------------------------------------------

STUDY_SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True},
    "lora_rank": {"type": "choice", "values": [2, 4, 8, 16]},
    "lora_dropout": {"type": "float", "low": 0.0, "high": 0.3},
}


def prepare_data(project: Path) -> None:
    """prepare + encode through DVC, as `sdft tune` does."""
    assert run_dvc(project, "init", "-q").returncode == 0
    done = run_dvc(project, "repro", "encode")
    assert done.returncode == 0, done.stderr[-2000:]


def tune_command(project: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--project", str(project), "tune", *extra]


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run `command`; return it with the CPU seconds (user + system) it and its children used, and the wall time."""
    import resource

    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done, cpu, time.perf_counter() - start


def study_trials(project: Path) -> list[Any]:
    import optuna

    from pipeline.tune import counted

    storage = f"sqlite:///{project / '.sdft' / 'tune' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return counted(optuna.load_study(study_name=summary.study_name, storage=storage).get_trials())


def starts(project: Path) -> dict[int, int]:
    """How many times each trial number started (each start appends a line to its folder's starts.log)."""
    (study,) = (project / ".sdft" / "tune").glob("sdft-*")
    return {int(p.parent.name.split("_")[1]): len(p.read_text().splitlines()) for p in study.glob("trial_*/starts.log")}


@pytest.mark.slow
def test_study_beats_the_defaults_within_five_trainings(make_project: Any) -> None:
    project = make_project(
        {
            "train.validation_every": 10,
            "tune.space": STUDY_SPACE,
            "tune.n_trials": 12,
            "tune.startup_trials": 1,  # trial 0 (the shipped values) is the only one never pruned
            "tune.warmup_checks": 1,
        }
    )
    prepare_data(project)
    env = sdft_env(project)
    # One full training with the shipped defaults: the train stage's command (dvc.yaml), as `dvc repro train` runs it.
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["train"]["cmd"].split()
    train = [sys.executable, *stage[1:]]
    # Cost is CPU time (user + system) of the command and its children: wall time on a shared machine measures the
    # neighbours' load as much as ours.
    done, full_cpu, full_wall = timed([*train], project, env)
    assert done.returncode == 0, done.stderr[-2000:]
    default_loss = json.loads((project / "reports" / "train" / "summary.json").read_text())["best_val_loss"]

    done, study_cpu, study_wall = timed(tune_command(project, "--no-repro"), project, env)
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)
    print(
        f"full training: {full_cpu:.0f} s CPU ({full_wall:.0f} s wall); study of 12 trials: {study_cpu:.0f} s CPU "
        f"({study_wall:.0f} s wall): {study_cpu / full_cpu:.2f} trainings"
    )
    assert study_cpu <= 5.5 * full_cpu  # "about 5 trainings"

    report = project / "reports" / "tune"
    best = json.loads((report / "best_params.json").read_text())
    assert best["objective"] < default_loss
    # Trial 0 is the current values; it reproduces the stage's own number (same data, seed, noise).
    assert best["current_values_objective"] == pytest.approx(default_loss, rel=1e-3)
    with open(report / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {r["state"] for r in rows} >= {"complete", "pruned"}
    pruned_steps = [int(r["steps"]) for r in rows if r["state"] == "pruned"]
    assert max(pruned_steps) < 150
    assert sum(line.startswith("trial ") for line in done.stdout.splitlines()) == 12
    for name in ("history.png", "importance.png", "curves.png"):
        assert (report / name).read_bytes()[:4] == b"\x89PNG"
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and 'class="pruned"' in html

    # MLflow: one parent run for the study, a child run per trial with its validation curve.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        parent = client.get_run(best["mlflow_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["sdft.tune.study"] == best["study"]
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100
        )
        assert len(children) == 12
        states = {c.data.tags["sdft.tune.state"] for c in children}
        assert states >= {"complete", "pruned"}
        child = next(c for c in children if c.data.tags["sdft.tune.state"] == "complete")
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert [m.step for m in history][:3] == [0, 10, 20] and child.data.metrics["steps"] > 0
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]

    # --apply writes exactly the best values; the normal pipeline then trains them.
    done = run_sdft(project, "tune", "--no-repro", "--apply")
    assert done.returncode == 0, done.stderr[-2000:]
    train_section = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert {k: train_section[k] for k in best["train"]} == best["train"]


@pytest.mark.slow
def test_a_killed_worker_is_continued_by_running_sdft_tune_again(make_project: Any) -> None:
    project = make_project(
        {
            "train.max_steps": 30,
            "train.validation_every": 10,
            "tune.space": STUDY_SPACE,
            "tune.n_trials": 5,
            "tune.heartbeat_seconds": 2,
            "tune.pruner": "none",
        }
    )
    prepare_data(project)
    worker = subprocess.Popen(
        tune_command(project, "--no-repro"), cwd=project, env=sdft_env(project), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # two trials finished and the third running
            if (project / ".sdft" / "tune").is_dir() and len(starts(project) if _has_study(project) else {}) >= 3:
                break
            time.sleep(0.5)
        time.sleep(3)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    first = {t.number: t.state.name for t in study_trials(project)}
    finished_before = {n for n, s in first.items() if s == "COMPLETE"}
    assert len(finished_before) >= 2 and "RUNNING" in first.values(), first

    done = run_sdft(project, "tune")  # the same command again
    assert done.returncode == 0, done.stderr[-2000:]
    trials = study_trials(project)
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials), [t.state for t in trials]
    assert {n for n in finished_before} <= {t.number for t in trials}
    count = starts(project)
    assert all(count[n] == 1 for n in finished_before)  # finished trials were not run again
    # The trial the kill interrupted was failed (no heartbeat) and run again once, with the same values.
    interrupted = next(n for n, s in first.items() if s == "RUNNING")
    retry = next(t for t in trials if interrupted in t.system_attrs.get("retry_history", []))
    assert retry.params == next(t for t in _all_trials(project) if t.number == interrupted).params
    with open(project / "reports" / "tune" / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    dead = next(r for r in rows if int(r["trial"]) == interrupted)
    assert dead["state"] == "failed" and dead["counted"] == "False" and "no heartbeat" in dead["reason"]


def _has_study(project: Path) -> bool:
    return any((project / ".sdft" / "tune").glob("sdft-*"))


def _all_trials(project: Path) -> list[Any]:
    import optuna

    storage = f"sqlite:///{project / '.sdft' / 'tune' / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


@pytest.mark.slow
def test_two_workers_share_one_study_and_its_total(make_project: Any) -> None:
    project = make_project(
        {
            "train.max_steps": 20,
            "train.validation_every": 10,
            "tune.space": STUDY_SPACE,
            "tune.n_trials": 6,
            "tune.startup_trials": 2,
            "tune.warmup_checks": 0,
        }
    )
    prepare_data(project)
    env = sdft_env(project)
    workers = [
        subprocess.Popen(
            tune_command(project, "--no-repro"),
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=900) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
    trials = study_trials(project)
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    assert all(n == 1 for n in starts(project).values())  # no trial ran twice
    assert len(starts(project)) == 6
    pids = {line.split()[-1] for p in (project / ".sdft" / "tune").glob("sdft-*/trial_*/starts.log")
            for line in p.read_text().splitlines()}  # fmt: skip
    assert len(pids) == 2  # both workers ran trials
    progress = [line for out, _ in outputs for line in out.splitlines() if line.startswith("trial ")]
    assert len(progress) == 6


@pytest.mark.slow
def test_retrain_flow_runs_the_study_before_train_and_trains_its_best(make_project: Any) -> None:
    from tests.conftest import FAST

    project = make_project(
        FAST
        | {
            "tune.enabled": True,
            "tune.space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 3e-2, "log": True}},
            "tune.n_trials": 3,
            "tune.startup_trials": 1,
        }
    )
    done = run_sdft(project, "run", "--dry-run", timeout=1800)  # a whole retrain, the study included
    assert done.returncode == 0, done.stderr[-3000:]
    best = json.loads((project / "reports" / "tune" / "best_params.json").read_text())
    trained = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert trained["learning_rate"] == best["train"]["learning_rate"]
    # The train stage ran on the applied value: its validation loss is the best trial's (same data, seed, noise).
    summary = json.loads((project / "reports" / "train" / "summary.json").read_text())
    assert summary["best_val_loss"] == pytest.approx(best["objective"], rel=1e-3)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sdft")
    (retrain,) = client.search_runs([experiment.experiment_id], "tags.`sdft.tune.best_trial` != ''")
    assert retrain.data.tags["sdft.tune.study"] == best["study"]
    assert float(retrain.data.params["train.learning_rate"]) == pytest.approx(best["train"]["learning_rate"])
