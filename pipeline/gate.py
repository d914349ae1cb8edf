"""The promotion gate: a pure decision, `decide(candidate, baseline, policy) -> Decision`.

No I/O, no MLflow server, no files: metrics in, a `Decision` out. Moving the registry alias is a separate, small side
effect that reads `Decision.promote`.

A candidate is promoted only when every check passes:

- **primary** rules: the candidate must beat the baseline, by at least a minimum absolute and/or relative change, and
  optionally beyond noise (a paired bootstrap confidence interval of candidate - baseline that excludes zero).
- **guardrails**: the candidate may be worse than the baseline by at most a tolerance.
- **floors**: absolute bounds on the candidate's own values, with or without a baseline.

Semantics, exactly (g = greater_is_better, c = candidate value, b = baseline value):

    improvement  = c - b if g else b - c           (> 0 means the candidate is better)
    regression   = -improvement                     (> 0 means the candidate is worse)
    relative(x)  = x / |b|                          (the magnitude, as MLflow's MetricThreshold, so a negative
                                                     baseline keeps the direction; b == 0 gives +-inf for x != 0
                                                     and 0 for x == 0)

    primary passes    iff improvement > 0                         (always: a tie never promotes)
                      and improvement >= min_absolute_change        (when set)
                      and relative(improvement) >= min_relative_change (when set)
                      and the CI excludes 0 on the good side        (when require_significant: low > 0 if g, else
                                                                     high < 0)
    guardrail passes  iff regression <= max_absolute_regression     (when set)
                      and relative(regression) <= max_relative_regression (when set)
                      or, with require_significant, the CI includes 0 (a regression within noise does not block)
    floor passes      iff min <= c <= max                           (each bound when set; inclusive)

`>=` and `<=` against a threshold accept values within 1e-9 (relative) of it, so that binary rounding cannot fail an
exact boundary (0.30 -> 0.29 is an improvement of 0.00999999999999995, which meets a 0.01 threshold). `improvement > 0`
is exact. A NaN or infinite value fails every check that reads it.

Errors versus rejections: a metric named by a rule but absent from the candidate is a bug in the evaluation, so
`decide` raises `GateError`; a metric absent from the baseline (e.g. an old champion evaluated before the metric
existed) fails that check, with a detail saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.stats import paired_bootstrap

# Tolerance for ">= threshold" / "<= threshold": float subtraction must not fail an exact boundary (see module doc).
_REL_TOL = 1e-9
_ABS_TOL = 1e-12


class GateError(ValueError):
    """The gate cannot decide because its inputs are wrong (not because the candidate is bad)."""


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSet:
    """The evaluation of one model.

    Attributes:
        values: aggregate metrics, name -> value (e.g. {"val_loss": 0.123, "clip_score": 0.31}).
        samples: per-sample values, name -> list, for metrics that can be tested for significance (e.g. the
            validation loss of each held-out image). The candidate's and the baseline's lists must be in the same
            order (sample i of one is paired with sample i of the other).
        source: what was evaluated, for humans: "candidate", "champion v3", "base model (untuned)".
    """

    values: dict[str, float]
    samples: dict[str, list[float]] = field(default_factory=dict)
    source: str = "candidate"


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str = Field(min_length=1, description="Metric name, as written by the evaluate stage.")


class PrimaryRule(_Rule):
    """A metric the candidate must improve on the baseline."""

    greater_is_better: bool = Field(description="true for scores (CLIP score), false for losses and distances (FID).")
    min_absolute_change: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="Required improvement over the baseline, in the metric's units. 0.0 = any strict improvement.",
    )
    min_relative_change: Annotated[float, Field(ge=0, le=1)] | None = Field(
        None,
        description="Required improvement as a fraction of |baseline| (0.01 = 1%). 0.0 = any strict improvement.",
    )
    require_significant: bool = Field(
        False,
        description="Also require the paired bootstrap confidence interval of candidate - baseline (over the "
        "per-sample values) to exclude zero on the good side.",
    )

    @model_validator(mode="after")
    def _has_threshold(self) -> PrimaryRule:
        if self.min_absolute_change is None and self.min_relative_change is None:
            raise ValueError(
                f"primary rule for '{self.metric}' sets neither min_absolute_change nor min_relative_change; set at "
                "least one (0.0 means 'any strict improvement')"
            )
        return self


class GuardrailRule(_Rule):
    """A metric the candidate may not make much worse than the baseline."""

    greater_is_better: bool = Field(description="true for scores (CLIP score), false for losses and distances (FID).")
    max_absolute_regression: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Largest allowed regression versus the baseline, in the metric's units. 0.0 = no regression."
    )
    max_relative_regression: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Largest allowed regression as a fraction of |baseline| (0.05 = 5%). 0.0 = no regression."
    )
    require_significant: bool = Field(
        False,
        description="Fail only on a regression beyond noise: past the tolerance AND with the paired bootstrap "
        "confidence interval of candidate - baseline excluding zero on the bad side (for metrics noisy at small N, "
        "such as KID).",
    )

    @model_validator(mode="after")
    def _has_threshold(self) -> GuardrailRule:
        if self.max_absolute_regression is None and self.max_relative_regression is None:
            raise ValueError(
                f"guardrail for '{self.metric}' sets neither max_absolute_regression nor max_relative_regression; "
                "set at least one (0.0 means 'no regression at all')"
            )
        return self


class FloorRule(_Rule):
    """Absolute bounds on the candidate's value, checked with or without a baseline."""

    min: float | None = Field(None, description="The candidate's value must be >= min (inclusive).")
    max: float | None = Field(None, description="The candidate's value must be <= max (inclusive).")

    @model_validator(mode="after")
    def _has_bound(self) -> FloorRule:
        if self.min is None and self.max is None:
            raise ValueError(f"floor for '{self.metric}' sets neither min nor max; set at least one")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"floor for '{self.metric}' has min {self.min} > max {self.max}; no value can pass")
        return self


