"""The evaluation's metrics, one small function each, with the paper or library each one follows.

Pure: tensors and arrays in, numbers out; no params, no files. `pipeline.evaluate` decides what to feed them.
Image-set metrics take features already extracted once per image set (`pipeline.features.extract`), so FID, KID,
MiFID, precision/recall, density/coverage and memorisation all see the same numbers and nothing is extracted twice.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import torch

from pipeline import stats
from pipeline.features import Precomputed, module_device

# --------------------------------------------------------------------------------------------------------------------
# Text-image agreement (CLIP)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_embeddings(clip: Any, processor: Any, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (N, P) of uint8 images (N, 3, H, W), preprocessed as torchmetrics does."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = [image.cpu() for image in images[start : start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        out.append(clip.get_image_features(pixel_values=pixels.to(module_device(clip))).float().cpu())
    emb = torch.cat(out)
    return emb / emb.norm(dim=-1, keepdim=True)


@torch.no_grad()
def text_embeddings(clip: Any, processor: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (N, P); text longer than CLIP's 77 tokens is truncated."""
    out, device = [], module_device(clip)
    for start in range(0, len(texts), batch_size):
        tokens = processor(
            text=texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=77
        )
        ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        out.append(clip.get_text_features(input_ids=ids, attention_mask=mask).cpu())
    emb = torch.cat(out).float()
    return emb / emb.norm(dim=-1, keepdim=True)


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> np.ndarray:
    """CLIPScore per image: max(100 * cos(E_I, E_C), 0) (Hessel et al. 2021, "CLIPScore", EMNLP; w = 100 as in
    torchmetrics' `CLIPScore`, which gives the same value image by image)."""
    return (100.0 * (image_emb * text_emb).sum(dim=-1)).clamp(min=0.0).double().numpy()


def label_of(prompt: str, vocabulary: list[str]) -> str | None:
    """The one vocabulary word the prompt contains (whole words, case-insensitive); None for zero or several."""
    found = [w for w in vocabulary if re.search(rf"\b{re.escape(w.lower())}\b", prompt.lower())]
    return found[0] if len(found) == 1 else None


def label_key(label: str) -> str:
    """A vocabulary word as it appears in metric names: `adherence_precision_<key>`."""
    return re.sub(r"\W+", "_", label.lower()).strip("_")


def zero_shot_labels(image_emb: torch.Tensor, label_emb: torch.Tensor, vocabulary: list[str]) -> list[str]:
    """Zero-shot classification: the label whose prompt embedding is most similar to each image (Radford et al.
    2021, "Learning Transferable Visual Models From Natural Language Supervision", section 3.1.4)."""
    return [vocabulary[i] for i in (image_emb @ label_emb.T).argmax(dim=1).tolist()]


def classification_report(true: list[str], predicted: list[str], vocabulary: list[str]) -> dict[str, float]:
    """Accuracy and per-class precision, recall and F1 (a class never predicted has precision 0)."""
    out = {"accuracy": float(np.mean([t == p for t, p in zip(true, predicted, strict=True)]))}
    for label in vocabulary:
        tp = sum(t == label and p == label for t, p in zip(true, predicted, strict=True))
        n_pred, n_true = predicted.count(label), true.count(label)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        key = label_key(label)
        out |= {f"precision_{key}": precision, f"recall_{key}": recall, f"f1_{key}": f1}
    return out


