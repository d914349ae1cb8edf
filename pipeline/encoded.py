"""The precomputed-inputs format shared by the `encode` stage (writer) and `train` (reader).

`<out>/index.json` says what was encoded and from what; `<out>/<split>.safetensors` holds, for row i of
`<prepared>/<split>/metadata.jsonl`: `latents.<i>` (4, h/8, w/8: the scaled VAE mean of the prepared image), with
data.random_flip `flipped.<i>` (the mirrored image's), and `emb.<i>` (77, D) plus, for SDXL, `pooled.<i>` (P): the
frozen text conditioning of the caption. Rows may differ in size (aspect-ratio buckets).

Two keys decide whether train may use it: the base model's fingerprint (a hash of the VAE's and text encoders' weights
and the tokenizers' vocabularies: what the numbers were computed with) and the prepared split's digest (its
metadata and image bytes: what they were computed from). On any mismatch train encodes in memory instead, and says so.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.diffusion import read_rows

INDEX_FILE = "index.json"
FORMAT_VERSION = 1


def model_fingerprint(components: Any) -> str:
    """Hash of everything that shapes the encoded numbers: VAE and text-encoder weights, tokenizer vocabularies."""
    digest = hashlib.sha256()
    for name in ("vae", "text_encoder", "text_encoder_2"):
        model = getattr(components, name)
        if model is None:
            continue
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        # Not where it was loaded from, nor which library version wrote it: only what changes the numbers.
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps([name, config], sort_keys=True, default=str).encode())
        for key, tensor in sorted(model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for tokenizer in (components.tokenizer, components.tokenizer_2):
        if tokenizer is not None:
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def split_digest(folder: Path) -> str:
    """Hash of a prepared split as training reads it: its metadata.jsonl and every image's bytes, in row order."""
    digest = hashlib.sha256((folder / "metadata.jsonl").read_bytes())
    for row in read_rows(folder):
        digest.update((folder / row["file_name"]).read_bytes())
    return digest.hexdigest()


@dataclass
class EncodedSplit:
    """One split's precomputed inputs, row-aligned with its metadata.jsonl."""

    latents: list[torch.Tensor]
    flipped: list[torch.Tensor] | None
    cond: dict[str, torch.Tensor] | None  # {"emb": (N, 77, D)} (+ {"pooled": (N, P)} for SDXL)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"latents.{i}": x.contiguous() for i, x in enumerate(self.latents)}
        out |= {f"flipped.{i}": x.contiguous() for i, x in enumerate(self.flipped or [])}
        for key, stacked in (self.cond or {}).items():
            out |= {f"{key}.{i}": x.contiguous() for i, x in enumerate(stacked)}
        return out


def write(out: Path, splits: dict[str, EncodedSplit], index: dict[str, Any]) -> None:
    """Write the splits and index.json into `out`, through a temporary folder renamed at the end."""
    import shutil

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, split in splits.items():
        save_file(split.tensors(), str(partial / f"{name}.safetensors"))
    (partial / INDEX_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, **index}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def write_disabled(out: Path, reason: str) -> None:
    write(out, {}, {"enabled": False, "reason": reason})


def read_index(out: Path) -> dict[str, Any] | None:
    path = out / INDEX_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def usable(
    index: dict[str, Any] | None, fingerprint: str, digests: dict[str, str], random_flip: bool
) -> tuple[bool, str]:
    """Whether train may read the precomputed inputs, and if not, why (for the log line)."""
    if index is None:
        return False, "no precomputed inputs"
    if not index.get("enabled"):
        return False, f"precomputed inputs are off ({index.get('reason', 'data.precompute: false')})"
    if index.get("format_version") != FORMAT_VERSION:
        return False, f"precomputed inputs have format {index.get('format_version')}, this code reads {FORMAT_VERSION}"
    if index.get("fingerprint") != fingerprint:
        return False, "precomputed inputs were made with another base model (VAE / text encoder / tokenizer differ)"
    for split, digest in digests.items():
        if index.get("splits", {}).get(split, {}).get("digest") != digest:
            return False, f"precomputed inputs were made from other prepared data ({split} split differs)"
    if random_flip and not index.get("random_flip"):
        return False, "data.random_flip is on but the precomputed inputs hold no mirrored latents"
    return True, ""


def read_split(out: Path, split: str, rows: int, with_text: bool) -> EncodedSplit:
    tensors = load_file(str(out / f"{split}.safetensors"))
    flipped = [tensors[f"flipped.{i}"] for i in range(rows)] if f"flipped.{0}" in tensors else None
    cond = None
    if with_text:
        keys = [k for k in ("emb", "pooled") if f"{k}.0" in tensors]
        cond = {k: torch.stack([tensors[f"{k}.{i}"] for i in range(rows)]) for k in keys}
    return EncodedSplit(latents=[tensors[f"latents.{i}"] for i in range(rows)], flipped=flipped, cond=cond)
