"""Sample quality without Inception weights: distances in the penultimate features of a small
classifier trained here on the same images.

* Fréchet distance (FD, the formula of FID) and kernel distance (KID: the unbiased MMD² with the
  cubic polynomial kernel ``(x·y/d + 1)³``, averaged over random subsets, as in Bińkowski et al.
  and torchmetrics) between generated and real features; both in float64;
* class fidelity: the classifier's accuracy on class-conditional samples (did the model draw the
  class it was asked for?);
* the entropy of the classifier's average prediction (diversity over classes, ``log C`` at most);
* the real-vs-real floor: the same distances between two disjoint sets of real test images of
  the sample size, what a perfect generator would score (FD is biased upward at finite N).

The feature classifier is a :class:`~distil.models.classifier.SmallCNN` on ``[0, 1]`` images; its
weights are an input (a folder with ``classifier.safetensors`` + ``classifier.json``), trained
by the ``diffusion_train`` recipe's ``classifier`` phase (cross-entropy on the same images).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distil.errors import DistilError
from distil.models.classifier import SmallCNN

__all__ = [
    "FeatureClassifierInfo",
    "SampleQuality",
    "build_feature_classifier",
    "class_fidelity",
    "classifier_features",
    "evaluate_samples",
    "frechet_distance",
    "kernel_distance",
    "load_feature_classifier",
    "marginal_class_entropy",
    "real_floor",
    "save_feature_classifier",
]

logger = logging.getLogger(__name__)

CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_INFO = "classifier.json"


@dataclass(frozen=True)
class FeatureClassifierInfo:
    """What ``classifier.json`` records about the metric's classifier."""

    channels: tuple[int, ...]
    in_channels: int
    num_classes: int
    image_size: int
    dataset: str
    test_accuracy: float
    epochs: int
    seed: int


def build_feature_classifier(info: FeatureClassifierInfo, *, seed: int = 0) -> SmallCNN:
    """The classifier architecture (a stage per width, max-pool after each), freshly
    initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(info.in_channels, info.num_classes, channels=info.channels, pool_every=1)


def classifier_features(model: SmallCNN, images01: Tensor, batch_size: int = 1000) -> Tensor:
    """Penultimate features (global-average-pooled last stage), ``(N, C_last)`` float64.

    Args:
        model: the feature classifier (put in eval mode here).
        images01: ``(N, C, H, W)`` in [0, 1].
    """
    model.eval()
    chunks = []
    with torch.no_grad():
        for begin in range(0, len(images01), batch_size):
            x = images01[begin : begin + batch_size].float()
            chunks.append(model.pool(model.stages(x)).flatten(1).to(torch.float64))
    return torch.cat(chunks)


def _predict(model: SmallCNN, images01: Tensor, batch_size: int = 1000) -> Tensor:
    """``(N, num_classes)`` class probabilities."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [
                model(images01[b : b + batch_size].float()).softmax(-1)
                for b in range(0, len(images01), batch_size)
            ]
        )


def save_feature_classifier(folder: Path, model: SmallCNN, info: FeatureClassifierInfo) -> Path:
    """Write ``classifier.safetensors`` and ``classifier.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        str(folder / CLASSIFIER_WEIGHTS),
    )
    (folder / CLASSIFIER_INFO).write_text(json.dumps(asdict(info), indent=1))
    return folder


def load_feature_classifier(folder: Path) -> tuple[SmallCNN, FeatureClassifierInfo]:
    """Read a classifier folder written by :func:`save_feature_classifier`."""
    from safetensors.torch import load_file

    if not (folder / CLASSIFIER_INFO).is_file():
        raise DistilError(
            f"{folder}: no {CLASSIFIER_INFO}; train the metric's classifier first "
            "(the classifier phase of `distil run diffusion_train` writes one in classifier/final)"
        )
    raw: dict[str, Any] = json.loads((folder / CLASSIFIER_INFO).read_text())
    info = FeatureClassifierInfo(**{**raw, "channels": tuple(raw["channels"])})
    model = build_feature_classifier(info)
    model.load_state_dict(load_file(str(folder / CLASSIFIER_WEIGHTS)))
    model.eval()
    return model, info


def _mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    x = features.to(torch.float64)
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    ``‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2·(Σ_a^{1/2} Σ_b Σ_a^{1/2})^{1/2})``, in float64.

    The trace of the cross term is computed from the eigenvalues of the symmetric matrix
    ``Σ_a^{1/2} Σ_b Σ_a^{1/2}`` (same trace as ``(Σ_a Σ_b)^{1/2}``, no complex square root).

    Args:
        features_a: ``(N, D)``.
        features_b: ``(M, D)``.
    """
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise DistilError("the Fréchet distance needs at least 2 images on each side")
    mu_a, cov_a = _mean_cov(features_a)
    mu_b, cov_b = _mean_cov(features_b)
    root_a = _psd_sqrt(cov_a)
    cross = root_a @ cov_b @ root_a
    trace_cross = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0.0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * trace_cross
    return float(value.clamp_min(0.0))


