"""The evaluation's metric functions (pipeline.metrics) and the per-sample statistics they rest on: fast, no SD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import metrics, stats
from pipeline.features import TinyImageFeatures, extract


def _blobs(n: int, centre: float, seed: int, dim: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(centre, 1.0, size=(n, dim))


def test_per_sample_terms_average_to_the_published_metrics() -> None:
    real, fake = _blobs(30, 0.0, 1), _blobs(25, 0.7, 2)
    pr = stats.precision_recall_per_sample(real, fake, k=3)
    dc = stats.density_coverage_per_sample(real, fake, k=5)
    assert pr["precision"].shape == (25,) and pr["recall"].shape == (30,)
    assert dc["density"].shape == (25,) and dc["coverage"].shape == (30,)
    aggregate = stats.precision_recall(real, fake, k=3)
    assert aggregate["precision"] == pytest.approx(pr["precision"].mean())
    assert aggregate["recall"] == pytest.approx(pr["recall"].mean())
    assert stats.density_coverage(real, fake, k=5) == pytest.approx(
        {"density": dc["density"].mean(), "coverage": dc["coverage"].mean()}
    )
    # 0 < precision < 1 here, so the per-sample values carry information a paired test can use.
    assert 0 < pr["precision"].mean() < 1


def test_kid_is_seeded_and_the_same_for_the_same_features() -> None:
    real, fake = torch.randn(20, 8, dtype=torch.float64), torch.randn(15, 8, dtype=torch.float64) + 0.5
    assert metrics.kid(real, fake, seed=3) == metrics.kid(real, fake, seed=3)
    assert metrics.kid(real, fake, seed=3)[0] > metrics.kid(real, real[:15], seed=3)[0]


def test_memorised_copies_score_one_and_mifid_penalises_them() -> None:
    extractor = TinyImageFeatures(seed=0)
    gen = torch.Generator().manual_seed(0)
    train = extract(extractor, torch.randint(0, 256, (12, 3, 32, 32), generator=gen, dtype=torch.uint8))
    novel = extract(extractor, torch.randint(0, 256, (6, 3, 32, 32), generator=gen, dtype=torch.uint8))
    copies = train[:6].clone()
    similarity, index = metrics.memorisation(copies, train)
    assert similarity == pytest.approx(np.ones(6)) and index.tolist() == list(range(6))
    assert (metrics.memorisation(novel, train)[0] < 1 - 1e-6).all()
    # MiFID divides FID by the memorisation distance when it is below 0.1: copies inflate it far beyond FID.
    assert metrics.mifid(train, copies) > 100 * metrics.fid(train, copies)


def test_label_of_needs_exactly_one_vocabulary_word() -> None:
    vocab = ["circle", "square", "triangle"]
    assert metrics.label_of("a red Circle on a white background", vocab) == "circle"
    assert metrics.label_of("a red circles on white", vocab) is None  # whole words only
    assert metrics.label_of("a circle and a square", vocab) is None  # ambiguous
    assert metrics.label_of("a dog", vocab) is None


def test_zero_shot_labels_and_classification_report_hand_computed() -> None:
    vocab = ["circle", "square"]
    label_emb = torch.eye(2)
    image_emb = torch.tensor([[1.0, 0.1], [0.2, 1.0], [0.9, 0.0], [1.0, 0.3]])
    predicted = metrics.zero_shot_labels(image_emb, label_emb, vocab)
    assert predicted == ["circle", "square", "circle", "circle"]
    report = metrics.classification_report(["circle", "square", "square", "circle"], predicted, vocab)
    # circle: 3 predicted, 2 right of 2 true; square: 1 predicted, 1 right of 2 true.
    assert report["accuracy"] == 0.75
    assert report["precision_circle"] == pytest.approx(2 / 3) and report["recall_circle"] == 1.0
    assert report["precision_square"] == 1.0 and report["recall_square"] == 0.5
    assert report["f1_square"] == pytest.approx(2 / 3)


def test_small_n_fid_is_untrusted_and_refused_as_a_gate_metric() -> None:
    untrusted = metrics.untrusted_metrics(n_real=50, n_train=5000, n_generated=4000, fid_min_n=2048)
    assert list(untrusted) == ["fid"] and untrusted["fid"].startswith("untrusted_small_n")
    assert metrics.untrusted_metrics(3000, 3000, 3000, 2048) == {}
    problems = metrics.gate_metric_problems(["val_loss", "fid", "recall"], untrusted, {"recall": "k too large"})
    assert len(problems) == 2
    assert "'fid'" in problems[0] and "must not decide a promotion" in problems[0]
    assert "'recall'" in problems[1] and "k too large" in problems[1]
    assert metrics.gate_metric_problems(["val_loss", "kid"], untrusted, {}) == []


def test_kid_per_image_averages_to_the_unbiased_kid_of_the_whole_sets() -> None:
    torch.manual_seed(0)
    real, fake = torch.randn(30, 16), torch.randn(20, 16) + 0.3
    per_image = metrics.kid_per_image(real, fake)
    assert len(per_image) == 20
    # The unbiased MMD^2 with KID's kernel, written out once here.
    x, y, d = fake.double(), real.double(), 16
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    n, m = len(x), len(y)
    mmd = (k(x, x).sum() - k(x, x).trace()) / (n * (n - 1)) + (k(y, y).sum() - k(y, y).trace()) / (m * (m - 1))
    mmd -= 2 * k(x, y).mean()
    assert np.mean(per_image) == pytest.approx(float(mmd), rel=1e-9)
    # Close to torchmetrics' subset estimate, and larger for a set further from the real one.
    assert np.mean(per_image) == pytest.approx(metrics.kid(real, fake, seed=0)[0], rel=0.2)
    assert np.mean(metrics.kid_per_image(real, fake + 1.0)) > np.mean(per_image)
