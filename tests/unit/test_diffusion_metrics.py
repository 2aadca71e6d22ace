"""Sample-quality metrics: float64 references (scipy's sqrtm, a naive MMD), torchmetrics'
FID/KID on the same features, and the classifier-based scores on a separable toy task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distil.diffusion.metrics import (
    FeatureClassifierInfo,
    build_feature_classifier,
    class_fidelity,
    classifier_features,
    evaluate_samples,
    frechet_distance,
    kernel_distance,
    load_feature_classifier,
    marginal_class_entropy,
    real_floor,
    save_feature_classifier,
)
from distil.errors import DistilError

F64 = torch.float64


def features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=F64)
    return torch.randn(n, d, generator=g, dtype=F64) @ mixing + shift


def scipy_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    import numpy as np
    from scipy import linalg

    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    cov_a, cov_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_frechet_distance_matches_scipy_and_known_values() -> None:
    a, b = features(300, 6, 0), features(250, 6, 1, shift=0.3)
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-7)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0], dtype=F64)
    assert frechet_distance(a, a + delta) == pytest.approx(float(delta.square().sum()), rel=1e-9)
    with pytest.raises(DistilError):
        frechet_distance(a[:1], b)


def naive_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    d = x.shape[1]

    def k(u: torch.Tensor, v: torch.Tensor) -> float:
        return float((u @ v / d + 1) ** 3)

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kernel_distance_matches_the_naive_unbiased_mmd() -> None:
    a, b = features(12, 3, 2), features(12, 3, 3, shift=0.5)
    mean, std = kernel_distance(a, b, subsets=3, subset_size=12)
    assert mean == pytest.approx(naive_mmd2(a, b), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-9)  # every subset is the whole set


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double()


def test_agrees_with_torchmetrics_on_the_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    a, b = features(200, 4, 4).float(), features(180, 4, 5, shift=0.2).float()
    fid = FrechetInceptionDistance(feature=Flatten(), input_img_size=(1, 2, 2))
    fid.update(a.reshape(-1, 1, 2, 2), real=True)
    fid.update(b.reshape(-1, 1, 2, 2), real=False)
    assert frechet_distance(b.double(), a.double()) == pytest.approx(float(fid.compute()), rel=1e-5)
    kid = KernelInceptionDistance(feature=Flatten(), subsets=1, subset_size=180)
    kid.update(a[:180].reshape(-1, 1, 2, 2), real=True)
    kid.update(b.reshape(-1, 1, 2, 2), real=False)
    theirs, _ = kid.compute()
    ours, _ = kernel_distance(b.double(), a[:180].double(), subsets=1, subset_size=180)
    assert ours == pytest.approx(float(theirs), rel=1e-5)


def toy_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 dark, class 1 bright: separable in one epoch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = (0.2 + 0.6 * labels.float()).reshape(-1, 1, 1, 1) + 0.05 * torch.randn(
        n, 1, 8, 8, generator=g
    )
    return images.clamp(0, 1), labels


def test_classifier_scores_and_folder(tmp_path: Path) -> None:
    train, train_labels = toy_images(256, 0)
    test, test_labels = toy_images(64, 1)
    info = FeatureClassifierInfo(
        channels=(4, 8),
        in_channels=1,
        num_classes=2,
        image_size=8,
        dataset="toy",
        test_accuracy=1.0,
        epochs=2,
        seed=0,
    )
    model = build_feature_classifier(info)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):  # two epochs of 32-image steps separate dark from bright
        for begin in range(0, 256, 32):
            loss = torch.nn.functional.cross_entropy(
                model(train[begin : begin + 32]), train_labels[begin : begin + 32]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert class_fidelity(model, test, test_labels) == 1.0
    assert class_fidelity(model, test, 1 - test_labels) == 0.0
    assert marginal_class_entropy(model, test) == pytest.approx(
        torch.log(torch.tensor(2.0)).item(), abs=0.05
    )
    assert (
        marginal_class_entropy(model, test[test_labels == 1])
        < marginal_class_entropy(model, test) - 0.05
    )
    save_feature_classifier(tmp_path / "clf", model, info)
    loaded, loaded_info = load_feature_classifier(tmp_path / "clf")
    assert loaded_info == info
    assert torch.equal(classifier_features(loaded, test), classifier_features(model, test))
    reference = classifier_features(model, train)
    quality = evaluate_samples(
        model, test, test_labels, reference, kid_subsets=2, kid_subset_size=32
    )
    assert quality.class_fidelity == 1.0 and quality.num_images == 64
    floor = real_floor(model, train, train_labels, 100, kid_subsets=2, kid_subset_size=50)
    assert floor.frechet_distance >= 0 and floor.class_fidelity == 1.0
    against = real_floor(
        model,
        train,
        train_labels,
        200,
        reference_features=classifier_features(model, test),
        kid_subsets=2,
        kid_subset_size=50,
    )
    assert against.num_images == 200 and against.frechet_distance >= 0
    with pytest.raises(DistilError, match="real-vs-real"):
        real_floor(model, train, train_labels, 200)
    with pytest.raises(DistilError, match="classifier.json"):
        load_feature_classifier(tmp_path)
