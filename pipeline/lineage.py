"""Lineage: what a registered model version was made from, and the commands that make it again.

`tags(...)` is written onto each registered version (and so travels with it): the git commit and whether the tree
was dirty, the DVC stage hashes from `dvc.lock`, the data digests from `reports/data_validation.json`, a hash of
`params.yaml`, the base model and revision, the MLflow run, the Prefect flow run, the evaluation-set hash, and two
hashes of the adapter (the train output's weights: the LoRA file, or a full fine-tune's sub-model weights).

Adapter hashes: `sdft.adapter_sha256` is the sha256 of the weights file as registered; `sdft.adapter_tensors_sha256`
hashes only the tensors (names, dtypes, shapes and raw bytes). Training is seeded and its tensors are bitwise equal
from one CPU run to the next, but the safetensors header is not: diffusers writes the LoRA config with its target
modules from a Python set (ordered by the per-process string hash) and safetensors orders its metadata map per
process too. So a reproduction is checked on the tensors digest (exact, not within a tolerance); the file hash is
shown for information.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import candidate, env, registry

EMBEDDED_BASE = "models/tiny-sd"  # installed by `sdft init` from the committed assets/tiny-shapes-sd


# --------------------------------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(path: Path) -> str:
    """sha256 of a safetensors file's tensors (sorted names, dtypes, shapes, raw bytes), ignoring its metadata.

    Read from the file format directly (8-byte little-endian header length, JSON header, data), so no framework is
    imported and every dtype is covered.
    """
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        start_of_data = 8 + size
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            handle.seek(start_of_data + begin)
            data = handle.read(end - begin)
            h.update(json.dumps([name, info["dtype"], info["shape"], len(data)]).encode())
            h.update(data)
    return h.hexdigest()


def adapter_digests(adapter_dir: Path) -> dict[str, str]:
    """`sdft.adapter_sha256` and `sdft.adapter_tensors_sha256` of a train output folder's weight files.

    A LoRA (or an older folder without training.json): its top-level safetensors files. A full fine-tune: the saved
    sub-models' weights (`unet/diffusion_pytorch_model.safetensors`, ...); their config.json files are not hashed
    (diffusers writes its own version into them). One file: its own hashes. Several: a hash of `path:hash` lines,
    with paths relative to the folder.
    """
    folder = Path(adapter_dir)
    if (folder / candidate.TRAINING_FILE).is_file():
        files = candidate.weight_files(candidate.read_output(folder))
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {adapter_dir}: is it an output folder written by train?")

    def combined(digest: Any) -> str:
        if len(files) == 1:
            return digest(files[0])
        lines = "".join(f"{f.relative_to(folder).as_posix()}:{digest(f)}\n" for f in files)
        return hashlib.sha256(lines.encode()).hexdigest()

    return {"sdft.adapter_sha256": combined(file_sha256), "sdft.adapter_tensors_sha256": combined(tensors_sha256)}


# --------------------------------------------------------------------------------------------------------------------
# Collecting lineage at registration time
# --------------------------------------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


# Bookkeeping that DVC writes and stages (`dvc init`, `dvc repro`) without changing what a stage computes.
_NOT_DIRTY = (":(exclude).dvc", ":(exclude).dvcignore", ":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore")


def dirty_paths(root: Path) -> list[str]:
    """Tracked files that differ from the commit (staged or not), DVC's bookkeeping aside."""
    args = ["git", "status", "--porcelain", "-z", "--untracked-files=no", "--", ".", *_NOT_DIRTY]
    result = subprocess.run(args, cwd=root, capture_output=True, text=True)
    return [entry[3:] for entry in result.stdout.split("\0") if entry.strip()] if result.returncode == 0 else []


def git_state(root: Path) -> tuple[str, bool]:
    """(commit, dirty) of the project, or ("", False) outside git. Untracked files (outputs) do not count."""
    commit = _git(root, "rev-parse", "HEAD")
    return commit, bool(commit) and bool(dirty_paths(root))


def git_remote(root: Path) -> str:
    """`origin`'s URL without credentials, or ""."""
    return env.redact(_git(root, "remote", "get-url", "origin"))


def params_hash(params_file: Path) -> str:
    return file_sha256(params_file)


