"""Can the demo teach the base model purple? Fine-tune it on data/demo with the real stages and judge before/after.

    python bench/demo_feasibility.py assets/tiny-shapes-sd /tmp/feas '[{"name": "default", "train": {}}]'

Copies this checkout to the work folder (without .git), installs the base there, runs prepare and encode once, then
for each config: sets its `train` keys in the copy's params.yaml, runs `pipeline.train`, and judges 4 images per
scene (10 steps, guidance 5, the model's scheduler) with the pixel judge: purple scenes (learned?) and base scenes
(forgotten?). One JSON line per config in <work>/results.jsonl, and a grid PNG per config.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from pipeline.candidate import load_base, load_trained, read_output
from pipeline.pretrain_base import grid, quality
from pipeline.world import BASE_COLOURS, NEW_COLOURS

torch.set_num_threads(1)

WT = Path(__file__).resolve().parents[1]
base_asset = Path(sys.argv[1])
work = Path(sys.argv[2])
configs = json.loads(sys.argv[3])  # list of {name, train overrides}
PER = int(os.environ.get("PER", "4"))
env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
py = sys.executable


def run(cmd, cwd):
    t = time.perf_counter()
    with open(cwd / "stage.log", "a") as log:
        subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return round(time.perf_counter() - t, 1)


if not (work / "params.yaml").exists():
    shutil.copytree(WT, work, ignore=shutil.ignore_patterns(".git", ".sdft", "models", "mlruns", "__pycache__"))
    shutil.copytree(base_asset, work / "models" / "tiny-sd")
    t1 = run(
        [
            py,
            "-m",
            "pipeline.prepare",
            "--params",
            "params.yaml",
            "--source",
            "data/demo",
            "--out",
            "data/prepared",
            "--report",
            "reports/data_validation.json",
            "--summary",
            "reports/data",
            "--cache",
            ".sdft/prepare-cache",
            "--workers",
            "1",
        ],
        work,
    )
    t2 = run(
        [
            py,
            "-m",
            "pipeline.encode",
            "--params",
            "params.yaml",
            "--prepared",
            "data/prepared",
            "--out",
            "data/encoded",
            "--cache",
            ".sdft/encode-cache",
        ],
        work,
    )
    print("prepare", t1, "encode", t2, flush=True)
    base = load_base(str(work / "models" / "tiny-sd"))
    before = {"purple": quality(base, list(NEW_COLOURS), PER)[0], "base": quality(base, list(BASE_COLOURS), PER)[0]}
    (work / "before.json").write_text(json.dumps(before))
before = json.loads((work / "before.json").read_text())
print("before", before, flush=True)
original = yaml.safe_load((work / "params.yaml").read_text())
for config in configs:
    params = json.loads(json.dumps(original))
    params["train"].update(config["train"])
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = work / "models" / f"adapter-{config['name']}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "models" / "checkpoints", ignore_errors=True)
    seconds = run(
        [
            py,
            "-m",
            "pipeline.train",
            "--params",
            "params.yaml",
            "--prepared",
            "data/prepared",
            "--encoded",
            "data/encoded",
            "--out",
            str(out),
            "--report",
            f"reports/train-{config['name']}",
            "--checkpoints",
            "models/checkpoints",
        ],
        work,
    )
    pipe = load_trained(read_output(out), str(work / "models" / "tiny-sd"))
    t = time.perf_counter()
    purple, images = quality(pipe, list(NEW_COLOURS), PER)
    basec, bimages = quality(pipe, list(BASE_COLOURS), PER)
    grid(images + bimages, 24).save(work / f"grid-{config['name']}.png")
    result = {
        "config": config,
        "train_seconds": seconds,
        "judge_seconds": round(time.perf_counter() - t, 1),
        "purple": purple,
        "base": basec,
        "forgetting_colour_points": round(100 * (before["base"]["colour"] - basec["colour"]), 1),
        "forgetting_all_three_points": round(100 * (before["base"]["all_three"] - basec["all_three"]), 1),
    }
    print(json.dumps(result), flush=True)
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
(work / "params.yaml").write_text(yaml.safe_dump(original, sort_keys=False))
