"""`sdft`: the command line. It sits on top (flows -> pipeline), so it can start flows and read the registry.

sdft init          install the pre-trained tiny default base model (models/tiny-sd) and demo data if missing
sdft run           run the retrain flow once: DVC stages, gate, registration
sdft tune          run or continue the hyperparameter study of params.yaml's tune section; --apply: keep its best
sdft models        registered versions with their aliases, status, gate metrics and last change
sdft promote       make a version @champion by hand (audited); rollback: back to @previous-champion
sdft approve       promote the @challenger (registry.approval: manual); lineage: what a version came from
sdft ui            print the command that opens the MLflow UI on this project's store
sdft serve         serve the scheduled retrain of prefect.yaml (starts a local Prefect server if none is set)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline import env

BASE_ASSET = "tiny-shapes-sd"


def describe_base(model: Path) -> str:
    """One line on what the installed base model is, from its MANIFEST.json."""
    manifest = json.loads((model / "MANIFEST.json").read_text())
    millions = sum(manifest.get("parameters", {}).values()) / 1e6
    quality = manifest.get("quality", {}).get("base_scenes_10_steps", {})
    drawn = f", colour right {quality['colour']:.0%} of the time at 10 steps" if "colour" in quality else ""
    return (
        f"a {millions:.1f} M-parameter SD 1.x-shaped model pre-trained on the shape world: red/green/blue circles, "
        f"squares and triangles on white/black{drawn}; it has never seen purple, which the demo data teaches"
    )


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.assets import AssetError, install
    from pipeline.config import ParamsError, load_params
    from pipeline.demo_data import make_demo_dataset

    root = Path(args.project).resolve()
    model = root / "models" / "tiny-sd"
    if model.is_dir():
        print(f"base model: {model} (exists)")
    else:
        try:
            install(BASE_ASSET, model)
        except AssetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"base model: installed {model} from assets/{BASE_ASSET} ({describe_base(model)})")
    demo = root / "data" / "demo"
    if not (demo / "metadata.jsonl").is_file():
        make_demo_dataset(demo)
        print(f"demo data: generated {demo}")
    try:
        load_params(root / "params.yaml")
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"params: {root / 'params.yaml'} is valid")
    return 0


def ui_command(root: Path) -> str:
    """The MLflow UI on this project's store, sized to the machine.

    `mlflow ui` starts 4 uvicorn workers and, with job execution on, a pool of huey job workers (for MLflow's GenAI
    jobs, which sdft does not use): too many processes for a small machine. One worker per 4 cores (1 to 4), no jobs.
    """
    workers = max(1, min(4, (os.cpu_count() or 1) // 4))
    store = env.redact(env.tracking_uri(root))
    return (
        f"env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {store} "
        f"--host 127.0.0.1 --port 5000 --workers {workers}"
    )


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import ParamsError, load_params

    root = Path(args.project).resolve()
    try:
        approval = load_params(root / "params.yaml").registry.approval  # fail in a second, before any work
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.retrain import retrain

    try:
        result = retrain(project=str(root), dry_run=args.dry_run, trigger=args.trigger)
    except Exception as exc:  # the flow has logged the traceback; the registry was not touched
        print(f"error: the retrain failed, nothing was promoted: {env.redact(str(exc))}", file=sys.stderr)
        return 1
    if result.skipped:
        print(f"SKIPPED: {result.reason}")
        return 0
    print()
    print(result.gate_report)
    if result.promoted and approval == "manual":
        print(f"CHALLENGER: registered as version {result.version}, now @challenger; `sdft approve --reason ...`")
    elif result.promoted:
        print(f"PROMOTED: registered as version {result.version}, now @champion.")
    elif args.dry_run:
        print("DRY RUN: nothing was registered.")
    elif result.reason in result.gate_report:  # said once, in the report above
        print("REJECTED: nothing was registered; the champion stays.")
    else:  # e.g. the champion moved while this candidate was registered
        print(f"REJECTED: {result.reason}")
    print(f"MLflow run: {result.run_id}")
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        print(f"Open it with: {ui_command(root)}  then http://127.0.0.1:5000")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Bring the prepared data up to date (DVC), then run or continue the study (pipeline/tune.py)."""
    import subprocess

    from pipeline import tune
    from pipeline.config import ParamsError, load_params

    root = Path(args.project).resolve()
    try:
        load_params(root / "params.yaml")
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_repro:
        from flows.retrain import _tool, data_stages, ensure_workspace

        ensure_workspace(root)
        stages = data_stages(root)
        if stages:
            done = subprocess.run([_tool("dvc"), "repro", stages[-1]], cwd=root)
            if done.returncode != 0:
                print(f"error: `dvc repro {stages[-1]}` failed; the study needs the prepared data", file=sys.stderr)
                return 1
    argv = ["--params", str(root / "params.yaml"), "--prepared", str(root / "data" / "prepared")]
    argv += ["--encoded", str(root / "data" / "encoded"), "--workdir", str(root / ".sdft" / "tune")]
    argv += ["--report", str(root / "reports" / "tune")]
    return tune.main(argv + (["--apply"] if args.apply else []))


