"""A text-encoder LoRA trained by this stack loads in an older diffusers/transformers pair and gives the same model.

Users run sdft's `pytorch_lora_weights.safetensors` with their own diffusers. With transformers 4 (nested
`CLIPTextModel.text_model`) diffusers reads text-encoder keys only as `text_encoder.text_model.encoder.layers.N...`;
a file without `text_model.` failed there with "Cannot copy out of meta tensor".

The older pair lives in its own venv, built once from PyPI and cached under `.sdft/test-venvs/`: only diffusers,
transformers, huggingface_hub and tokenizers are installed into it (no dependencies); a `.pth` file then appends this
venv's site-packages, so torch, peft and the rest are this stack's and no second torch is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.diffusion import load_components
from pipeline.train import save_adapter, train
from tests.test_train import prepared, splits, tp  # noqa: F401  (prepared and splits are fixtures)

REPO = Path(__file__).resolve().parents[1]
# The last diffusers before it followed transformers 5's flat CLIPTextModel, with the transformers it supports.
OLDER_STACK = ["diffusers==0.35.2", "transformers==4.57.6", "huggingface_hub==0.36.2", "tokenizers==0.22.2"]


def older_stack_python() -> Path:
    """The cached venv's python (built on first use: about 40 s and 20 MB from PyPI)."""
    here = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    stamp = "\n".join([*OLDER_STACK, *here]) + "\n"
    venv = REPO / ".sdft" / "test-venvs" / "diffusers-0.35-transformers-4.57"
    python = venv / "bin" / "python"
    if (venv / "READY").is_file() and (venv / "READY").read_text() == stamp and python.exists():
        return python
    partial = venv.with_name(venv.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True)
    subprocess.run(
        [str(partial / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         *OLDER_STACK],
        check=True,
    )  # fmt: skip
    site = Path(
        subprocess.run(
            [str(partial / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    # Appended after the venv's own site-packages (which wins); addsitedir also runs the .pth files found there.
    lines = [f"import site; site.addsitedir({path!r})\n" for path in here]
    (site / "zz_sdft_main_stack.pth").write_text("".join(lines))
    shutil.rmtree(venv, ignore_errors=True)
    partial.rename(venv)
    (venv / "READY").write_text(stamp)
    return python


@pytest.mark.slow
def test_text_encoder_lora_loads_in_diffusers_035_with_transformers_4(tmp_path: Path, tiny_model: Path, splits) -> None:  # noqa: F811
    params = tp(max_steps=2, train_text_encoder=True, text_encoder_lr=1e-2, lora_rank=2, lora_alpha=8)
    result = train(load_components(str(tiny_model)), *splits, params)
    save_adapter(result, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        text_keys = [k for k in handle.keys() if k.startswith("text_encoder.")]  # noqa: SIM118
    assert text_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)

    torch.manual_seed(0)
    inputs = {
        "ids": torch.randint(0, 49406, (2, 77)),
        "x": torch.randn(2, 4, 8, 8),
        "t": torch.tensor([50, 800]),
        "emb": torch.randn(2, 77, 32),
    }
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [str(older_stack_python()), str(REPO / "tests" / "older_stack_load.py"), str(tiny_model),
         str(tmp_path / "adapter"), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        assert handle.metadata() == {"diffusers": "0.35.2", "transformers": "4.57.6"}
    out = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        trained_text = result.models["text_encoder"](inputs["ids"])[0]
        trained_unet = result.models["unet"](inputs["x"], inputs["t"], inputs["emb"]).sample
    assert not torch.allclose(out["base_text"], trained_text, atol=1e-4)  # the LoRA changed the text encoder
    torch.testing.assert_close(out["text"], trained_text, atol=1e-5, rtol=1e-4)  # every key loaded, alpha/rank = 4
    torch.testing.assert_close(out["unet"], trained_unet, atol=1e-5, rtol=1e-4)
