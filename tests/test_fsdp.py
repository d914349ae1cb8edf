"""FSDP (configs/accelerate/fsdp.yaml): two processes that each hold half of every weight train what one process does,
save whole weights, and resume from their own checkpoints.

accelerate 1.15 turns an FSDP config into FSDP only on GPU-like devices: on CPU it silently runs DDP instead
(`AcceleratorState` sets FSDP for MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU), and train.py refuses that. torch's
FSDP2 (`fully_shard`) itself runs on CPU over gloo, so the launched processes run `_shard_on_cpu()` first: it sets
the distributed type accelerate would set on GPUs, with the plugin accelerate built from the config. Everything after
that (accelerate's FSDP2 preparation, DTensor shards, their all-gathers and train.py) is the GPU code path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train import REPO, adapter_tensors, assert_same_training, curve, prepared, write_params  # noqa: F401
from tests.test_train_ddp import _free_port

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
CONFIG = REPO / "configs" / "accelerate" / "fsdp.yaml"


def _shard_on_cpu() -> None:
    """Make accelerate shard on CPU (gloo) as it does on GPUs (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def sharding_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and kwargs.get("fsdp_plugin") is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = kwargs["fsdp_plugin"]
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate does on GPUs

    AcceleratorState.__init__ = sharding_init


def _train(run: Path, prepared: Path, processes: int, checkpoints: Path) -> subprocess.CompletedProcess:  # noqa: F811
    args = ["--params", str(run / "params.yaml"), "--prepared", str(prepared), "--out", str(run / "adapter")]
    args += ["--report", str(run / "report"), "--checkpoints", str(checkpoints)]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "pipeline.train", *args]
    else:  # the checked-in config, as a user launches it; only the process count and port differ
        cmd = [ACCELERATE, "launch", "--config_file", str(CONFIG)]
        cmd += ["--num_processes", str(processes), "--main_process_port", str(_free_port())]
        cmd += ["-m", "tests.test_fsdp", *args]
        env |= {"ACCELERATE_USE_CPU": "true"}  # gloo; `_shard_on_cpu` then turns accelerate's DDP into FSDP
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _trained(run: Path, method: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if method == "lora":
        return adapter_tensors(run / "adapter")
    return load_file(str(run / "adapter" / "unet" / "diffusion_pytorch_model.safetensors"))


def _checkpoint(folder: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / f"step-{step:06d}" / "tensors.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "method, extra",
    [
        ("lora", {}),
        # A full fine-tune of one block (sharded and frozen weights in the same FSDP units), with EMA (sharded too).
        ("full", {"train_blocks": ["up_blocks.1"], "ema_decay": 0.9}),
    ],
)
def test_fsdp_matches_one_process_and_resumes(
    tmp_path: Path,
    tiny_model: Path,
    prepared: Path,  # noqa: F811
    method: str,
    extra: dict,
) -> None:
    steps, lr = 4, 1e-3
    settings = {"method": method, "max_steps": steps, "learning_rate": lr, "validation_every": 2} | extra
    settings |= {"validation_timesteps": 1, "checkpoint_every": 2, "checkpoints_total_limit": 5, "log_every": 2}
    runs = {name: tmp_path / name for name in ("single", "fsdp", "resumed")}
    write_params(runs["single"], tiny_model, prepared, batch_size=4, **settings)
    for name in ("fsdp", "resumed"):
        write_params(runs[name], tiny_model, prepared, batch_size=2, **settings)

    _train(runs["single"], prepared, 1, runs["single"] / "checkpoints")
    fsdp = _train(runs["fsdp"], prepared, 2, runs["fsdp"] / "checkpoints")
    gathered = [int(line.split()[1]) for line in fsdp.stdout.splitlines() if line.startswith("gathered ")]
    assert len(gathered) == 2 and min(gathered) > 0, fsdp.stdout[-2000:]  # both processes held shards
    summary = yaml.safe_load((runs["fsdp"] / "report" / "summary.json").read_text())
    assert summary["cost"]["processes"] == 2 and summary["cost"]["effective_batch_size"] == 4

    # The same losses, step by step (validation runs the sharded UNet, gathering each unit as it goes).
    for x, y in zip(curve(runs["single"] / "report"), curve(runs["fsdp"] / "report"), strict=True):
        for column in ("train_loss", "val_loss"):
            assert (x[column] == "") == (y[column] == "")
            if x[column]:
                assert float(y[column]) == pytest.approx(float(x[column]), rel=1e-5)
    # The saved weights are whole (gathered on the main process) and what one process trains.
    single, sharded = _trained(runs["single"], method), _trained(runs["fsdp"], method)
    assert {k: v.shape for k, v in sharded.items()} == {k: v.shape for k, v in single.items()}
    assert_same_training(sharded, single, lr=lr, steps=steps)
    if method == "full":
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(runs["fsdp"] / "adapter", subfolder="unet")
        assert type(unet) is UNet2DConditionModel  # a plain UNet, not accelerate's FSDP class
    # Checkpoints hold whole tensors too: trained, best and EMA weights and AdamW moments equal one process's.
    a, b = _checkpoint(runs["single"] / "checkpoints", steps), _checkpoint(runs["fsdp"] / "checkpoints", steps)
    assert a.keys() == b.keys()
    for prefix in ("weights.", "best.", "ema.") if method == "full" else ("weights.", "best."):
        keys = [k for k in a if k.startswith(prefix)]
        assert keys, prefix
        assert_same_training({k: b[k] for k in keys}, {k: a[k] for k in keys}, lr=lr, steps=steps)
    for key in (k for k in a if k.startswith("optimizer.")):
        assert b[key].shape == a[key].shape, key
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-7, msg=key)

    # Resume under FSDP from its own step-2 checkpoint: whole tensors split back into shards, the same result.
    shutil.copytree(runs["fsdp"] / "checkpoints", runs["resumed"] / "checkpoints")
    shutil.rmtree(runs["resumed"] / "checkpoints" / f"step-{steps:06d}")
    resumed = _train(runs["resumed"], prepared, 2, runs["resumed"] / "checkpoints")
    assert "(step 2)" in resumed.stdout, resumed.stdout[-2000:]
    torch.testing.assert_close(_trained(runs["resumed"], method), sharded, rtol=0, atol=1e-6)