# --------------------------------------------------------------------------------------------------------------------
# Distribution distances (torchmetrics on precomputed features)
# --------------------------------------------------------------------------------------------------------------------


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the features (Heusel et al. 2017, "GANs Trained by a Two
    Time-Scale Update Rule Converge to a Local Nash Equilibrium"), torchmetrics' `FrechetInceptionDistance`.

    Strongly biased upward at small N (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score"):
    compare FIDs only at the same N, and do not gate on it below `evaluate.fid_min_n`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int, subsets: int = 100) -> tuple[float, float]:
    """Kernel Inception Distance, mean and std over random subsets (Bińkowski et al. 2018, "Demystifying MMD
    GANs", ICLR), torchmetrics' `KernelInceptionDistance`: unbiased, so usable at small N.

    Subsets of min(N_real, N_fake, 1000) (the paper's 1000, capped by the sets); the subsets are drawn with a fixed
    seed so two models get the same draws and a rerun gives the same number.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features": features, not images, so they are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=Precomputed(real.shape[1]), subsets=subsets, subset_size=min(len(real), len(fake), 1000)
        )
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kid_per_image(real: torch.Tensor, fake: torch.Tensor) -> list[float]:
    """Each generated image's share of the unbiased KID over the whole sets: their mean is that KID.

    KID's kernel is k(x, y) = (x . y / d + 1) ** 3, and its unbiased MMD^2 with n generated images x and m real images
    y is  mean_{i != j} k(x_i, x_j) + mean_{a != b} k(y_a, y_b) - 2 mean_{i, a} k(x_i, y_a).  Grouping the terms by
    generated image gives  c_i = mean_{j != i} k(x_i, x_j) - 2 mean_a k(x_i, y_a) + mean_{a != b} k(y_a, y_b),  with
    mean_i c_i = MMD^2. Two models sampled from the same prompts and seeds give paired lists, so the gate's paired
    bootstrap can ask whether a KID difference is beyond noise (an approximation: each c_i also depends on the other
    generated images).
    """
    x, y = fake.double(), real.double()
    n, m, d = len(x), len(y), x.shape[1]
    if n < 2 or m < 2:
        raise ValueError(f"KID needs at least 2 generated and 2 real images (got {n} and {m})")
    k_xx = (x @ x.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    real_term = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    own = (k_xx.sum(dim=1) - k_xx.diagonal()) / (n - 1)
    return (own - 2 * k_xy.mean(dim=1) + real_term).tolist()


def mifid(train: torch.Tensor, fake: torch.Tensor) -> float:
    """Memorisation-informed FID: FID divided by a memorisation distance when generated and training features are
    closer than 0.1 in cosine distance (Bai et al. 2021, "On Training Sample Memorization: Lessons from
    Benchmarking Generative Modeling with a Large-scale Competition", KDD), torchmetrics'
    `MemorizationInformedFrechetInceptionDistance`. The reference set here is the training set."""
    from torchmetrics.image.mifid import MemorizationInformedFrechetInceptionDistance

    metric = MemorizationInformedFrechetInceptionDistance(feature=Precomputed(train.shape[1]))
    metric.update(train, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


# --------------------------------------------------------------------------------------------------------------------
# Fidelity, diversity, memorisation (pipeline.stats on the same features)
# --------------------------------------------------------------------------------------------------------------------


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Improved precision per generated image and recall per real image (Kynkäänniemi et al. 2019, "Improved
    Precision and Recall Metric for Assessing Generative Models", NeurIPS; the paper's k is 3)."""
    return stats.precision_recall_per_sample(real, fake, k)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """Density per generated image and coverage per real image (Naeem et al. 2020, "Reliable Fidelity and
    Diversity Metrics for Generative Models", ICML; the paper's k is 5)."""
    return stats.density_coverage_per_sample(real, fake, k)


def memorisation(fake: torch.Tensor, train: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per generated image, the cosine similarity to its nearest training image and that image's index: a value
    near 1 flags a likely copy (Somepalli et al. 2023, "Diffusion Art or Digital Forgery?", CVPR, who use
    self-supervised features such as DINO for it)."""
    return stats.nearest_neighbours(fake, train)


# --------------------------------------------------------------------------------------------------------------------
# Which numbers a gate may use
# --------------------------------------------------------------------------------------------------------------------

SMALL_N_METRICS = ("fid", "mifid")  # biased at small N; KID is not


def untrusted_metrics(n_real: int, n_train: int, n_generated: int, fid_min_n: int) -> dict[str, str]:
    """{metric: reason} for FID-type metrics computed on fewer than `fid_min_n` images on either side.

    2048 is the default because Inception's 2048-d covariance is singular below 2048 images, and FID's bias grows as
    1/N (Chong & Forsyth 2020); the numbers are still reported, for trends at a fixed N.
    """
    out = {}
    for metric, n_ref in (("fid", n_real), ("mifid", n_train)):
        n = min(n_ref, n_generated)
        if n < fid_min_n:
            out[metric] = (
                f"untrusted_small_n: computed on {n_ref} reference and {n_generated} generated images, fewer than "
                f"evaluate.fid_min_n={fid_min_n}"
            )
    return out


def gate_metric_problems(gate_metrics: list[str], untrusted: dict[str, str], skipped: dict[str, str]) -> list[str]:
    """Sentences for every gate rule that names a metric a gate must not use (small-N FID) or that is not computed."""
    problems = []
    for metric in gate_metrics:
        if metric in untrusted:
            problems.append(
                f"gate rule on '{metric}': it is flagged {untrusted[metric]}; it must not decide a promotion. Gate on "
                "a paired metric (val_loss, clip_score) or on kid, or raise the number of evaluation images."
            )
        elif metric in skipped:
            problems.append(f"gate rule on '{metric}': this evaluation does not compute it ({skipped[metric]}).")
    return problems
