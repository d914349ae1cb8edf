"""Lineage without a server: adapter hashes, model URIs, the printed chain and commands, and verification.

The end-to-end check (a promoted version rebuilt from its git commit with `dvc repro`, same tensors) is in
tests/test_mlflow_server.py, on the version that the flow registered there over HTTP.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline import lineage

TENSORS = {"b.lora_A.weight": torch.arange(6.0).reshape(2, 3), "a.lora_B.weight": torch.ones(3, 2)}


def test_tensor_digest_ignores_the_header_but_not_one_bit_of_the_weights(tmp_path: Path) -> None:
    first, second, changed = tmp_path / "1", tmp_path / "2", tmp_path / "3"
    for folder in (first, second, changed):
        folder.mkdir()
    # The same tensors with the metadata a rerun may write in another order (what diffusers + safetensors do).
    save_file(TENSORS, first / "pytorch_lora_weights.safetensors", metadata={"format": "pt", "cfg": '["q", "k"]'})
    save_file(TENSORS, second / "pytorch_lora_weights.safetensors", metadata={"cfg": '["k", "q"]', "format": "pt"})
    bumped = dict(TENSORS)
    bumped["a.lora_B.weight"] = torch.nextafter(torch.ones(3, 2), torch.full((3, 2), 2.0))  # one ulp
    save_file(bumped, changed / "pytorch_lora_weights.safetensors", metadata={"format": "pt", "cfg": '["q", "k"]'})

    d1, d2, d3 = (lineage.adapter_digests(f) for f in (first, second, changed))
    assert d1["sdft.adapter_sha256"] != d2["sdft.adapter_sha256"]  # the files differ...
    assert d1["sdft.adapter_tensors_sha256"] == d2["sdft.adapter_tensors_sha256"]  # ...their tensors do not
    assert d1["sdft.adapter_tensors_sha256"] != d3["sdft.adapter_tensors_sha256"]
    with pytest.raises(FileNotFoundError, match="no .safetensors file"):
        lineage.adapter_digests(tmp_path)


def _full_output(folder: Path, unet: dict[str, torch.Tensor], text: dict[str, torch.Tensor], config: str) -> Path:
    """A full fine-tune's train output: sub-model folders (weights + config.json) and training.json."""
    info = {"format_version": 1, "method": "full", "architecture": "sd", "prediction_type": "epsilon"}
    (folder / "training.json").parent.mkdir(parents=True)
    (folder / "training.json").write_text(json.dumps(info | {"trained": ["unet", "text_encoder"]}))
    for name, tensors, weights in (
        ("unet", unet, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", text, "model.safetensors"),
    ):
        (folder / name).mkdir()
        save_file(tensors, folder / name / weights, metadata={"format": "pt"})
        (folder / name / "config.json").write_text(config)
    return folder


def test_full_fine_tune_digest_covers_every_saved_sub_model_but_not_configs(tmp_path: Path) -> None:
    text = {"embeddings.weight": torch.zeros(4, 2)}
    first = lineage.adapter_digests(_full_output(tmp_path / "1", TENSORS, text, '{"_diffusers_version": "0.42.1"}'))
    # Another diffusers version in config.json: the same weights.
    again = lineage.adapter_digests(_full_output(tmp_path / "2", TENSORS, text, '{"_diffusers_version": "0.43.0"}'))
    assert first == again
    # One changed text-encoder weight changes the digest: every trained sub-model is covered, not only the UNet.
    changed = lineage.adapter_digests(
        _full_output(tmp_path / "3", TENSORS, {"embeddings.weight": torch.ones(4, 2)}, "{}")
    )
    assert changed["sdft.adapter_tensors_sha256"] != first["sdft.adapter_tensors_sha256"]
    # A full output with no top-level safetensors is still hashed (the LoRA glob alone would find nothing).
    assert not list((tmp_path / "1").glob("*.safetensors"))


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/sdft-demo/3", ("sdft-demo", "3", None)),
        ("models:/sdft-demo@champion", ("sdft-demo", None, "champion")),
        ("models:/team/sdft/12", ("team/sdft", "12", None)),
    ],
)
def test_model_uris(uri: str, expected: tuple) -> None:
    assert lineage.parse_model_uri(uri) == expected


@pytest.mark.parametrize("uri", ["sdft-demo/3", "models:/sdft-demo", "models:/sdft-demo/latest", "models:/@x"])
def test_bad_model_uris_say_what_to_write(uri: str) -> None:
    with pytest.raises(ValueError, match="models:/<name>/<version>"):
        lineage.parse_model_uri(uri)


