"""Mixing plans shared by student and teacher inputs, and feature-KD terms for classifier maps."""

from __future__ import annotations

import pytest
import torch

from distil.data.mixing import apply_mix, sample_mix
from distil.errors import DistilError
from distil.losses.objective import feature_objective
from distil.models.classifier import MLP, SmallCNN
from distil.models.features import FeatureTerm, capture_features, feature_distiller, feature_shapes


def test_no_alpha_means_no_plan_and_plans_follow_the_generator() -> None:
    assert sample_mix(8) is None
    a = sample_mix(8, mixup_alpha=0.4, generator=torch.Generator().manual_seed(1))
    b = sample_mix(8, mixup_alpha=0.4, generator=torch.Generator().manual_seed(1))
    assert a is not None and b is not None and a.lam == b.lam and torch.equal(a.perm, b.perm)
    lams = [
        sample_mix(4, mixup_alpha=1.0, generator=torch.Generator().manual_seed(s)).lam
        for s in range(300)
    ]  # type: ignore[union-attr]
    assert (
        0.45 < sum(lams) / len(lams) < 0.55 and min(lams) >= 0 and max(lams) <= 1
    )  # Beta(1, 1) is uniform


def test_mixup_blends_and_cutmix_pastes_the_same_region_at_any_resolution() -> None:
    plan = sample_mix(4, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert plan is not None
    x = torch.randn(4, 3)
    assert torch.allclose(apply_mix(x, plan), plan.lam * x + (1 - plan.lam) * x[plan.perm])
    plan = sample_mix(4, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(3))
    assert plan is not None and plan.box is not None
    small, large = torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, 16, 16)
    small[:, 0] = torch.arange(4.0).view(4, 1, 1)
    large[:, 0] = torch.arange(4.0).view(4, 1, 1)
    ms, ml = apply_mix(small, plan), apply_mix(large, plan)
    pasted_small = (ms != small).float().mean(dim=(1, 2, 3))
    pasted_large = (ml != large).float().mean(dim=(1, 2, 3))
    moved = plan.perm != torch.arange(4)
    assert torch.allclose(
        pasted_small[moved], pasted_large[moved], atol=0.15
    )  # the same relative box
    assert abs(float(pasted_large[moved][0]) - (1 - plan.lam)) < 0.15
    with pytest.raises(ValueError):
        apply_mix(torch.zeros(4, 3), plan)


@pytest.mark.parametrize("loss", ["hint", "cwd", "attention"])
def test_feature_terms_train_student_and_projector(loss: str) -> None:
    torch.manual_seed(0)
    teacher, student = SmallCNN(1, 10, channels=[8, 16]), SmallCNN(1, 10, channels=[2, 4])
    x = torch.randn(6, 1, 8, 8)
    terms = [
        FeatureTerm(
            student="stages.1", teacher="stages.1", loss=loss, weight=2.0, kd_temperature=2.0
        )
    ]
    t_shapes = feature_shapes(teacher, ["stages.1"], lambda: teacher(x[:2]))
    fkd = feature_distiller(terms, student, lambda: student(x[:2]), t_shapes)
    with torch.no_grad(), capture_features(teacher, fkd.teacher_names, detach=True) as t_feats:
        teacher(x)
    with capture_features(student, fkd.student_names) as s_feats:
        student(x)
    out = feature_objective(fkd.terms(s_feats, t_feats, num_items=6))
    name = terms[0].name
    assert set(out.components) == {f"{name}/raw", f"{name}/weighted"}
    factor = 2.0 * (4.0 if loss == "cwd" else 1.0)  # weight, and τ² for CWD
    assert torch.allclose(
        out.components[f"{name}/weighted"], factor * out.components[f"{name}/raw"]
    )
    out.loss.backward()
    assert student.stages[1][0].weight.grad is not None
    assert (len(list(fkd.parameters())) > 0) == (
        loss != "attention"
    )  # attention transfer needs no projector


def test_map_losses_refuse_flat_features() -> None:
    student, teacher = MLP(16, 10, hidden=[8]), MLP(16, 10, hidden=[8])
    names = [n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)]
    with pytest.raises(DistilError, match="cwd needs"):
        feature_distiller(
            [FeatureTerm(student=names[0], teacher=names[0], loss="cwd")],
            student,
            lambda: student(torch.randn(2, 16)),
            feature_shapes(teacher, [names[0]], lambda: teacher(torch.randn(2, 16))),
        )
