"""Pure numeric helpers for the evaluation stage and the promotion gate.

Arrays in, floats out. Every function accepts Python lists, numpy arrays or torch tensors (any device or dtype,
bfloat16 included) and computes in float64 numpy. Nothing here reads files, params or MLflow.

- `paired_bootstrap`: confidence interval of the mean paired difference (Efron & Tibshirani 1993, ch. 13, the
  percentile interval), used by the gate to ask "is the candidate better on the same prompts, beyond noise?".
- `precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019).
- `density_coverage`: density and coverage (Naeem et al. 2020).
- `precision_recall_per_sample`, `density_coverage_per_sample`: the per-sample terms whose means are those metrics,
  for paired intervals.
- `nearest_neighbours`: cosine nearest neighbour, for memorisation checks (generated image vs. training images).

Boundary convention for the k-NN manifolds: a point at exactly the radius of a ball counts as inside (<=).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Cap on the elements of one (resamples x units) index block in `paired_bootstrap`: 2**22 int64 = 32 MiB.
_BOOTSTRAP_BLOCK_ELEMENTS = 2**22


# --------------------------------------------------------------------------------------------------------------------
# Input conversion and validation
# --------------------------------------------------------------------------------------------------------------------


def _to_float_array(x: Any, name: str) -> np.ndarray:
    """Convert a list, numpy array or torch tensor to a float64 numpy array, or say why it cannot be converted."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor; .double() first because numpy has no bfloat16
        x = x.detach().cpu().double().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be numeric (a list, numpy array or torch tensor of numbers); "
            f"could not convert a {type(x).__name__} to float64: {err}"
        ) from err


