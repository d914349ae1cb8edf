"""Unit tests of the promotion gate: a table of decisions, then the rules' arithmetic, the policy and the reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.gate import Decision, GateError, GatePolicy, MetricSet, decide

# A typical policy: val_loss must drop by 2% (and significantly), CLIP score may drop by at most 0.01, and FID has an
# absolute ceiling.
POLICY = GatePolicy.model_validate(
    {
        "primary": [
            {"metric": "val_loss", "greater_is_better": False, "min_relative_change": 0.02, "require_significant": True}
        ],
        "guardrails": [{"metric": "clip_score", "greater_is_better": True, "max_absolute_regression": 0.01}],
        "floors": [{"metric": "fid", "max": 100.0}],
        "bootstrap_resamples": 2000,
    }
)

RNG = np.random.default_rng(0)
BASE_LOSS = RNG.uniform(0.2, 0.4, size=40)  # per-image validation loss of the baseline
NOISE = RNG.normal(0.0, 0.05, size=40)  # large, symmetric per-image noise


def metrics(source: str, val_loss_samples: np.ndarray, clip: float = 0.30, fid: float = 50.0) -> MetricSet:
    return MetricSet(
        values={"val_loss": float(val_loss_samples.mean()), "clip_score": clip, "fid": fid},
        samples={"val_loss": val_loss_samples.tolist()},
        source=source,
    )


BASELINE = metrics("champion v3", BASE_LOSS)
CLEARLY_BETTER = BASE_LOSS * 0.9  # 10% lower on every image: significant
SLIGHTLY_BETTER = BASE_LOSS * 0.99  # 1% lower on every image: significant but below the 2% minimum
NOISY_BETTER = BASE_LOSS * 0.95 + NOISE - NOISE.mean()  # 5% lower on average, but with noise: not significant
FLOORS_ONLY = POLICY.model_copy(update={"on_missing_baseline": "floors_only"})


@pytest.mark.parametrize(
    ("candidate", "baseline", "policy", "promote", "failed", "reason_has"),
    [
        (metrics("candidate", CLEARLY_BETTER), None, POLICY, False, {"val_loss", "clip_score"}, "no baseline"),
        (metrics("candidate", CLEARLY_BETTER), None, FLOORS_ONLY, True, set(), "without a baseline"),
        (metrics("candidate", CLEARLY_BETTER, fid=150.0), None, FLOORS_ONLY, False, {"fid"}, "no baseline"),
        (metrics("candidate", CLEARLY_BETTER, fid=150.0), BASELINE, POLICY, False, {"fid"}, "above the maximum"),
        (metrics("candidate", BASE_LOSS * 1.1), BASELINE, POLICY, False, {"val_loss"}, "not better"),
        (metrics("candidate", SLIGHTLY_BETTER), BASELINE, POLICY, False, {"val_loss"}, "below the required 2%"),
        (metrics("candidate", NOISY_BETTER), BASELINE, POLICY, False, {"val_loss"}, "not significant"),
        (metrics("candidate", CLEARLY_BETTER, clip=0.28), BASELINE, POLICY, False, {"clip_score"}, "exceeds"),
        (metrics("candidate", CLEARLY_BETTER, clip=0.295), BASELINE, POLICY, True, set(), "Promoted"),
    ],
    ids=[
        "no-baseline-rejects",
        "no-baseline-floors-only-promotes",
        "no-baseline-floors-only-below-floor",
        "below-floor",
        "worse",
        "better-but-below-min-change",
        "better-but-not-significant",
        "better-but-guardrail-fails",
        "better-on-everything-promotes",
    ],
)
def test_decision_table(candidate, baseline, policy, promote, failed, reason_has):
    decision = decide(candidate, baseline, policy)
    assert decision.promote is promote
    assert {c.metric for c in decision.checks if not c.passed} == failed
    assert reason_has in decision.reason
    assert decision.baseline_source == (baseline.source if baseline else None)


def test_noisy_case_is_better_on_average_but_its_interval_straddles_zero():
    check = decide(metrics("candidate", NOISY_BETTER), BASELINE, POLICY).checks[0]
    assert check.difference < 0  # lower loss on average, by more than the 2% minimum ...
    assert -check.difference / BASELINE.values["val_loss"] > 0.02
    low, high = check.interval
    assert low < 0 < high  # ... but not beyond noise
    assert not check.passed


def test_floors_only_skips_comparisons_and_reject_mode_still_reports_floors():
    first = decide(metrics("candidate", CLEARLY_BETTER), None, FLOORS_ONLY)
    assert [(c.kind, c.metric) for c in first.checks] == [("floor", "fid")]
    rejected = decide(metrics("candidate", CLEARLY_BETTER), None, POLICY)
    assert [(c.kind, c.passed) for c in rejected.checks] == [("primary", False), ("guardrail", False), ("floor", True)]
    assert all(c.baseline is None and c.detail == "no baseline to compare with" for c in rejected.checks[:2])


def test_decide_is_deterministic():
    args = (metrics("candidate", NOISY_BETTER), BASELINE, POLICY)
    assert decide(*args) == decide(*args)


# --------------------------------------------------------------------------------------------------------------------
# Rule arithmetic: directions, absolute and relative thresholds
# --------------------------------------------------------------------------------------------------------------------


def one_primary(**rule) -> GatePolicy:
    return GatePolicy.model_validate({"primary": [{"metric": "m", **rule}]})


def verdict(policy: GatePolicy, candidate: float, baseline: float) -> bool:
    return decide(MetricSet({"m": candidate}), MetricSet({"m": baseline}, source="base"), policy).promote


@pytest.mark.parametrize(
    ("rule", "candidate", "baseline", "promote"),
    [
        ({"greater_is_better": True, "min_absolute_change": 0.0}, 0.31, 0.30, True),
        ({"greater_is_better": True, "min_absolute_change": 0.0}, 0.30, 0.30, False),  # a tie never promotes
        ({"greater_is_better": True, "min_absolute_change": 0.0}, 0.29, 0.30, False),
        ({"greater_is_better": False, "min_absolute_change": 0.0}, 0.29, 0.30, True),
        ({"greater_is_better": False, "min_absolute_change": 0.0}, 0.31, 0.30, False),
        ({"greater_is_better": True, "min_absolute_change": 0.05}, 0.34, 0.30, False),
        ({"greater_is_better": True, "min_absolute_change": 0.05}, 0.36, 0.30, True),
        (
            {"greater_is_better": False, "min_absolute_change": 0.01},
            0.29,
            0.30,
            True,
        ),  # exact boundary despite rounding
        ({"greater_is_better": False, "min_relative_change": 0.1}, 0.27, 0.30, True),  # exactly 10% lower
        ({"greater_is_better": False, "min_relative_change": 0.1}, 0.28, 0.30, False),  # 6.7% lower
        ({"greater_is_better": True, "min_relative_change": 0.1}, 11.0, 10.0, True),
        ({"greater_is_better": True, "min_relative_change": 0.1}, 10.5, 10.0, False),
        ({"greater_is_better": True, "min_relative_change": 0.5}, -0.5, -1.0, True),  # |baseline|: 50% better
        ({"greater_is_better": True, "min_relative_change": 0.5}, 0.1, 0.0, True),  # zero baseline: any gain is +inf
        # Both thresholds set: both must hold. 0.30 -> 0.25 is 0.05 (meets 0.01) and 16.7% (misses 20%).
        ({"greater_is_better": False, "min_absolute_change": 0.01, "min_relative_change": 0.2}, 0.25, 0.30, False),
        ({"greater_is_better": False, "min_absolute_change": 0.1, "min_relative_change": 0.1}, 0.25, 0.30, False),
        ({"greater_is_better": False, "min_absolute_change": 0.01, "min_relative_change": 0.1}, 0.25, 0.30, True),
    ],
)
def test_primary_rule_arithmetic(rule, candidate, baseline, promote):
    assert verdict(one_primary(**rule), candidate, baseline) is promote


@pytest.mark.parametrize(
    ("rule", "candidate", "promote"),
    [
        ({"greater_is_better": True, "max_absolute_regression": 0.02}, 0.49, True),
        ({"greater_is_better": True, "max_absolute_regression": 0.02}, 0.48, True),  # exactly at the limit
        ({"greater_is_better": True, "max_absolute_regression": 0.02}, 0.47, False),
        ({"greater_is_better": False, "max_absolute_regression": 0.02}, 0.52, True),
        ({"greater_is_better": False, "max_absolute_regression": 0.02}, 0.53, False),
        ({"greater_is_better": False, "max_absolute_regression": 0.02}, 0.10, True),  # better is always fine
        ({"greater_is_better": True, "max_relative_regression": 0.1}, 0.45, True),  # 10% worse
        ({"greater_is_better": True, "max_relative_regression": 0.1}, 0.44, False),  # 12% worse
        ({"greater_is_better": False, "max_relative_regression": 0.1}, 0.56, False),
        ({"greater_is_better": False, "max_relative_regression": 0.0}, 0.5000001, False),  # 0 = no regression at all
        ({"greater_is_better": False, "max_relative_regression": 0.0}, 0.5, True),
    ],
)
def test_guardrail_arithmetic(rule, candidate, promote):
    policy = GatePolicy.model_validate(
        {
            "primary": [{"metric": "p", "greater_is_better": True, "min_absolute_change": 0.0}],
            "guardrails": [{"metric": "g", **rule}],
        }
    )
    decision = decide(MetricSet({"p": 1.0, "g": candidate}), MetricSet({"p": 0.0, "g": 0.5}, source="b"), policy)
    assert decision.checks[0].passed  # the primary always passes here
    assert decision.promote is promote


@pytest.mark.parametrize(
    ("bounds", "value", "passed"),
    [({"min": 0.2}, 0.2, True), ({"min": 0.2}, 0.19, False), ({"max": 1.0}, 1.0, True), ({"max": 1.0}, 1.01, False)]
    + [({"min": 0.0, "max": 1.0}, v, ok) for v, ok in [(0.5, True), (-0.1, False), (1.1, False)]],
)
def test_floor_bounds_are_inclusive(bounds, value, passed):
    policy = GatePolicy.model_validate(
        {
            "primary": [{"metric": "p", "greater_is_better": True, "min_absolute_change": 0.0}],
            "floors": [{"metric": "f", **bounds}],
        }
    )
    check = decide(MetricSet({"p": 1.0, "f": value}), MetricSet({"p": 0.0}, source="b"), policy).checks[-1]
    assert (check.kind, check.passed) == ("floor", passed)


def test_significance_direction_follows_greater_is_better():
    base = BASE_LOSS.tolist()
    higher = (BASE_LOSS + 0.05 + NOISE / 5).tolist()  # higher by 0.05 on average, with a little noise
    for greater_is_better, promote, detail in [(True, True, ""), (False, False, "higher than the baseline")]:
        policy = one_primary(greater_is_better=greater_is_better, min_absolute_change=0.0, require_significant=True)
        a = MetricSet({"m": float(np.mean(higher))}, {"m": higher})
        b = MetricSet({"m": float(np.mean(base))}, {"m": base}, source="b")
        check = decide(a, b, policy).checks[0]
        assert check.passed is promote
        assert detail in check.detail
        low, high = check.interval
        assert 0 < low < 0.05 < high  # the interval of candidate - baseline, whichever direction is better


# --------------------------------------------------------------------------------------------------------------------
# Missing and broken inputs
# --------------------------------------------------------------------------------------------------------------------


def test_metric_missing_from_candidate_is_an_error_naming_it_and_the_metrics_present():
    with pytest.raises(GateError, match=r"\['fid'\].*\['clip_score', 'val_loss'\]"):
        decide(MetricSet({"val_loss": 0.1, "clip_score": 0.3}), BASELINE, POLICY)


def test_non_numeric_candidate_metric_is_an_error():
    with pytest.raises(GateError, match="'m'.*not a number"):
        decide(
            MetricSet({"m": "0.3"}), MetricSet({"m": 0.2}), one_primary(greater_is_better=True, min_relative_change=0)
        )


def test_numpy_scalars_are_numbers():
    policy = one_primary(greater_is_better=True, min_absolute_change=0.0)
    assert decide(MetricSet({"m": np.float32(0.5)}), MetricSet({"m": np.float64(0.4)}), policy).promote


def test_metric_missing_from_baseline_fails_that_check():
    old = MetricSet({"val_loss": 1.0, "fid": 50.0}, {"val_loss": BASE_LOSS.tolist()}, source="champion v1")
    decision = decide(metrics("candidate", CLEARLY_BETTER), old, POLICY)
    assert not decision.promote
    (bad,) = decision.failed
    assert (bad.metric, bad.baseline) == ("clip_score", None)
    assert "'champion v1' has no 'clip_score'" in bad.detail


@pytest.mark.parametrize(
    ("cand_samples", "base_samples", "detail"),
    [
        (None, BASE_LOSS.tolist(), "candidate has no per-sample values"),
        (CLEARLY_BETTER.tolist(), None, "champion v3 has no per-sample values"),
        (CLEARLY_BETTER[:10].tolist(), BASE_LOSS.tolist(), "cannot test significance"),
    ],
    ids=["candidate-samples-missing", "baseline-samples-missing", "unpaired-lengths"],
)
def test_significance_without_usable_samples_fails_the_check(cand_samples, base_samples, detail):
    cand = metrics("candidate", CLEARLY_BETTER)
    cand = MetricSet(cand.values, {} if cand_samples is None else {"val_loss": cand_samples}, cand.source)
    base = MetricSet(BASELINE.values, {} if base_samples is None else {"val_loss": base_samples}, BASELINE.source)
    decision = decide(cand, base, POLICY)
    assert not decision.promote
    assert detail in decision.checks[0].detail
    assert decision.checks[0].interval is None


def test_nan_candidate_fails_instead_of_promoting():
    policy = GatePolicy.model_validate(
        {
            "primary": [{"metric": "loss", "greater_is_better": False, "min_absolute_change": 0.0}],
            "floors": [{"metric": "loss", "max": 1.0}],
        }
    )
    decision = decide(MetricSet({"loss": float("nan")}), MetricSet({"loss": 0.5}, source="b"), policy)
    assert not decision.promote
    assert all("not finite" in c.detail for c in decision.checks)


# --------------------------------------------------------------------------------------------------------------------
# The policy (the `gate:` section of params.yaml)
# --------------------------------------------------------------------------------------------------------------------

MINIMAL = {"primary": [{"metric": "m", "greater_is_better": True, "min_absolute_change": 0.0}]}


def test_policy_defaults():
    policy = GatePolicy.model_validate(MINIMAL)
    assert (policy.bootstrap_resamples, policy.confidence, policy.seed) == (1000, 0.95, 0)
    assert policy.on_missing_baseline == "reject"
    assert policy.guardrails == [] and policy.floors == []
    assert policy.primary[0].require_significant is False


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({**MINIMAL, "treshold": 0.1}, "Extra inputs are not permitted"),
        ({"primary": [{**MINIMAL["primary"][0], "min_abs": 0.1}]}, "Extra inputs are not permitted"),
        ({"primary": []}, "at least 1 item"),
        ({"guardrails": []}, "Field required"),
        ({"primary": [{"metric": "m", "greater_is_better": True}]}, "sets neither min_absolute_change"),
        ({"primary": [{"metric": "m", "min_absolute_change": 0.1}]}, "Field required"),
        (
            {"primary": [{"metric": "m", "greater_is_better": True, "min_relative_change": 5}]},
            "less than or equal to 1",
        ),
        ({"primary": [{"metric": "m", "greater_is_better": True, "min_absolute_change": -1}]}, "greater than or equal"),
        ({**MINIMAL, "guardrails": [{"metric": "g", "greater_is_better": True}]}, "sets neither max_absolute"),
        ({**MINIMAL, "floors": [{"metric": "f"}]}, "sets neither min nor max"),
        ({**MINIMAL, "floors": [{"metric": "f", "min": 2, "max": 1}]}, "min 2.0 > max 1.0"),
        ({**MINIMAL, "on_missing_baseline": "promote"}, "'reject' or 'floors_only'"),
        ({**MINIMAL, "on_missing_baseline": "floors_only"}, "no floors are set"),
        ({**MINIMAL, "bootstrap_resamples": 10}, "greater than or equal to 100"),
        ({**MINIMAL, "confidence": 95}, "less than 1"),
    ],
)
def test_policy_rejects_bad_config(raw, message):
    with pytest.raises(ValidationError, match=message):
        GatePolicy.model_validate(raw)


def test_policy_fields_are_documented_for_params_yaml():
    for field in GatePolicy.model_fields.values():
        assert field.description


# --------------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------------


def test_to_dict_is_json_serialisable_and_complete():
    decision = decide(metrics("candidate", CLEARLY_BETTER, clip=0.28), BASELINE, POLICY)
    data = json.loads(json.dumps(decision.to_dict(), allow_nan=False))
    assert data["promote"] is False
    assert data["baseline_source"] == "champion v3"
    assert [c["metric"] for c in data["checks"]] == ["val_loss", "clip_score", "fid"]
    assert [c["passed"] for c in data["checks"]] == [True, False, True]
    low, high = data["checks"][0]["interval"]
    assert low < high < 0
    assert data["checks"][1]["difference"] == pytest.approx(-0.02)


def test_to_dict_replaces_non_finite_values_with_null():
    decision = decide(
        MetricSet({"m": float("inf")}),
        MetricSet({"m": 0.0}),
        one_primary(greater_is_better=True, min_absolute_change=0.0),
    )
    json.dumps(decision.to_dict(), allow_nan=False)
    assert decision.to_dict()["checks"][0]["candidate"] is None


def test_to_markdown_has_the_decision_and_one_row_per_check():
    decision = decide(metrics("candidate", CLEARLY_BETTER, clip=0.28), BASELINE, POLICY)
    md = decision.to_markdown()
    assert md.startswith("**Gate: REJECT**")
    assert "| metric | kind | candidate | baseline | Δ | 95% CI | threshold | result |" in md
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in md.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert rows["val_loss"].endswith("| PASS |") and "≥ 2% lower than baseline" in rows["val_loss"]
    assert rows["clip_score"].endswith("| FAIL |") and "≤ 0.01 worse than baseline" in rows["clip_score"]
    assert rows["fid"].endswith("| PASS |") and "≤ 100" in rows["fid"]
    assert "guardrail clip_score failed (worse by 0.02" in md.splitlines()[0]  # the reason, in words, once
    assert "Failed:" not in md

    promoted = decide(metrics("candidate", CLEARLY_BETTER), BASELINE, POLICY).to_markdown()
    assert promoted.startswith("**Gate: PROMOTE**") and "FAIL" not in promoted


def test_decision_is_frozen():
    decision = decide(metrics("candidate", CLEARLY_BETTER), BASELINE, POLICY)
    assert isinstance(decision, Decision)
    with pytest.raises(AttributeError):
        decision.promote = False  # type: ignore[misc]


KID_GUARD = {"metric": "kid", "greater_is_better": False, "max_absolute_regression": 0.0, "require_significant": True}


@pytest.mark.parametrize(
    ("candidate_samples", "promote", "words"),
    [
        # Worse than the tolerance, and consistently so: the interval excludes 0 on the bad side.
        ([0.30 + 0.001 * i for i in range(20)], False, "exceeds the allowed"),
        # Worse on average by the same amount, but the per-sample differences straddle 0: noise, not a regression.
        ([0.10 + (0.6 if i % 2 else -0.2) for i in range(20)], True, "within noise"),
    ],
)
def test_a_guardrail_with_require_significant_ignores_noise(candidate_samples, promote, words):
    policy = GatePolicy.model_validate(
        {
            "primary": [{"metric": "p", "greater_is_better": True, "min_absolute_change": 0.0}],
            "guardrails": [
                {
                    "metric": "kid",
                    "greater_is_better": False,
                    "max_absolute_regression": 0.0,
                    "require_significant": True,
                }
            ],
            "bootstrap_resamples": 500,
        }
    )
    base_samples = [0.1] * 20
    candidate = MetricSet(
        {"p": 1.0, "kid": float(np.mean(candidate_samples))}, {"kid": candidate_samples}, source="candidate"
    )
    baseline = MetricSet({"p": 0.0, "kid": 0.1}, {"kid": base_samples}, source="base")
    decision = decide(candidate, baseline, policy)
    (guard,) = [c for c in decision.checks if c.kind == "guardrail"]
    assert guard.interval is not None and words in guard.detail
    assert decision.promote is promote


def test_a_significant_guardrail_without_samples_fails_and_says_why():
    policy = GatePolicy.model_validate(
        {
            "primary": [{"metric": "p", "greater_is_better": True, "min_absolute_change": 0.0}],
            "guardrails": [
                {
                    "metric": "kid",
                    "greater_is_better": False,
                    "max_absolute_regression": 0.0,
                    "require_significant": True,
                }
            ],
        }
    )
    decision = decide(MetricSet({"p": 1.0, "kid": 0.2}), MetricSet({"p": 0.0, "kid": 0.1}, source="b"), policy)
    assert not decision.promote
    assert "no per-sample values for 'kid'" in decision.checks[1].detail
