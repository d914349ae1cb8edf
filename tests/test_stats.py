"""Unit tests of pipeline.stats against cases small enough to compute by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from pipeline.stats import Interval, density_coverage, nearest_neighbours, paired_bootstrap, precision_recall

# Four real points on a line; with k=1 every radius is 1, so the real manifold is [-1, 4].
LINE = [[0.0], [1.0], [2.0], [3.0]]
# Unit square corners: with k=1 or k=2 every radius is 1; with k=3 it is sqrt(2) (the opposite corner).
SQUARE = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


# --------------------------------------------------------------------------------------------------------------------
# paired_bootstrap
# --------------------------------------------------------------------------------------------------------------------


def test_bootstrap_identical_inputs_give_zero_interval():
    scores = [0.3, 0.1, 0.7, 0.2, 0.9]
    iv = paired_bootstrap(scores, scores)
    assert (iv.mean_diff, iv.low, iv.high) == (0.0, 0.0, 0.0)
    assert iv.low <= 0.0 <= iv.high
    assert not iv.excludes_zero


def test_bootstrap_constant_shift_excludes_zero_with_mean_one():
    base = np.array([0.3, 0.1, 0.7, 0.2, 0.9, 0.4])
    iv = paired_bootstrap(base + 1.0, base)
    assert iv.mean_diff == pytest.approx(1.0)
    assert iv.low == pytest.approx(1.0) and iv.high == pytest.approx(1.0)
    assert iv.excludes_zero


def test_bootstrap_worse_candidate_excludes_zero_below():
    base = np.array([0.5, 0.6, 0.7, 0.8])
    iv = paired_bootstrap(base - 0.25, base)
    assert iv.high < 0.0 and iv.excludes_zero


def test_bootstrap_two_units_hand_computed():
    # diff = [0, 1]: a resample mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the 2.5% and 97.5%
    # quantiles are 0 and 1.
    iv = paired_bootstrap([0.0, 1.0], [0.0, 0.0], n_resamples=2000)
    assert iv.mean_diff == 0.5
    assert (iv.low, iv.high) == (0.0, 1.0)
    assert not iv.excludes_zero


def test_bootstrap_same_seed_same_interval_other_seed_differs():
    rng = np.random.default_rng(1)
    cand, base = rng.normal(size=50), rng.normal(size=50)
    assert paired_bootstrap(cand, base, seed=7) == paired_bootstrap(cand, base, seed=7)
    assert paired_bootstrap(cand, base, seed=7) != paired_bootstrap(cand, base, seed=8)


def test_bootstrap_noisy_case_contains_known_mean_and_matches_normal_theory():
    rng = np.random.default_rng(0)
    base = rng.uniform(size=400)
    cand = base + 0.5 + rng.normal(scale=1.0, size=400)  # true mean difference 0.5
    iv = paired_bootstrap(cand, base, n_resamples=4000, confidence=0.95, seed=3)
    diff = cand - base
    assert iv.mean_diff == pytest.approx(diff.mean())
    assert iv.low < 0.5 < iv.high
    assert iv.low < iv.mean_diff < iv.high
    # The percentile interval of a mean is close to mean +- 1.96 * sd / sqrt(n) at n = 400.
    se = diff.std() / math.sqrt(len(diff))
    assert iv.high - iv.low == pytest.approx(2 * 1.959964 * se, rel=0.1)
    assert iv.excludes_zero


def test_bootstrap_wider_at_higher_confidence():
    rng = np.random.default_rng(2)
    cand, base = rng.normal(size=100), rng.normal(size=100)
    narrow = paired_bootstrap(cand, base, confidence=0.8)
    wide = paired_bootstrap(cand, base, confidence=0.99)
    assert wide.low < narrow.low and wide.high > narrow.high


def test_bootstrap_accepts_torch_and_lists_and_large_n():
    base = torch.linspace(0, 1, 5000, dtype=torch.bfloat16)
    iv = paired_bootstrap(base + 1, base.tolist(), n_resamples=1000)  # 5000 x 1000 draws: several memory blocks
    assert iv.n == 5000 and iv.excludes_zero


def test_interval_to_dict_and_frozen():
    iv = paired_bootstrap([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], n_resamples=100, confidence=0.9)
    assert iv.to_dict() == {
        "mean_diff": 1.0,
        "low": 1.0,
        "high": 1.0,
        "n": 3,
        "n_resamples": 100,
        "confidence": 0.9,
        "excludes_zero": True,
    }
    assert isinstance(iv, Interval)
    with pytest.raises(dataclasses.FrozenInstanceError):
        iv.low = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("candidate", "baseline", "kwargs", "match"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], {}, r"candidate has 3 scores but baseline has 2"),
        ([], [], {}, r"candidate is empty"),
        ([1.0], [0.0], {}, r"at least 2 paired units"),
        ([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], {}, r"candidate\[1\] is nan"),
        ([1.0, 2.0, 3.0], [1.0, 2.0, float("inf")], {}, r"baseline\[2\] is inf"),
        ([1.0, 2.0], [1.0, 2.0], {"n_resamples": 99}, r"n_resamples must be an integer >= 100"),
        ([1.0, 2.0], [1.0, 2.0], {"confidence": 1.0}, r"confidence must be strictly between 0 and 1"),
        ([[1.0, 2.0]], [[1.0, 2.0]], {}, r"1-D sequence"),
    ],
)
def test_bootstrap_rejects_bad_input(candidate, baseline, kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(candidate, baseline, **kwargs)


def test_bootstrap_rejects_non_numeric():
    with pytest.raises(TypeError, match="must be numeric"):
        paired_bootstrap(["a", "b"], [1.0, 2.0])


# --------------------------------------------------------------------------------------------------------------------
# precision_recall
# --------------------------------------------------------------------------------------------------------------------


def test_precision_recall_identical_sets_are_one():
    assert precision_recall(LINE, LINE, k=1) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert precision_recall(SQUARE, SQUARE, k=3) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_precision_recall_disjoint_far_sets_are_zero():
    far = [[100.0], [101.0], [102.0]]
    assert precision_recall(LINE, far, k=1) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_precision_recall_differ_hand_computed():
    # Real manifold (k=1, radius 1 everywhere) is [-1, 4]: 0.5 inside, 4 on the boundary (inside), 4.5 and 10 out,
    # so precision = 2/4. Fake radii (k=1): 0.5 -> 3.5 (to 4), 4 -> 0.5, 4.5 -> 0.5, 10 -> 5.5; the ball around 0.5
    # is [-3, 4] and holds every real, so recall = 1. f1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    fake = [[0.5], [4.0], [4.5], [10.0]]
    out = precision_recall(LINE, fake, k=1)
    assert out["precision"] == 0.5
    assert out["recall"] == 1.0
    assert out["f1"] == pytest.approx(2 / 3)


def test_precision_recall_mode_collapse_hits_recall_not_precision():
    # Fakes collapsed onto one real point: all are real-looking (precision 1); their own radii are 0 (duplicates),
    # so the fake manifold is the single point [1] and covers 1 of 4 reals (recall 1/4).
    out = precision_recall(LINE, [[1.0], [1.0], [1.0]], k=1)
    assert out == {"precision": 1.0, "recall": 0.25, "f1": pytest.approx(2 * 0.25 / 1.25)}


def test_precision_radius_depends_on_k_2d():
    # (2, 0) is at distance 1 from corner (1, 0): inside for k=1 (radius 1, on the boundary).
    # (2, 2) is at distance sqrt(2) from (1, 1): outside for k=1 or 2 (radius 1), inside for k=3 (radius sqrt(2)).
    fake = [[0.5, 0.5], [2.0, 0.0], [2.0, 2.0], [5.0, 5.0]]
    assert precision_recall(SQUARE, fake, k=1)["precision"] == 0.5
    assert precision_recall(SQUARE, fake, k=2)["precision"] == 0.5
    assert precision_recall(SQUARE, fake, k=3)["precision"] == 0.75


def test_precision_recall_accepts_torch_and_numpy():
    real = torch.tensor(LINE)
    fake = np.array([[0.5], [4.0], [4.5], [10.0]], dtype=np.float32)
    assert precision_recall(real, fake, k=1)["precision"] == 0.5


@pytest.mark.parametrize(
    ("real", "fake", "k", "match"),
    [
        (LINE, LINE, 4, r"k=4 needs more than k samples in real .* has 4"),
        (LINE, [[0.0], [1.0]], 2, r"k=2 needs more than k samples in fake"),
        (LINE, LINE, 0, r"k must be a positive integer"),
        (LINE, LINE, 1.5, r"k must be a positive integer"),
        (LINE, SQUARE, 1, r"real has 1 features per sample but fake has 2"),
        ([0.0, 1.0, 2.0], LINE, 1, r"2-D \(n_samples, n_features\).*reshape\(-1, 1\)"),
        (LINE, [[0.0], [float("nan")]], 1, r"fake\[1, 0\] is nan"),
        (np.zeros((0, 2)), SQUARE, 1, r"at least one sample"),
    ],
)
def test_precision_recall_rejects_bad_input(real, fake, k, match):
    with pytest.raises(ValueError, match=match):
        precision_recall(real, fake, k=k)


# --------------------------------------------------------------------------------------------------------------------
# density_coverage
# --------------------------------------------------------------------------------------------------------------------


def test_density_coverage_hand_computed_k1():
    # Real balls (k=1, radius 1): [-1,1], [0,2], [1,3], [2,4]. 0.5 is in the first two, 1.5 in the middle two,
    # 10 in none: density = 4 / (1 * 3); covered reals: 0, 1, 2 (3 has no fake in [2, 4]): coverage = 3/4.
    out = density_coverage(LINE, [[0.5], [1.5], [10.0]], k=1)
    assert out["density"] == pytest.approx(4 / 3)
    assert out["coverage"] == 0.75


def test_density_coverage_hand_computed_k2():
    # k=2 radii: 0 -> 2, 1 -> 1, 2 -> 1, 3 -> 2; balls [-2,2], [0,2], [1,3], [1,5].
    # 0.5 is in 2 balls, 1.5 in all 4, 10 in none: density = 6 / (2 * 3) = 1; every ball holds a fake: coverage 1.
    out = density_coverage(LINE, [[0.5], [1.5], [10.0]], k=2)
    assert out == {"density": pytest.approx(1.0), "coverage": 1.0}


def test_density_exceeds_one_when_fakes_crowd_a_real_point():
    # Each fake at 1 lies in the balls of 0, 1 and 2 (the ball of 1 on its centre, the others on their boundary):
    # density = 3 * 3 / (1 * 3) = 3; the ball of 3, [2, 4], is empty: coverage 3/4.
    out = density_coverage(LINE, [[1.0], [1.0], [1.0]], k=1)
    assert out == {"density": pytest.approx(3.0), "coverage": 0.75}


def test_density_coverage_disjoint_far_sets_are_zero():
    assert density_coverage(SQUARE, [[9.0, 9.0], [10.0, 10.0]], k=2) == {"density": 0.0, "coverage": 0.0}


def test_density_coverage_identical_sets_full_coverage():
    out = density_coverage(SQUARE, SQUARE, k=1)
    # Each corner lies in its own ball and its two adjacent corners' balls (distance 1 = radius): 4 * 3 / (1 * 4).
    assert out == {"density": pytest.approx(3.0), "coverage": 1.0}


def test_density_coverage_needs_k_below_real_count_only():
    # One fake is fine (coverage needs no fake radii), but k must be below the number of reals.
    assert density_coverage(LINE, [[0.0]], k=3)["coverage"] > 0.0
    with pytest.raises(ValueError, match=r"k=4 needs more than k samples in real"):
        density_coverage(LINE, [[0.0]], k=4)


# --------------------------------------------------------------------------------------------------------------------
# nearest_neighbours
# --------------------------------------------------------------------------------------------------------------------


def test_nearest_neighbours_hand_computed():
    reference = [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]
    query = [[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, -1.0]]
    sim, idx = nearest_neighbours(query, reference)
    # Scale does not matter; (1, 1) ties between references 0 and 1 at cos 45 deg (lowest index wins);
    # (-1, -1) is 135 deg from references 0 and 1 and 45 deg from reference 2.
    np.testing.assert_allclose(sim, [1.0, 1.0, 1 / math.sqrt(2), 1 / math.sqrt(2)])
    np.testing.assert_array_equal(idx, [1, 0, 0, 2])
    assert sim.dtype == np.float64 and idx.dtype == np.int64 and sim.shape == idx.shape == (4,)


def test_nearest_neighbours_exact_copy_scores_one_and_torch_input():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20, 8))
    generated = torch.tensor(np.stack([train[13] * 2.0, -train[4]]))
    sim, idx = nearest_neighbours(generated, train)
    assert idx[0] == 13 and sim[0] == pytest.approx(1.0)
    assert sim[1] < 1.0 and sim[1] >= -1.0


@pytest.mark.parametrize(
    ("query", "reference", "match"),
    [
        ([[0.0, 0.0]], [[1.0, 0.0]], r"query row 0 is all zeros"),
        ([[1.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]], r"reference row 1 is all zeros"),
        ([[1.0, 0.0]], [[1.0, 0.0, 0.0]], r"query has 2 features per sample but reference has 3"),
        ([1.0, 0.0], [[1.0, 0.0]], r"reshape\(1, -1\)"),
    ],
)
def test_nearest_neighbours_rejects_bad_input(query, reference, match):
    with pytest.raises(ValueError, match=match):
        nearest_neighbours(query, reference)
