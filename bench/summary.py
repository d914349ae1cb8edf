"""One Markdown table of every training benchmark result in a folder (the JSON files bench/train_bench.py writes).

    python bench/summary.py bench/results

Speed-ups are against the recipe, and a stage run's loss curve against the un-optimised (`stage-plain`, fp32) one, of
the same model, method, resolution, batch size and steps: from the same file, or else from another one (a compiled
run is compared with the recipe and the fp32 curve of the eager run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SAME_RUN = ("arch", "method", "resolution", "batch_size", "steps", "warmup")


def load(folder: Path) -> dict[str, dict[str, Any]]:
    reports = {}
    for path in sorted(folder.glob("*.json")):
        report = json.loads(path.read_text())
        if "results" in report and "config" in report:  # a train_bench.py result (not gpu_checks.json)
            reports[path.stem] = report
    return reports


def same_settings(reports: dict[str, dict[str, Any]], name: str, variant: str) -> dict[str, Any] | None:
    """`variant`'s result for the settings of report `name`: from that report, else from another with equal settings."""
    config = reports[name]["config"]
    for other in [name, *reports]:
        same = all(reports[other]["config"].get(k, "lora") == config.get(k, "lora") for k in SAME_RUN)
        if same and variant in reports[other]["results"]:
            return reports[other]["results"][variant]
    return None


def curve_gap(losses: list[float], plain: list[float]) -> str:
    """Largest difference from the fp32 curve, absolute and relative to the fp32 loss."""
    pairs = list(zip(losses, plain, strict=False))
    worst = max(pairs, key=lambda p: abs(p[0] - p[1]))
    return f"{abs(worst[0] - worst[1]):.1e} ({abs(worst[0] - worst[1]) / abs(worst[1]):.1%})"


def table(reports: dict[str, dict[str, Any]]) -> str:
    head = "| benchmark | variant | img/s | step s | peak GiB | vs recipe | MFU | first step s | loss vs fp32 |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, report in reports.items():
        plain, recipe = same_settings(reports, name, "stage-plain"), same_settings(reports, name, "recipe")
        for variant, r in report["results"].items():
            ratio = f"{r['images_per_s'] / recipe['images_per_s']:.2f}x" if recipe else "n/a"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            first = f"{r['first_step_seconds']:.1f}" if r.get("first_step_seconds") is not None else "n/a"
            compare = plain and r.get("losses") and variant != "stage-plain"
            gap = curve_gap(r["losses"], plain["losses"]) if compare else ""
            lines.append(
                f"| {name} | {variant} | {r['images_per_s']:.1f} | {r['step_seconds']:.4f} | "
                f"{r['peak_memory_mb'] / 1024:.1f} | {ratio} | {mfu} | {first} | {gap} |"
            )
    machines = sorted({r["machine"].get("gpu", r["machine"]["platform"]) for r in reports.values()})
    return "\n".join(lines) + f"\n\nMachine: {', '.join(machines)}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    reports = load(args.folder)
    print(table(reports) if reports else f"no benchmark results in {args.folder}")
    checks = args.folder / "gpu_checks.json"
    if checks.is_file():
        results = json.loads(checks.read_text())["results"]
        failed = [r["check"] for r in results if not r["ok"]]
        outcome = f"; failed: {', '.join(failed)}" if failed else "."
        print(f"\nChecks: {len(results) - len(failed)} of {len(results)} passed{outcome}")


if __name__ == "__main__":
    main()
