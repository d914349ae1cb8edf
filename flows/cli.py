"""`sdft`: the command line. It sits on top (flows -> pipeline), so it can start flows and read the registry.

sdft init          build the tiny default base model (models/tiny-sd) if it is missing
sdft run           run the retrain flow once: DVC stages, gate, registration
sdft models        registered versions with their aliases and key metrics
sdft ui            print the command that opens the MLflow UI on this project's store
sdft serve         serve the scheduled retrain of prefect.yaml (starts a local Prefect server if none is set)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import env


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.config import ParamsError, load_params
    from pipeline.demo_data import make_demo_dataset
    from pipeline.tiny import build_tiny_sd

    root = Path(args.project).resolve()
    model = root / "models" / "tiny-sd"
    if model.is_dir():
        print(f"base model: {model} (exists)")
    else:
        build_tiny_sd(model)
        print(f"base model: built {model} (tiny, random weights: for checking the pipeline, not for drawing)")
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
    return f"mlflow ui --backend-store-uri {env.tracking_uri(root)} --host 127.0.0.1 --port 5000"


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import ParamsError, load_params

    root = Path(args.project).resolve()
    try:
        load_params(root / "params.yaml")  # fail in a second, before a Prefect server or any stage starts
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.retrain import retrain

    try:
        result = retrain(project=str(root), dry_run=args.dry_run, trigger=args.trigger)
    except Exception as exc:  # the flow has logged the traceback; the registry was not touched
        print(f"error: the retrain failed, nothing was promoted: {exc}", file=sys.stderr)
        return 1
    if result.skipped:
        print(f"SKIPPED: {result.reason}")
        return 0
    print()
    print(result.gate_report)
    if result.promoted:
        print(f"PROMOTED: registered as version {result.version}, now @champion.")
    elif args.dry_run:
        print("DRY RUN: nothing was registered.")
    else:
        print(f"REJECTED: {result.reason}")
    print(f"MLflow run: {result.run_id}")
    if not os.environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
        print(f"Open it with: {ui_command(root)}  then http://127.0.0.1:5000")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from pipeline.config import load_params
    from pipeline.registry import version_summary

    root = Path(args.project).resolve()
    name = args.name or load_params(root / "params.yaml", paths=False).registry.model_name
    rows = version_summary(name)
    if not rows:
        print(f"{name}: no versions yet")
    print(f"{'version':>7}  {'aliases':<28} {'promotion':<10} val_loss  run")
    for row in rows:
        val = row["metrics"].get("eval.val_loss")
        print(
            f"{row['version']:>7}  {','.join(row['aliases']):<28} {row['promotion']:<10} "
            f"{'' if val is None else f'{val:.5f}':<9} {row['run_id']}"
        )
    return 0


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
    sub.add_parser("init", help="build the tiny default base model").set_defaults(func=cmd_init)
    run = sub.add_parser("run", help="run the retrain flow once")
    run.add_argument("--dry-run", action="store_true", help="decide and report, register nothing")
    run.add_argument(
        "--trigger", choices=["manual", "data", "schedule"], default="manual", help="data: skip if data is unchanged"
    )
    run.set_defaults(func=cmd_run)
    models = sub.add_parser("models", help="list registered versions")
    models.add_argument("--name", help="registered model name (default: registry.model_name)")
    models.set_defaults(func=cmd_models)
    sub.add_parser("ui", help="print the MLflow UI command").set_defaults(func=cmd_ui)
    serve = sub.add_parser("serve", help="serve the scheduled retrain (prefect.yaml) until interrupted")
    serve.add_argument("--port", type=int, help="port of the local Prefect server it starts (default 4200 or free)")
    serve.set_defaults(func=cmd_serve)
    args = parser.parse_args(argv)
    os.environ.setdefault("SDFT_ROOT", str(Path(args.project).resolve()))
    env.configure()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
