"""Scale-out configs are parsed and checked against what the code expects: the Kubernetes GPU work pool and its
deployment (against Prefect's own template validation and prefect.yaml), the DVC S3 remote (read by real DVC), the
accelerate configs (by accelerate's loader), and the files the docs point at."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "configs" / "prefect" / "k8s-gpu-base-job-template.json"
K8S_DEPLOYMENT = REPO / "configs" / "prefect" / "k8s-deployment.yaml"


def _defaults(template: dict) -> dict:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def test_k8s_gpu_work_pool_template_is_valid_and_requests_gpus() -> None:
    from prefect.server.schemas.actions import WorkPoolCreate, validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = json.loads(TEMPLATE.read_text())
    validate_base_job_template(template)  # what the Prefect server runs on `work-pool create`: no undeclared vars
    WorkPoolCreate(name="sdft-k8s-gpu", type="kubernetes", base_job_template=template)

    values = _defaults(template) | {"command": "prefect flow-run execute", "name": "r", "labels": {}, "gpu_count": 2}
    job = apply_values(template["job_configuration"], values)["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2  # extended resources: requests == limits
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0  # the next trigger re-runs, resuming
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # The persistent workspace: where the deployment's pull steps put the project.
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["workspace"] == "sdft-workspace" and mounts["workspace"] == "/workspace"
    assert container["env"]["MLFLOW_TRACKING_URI"].startswith("http://")


def test_k8s_deployment_matches_prefect_yaml_and_the_pool() -> None:
    from flows.retrain import retrain

    k8s = yaml.safe_load(K8S_DEPLOYMENT.read_text())
    local = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (gpu,) = k8s["deployments"]
    (served,) = local["deployments"]
    # One schedule, one set of parameters: the GPU deployment is the same retrain, elsewhere.
    assert gpu["entrypoint"] == served["entrypoint"] == "flows/retrain.py:retrain"
    assert gpu["schedules"] == served["schedules"]
    assert gpu["parameters"] == served["parameters"]
    assert set(gpu["parameters"]) <= set(inspect.signature(retrain.fn).parameters)
    # Every job variable is one the pool declares (Prefect ignores undeclared ones silently).
    declared = set(json.loads(TEMPLATE.read_text())["variables"]["properties"])
    assert gpu["work_pool"]["name"] == "sdft-k8s-gpu"
    assert set(gpu["work_pool"]["job_variables"]) <= declared
    assert gpu["work_pool"]["job_variables"]["env"]["MLFLOW_TRACKING_URI"].startswith("http")
    # The pull steps clone into the persistent workspace and start the flow there.
    steps = [next(iter(step.items())) for step in k8s["pull"]]
    assert steps[0][0] == "prefect.deployments.steps.run_shell_script"
    assert "dvc pull" in steps[0][1]["script"] and "/workspace/sdft" in steps[0][1]["script"]
    assert steps[-1] == ("prefect.deployments.steps.set_working_directory", {"directory": "/workspace/sdft"})


def test_dvc_s3_remote_config_is_read_by_dvc(tmp_path: Path) -> None:
    from flows.retrain import default_remote

    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    assert default_remote(tmp_path) is None  # no remote: the flow skips `dvc push`
    config = tmp_path / ".dvc" / "config"
    config.write_text(config.read_text() + (REPO / "configs" / "dvc" / "remote-s3.config").read_text())
    listed = subprocess.run([dvc, "remote", "list"], cwd=tmp_path, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr  # DVC validates the whole config when it loads it
    assert re.search(r"^s3\s+s3://my-bucket/sdft/dvc-cache\s+\(default\)", listed.stdout, re.M), listed.stdout
    assert default_remote(tmp_path) == "s3"  # the flow pushes there after the stages
    jobs = subprocess.run([dvc, "config", "remote.s3.jobs"], cwd=tmp_path, capture_output=True, text=True)
    assert jobs.stdout.strip() == "8"


def test_accelerate_configs_load() -> None:
    folder = REPO / "configs" / "accelerate"
    files = sorted(folder.glob("*.yaml")) if folder.is_dir() else []
    if not files:
        pytest.skip("configs/accelerate/ has no configs yet (the training engineer's)")
    from accelerate.commands.config.config_args import ClusterConfig

    for path in files:
        config = ClusterConfig.from_yaml_file(str(path))  # rejects unknown keys
        assert config.num_processes >= 1, path
        assert config.mixed_precision in ("no", "fp16", "bf16", "fp8"), path


@pytest.mark.parametrize("doc", ["docs/scheduling.md", "docs/scale-out.md"])
def test_docs_point_at_files_that_exist(doc: str) -> None:
    text = (REPO / doc).read_text()
    paths = set(re.findall(r"`((?:configs|flows|mlflow|docs|pipeline)/[\w./-]+\.\w+)`", text))
    paths |= {p for p in re.findall(r"\]\(([\w./-]+\.md)\)", text)}
    assert paths, f"{doc} names no files"
    missing = sorted(p for p in paths if not ((REPO / p).exists() or (REPO / "docs" / p).exists()))
    assert missing == [], f"{doc} points at missing files: {missing}"


def test_scale_out_commands_name_the_configs_and_pools() -> None:
    text = (REPO / "docs" / "scale-out.md").read_text()
    assert "--base-job-template configs/prefect/k8s-gpu-base-job-template.json" in text
    assert "--prefect-file configs/prefect/k8s-deployment.yaml" in text
    assert "sdft-k8s-gpu" in text and "configs/dvc/remote-s3.config" in text