def _polynomial_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD² with ``k(a, b) = (a·b/d + 1)³`` (diagonals excluded)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    sum_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sum_xx + sum_yy - 2.0 * kxy.mean()


def kernel_distance(
    features_a: Tensor,
    features_b: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel (inception) distance: the unbiased polynomial-kernel MMD² over ``subsets`` random
    subsets of ``subset_size`` rows from each side (without replacement), float64.

    Args:
        features_a: ``(N, D)``.
        features_b: ``(M, D)``.
        subsets: number of subset pairs.
        subset_size: rows per subset (capped at the smaller side).
        seed: subset draws.

    Returns:
        ``(mean, std)`` over the subsets.
    """
    size = min(subset_size, features_a.shape[0], features_b.shape[0])
    if size < 2:
        raise DistilError("the kernel distance needs at least 2 images on each side")
    generator = torch.Generator().manual_seed(seed)
    a, b = features_a.to(torch.float64), features_b.to(torch.float64)
    values = torch.stack(
        [
            _polynomial_mmd2(
                a[torch.randperm(a.shape[0], generator=generator)[:size]],
                b[torch.randperm(b.shape[0], generator=generator)[:size]],
            )
            for _ in range(subsets)
        ]
    )
    return float(values.mean()), float(values.std(unbiased=False))


def class_fidelity(model: SmallCNN, images01: Tensor, labels: Tensor) -> float:
    """Fraction of images the classifier assigns to the class in ``labels``."""
    return float((_predict(model, images01).argmax(-1) == labels).double().mean())


def marginal_class_entropy(model: SmallCNN, images01: Tensor) -> float:
    """Entropy (nats) of the classifier's mean predicted distribution: ``log C`` when the
    samples cover the classes evenly, 0 when they are all one class."""
    mean = _predict(model, images01).to(torch.float64).mean(0)
    return float(-(mean * mean.clamp_min(1e-12).log()).sum())


@dataclass(frozen=True)
class SampleQuality:
    """Distances and fidelity of one sample set (see the module docstring)."""

    num_images: int
    frechet_distance: float
    kernel_distance: float
    kernel_distance_std: float
    class_fidelity: float
    marginal_entropy: float


def evaluate_samples(
    model: SmallCNN,
    samples01: Tensor,
    sample_labels: Tensor,
    reference_features: Tensor,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> SampleQuality:
    """Score samples against real reference features.

    Args:
        model: the feature classifier.
        samples01: ``(N, C, H, W)`` generated images in [0, 1].
        sample_labels: ``(N,)`` the classes the samples were asked for.
        reference_features: ``(M, D)`` :func:`classifier_features` of real images.
        kid_subsets, kid_subset_size: see :func:`kernel_distance`.
    """
    features = classifier_features(model, samples01)
    kid, kid_std = kernel_distance(
        features, reference_features, subsets=kid_subsets, subset_size=kid_subset_size
    )
    return SampleQuality(
        num_images=len(samples01),
        frechet_distance=frechet_distance(features, reference_features),
        kernel_distance=kid,
        kernel_distance_std=kid_std,
        class_fidelity=class_fidelity(model, samples01, sample_labels),
        marginal_entropy=marginal_class_entropy(model, samples01),
    )


def real_floor(
    model: SmallCNN,
    real_images01: Tensor,
    real_labels: Tensor,
    num_images: int,
    *,
    reference_features: Tensor | None = None,
    seed: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> SampleQuality:
    """The scores of ``num_images`` real images drawn from ``real_images01``: the floor any
    generator of that many images is compared to.

    Args:
        model: the feature classifier.
        real_images01: ``(N, C, H, W)`` real images in [0, 1] (e.g. the training set).
        real_labels: ``(N,)``.
        num_images: how many to score (the sample size of the generators).
        reference_features: the reference the samples are scored against (e.g. the test set's
            features); without it, a disjoint second draw of ``num_images`` from
            ``real_images01`` is the reference (needs ``2·num_images`` images).
        seed: which images are drawn.
    """
    needed = num_images if reference_features is not None else 2 * num_images
    if needed > len(real_images01):
        raise DistilError(
            f"the real-vs-real floor needs {needed} real images, have {len(real_images01)}"
        )
    order = torch.randperm(len(real_images01), generator=torch.Generator().manual_seed(seed))
    first = order[:num_images]
    if reference_features is None:
        reference_features = classifier_features(model, real_images01[order[num_images:needed]])
    return evaluate_samples(
        model,
        real_images01[first],
        real_labels[first],
        reference_features,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
    )