def dvc_stage_hashes(lock_file: Path) -> dict[str, str]:
    """`sdft.dvc.<stage>.outs` = "path:md5,..." for each stage of dvc.lock (what `dvc repro` must give again)."""
    lock = yaml.safe_load(lock_file.read_text()) if lock_file.is_file() else {}
    tags = {}
    for stage, entry in ((lock or {}).get("stages") or {}).items():
        outs = entry.get("outs") or []
        tags[f"sdft.dvc.{stage}.outs"] = ",".join(f"{o['path']}:{o.get('md5', '')}" for o in outs)
    return tags


def data_identity(report_file: Path) -> dict[str, str]:
    if not report_file.is_file():
        return {}
    report = json.loads(report_file.read_text())
    identity = report.get("identity") or {}
    return {
        "sdft.data.source": str(report.get("source_uri") or report.get("source") or ""),
        "sdft.data.source_digest": identity.get("source_digest", ""),
        "sdft.data.prepared_digest": identity.get("prepared_digest", ""),
    }


def tags(
    root: Path,
    base_model: str,
    base_revision: str | None,
    run_id: str,
    eval_set_hash: str,
    flow_run_id: str,
    adapter_dir: Path,
) -> dict[str, str]:
    """Everything that leads a model version back to its code, data, params and base model."""
    commit, dirty = git_state(root)
    out = {
        "mlflow.source.git.commit": commit,
        "sdft.git.dirty": str(dirty).lower(),
        "sdft.git.dirty_paths": ",".join(dirty_paths(root))[:5000] if dirty else "",
        "sdft.git.remote": git_remote(root),
        "sdft.params_hash": params_hash(root / "params.yaml"),
        "sdft.base_model": base_model,
        "sdft.base_model_revision": base_revision or "",
        "sdft.run_id": run_id,
        "sdft.prefect_flow_run_id": flow_run_id,
        "sdft.eval_set_hash": eval_set_hash,
    }
    out |= dvc_stage_hashes(root / "dvc.lock")
    prepare_outs = out.get("sdft.dvc.prepare.outs", "")
    out["sdft.data_digest"] = prepare_outs.split(",")[0].partition(":")[2] if prepare_outs else ""
    out |= data_identity(root / "reports" / "data_validation.json")
    out |= adapter_digests(adapter_dir)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Reading it back: `sdft lineage models:/<name>/<version>`
