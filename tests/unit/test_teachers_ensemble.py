"""Ensembles of teachers: what each combination rule targets, tested against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distil.config.sources import CombineRule, MemberWeighting
from distil.errors import DistilError
from distil.teachers.base import TeacherOutput
from distil.teachers.ensemble import EnsembleTeacher, combine_logits, confidence_weights


def _members(n: int = 3, shape: tuple[int, ...] = (5, 7)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [3 * torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


def test_mean_probs_is_the_weighted_mean_of_the_members_probabilities_at_t() -> None:
    z, w, t = _members(), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), 2.5
    combined = combine_logits(z, w, rule=CombineRule.MEAN_PROBS, kd_temperature=t)
    want = sum(wi * F.softmax(zi / t, dim=-1) for wi, zi in zip(w, z, strict=True))
    torch.testing.assert_close(F.softmax(combined.double() / t, dim=-1), want, rtol=1e-5, atol=1e-6)


def test_one_kl_to_mean_probs_has_the_gradient_of_the_summed_per_teacher_kls() -> None:
    """Σ_i w_i KL(p_i ‖ q) = H(p̄, q) − const: the student's gradient is the same."""
    z, w, t = _members(), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64), 2.0
    s1 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    target = combine_logits(z, w, rule=CombineRule.MEAN_PROBS, kd_temperature=t).double()
    kl = F.kl_div(
        F.log_softmax(s1 / t, -1), F.log_softmax(target / t, -1), log_target=True, reduction="sum"
    )
    summed = sum(
        wi
        * F.kl_div(
            F.log_softmax(s2 / t, -1), F.log_softmax(zi / t, -1), log_target=True, reduction="sum"
        )
        for wi, zi in zip(w, z, strict=True)
    )
    kl.backward()
    summed.backward()  # type: ignore[union-attr]
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-8)


def test_mean_logits_is_the_geometric_mean_not_the_arithmetic_one() -> None:
    z, w = _members(), torch.tensor([1 / 3] * 3, dtype=torch.float64)
    combined = combine_logits(z, w, rule=CombineRule.MEAN_LOGITS, kd_temperature=1.0).double()
    torch.testing.assert_close(combined, sum(zi / 3 for zi in z), rtol=1e-5, atol=1e-5)  # fp32
    geometric = torch.exp(sum(F.log_softmax(zi, -1) / 3 for zi in z))
    geometric = geometric / geometric.sum(-1, keepdim=True)
    torch.testing.assert_close(F.softmax(combined, -1), geometric, rtol=1e-5, atol=1e-6)
    arithmetic = combine_logits(z, w, rule=CombineRule.MEAN_PROBS, kd_temperature=1.0).double()
    assert not torch.allclose(F.softmax(combined, -1), F.softmax(arithmetic, -1), atol=1e-3)


def test_confidence_weights_favour_the_member_that_is_right() -> None:
    labels = torch.tensor([0, 1, -100])
    right = torch.full((3, 4), -5.0, dtype=torch.float64)
    right[0, 0] = right[1, 1] = 5.0
    wrong = torch.full((3, 4), -5.0, dtype=torch.float64)
    wrong[0, 2] = wrong[1, 3] = 5.0
    static = torch.tensor([0.5, 0.5], dtype=torch.float64)
    w = confidence_weights([right, wrong], labels, static)  # (2, 3)
    torch.testing.assert_close(w.sum(0), torch.ones(3))
    assert bool((w[0, :2] > 0.99).all())  # the right member dominates where there is a label
    torch.testing.assert_close(w[:, 2], static.float())  # no label: the static weights


class _Fixed:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, batch: object) -> TeacherOutput:
        return TeacherOutput(logits=self.logits)

    def describe(self) -> str:
        return "fixed"


def test_an_ensemble_of_one_model_twice_is_that_model() -> None:
    z = _members(1)[0].float()
    for rule in CombineRule:
        ens = EnsembleTeacher([_Fixed(z), _Fixed(z)], [1, 3], rule=rule, kd_temperature=2.0)
        out = ens({})
        assert out.logits is not None
        torch.testing.assert_close(F.softmax(out.logits / 2, -1), F.softmax(z / 2, -1))


def test_members_that_disagree_on_classes_or_lack_labels_are_refused() -> None:
    a, b = _Fixed(torch.zeros(2, 3)), _Fixed(torch.zeros(2, 4))
    with pytest.raises(DistilError, match="output size"):
        EnsembleTeacher([a, b], [1, 1])({})
    same = EnsembleTeacher([a, a], [1, 1], weighting=MemberWeighting.CONFIDENCE)
    with pytest.raises(DistilError, match="labels or targets"):
        same({})
    with pytest.raises(DistilError, match="two or more"):
        EnsembleTeacher([a], [1])