def test_fsdp_config_is_fsdp2_with_full_state_dict_and_wraps_unet_blocks(tiny_model: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils.dataclasses import get_module_class_from_name
    from diffusers import UNet2DConditionModel

    config = ClusterConfig.from_yaml_file(str(CONFIG))  # rejects unknown keys
    fsdp = config.fsdp_config
    assert config.distributed_type == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT" and config.mixed_precision == "bf16"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # accelerate refuses a class to wrap that the model lacks; these are in every SD 1.x/2.x/SDXL UNet.
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    for name in fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert get_module_class_from_name(unet, name) is not None, name


@pytest.mark.slow
def test_fsdp_without_gpus_is_refused_not_run_as_ddp(tmp_path: Path, tiny_model: Path, prepared: Path) -> None:  # noqa: F811
    """What a user gets on CPU: accelerate falls back to DDP without a word; train.py says so and stops."""
    write_params(tmp_path, tiny_model, prepared, max_steps=1, batch_size=2)
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIG), "--num_processes", "2"]
    cmd += ["--main_process_port", str(_free_port()), "-m", "pipeline.train", "--params", str(tmp_path / "params.yaml")]
    cmd += ["--prepared", str(prepared), "--out", str(tmp_path / "adapter"), "--report", str(tmp_path / "report")]
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "FSDP was asked for but accelerate runs MULTI_CPU" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "adapter").exists()


if __name__ == "__main__":  # each launched process: `accelerate launch ... -m tests.test_fsdp <pipeline.train args>`
    _shard_on_cpu()
    from pipeline import train

    gather, shards = train.full_tensor, []

    def counting_gather(tensor: torch.Tensor) -> torch.Tensor:
        shards.append(type(tensor).__name__ == "DTensor")
        return gather(tensor)

    train.full_tensor = counting_gather
    code = train.main()
    print(f"gathered {sum(shards)} sharded tensors")  # the test checks the weights really were sharded
    sys.exit(code)