def _model_name(args: argparse.Namespace) -> str:
    from pipeline.config import load_params

    return args.name or load_params(Path(args.project).resolve() / "params.yaml", paths=False).registry.model_name


def _registry_call(call: Any) -> int:
    """Run a registry command; its refusals and an unreachable server become one clear line and exit status 1."""
    from mlflow.exceptions import MlflowException

    from pipeline.registry import RegistryError, RegistryUnavailable

    try:
        call()
    except (RegistryError, RegistryUnavailable) as exc:
        print(f"error: {env.redact(str(exc))}", file=sys.stderr)
        return 1
    except MlflowException as exc:  # e.g. PERMISSION_DENIED from a server with auth
        message = env.redact(exc.message[:500])
        print(f"error: the tracking server refused ({exc.error_code}): {message}", file=sys.stderr)
        return 1
    return 0


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.5g}"


def shorten(text: str, width: int) -> str:
    """`text` in at most `width` characters, cut after a whole word and marked with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1].rsplit(" ", 1)[0] if " " in text[: width - 1] else text[: width - 1]
    return cut.rstrip(" ,;:.") + "…"


def describe_change(audit: dict[str, Any], version: str) -> str:
    """An audit record as it concerns `version`: its own promotion, or losing @champion to another version."""
    action, who, why = audit.get("action", "?"), audit.get("who", "?"), audit.get("why", "")
    subject = audit.get("version")
    if subject in (None, version):
        return f"{action} by {who}: {shorten(why, 60)}"
    if audit.get("previous") == version:  # a promote, approve or rollback that moved @champion from this version
        return f"@champion went to v{subject} ({action} by {who})"
    return f"{action} of v{subject} by {who}"


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.config import load_params
    from pipeline.registry import version_summary

    params = load_params(Path(args.project).resolve() / "params.yaml", paths=False)
    name = args.name or params.registry.model_name
    gate = params.gate
    metrics = list(dict.fromkeys(f"eval.{r.metric}" for r in (*gate.primary, *gate.guardrails, *gate.floors)))

    def show() -> None:
        from pipeline.registry import RegistryError, model_exists, server

        if not model_exists(name):
            raise RegistryError(
                f"no registered model named {name!r} in {server()}. "
                "Check --name (or registry.model_name); `sdft run` registers the first version."
            )
        rows = version_summary(name, metrics, limit=args.limit)
        if not rows:
            print(f"{name}: no versions yet")
            return
        print(f"{name} (approval: {params.registry.approval}; metrics are the gate's, on each version's run)")
        head = f"{'version':>7}  {'aliases':<28} {'status':<11} {'vs':<5}"
        head += "".join(f" {m.removeprefix('eval.'):>12}" for m in metrics)
        print(head + "  eval set  created (UTC)        last change")
        for row in rows:
            values = "".join(f" {_num(row['metrics'].get(m)):>12}" for m in metrics)
            change = describe_change(row["last_audit"], row["version"]) if row["last_audit"] else ""
            print(
                f"{row['version']:>7}  {','.join(row['aliases']):<28} {row['promotion']:<11} "
                f"{row['compared_with'] or '':<5}{values}  {row['eval_set'][:8] or '?':<8}  {row['created'][:19]:<20} "
                f"{change}"
            )
        sets = {row["eval_set"] for row in rows}
        if len(sets) > 1:
            print(
                f"Note: these metrics come from {len(sets)} different evaluation sets (the eval set column): compare "
                "numbers only within one set. The gate always re-evaluates the champion on the candidate's set."
            )

    return _registry_call(show)


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline.registry import promote_version

    def act() -> None:
        move = promote_version(_model_name(args), args.version, args.reason)
        print(f"{move.model_name}: version {move.version} is now @champion (previous-champion: {move.previous}).")

    return _registry_call(act)


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipeline.registry import rollback

    def act() -> None:
        move = rollback(_model_name(args), args.reason or "")
        print(f"{move.model_name}: rolled back: version {move.version} is @champion again (was {move.previous}).")

    return _registry_call(act)


def cmd_approve(args: argparse.Namespace) -> int:
    from pipeline.registry import approve

    def act() -> None:
        move = approve(_model_name(args), args.version, args.reason)
        print(f"{move.model_name}: approved: version {move.version} is now @champion (was {move.previous}).")

    return _registry_call(act)


def cmd_lineage(args: argparse.Namespace) -> int:
    from pipeline import lineage

    def act() -> None:
        found = lineage.describe(args.model_uri)
        if args.json:
            print(json.dumps(found.__dict__ | {"commands": found.commands()}, indent=2, default=str))
        else:
            print(found.format(), end="")
        if args.verify:
            checks = lineage.verify(found, Path(args.project).resolve(), Path(args.verify))
            print(f"Verify {args.verify} against {found.uri}:")
            print(lineage.format_checks(checks), end="")
            failed = [c.what for c in checks if c.required and not c.ok]
            if failed:
                raise lineage.registry.RegistryError(f"the rebuild differs from {found.uri}: {', '.join(failed)}")
            print("REPRODUCED: same adapter tensors, params and prepared data.")

    try:
        lineage.parse_model_uri(args.model_uri)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _registry_call(act)


def add_registry_commands(sub: Any) -> None:
    """promote, rollback, approve and lineage (docs/registry.md); `models` is declared in main()."""
    name_help = "registered model name (default: registry.model_name)"
    promote = sub.add_parser("promote", help="make a version @champion by hand (an audited override)")
    promote.add_argument("version", help="the registered version number to make @champion (see `sdft models`)")
    promote.add_argument("--reason", required=True, help="why (kept in the audit record)")
    promote.add_argument("--name", help=name_help)
    promote.set_defaults(func=cmd_promote)
    rollback = sub.add_parser("rollback", help="put @previous-champion back behind @champion")
    rollback.add_argument("--reason", help="why (kept in the audit record)")
    rollback.add_argument("--name", help=name_help)
    rollback.set_defaults(func=cmd_rollback)
    approve = sub.add_parser("approve", help="promote the @challenger (registry.approval: manual)")
    approve.add_argument("version", nargs="?", help="default: the version behind @challenger")
    approve.add_argument("--reason", required=True, help="why (kept in the audit record)")
    approve.add_argument("--name", help=name_help)
    approve.set_defaults(func=cmd_approve)
    lineage = sub.add_parser("lineage", help="what a version was made from, and how to rebuild it")
    lineage.add_argument("model_uri", help="models:/<name>/<version> or models:/<name>@<alias>")
    lineage.add_argument("--verify", metavar="ADAPTER_DIR", help="compare a rebuilt adapter (and project) with it")
    lineage.add_argument("--json", action="store_true", help="print the lineage as JSON")
    lineage.set_defaults(func=cmd_lineage)


def cmd_ui(args: argparse.Namespace) -> int:
    print(ui_command(Path(args.project).resolve()))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve

    serve(Path(args.project).resolve(), port=args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdft", description="Fine-tune Stable Diffusion, gated and versioned.")
    parser.add_argument("--project", default=".", help="project folder (holds params.yaml and dvc.yaml)")
    sub = parser.add_subparsers(dest="command", required=True)
    init_help = "install the default base model (models/tiny-sd) and demo data if missing; check params.yaml"
    init = sub.add_parser("init", help=init_help, description=init_help[0].upper() + init_help[1:] + ".")
    init.set_defaults(func=cmd_init)
    run = sub.add_parser("run", help="run the retrain flow once")
    run.add_argument("--dry-run", action="store_true", help="decide and report, register nothing")
    run.add_argument(
        "--trigger",
        choices=["manual", "data", "schedule"],
        default="manual",
        help="why this run starts, recorded in the run and the retrain history. manual (default) and schedule: "
        "always run (DVC still skips stages whose inputs are unchanged); data: finish as skipped when the data "
        "source holds the same content as the last retrain",
    )
    run.set_defaults(func=cmd_run)
    tune = sub.add_parser("tune", help="run or continue the hyperparameter study (docs/tuning.md)")
    tune.add_argument("--apply", action="store_true", help="write the best values into params.yaml (tuned keys only)")
    tune.add_argument(
        "--no-repro", action="store_true", help="use data/prepared as it is (extra workers: one DVC run at a time)"
    )
    tune.set_defaults(func=cmd_tune)
    models = sub.add_parser("models", help="list registered versions")
    models.add_argument("--name", help="registered model name (default: registry.model_name)")
    models.add_argument("--limit", type=int, default=20, help="newest versions shown (default 20)")
    models.set_defaults(func=cmd_models)
    add_registry_commands(sub)
    ui_help = "print the command that opens the MLflow UI on this project's tracking store (make ui runs it)"
    sub.add_parser("ui", help=ui_help, description=ui_help[0].upper() + ui_help[1:] + ".").set_defaults(func=cmd_ui)
    serve = sub.add_parser("serve", help="serve the scheduled retrain (prefect.yaml) until interrupted")
    serve.add_argument("--port", type=int, help="port of the local Prefect server it starts (default 4200 or free)")
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    os.environ.setdefault("SDFT_ROOT", str(Path(args.project).resolve()))
    # One Prefect home for `sdft` and `make` alike (the Makefile exports the same path), so the UI that `make serve`
    # opens shows every run; Prefect's default, ~/.prefect, would split the history in two.
    os.environ.setdefault("PREFECT_HOME", str(Path(args.project).resolve() / ".prefect"))
    env.configure()
    env.exit_on_sigterm()  # e.g. during start-up, before Prefect's flow engine installs its own handler
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not in the interpreter's final flush
        return code
    except BrokenPipeError:
        # `sdft models | head`: the reader left. Quiet exit with the status a tool killed by SIGPIPE gives (128 + 13);
        # stdout goes to /dev/null so nothing else tries to write to the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