def recorded(**overrides: str) -> lineage.Lineage:
    tags = {
        "mlflow.source.git.commit": "a" * 40,
        "sdft.git.dirty": "false",
        "sdft.git.remote": "git@example.com:team/sdft.git",
        "sdft.base_model": "models/tiny-sd",
        "sdft.promotion": "promoted",
        "sdft.expected_champion": "none",
        "sdft.dvc.train.outs": "models/adapter:abc.dir,reports/train/curve.csv:def",
    }
    return lineage.Lineage("sdft-demo", "4", ["champion"], tags | overrides, "**Gate: PROMOTE** ...\n", "run1")


def test_the_chain_and_the_commands_that_rebuild_it() -> None:
    text = recorded().format()
    assert text.startswith("models:/sdft-demo/4  (aliases: champion)  [promoted]")
    assert "compared with     base model" in text and "dvc train" in text and "warning" not in text
    assert recorded().commands() == [
        "git clone git@example.com:team/sdft.git sdft-v4 && cd sdft-v4",
        f"git checkout {'a' * 40}",
        "test -d .dvc || dvc init -q  # a commit without DVC metadata: the retrain flow runs the same",
        "sdft init  # installs the embedded tiny base model (assets/tiny-shapes-sd, sha256-checked)",
        "dvc repro train  # prepare + train: the adapter (plain `dvc repro` also re-runs evaluate)",
        "sdft lineage models:/sdft-demo/4 --verify models/adapter",
    ]


def test_warnings_for_what_a_commit_cannot_rebuild() -> None:
    assert "uncommitted changes" in recorded(**{"sdft.git.dirty": "true"}).format()
    nothing = recorded(**{"mlflow.source.git.commit": ""})
    assert nothing.commands() == [] and "cannot be rebuilt" in nothing.format()
    hub = recorded(**{"sdft.base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5"})
    assert "no pinned revision" in hub.format() and "sdft init" not in "\n".join(hub.commands())
    pinned = recorded(**{"sdft.base_model": "org/model", "sdft.base_model_revision": "0123abc"})
    assert "warning" not in pinned.format() and "org/model @ 0123abc" in pinned.format()
    assert "local folder /models/sd15" in recorded(**{"sdft.base_model": "/models/sd15"}).format()


def test_tags_collect_git_dvc_data_params_and_adapter(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "reports").mkdir(parents=True)
    (root / "params.yaml").write_text("train:\n  seed: 0\n")
    lock = {"schema": "2.0", "stages": {"prepare": {"outs": [{"path": "data/prepared", "md5": "p1.dir"}]}}}
    (root / "dvc.lock").write_text(json.dumps(lock))
    identity = {"source_digest": "s" * 64, "prepared_digest": "p" * 64}
    (root / "reports" / "data_validation.json").write_text(json.dumps({"source": "data/demo", "identity": identity}))
    save_file(TENSORS, root / "pytorch_lora_weights.safetensors")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "p"], cwd=root, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()

    tags = lineage.tags(root, "models/tiny-sd", None, "run1", "e" * 64, "flow-run-1", root)
    assert tags["mlflow.source.git.commit"] == commit and tags["sdft.git.dirty"] == "false"
    assert tags["sdft.dvc.prepare.outs"] == "data/prepared:p1.dir" and tags["sdft.data_digest"] == "p1.dir"
    assert tags["sdft.data.source_digest"] == "s" * 64 and tags["sdft.data.prepared_digest"] == "p" * 64
    assert tags["sdft.params_hash"] == lineage.file_sha256(root / "params.yaml")
    assert tags["sdft.prefect_flow_run_id"] == "flow-run-1" and tags["sdft.eval_set_hash"] == "e" * 64
    assert set(tags) >= {"sdft.adapter_sha256", "sdft.adapter_tensors_sha256", "sdft.base_model_revision"}
    # What `dvc init` and `dvc repro` stage (.dvc/, .dvcignore, .gitignore files) does not make the tree dirty...
    (root / ".dvc").mkdir()
    (root / ".dvc" / "config").write_text("")
    (root / ".dvcignore").write_text("")
    (root / "data").mkdir()
    (root / "data" / ".gitignore").write_text("/prepared\n")
    subprocess.run([*git, "add", ".dvc", ".dvcignore", "data/.gitignore"], cwd=root, check=True)
    assert lineage.git_state(root) == (commit, False)
    # ...a changed tracked file does, and is named.
    (root / "params.yaml").write_text("train:\n  seed: 1\n")
    dirty = lineage.tags(root, "m", None, "r", "e", "f", root)
    assert dirty["sdft.git.dirty"] == "true" and dirty["sdft.git.dirty_paths"] == "params.yaml"

    # Verification against the same folder: same tensors, params and data (the file hash is informational).
    found = lineage.Lineage("m", "1", [], tags, "", "run1")
    checks = {c.what: c for c in lineage.verify(found, root, root)}
    assert checks["adapter tensors"].ok and checks["prepared data"].ok
    assert not checks["params.yaml"].ok and checks["params.yaml"].required  # params.yaml changed since
    assert "DIFFERENT" in lineage.format_checks(list(checks.values()))