def _first_non_finite(a: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN or infinity in `a`, or None when every value is finite."""
    bad = np.argwhere(~np.isfinite(a))
    return None if len(bad) == 0 else tuple(int(i) for i in bad[0])


def _scores(x: Any, name: str) -> np.ndarray:
    """Validate a 1-D vector of per-unit scores."""
    a = _to_float_array(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-unit scores; got shape {a.shape}. Flatten it first.")
    if a.size == 0:
        raise ValueError(f"{name} is empty: pass one score per paired unit (e.g. per prompt).")
    bad = _first_non_finite(a)
    if bad is not None:
        raise ValueError(
            f"{name}[{bad[0]}] is {a[bad]}: scores must be finite. Fix or drop that unit in both inputs before "
            "comparing."
        )
    return a


def _features(x: Any, name: str) -> np.ndarray:
    """Validate an (n_samples, n_features) feature matrix."""
    a = _to_float_array(x, name)
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D (n_samples, n_features) array; got shape {a.shape}. "
            "For scalar features use x.reshape(-1, 1); for a single sample use x.reshape(1, -1)."
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} has shape {a.shape}: it needs at least one sample and one feature.")
    bad = _first_non_finite(a)
    if bad is not None:
        raise ValueError(f"{name}[{bad[0]}, {bad[1]}] is {a[bad]}: features must be finite.")
    return a


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has {a.shape[1]} features per sample but {name_b} has {b.shape[1]}: "
            "extract both with the same feature extractor."
        )


def _check_k(k: int, n: int, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}.")
    if k >= n:
        raise ValueError(
            f"k={k} needs more than k samples in {name} (each point's radius is the distance to its k-th nearest "
            f"*other* point), but {name} has {n}. Use k <= {n - 1} or more samples."
        )


# --------------------------------------------------------------------------------------------------------------------
# Paired bootstrap
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A bootstrap confidence interval of the mean paired difference (candidate - baseline)."""

    mean_diff: float  # observed mean of the per-unit differences (not the bootstrap mean)
    low: float
    high: float
    n: int  # number of paired units
    n_resamples: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies strictly on one side of zero (a 'significant' difference)."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float | int | bool]:
        """Plain-Python dict (JSON- and MLflow-friendly), including `excludes_zero`."""
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap(
    candidate: Any,
    baseline: Any,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of the mean paired difference `candidate - baseline`.

    Efron & Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13 (percentile interval). The units (e.g.
    prompts scored by both models) are resampled with replacement, keeping each pair together, so the between-prompt
    variance cancels out. The interval is the [(1-c)/2, (1+c)/2] quantiles of the `n_resamples` resampled means.

    Args:
        candidate: per-unit scores of the candidate, shape (n,).
        baseline: per-unit scores of the baseline on the same units in the same order, shape (n,).
        n_resamples: bootstrap resamples, at least 100 (1000 is a reasonable default; 10,000 for publication).
        confidence: two-sided confidence level in (0, 1).
        seed: seed of `np.random.default_rng`; the same inputs and seed give the same interval.

    Returns:
        An `Interval`; `interval.excludes_zero` tells whether the difference is significant at that level.

    Raises:
        ValueError: different lengths, fewer than 2 units, non-finite values, n_resamples < 100, or confidence outside
            (0, 1).
    """
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int | np.integer) or n_resamples < 100:
        raise ValueError(
            f"n_resamples must be an integer >= 100 for a usable percentile interval; got {n_resamples!r}."
        )
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1 (e.g. 0.95); got {confidence!r}.")
    cand = _scores(candidate, "candidate")
    base = _scores(baseline, "baseline")
    if cand.shape != base.shape:
        raise ValueError(
            f"candidate has {cand.size} scores but baseline has {base.size}: a paired bootstrap needs one score "
            "from each model for every unit, in the same order."
        )
    n = cand.size
    if n < 2:
        raise ValueError(
            "paired_bootstrap needs at least 2 paired units: with one, every resample is identical and the interval "
            "has zero width, which would make any difference look significant."
        )

    diff = cand - base
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)  # resamples per block, to bound memory at large n
    for start in range(0, n_resamples, block):
        stop = min(start + block, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))  # each row: one resample of the units, with replacement
        means[start:stop] = diff[idx].mean(axis=1)

    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Interval(
        mean_diff=float(diff.mean()),
        low=float(low),
        high=float(high),
        n=int(n),
        n_resamples=int(n_resamples),
        confidence=float(confidence),
    )


# --------------------------------------------------------------------------------------------------------------------
# k-NN manifold metrics
# --------------------------------------------------------------------------------------------------------------------


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances, shape (len(a), len(b)), in float64.

    Uses |a|^2 + |b|^2 - 2 a.b (one matrix product, as sklearn's `euclidean_distances` and the reference
    implementations do), clamped at 0 against rounding. Memory is len(a) * len(b) * 8 bytes: 200 MB at 5000 x 5000.
    Comparisons are done on squared distances, so integer-valued features give exact answers at the boundary.
    """
    sq = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(sq, 0.0)


def _knn_radii_sq(feats: np.ndarray, k: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest *other* row (the point itself is excluded, duplicates are
    not: a duplicate is a neighbour at distance 0)."""
    d = _squared_distances(feats, feats)
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0.0 else 2.0 * p * r / (p + r)


def precision_recall(real: Any, fake: Any, k: int = 3) -> dict[str, float]:
    """Improved precision and recall of generated samples (Kynkäänniemi et al. 2019, "Improved Precision and Recall
    Metric for Assessing Generative Models", NeurIPS).

    The real manifold is the union of balls B(real_i, r_i), with r_i the distance from real_i to its k-th nearest
    other real sample; the fake manifold is built the same way from the fakes. Precision is the fraction of fakes
    inside the real manifold (fidelity); recall is the fraction of reals inside the fake manifold (diversity).
    A point at exactly the radius counts as inside (<=).

    Args:
        real: real features, shape (N, D), e.g. Inception or CLIP embeddings.
        fake: generated features, shape (M, D), from the same extractor.
        k: neighbourhood size; the paper uses 3. Needs k < N and k < M.

    Returns:
        {"precision", "recall", "f1"}, each in [0, 1]; f1 is their harmonic mean (0 when both are 0).
    """
    real_a = _features(real, "real")
    fake_a = _features(fake, "fake")
    _check_same_dim(real_a, fake_a, "real", "fake")
    _check_k(k, len(real_a), "real")
    _check_k(k, len(fake_a), "fake")

    cross = _squared_distances(real_a, fake_a)  # (N, M)
    in_real_manifold = (cross <= _knn_radii_sq(real_a, k)[:, None]).any(axis=0)  # (M,): fake_j in some real ball
    in_fake_manifold = (cross <= _knn_radii_sq(fake_a, k)[None, :]).any(axis=1)  # (N,): real_i in some fake ball
    precision = float(in_real_manifold.mean())
    recall = float(in_fake_manifold.mean())
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall)}


def density_coverage(real: Any, fake: Any, k: int = 3) -> dict[str, float]:
    """Density and coverage of generated samples (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
    Generative Models", ICML).

    With r_i the distance from real_i to its k-th nearest other real sample, N reals and M fakes:
        density  = 1/(k M) * sum_j sum_i 1[fake_j in B(real_i, r_i)]   (unbounded above; about 1 when fake ~ real)
        coverage = 1/N * sum_i 1[exists j: fake_j in B(real_i, r_i)]   (in [0, 1])
    Only real-sample balls are used, which makes both robust to outlying fakes. A point at exactly the radius counts
    as inside (<=).

    Args:
        real: real features, shape (N, D).
        fake: generated features, shape (M, D), from the same extractor.
        k: neighbourhood size; the paper uses 5. Needs k < N.

    Returns:
        {"density", "coverage"}.
    """
    real_a = _features(real, "real")
    fake_a = _features(fake, "fake")
    _check_same_dim(real_a, fake_a, "real", "fake")
    _check_k(k, len(real_a), "real")

    inside = _squared_distances(real_a, fake_a) <= _knn_radii_sq(real_a, k)[:, None]  # (N, M): fake_j in B(real_i)
    density = float(inside.sum() / (k * len(fake_a)))
    coverage = float(inside.any(axis=1).mean())
    return {"density": density, "coverage": coverage}


def precision_recall_per_sample(real: Any, fake: Any, k: int = 3) -> dict[str, np.ndarray]:
    """Per-sample terms of `precision_recall` (Kynkäänniemi et al. 2019): their means are precision and recall.

    Returns:
        {"precision": float array (M,), 1.0 where fake_j lies in the real manifold;
         "recall": float array (N,), 1.0 where real_i lies in the fake manifold}.
        Per generated image and per real image, so two models evaluated on the same prompts, seeds and real images
        can be compared with a paired bootstrap.
    """
    real_a = _features(real, "real")
    fake_a = _features(fake, "fake")
    _check_same_dim(real_a, fake_a, "real", "fake")
    _check_k(k, len(real_a), "real")
    _check_k(k, len(fake_a), "fake")
    cross = _squared_distances(real_a, fake_a)  # (N, M)
    return {
        "precision": (cross <= _knn_radii_sq(real_a, k)[:, None]).any(axis=0).astype(np.float64),
        "recall": (cross <= _knn_radii_sq(fake_a, k)[None, :]).any(axis=1).astype(np.float64),
    }


def density_coverage_per_sample(real: Any, fake: Any, k: int = 5) -> dict[str, np.ndarray]:
    """Per-sample terms of `density_coverage` (Naeem et al. 2020): their means are density and coverage.

    Returns:
        {"density": float array (M,), the number of real balls holding fake_j divided by k;
         "coverage": float array (N,), 1.0 where real_i's ball holds at least one fake}.
    """
    real_a = _features(real, "real")
    fake_a = _features(fake, "fake")
    _check_same_dim(real_a, fake_a, "real", "fake")
    _check_k(k, len(real_a), "real")
    inside = _squared_distances(real_a, fake_a) <= _knn_radii_sq(real_a, k)[:, None]  # (N, M)
    return {"density": inside.sum(axis=0) / k, "coverage": inside.any(axis=1).astype(np.float64)}


# --------------------------------------------------------------------------------------------------------------------
# Memorisation
# --------------------------------------------------------------------------------------------------------------------


def nearest_neighbours(query: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of each query row to its most similar reference row, and that row's index.

    cos(q, r) = q.r / (|q| |r|). Used for memorisation checks: query = features of generated images, reference =
    features of training images; a similarity near 1 flags a likely copy. Ties go to the lowest reference index.

    Args:
        query: shape (Q, D).
        reference: shape (R, D).

    Returns:
        (similarity, index): float64 array of shape (Q,) in [-1, 1] and int64 array of shape (Q,).

    Raises:
        ValueError: non-2-D input, mismatched feature sizes, non-finite values, or an all-zero row (its cosine
            similarity is undefined).
    """
    q = _features(query, "query")
    ref = _features(reference, "reference")
    _check_same_dim(q, ref, "query", "reference")
    q_norm = np.linalg.norm(q, axis=1)
    ref_norm = np.linalg.norm(ref, axis=1)
    for name, norms in (("query", q_norm), ("reference", ref_norm)):
        zero = np.flatnonzero(norms == 0.0)
        if zero.size:
            raise ValueError(
                f"{name} row {int(zero[0])} is all zeros: cosine similarity is undefined for it. Drop that row or "
                "check the feature extractor."
            )
    sim = (q / q_norm[:, None]) @ (ref / ref_norm[:, None]).T  # (Q, R)
    index = sim.argmax(axis=1)
    best = np.clip(sim[np.arange(len(q)), index], -1.0, 1.0)  # clip rounding just past +-1
    return best.astype(np.float64), index.astype(np.int64)
