"""Pre-trained assets committed to the repository (`assets/`): the shape-world base model and its judges.

Each asset is a folder in a standard layout (diffusers or transformers) with a `MANIFEST.json` beside its files: the
sha256 of every file, the command that rebuilt it, its seed and how long the build took. `sdft init` copies an asset
into place only after its hashes match, so a truncated or edited file is caught before anything loads it.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

from pipeline.ingest import file_sha256

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MANIFEST = "MANIFEST.json"


class AssetError(RuntimeError):
    """An asset is missing or does not match its manifest; the message names the file and the fix."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, command: str, seed: int, seconds: float, extra: dict[str, Any] | None = None) -> Path:
    """Record every file's sha256 and how the folder was built, in `folder/MANIFEST.json`."""
    import torch

    manifest = {
        "command": command,
        "seed": seed,
        "build_seconds": round(seconds, 1),
        "built_with": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "files": {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)},
        **(extra or {}),
    }
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of `folder`, after checking that every file it lists is there with the same sha256."""
    path = folder / MANIFEST
    if not path.is_file():
        raise AssetError(f"{path} is missing: rebuild the asset with the command in its README, or `git checkout` it.")
    manifest = json.loads(path.read_text())
    for name, expected in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise AssetError(f"{file} is missing (listed in {path}): restore it with `git checkout -- {file}`.")
        if file_sha256(file) != expected:
            raise AssetError(
                f"{file} does not match its sha256 in {path}: restore it with `git checkout -- {file}`, or rebuild "
                f"the asset with `{manifest['command']}`."
            )
    return manifest


def install(name: str, dest: Path) -> Path:
    """Copy `assets/<name>` to `dest` after verifying it, atomically (a sibling `.partial` folder, then a rename)."""
    source = ASSETS / name
    verify(source)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    partial.rename(dest)
    return dest