class GatePolicy(BaseModel):
    """When a candidate replaces the baseline: the `gate:` section of params.yaml. Every check must pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary: list[PrimaryRule] = Field(
        min_length=1, description="Metrics the candidate must improve (all of them). At least one."
    )
    guardrails: list[GuardrailRule] = Field(
        default_factory=list, description="Metrics the candidate may not make much worse."
    )
    floors: list[FloorRule] = Field(default_factory=list, description="Absolute bounds on the candidate's values.")
    bootstrap_resamples: Annotated[int, Field(ge=100)] = Field(
        1000, description="Paired bootstrap resamples for require_significant."
    )
    confidence: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.95, description="Two-sided confidence level of the bootstrap interval."
    )
    seed: int = Field(0, description="Seed of the bootstrap; the same inputs and seed give the same decision.")
    on_missing_baseline: Literal["reject", "floors_only"] = Field(
        "reject",
        description="With no baseline (first run): 'reject', or 'floors_only' to promote when every floor passes.",
    )

    @model_validator(mode="after")
    def _floors_for_first_run(self) -> GatePolicy:
        if self.on_missing_baseline == "floors_only" and not self.floors:
            raise ValueError(
                "on_missing_baseline is 'floors_only' but no floors are set, so any first model would be promoted; "
                "add a floor (e.g. a maximum val_loss) or use 'reject'"
            )
        return self


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One rule applied to one metric.

    `difference` is candidate - baseline (raw, not direction-adjusted); `interval` is the bootstrap confidence
    interval of the mean per-sample candidate - baseline, when significance was tested.
    """

    kind: Literal["primary", "guardrail", "floor"]
    metric: str
    candidate: float
    baseline: float | None
    difference: float | None
    interval: tuple[float, float] | None
    threshold: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict; non-finite floats become None (the detail says what they were)."""
        return {
            "kind": self.kind,
            "metric": self.metric,
            "candidate": _json_float(self.candidate),
            "baseline": _json_float(self.baseline),
            "difference": _json_float(self.difference),
            "interval": None if self.interval is None else [_json_float(x) for x in self.interval],
            "threshold": self.threshold,
            "passed": self.passed,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Decision:
    """The gate's verdict: `promote`, one sentence of `reason`, and every check that led to it."""

    promote: bool
    reason: str
    baseline_source: str | None
    checks: list[Check]
    candidate_source: str = "candidate"
    confidence: float = 0.95

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (e.g. for `gate.json` or `mlflow.log_dict`)."""
        return {
            "promote": self.promote,
            "reason": self.reason,
            "candidate_source": self.candidate_source,
            "baseline_source": self.baseline_source,
            "confidence": self.confidence,
            "checks": [c.to_dict() for c in self.checks],
        }

    def to_markdown(self) -> str:
        """A short report: the decision line, a table of checks, then the details of failed checks."""
        verdict = "PROMOTE" if self.promote else "REJECT"
        versus = self.baseline_source if self.baseline_source is not None else "no baseline"
        ci = f"{self.confidence * 100:g}% CI"
        lines = [f"**Gate: {verdict}** ({self.candidate_source} vs {versus}). {self.reason}"]
        if not self.checks:  # e.g. the candidate is the champion itself: nothing was compared
            return lines[0] + "\n"
        lines += [
            "",
            f"| metric | kind | candidate | baseline | Δ | {ci} | threshold | result |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in self.checks:
            interval = "" if c.interval is None else f"[{_fmt(c.interval[0], signed=True)}, "
            interval += "" if c.interval is None else f"{_fmt(c.interval[1], signed=True)}]"
            cells = [
                c.metric,
                c.kind,
                _fmt(c.candidate),
                "" if c.baseline is None else _fmt(c.baseline),
                "" if c.difference is None else _fmt(c.difference, signed=True),
                interval,
                c.threshold,
                "PASS" if c.passed else "FAIL",
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        return "\n".join(lines) + "\n"  # the failures are in the reason, in words: not repeated here


# --------------------------------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------------------------------


def decide(candidate: MetricSet, baseline: MetricSet | None, policy: GatePolicy) -> Decision:
    """Decide whether `candidate` replaces `baseline` under `policy`. Pure: same inputs, same `Decision`.

    Args:
        candidate: the fine-tuned model's evaluation.
        baseline: the current champion's (or the untuned base model's) evaluation on the same held-out set, or None
            when there is nothing to compare with (first run): then `policy.on_missing_baseline` decides ('reject', or
            'floors_only': primary and guardrail rules are skipped and left out of `checks`).
        policy: the rules; see the module docstring for their exact semantics.

    Returns:
        A `Decision`; `promote` is True only when there is at least one check and all of them pass.

    Raises:
        GateError: a metric named by the policy is missing from the candidate, or is not a number.
    """
    # MLflow's validate_evaluation_results is not used: it needs EvaluationResult objects, raises one exception
    # instead of returning per-check results, has no significance test or regression tolerance, and its
    # MetricThreshold rejects min_absolute_change=0. The arithmetic below mirrors MetricThreshold's (see module doc).
    metrics = [r.metric for r in (*policy.primary, *policy.guardrails, *policy.floors)]
    missing = sorted({m for m in metrics if m not in candidate.values})
    if missing:
        raise GateError(
            f"the policy checks {missing} but the evaluation of {candidate.source!r} has no such metric (it has "
            f"{sorted(candidate.values)}). Fix the metric name under `gate:` in params.yaml, or make the evaluate "
            "stage compute it."
        )
    for m in metrics:
        _number(candidate, m)

    floors = [_floor(r, candidate, baseline) for r in policy.floors]
    if baseline is None and policy.on_missing_baseline == "floors_only":
        bad = [c for c in floors if not c.passed]
        if bad:
            reason = f"Rejected: there is no baseline, and {_describe_failures(bad, len(floors))}."
        else:
            reason = (
                f"Promoted without a baseline (on_missing_baseline: floors_only): all {len(floors)} floors pass; "
                "primary rules and guardrails were skipped."
            )
        return Decision(not bad, reason, None, floors, candidate.source, policy.confidence)

    primaries = [_primary(r, candidate, baseline, policy) for r in policy.primary]
    guardrails = [_guardrail(r, candidate, baseline, policy) for r in policy.guardrails]
    checks = primaries + guardrails + floors
    if baseline is None:
        reason = (
            "Rejected: there is no baseline to compare with and gate.on_missing_baseline is 'reject'; register a "
            "baseline (e.g. evaluate the untuned base model) or set on_missing_baseline: floors_only to promote a "
            "first model on its floors alone."
        )
        return Decision(False, reason, None, checks, candidate.source, policy.confidence)

    bad = [c for c in checks if not c.passed]
    if bad:
        reason = f"Rejected against {baseline.source}: {_describe_failures(bad, len(checks))}."
    else:
        gains = ", ".join(f"{c.metric} ({_fmt(c.difference, signed=True)})" for c in primaries)
        reason = f"Promoted: improves {gains} over {baseline.source}, and all {len(checks)} checks pass."
    return Decision(not bad, reason, baseline.source, checks, candidate.source, policy.confidence)


def _primary(rule: PrimaryRule, cand: MetricSet, base: MetricSet | None, policy: GatePolicy) -> Check:
    c = _number(cand, rule.metric)
    better = "higher" if rule.greater_is_better else "lower"
    parts = []
    if rule.min_absolute_change is not None:
        parts.append(f"≥ {_fmt(rule.min_absolute_change)} {better}" if rule.min_absolute_change else better)
    if rule.min_relative_change is not None:
        parts.append(f"≥ {_pct(rule.min_relative_change)} {better}" if rule.min_relative_change else better)
    threshold = " and ".join(dict.fromkeys(parts)) + " than baseline"
    if rule.require_significant:
        threshold += f", {policy.confidence * 100:g}% CI excludes 0"

    b, problem = _baseline_value(rule.metric, c, base)
    if problem:
        return Check("primary", rule.metric, c, b, None, None, threshold, False, problem)
    assert b is not None
    diff = c - b
    improvement = diff if rule.greater_is_better else -diff
    relative = _relative(improvement, b)
    interval, significance = None, None
    if rule.require_significant:
        interval, significance = _significance(rule, cand, base, policy)
    # One sentence in words; a candidate that is not better needs no word on thresholds or significance.
    if diff == 0:
        detail, failures = f"equal to the baseline ({_fmt(b)}): not better", ["not better"]
    elif not improvement > 0:
        worse = "lower" if rule.greater_is_better else "higher"
        detail = f"{worse} than the baseline by {_fmt(abs(diff))} ({_pct(abs(relative))}): not better"
        failures = ["not better"]
    else:
        failures = []
        if rule.min_absolute_change and not _at_least(improvement, rule.min_absolute_change):
            failures.append(f"{_fmt(improvement)} is below the required {_fmt(rule.min_absolute_change)}")
        if rule.min_relative_change and not _at_least(relative, rule.min_relative_change):
            failures.append(f"{_pct(relative)} is below the required {_pct(rule.min_relative_change)}")
        if significance:
            failures.append(significance)
        detail = f"{better} by {_fmt(improvement)} ({_pct(relative)})"
        if interval is not None:
            detail += f", {policy.confidence * 100:g}% CI of the per-sample difference "
            detail += f"[{_fmt(interval[0], signed=True)}, {_fmt(interval[1], signed=True)}]"
        detail += "".join(f"; {f}" for f in failures)
    return Check("primary", rule.metric, c, b, diff, interval, threshold, not failures, detail)


def _interval(
    rule: PrimaryRule | GuardrailRule, cand: MetricSet, base: MetricSet, policy: GatePolicy
) -> tuple[tuple[float, float] | None, str | None]:
    """The paired bootstrap interval of candidate - baseline, or why there is none."""
    absent = [ms.source for ms in (cand, base) if rule.metric not in ms.samples]
    if absent:
        return None, (
            f"require_significant is set but {' and '.join(absent)} has no per-sample values for '{rule.metric}'; "
            "the evaluate stage must record them for both models"
        )
    try:
        iv = paired_bootstrap(
            cand.samples[rule.metric],
            base.samples[rule.metric],
            n_resamples=policy.bootstrap_resamples,
            confidence=policy.confidence,
            seed=policy.seed,
        )
    except (TypeError, ValueError) as err:  # unpaired, too few or non-finite samples
        return None, f"cannot test significance: {err}"
    return (iv.low, iv.high), None


def _significance(
    rule: PrimaryRule, cand: MetricSet, base: MetricSet, policy: GatePolicy
) -> tuple[tuple[float, float] | None, str | None]:
    """The bootstrap interval of candidate - baseline, and why it does not show a significant improvement (or None)."""
    interval, problem = _interval(rule, cand, base, policy)
    if interval is None:
        return None, problem
    significant = interval[0] > 0 if rule.greater_is_better else interval[1] < 0
    if not significant:
        n = len(cand.samples[rule.metric])
        return interval, f"not significant: the interval over {n} samples does not exclude 0 on the good side"
    return interval, None


def _guardrail(rule: GuardrailRule, cand: MetricSet, base: MetricSet | None, policy: GatePolicy) -> Check:
    c = _number(cand, rule.metric)
    limits = []
    if rule.max_absolute_regression is not None:
        limits.append(f"≤ {_fmt(rule.max_absolute_regression)}")
    if rule.max_relative_regression is not None:
        limits.append(f"≤ {_pct(rule.max_relative_regression)}")
    no_regression = all(v in (None, 0) for v in (rule.max_absolute_regression, rule.max_relative_regression))
    threshold = "not worse than baseline" if no_regression else " and ".join(limits) + " worse than baseline"

    b, problem = _baseline_value(rule.metric, c, base)
    if problem:
        return Check("guardrail", rule.metric, c, b, None, None, threshold, False, problem)
    assert b is not None
    diff = c - b
    regression = -diff if rule.greater_is_better else diff
    relative = _relative(regression, b)
    failures = []
    if rule.max_absolute_regression is not None and not _at_most(regression, rule.max_absolute_regression):
        failures.append(f"regression {_fmt(regression)} exceeds the allowed {_fmt(rule.max_absolute_regression)}")
    if rule.max_relative_regression is not None and not _at_most(relative, rule.max_relative_regression):
        failures.append(f"regression {_pct(relative)} exceeds the allowed {_pct(rule.max_relative_regression)}")
    summary = f"worse by {_fmt(regression)} ({_pct(relative)})" if regression > 0 else "not worse than the baseline"
    interval = None
    if rule.require_significant:
        threshold += f" (fails only if the {policy.confidence * 100:g}% CI excludes 0)"
        interval, problem = _interval(rule, cand, base, policy)
        if problem:
            failures.append(problem)
        elif failures and interval is not None:
            worse = interval[0] > 0 if not rule.greater_is_better else interval[1] < 0
            if not worse:  # past the tolerance, but within noise: not a regression the gate acts on
                summary += f" (within noise: {policy.confidence * 100:g}% CI [{_fmt(interval[0], signed=True)}, "
                summary += f"{_fmt(interval[1], signed=True)}] includes 0)"
                failures = []
    detail = summary + ("; " + "; ".join(failures) if failures else "")
    return Check("guardrail", rule.metric, c, b, diff, interval, threshold, not failures, detail)


def _floor(rule: FloorRule, cand: MetricSet, base: MetricSet | None) -> Check:
    c = _number(cand, rule.metric)
    if rule.min is not None and rule.max is not None:
        threshold = f"in [{_fmt(rule.min)}, {_fmt(rule.max)}]"
    else:
        threshold = f"≥ {_fmt(rule.min)}" if rule.min is not None else f"≤ {_fmt(rule.max)}"
    b = None
    if base is not None and rule.metric in base.values:
        b = _number(base, rule.metric)
    diff = None if b is None else c - b
    if not math.isfinite(c):
        return Check("floor", rule.metric, c, b, diff, None, threshold, False, f"candidate value {c} is not finite")
    failures = []
    if rule.min is not None and not c >= rule.min:
        failures.append(f"{_fmt(c)} is below the minimum {_fmt(rule.min)}")
    if rule.max is not None and not c <= rule.max:
        failures.append(f"{_fmt(c)} is above the maximum {_fmt(rule.max)}")
    detail = "; ".join(failures) if failures else f"{_fmt(c)} is {threshold}"
    return Check("floor", rule.metric, c, b, diff, None, threshold, not failures, detail)


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def _number(ms: MetricSet, metric: str) -> float:
    value = ms.values[metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:  # numpy and torch scalars
            return float(value.item())  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError):
            raise GateError(
                f"metric '{metric}' of {ms.source!r} is {value!r} ({type(value).__name__}), not a number; the "
                "evaluate stage must write plain numbers"
            ) from None
    return float(value)


def _baseline_value(metric: str, c: float, base: MetricSet | None) -> tuple[float | None, str | None]:
    """The baseline's value of `metric`, and why the comparison cannot be made (or None)."""
    if base is None:
        return None, "no baseline to compare with"
    if metric not in base.values:
        return None, (
            f"{base.source!r} has no '{metric}' (it has {sorted(base.values)}); re-evaluate the baseline with the "
            "current evaluate stage"
        )
    b = _number(base, metric)
    if not math.isfinite(c):
        return b, f"candidate value {c} is not finite"
    if not math.isfinite(b):
        return b, f"baseline value {b} is not finite; re-evaluate the baseline"
    return b, None


def _relative(change: float, baseline: float) -> float:
    """`change` as a fraction of |baseline|; +-inf when the baseline is 0 and the change is not (see module doc)."""
    if baseline == 0:
        return 0.0 if change == 0 else math.copysign(math.inf, change)
    return change / abs(baseline)


def _at_least(value: float, threshold: float) -> bool:
    return value >= threshold or math.isclose(value, threshold, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)


def _at_most(value: float, threshold: float) -> bool:
    return value <= threshold or math.isclose(value, threshold, rel_tol=_REL_TOL, abs_tol=_ABS_TOL)


def _describe_failures(bad: list[Check], total: int) -> str:
    if len(bad) == 1 and total == 1:
        return f"{bad[0].metric} is {bad[0].detail}"
    listed = "; ".join(f"{c.kind} {c.metric} failed ({c.detail})" for c in bad)
    return f"{len(bad)} of {total} checks failed: {listed}"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def _json_float(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