# --------------------------------------------------------------------------------------------------------------------


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/<name>/<version>` or `models:/<name>@<alias>` -> (name, version, alias)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"{uri!r} is not a model URI; write models:/<name>/<version> or models:/<name>@<alias>")
    rest = uri[len("models:/") :].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise ValueError(f"{uri!r}: write models:/<name>/<version> (e.g. models:/sdft-demo/3) or models:/<name>@champion")


@dataclass
class Lineage:
    model_name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    description: str
    run_id: str
    audit: list[dict[str, Any]] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"

    def commands(self) -> list[str]:
        """Shell commands that rebuild this version's adapter from source, in a clone of the project."""
        t = self.tags
        commit = t.get("mlflow.source.git.commit", "")
        if not commit:
            return []
        remote = t.get("sdft.git.remote") or "<this project's git repository>"
        cmds = [
            f"git clone {remote} sdft-v{self.version} && cd sdft-v{self.version}",
            f"git checkout {commit}",
            "test -d .dvc || dvc init -q  # a commit without DVC metadata: the retrain flow runs the same",
        ]
        if t.get("sdft.base_model") == EMBEDDED_BASE:
            cmds.append("sdft init  # installs the embedded tiny base model (assets/tiny-shapes-sd, sha256-checked)")
        cmds += [
            "dvc repro train  # prepare + train: the adapter (plain `dvc repro` also re-runs evaluate)",
            f"sdft lineage {self.uri} --verify models/adapter",
        ]
        return cmds

    def warnings(self) -> list[str]:
        t, out = self.tags, []
        if not t.get("mlflow.source.git.commit"):
            out.append("no git commit was recorded (the project was not a git repository): it cannot be rebuilt.")
        if t.get("sdft.git.dirty") == "true":
            out.append(
                "the working tree had uncommitted changes to tracked files when it was trained "
                f"({t.get('sdft.git.dirty_paths') or 'see sdft.git.dirty_paths'}): the commit alone may not rebuild "
                "it (compare sdft.params_hash and the stage hashes after `dvc repro`)."
            )
        base = t.get("sdft.base_model", "")
        hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~", "models/"))
        if base and base != EMBEDDED_BASE and not hub_id:
            out.append(f"the base model is the local folder {base}: put the same weights there before `dvc repro`.")
        elif hub_id and not t.get("sdft.base_model_revision"):
            out.append(
                f"the base model {base} has no pinned revision (base.revision): the hub may serve other weights."
            )
        return out

    def format(self) -> str:
        t = self.tags

        def row(label: str, value: str) -> str:
            return f"  {label:<18}{value or '-'}"

        promotion = t.get(registry.PROMOTION, "")
        lines = [
            f"{self.uri}" + (f"  (aliases: {', '.join(self.aliases)})" if self.aliases else "") + f"  [{promotion}]",
            row("compared with", "base model" if t.get(registry.EXPECTED) == "none" else t.get(registry.EXPECTED)),
            row("gate", (self.description.splitlines() or [""])[0]),
            row("MLflow run", self.run_id),
            row("Prefect flow run", t.get("sdft.prefect_flow_run_id", "")),
            row("git commit", t.get("mlflow.source.git.commit", "") + (" (dirty)" if t.get("sdft.git.dirty") == "true"
                                                                         else "")),
            row("params.yaml", "sha256 " + t.get("sdft.params_hash", "")),
            row("base model", t.get("sdft.base_model", "") + (f" @ {t['sdft.base_model_revision']}"
                                                              if t.get("sdft.base_model_revision") else "")),
            row("data source", t.get("sdft.data.source", "")),
            row("  source digest", t.get("sdft.data.source_digest", "")),
            row("  prepared digest", t.get("sdft.data.prepared_digest", "")),
        ]  # fmt: skip
        for key in sorted(k for k in t if k.startswith("sdft.dvc.")):
            lines.append(row(f"dvc {key.split('.')[2]}", t[key].replace(",", ", ")))
        lines += [
            row("eval set", t.get("sdft.eval_set_hash", "")),
            row("adapter file", "sha256 " + t.get("sdft.adapter_sha256", "")),
            row("adapter tensors", "sha256 " + t.get("sdft.adapter_tensors_sha256", "")),
        ]
        if self.audit:
            lines.append("Audit:")
            lines += [
                f"  {a.get('when', '')}  {a.get('action', '')} v{a.get('version', '?')}"
                + (f" ({a['by']})" if a.get("by") else "")
                + f" by {a.get('who', '?')}: {a.get('why', '')}"
                for a in self.audit
            ]
        lines += [f"warning: {w}" for w in self.warnings()]
        commands = self.commands()
        if commands:
            lines += ["Reproduce (in a shell, from any folder):"] + [f"  {c}" for c in commands]
        return "\n".join(lines) + "\n"


def describe(uri: str) -> Lineage:
    name, version, alias = parse_model_uri(uri)
    if alias:
        version = registry.alias_version(name, alias)
        if version is None:
            raise registry.RegistryError(f"{name!r} has no alias {alias!r}.")
    mv = registry.get_version(name, str(version))
    return Lineage(
        model_name=name,
        version=str(mv.version),
        aliases=sorted(mv.aliases or []),
        tags=dict(mv.tags or {}),
        description=mv.description or "",
        run_id=mv.run_id or "",
        audit=registry._audit_entries(dict(mv.tags or {})),
    )


@dataclass
class Check:
    what: str
    expected: str
    found: str
    required: bool  # a mismatch fails the verification

    @property
    def ok(self) -> bool:
        return self.expected == self.found


def verify(lineage: Lineage, root: Path, adapter_dir: Path) -> list[Check]:
    """Compare a rebuilt project (after `git checkout` and `dvc repro`) with the version's recorded lineage."""
    t = lineage.tags
    found = adapter_digests(adapter_dir)
    checks = [
        Check("adapter tensors", t.get("sdft.adapter_tensors_sha256", ""), found["sdft.adapter_tensors_sha256"], True),
        Check("adapter file", t.get("sdft.adapter_sha256", ""), found["sdft.adapter_sha256"], False),
        Check("params.yaml", t.get("sdft.params_hash", ""), params_hash(root / "params.yaml"), True),
    ]
    data = data_identity(root / "reports" / "data_validation.json")
    if data:
        key = "sdft.data.prepared_digest"
        checks.append(Check("prepared data", t.get(key, ""), data[key], True))
    return checks


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        verdict = "same" if c.ok else ("DIFFERENT" if c.required else "different (informational)")
        lines.append(f"  {c.what:<16}{verdict}: recorded {c.expected[:16]}, rebuilt {c.found[:16]}")
    return "\n".join(lines) + "\n"
