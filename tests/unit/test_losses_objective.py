"""Tests for distil.losses.objective: the mix, T², normalisation and the chunked LM objective."""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distil.losses import classifier as cl
from distil.losses import objective as ob
from distil.losses.divergences import DIVERGENCES, compute_divergence, forward_kl
from distil.losses.representation import channel_wise_distillation, hint_loss

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out costs more than it saves; restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape: int, seed: int, scale: float = 1.0, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def randint(high: int, *shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- classifier objective


def test_classifier_objective_formula_and_components() -> None:
    s, t, y = randn(6, 5, seed=1, scale=2.0), randn(6, 5, seed=2, scale=2.0), randint(5, 6, seed=3)
    out = ob.classifier_objective(s, t, y, kd_weight=0.7, kd_temperature=4.0)
    ce = F.cross_entropy(s, y)
    p = torch.softmax(t / 4.0, -1)
    kd = (p * (p.log() - torch.log_softmax(s / 4.0, -1))).sum(-1).mean()
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * 16.0 * kd)
    assert set(out.components) == {"hard_ce/raw", "hard_ce/weighted", "kd/raw", "kd/weighted"}
    torch.testing.assert_close(out.components["hard_ce/raw"], ce)
    torch.testing.assert_close(out.components["kd/raw"], kd)
    torch.testing.assert_close(out.components["kd/weighted"], 0.7 * 16.0 * kd)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.components.values())
    # num_items is the normaliser of both terms.
    out10 = ob.classifier_objective(s, t, y, kd_weight=0.7, kd_temperature=4.0, num_items=10)
    torch.testing.assert_close(out10.loss, out.loss * 6 / 10)


def test_classifier_objective_without_teacher_is_plain_cross_entropy() -> None:
    s, y = randn(4, 3, seed=4).requires_grad_(), randint(3, 4, seed=5)
    out = ob.classifier_objective(s, None, y, kd_weight=0.9, kd_temperature=2.0)
    torch.testing.assert_close(out.loss, F.cross_entropy(s, y))
    assert set(out.components) == {"hard_ce/raw", "hard_ce/weighted"}


def test_teacher_is_a_constant() -> None:
    s, t, y = (
        randn(4, 3, seed=6).requires_grad_(),
        randn(4, 3, seed=7).requires_grad_(),
        randint(3, 4, seed=8),
    )
    ob.classifier_objective(s, t, y, kd_weight=0.5, kd_temperature=2.0).loss.backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("divergence", [*DIVERGENCES, "hinton_kd", "dkd", "standardized_kd"])
def test_classifier_objective_accepts_every_kd_name(divergence: str) -> None:
    s, t, y = randn(5, 4, seed=9), randn(5, 4, seed=10), randint(4, 5, seed=11)
    out = ob.classifier_objective(s, t, y, kd_weight=1.0, kd_temperature=2.0, divergence=divergence)
    if divergence in DIVERGENCES:
        kd = DIVERGENCES[divergence](s, t, kd_temperature=2.0)
    else:
        kd = cl.CLASSIFIER_LOSSES[divergence](s, t, labels=y, kd_temperature=2.0)
    torch.testing.assert_close(out.loss, 4.0 * kd)


def test_soft_term_gradient_is_temperature_independent_with_t_squared() -> None:
    # Hinton et al.: soft-target gradients scale as 1/T², so T²·KD keeps them comparable.
    s, t, y = randn(8, 10, seed=12).requires_grad_(), randn(8, 10, seed=13), randint(10, 8, seed=14)
    norms = []
    for temp in (20.0, 40.0):
        out = ob.classifier_objective(s, t, y, kd_weight=1.0, kd_temperature=temp)
        (grad,) = torch.autograd.grad(out.loss, s)
        norms.append(float(grad.norm()))
    assert abs(norms[0] / norms[1] - 1) < 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kd_weight": 1.5, "kd_temperature": 1.0}, "kd_weight"),
        ({"kd_weight": -0.1, "kd_temperature": 1.0}, "kd_weight"),
        ({"kd_weight": 0.5, "kd_temperature": 0.0}, "kd_temperature"),
        ({"kd_weight": 0.5, "kd_temperature": 1.0, "divergence": "pld"}, "PLD"),
        ({"kd_weight": 0.5, "kd_temperature": 1.0, "divergence": "kl"}, "unknown"),
    ],
)
def test_classifier_objective_rejects_bad_options(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    s, t, y = randn(2, 3, seed=15), randn(2, 3, seed=16), randint(3, 2, seed=17)
    with pytest.raises(ValueError, match=match):
        ob.classifier_objective(s, t, y, **kwargs)


def test_mixup_objective_is_mix_std() -> None:
    s, t = randn(4, 5, seed=18, scale=3.0), randn(4, 5, seed=19, scale=3.0)
    targets = cl.mixed_targets(
        randint(5, 4, seed=20), randint(5, 4, seed=21), torch.tensor([0.6, 1.0, 0.3, 0.5]), 5
    )
    out = ob.mixup_classifier_objective(
        s, t, targets, kd_weight=0.4, kd_temperature=1.0, standardize=True
    )
    zs, zt = cl.standardize_logits(s), cl.standardize_logits(t)
    ce = -(targets.double() * torch.log_softmax(zs, -1)).sum(-1).mean()
    kd = forward_kl(zs, zt)
    torch.testing.assert_close(out.loss, 0.6 * ce + 0.4 * kd)
    plain = ob.mixup_classifier_objective(s, t, targets, kd_weight=0.4, kd_temperature=2.0)
    ce_plain = -(targets.double() * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(
        plain.loss, 0.6 * ce_plain + 0.4 * 4.0 * forward_kl(s, t, kd_temperature=2.0)
    )


# ---------------------------------------------------------------- token objectives


def lm_batch(
    b: int = 8, t: int = 6, v: int = 13, seed: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels with a variable number of supervised tokens per row, some rows empty."""
    labels = randint(v, b, t, seed=seed)
    lengths = torch.tensor([6, 1, 3, 0, 4, 2, 6, 5][:b])
    labels[torch.arange(t) >= lengths.unsqueeze(1)] = ob.IGNORE_INDEX
    return labels, lengths


def test_token_objective_formula() -> None:
    labels, _ = lm_batch()
    s, t = randn(8, 6, 13, seed=31, scale=2.0), randn(8, 6, 13, seed=32, scale=2.0)
    out = ob.token_objective(
        s, t, labels, kd_weight=0.25, kd_temperature=2.0, divergence="generalized_jsd", beta=0.3
    )
    mask = labels != -100
    ce = F.cross_entropy(s[mask], labels[mask], reduction="sum") / mask.sum()
    kd = compute_divergence("generalized_jsd", s, t, mask, kd_temperature=2.0, beta=0.3)
    torch.testing.assert_close(out.loss, 0.75 * ce + 0.25 * 4.0 * kd)
    torch.testing.assert_close(out.components["kd/raw"], kd)
    # Half inputs: fp32 math.
    half = ob.token_objective(s.bfloat16(), t.bfloat16(), labels, kd_weight=0.5, kd_temperature=1.0)
    assert half.loss.dtype == torch.float32


class TinyLM(nn.Module):
    """Hidden states → logits, so accumulation is checked on real parameter gradients."""

    def __init__(self, h: int = 5, v: int = 13) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(h, h).double()
        self.head = nn.Linear(h, v).double()

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def accumulate_grads(step, micro_batch: int, b: int = 8) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    model = TinyLM()
    labels, _ = lm_batch()
    x, teacher = randn(b, 6, 5, seed=33), randn(b, 6, 13, seed=34, scale=2.0)
    window = int((labels != -100).sum())  # supervised tokens over the whole window
    for i in range(0, b, micro_batch):
        sl = slice(i, i + micro_batch)
        step(model, x[sl], teacher[sl], labels[sl], window).backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("path", ["logits", "hidden_chunked", "hidden_reference"])
def test_gradient_accumulation_invariance(path: str) -> None:
    # batch 8 × accum 1 == batch 2 × accum 4 when num_items counts the window's tokens (F6).
    def step(
        model: TinyLM, x: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, window: int
    ) -> torch.Tensor:
        common = {"kd_weight": 0.6, "kd_temperature": 2.0, "num_items": window}
        if path == "logits":
            return ob.token_objective(model(x), teacher, labels, **common).loss
        return ob.token_objective_from_hidden(
            model.hidden(x),
            model.head.weight,
            teacher,
            labels,
            student_bias=model.head.bias,
            chunked=path == "hidden_chunked",
            chunk_size=4,
            **common,
        ).loss

    whole = accumulate_grads(step, micro_batch=8)
    accumulated = accumulate_grads(step, micro_batch=2)
    assert len(whole) == 4
    for a, w in zip(accumulated, whole, strict=True):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-14)


def plain_token_objective(
    logits: torch.Tensor,
    teacher: torch.Tensor | None,
    labels: torch.Tensor,
    kd_weight: float,
    kd_temperature: float,
    divergence: str,
) -> ob.ObjectiveOutput:
    """The objective written with plain autograd formulas: the ground truth for both paths."""
    mask = labels != ob.IGNORE_INDEX
    n = mask.sum()
    ce = F.cross_entropy(logits[mask], labels[mask], reduction="sum") / n
    if teacher is None:
        return ob.ObjectiveOutput(ce, {"hard_ce/raw": ce, "hard_ce/weighted": ce})
    kd = (
        compute_divergence(
            divergence, logits, teacher, mask, kd_temperature=kd_temperature, reduction="sum"
        )
        / n
    )
    w, t2 = kd_weight, kd_temperature**2
    return ob.ObjectiveOutput(
        (1 - w) * ce + w * t2 * kd,
        {
            "hard_ce/raw": ce,
            "hard_ce/weighted": (1 - w) * ce,
            "kd/raw": kd,
            "kd/weighted": w * t2 * kd,
        },
    )


@pytest.mark.parametrize("path", ["hidden", "logits"])
@pytest.mark.parametrize("teacher_form", ["none", "logits", "hidden"])
@pytest.mark.parametrize(
    "divergence", ["forward_kl", "reverse_kl", "generalized_jsd", "total_variation"]
)
def test_chunked_token_objectives_equal_plain_autograd(
    path: str, teacher_form: str, divergence: str
) -> None:
    labels, _ = lm_batch()
    hidden = randn(8, 6, 5, seed=35).requires_grad_()
    weight = randn(13, 5, seed=36).requires_grad_()
    bias = randn(13, seed=37).requires_grad_()
    t_hidden, t_weight = randn(8, 6, 4, seed=38), randn(13, 4, seed=39, scale=2.0)
    teacher_logits = t_hidden @ t_weight.T
    common = {"kd_weight": 0.3, "kd_temperature": 1.5, "divergence": divergence}
    ref = plain_token_objective(
        hidden @ weight.T + bias,
        None if teacher_form == "none" else teacher_logits,
        labels,
        **common,
    )
    if path == "logits":
        got = ob.token_objective(
            hidden @ weight.T + bias,
            None if teacher_form == "none" else teacher_logits,
            labels,
            chunk_size=5,
            **common,
        )
    else:
        teacher: dict[str, torch.Tensor] = {}
        if teacher_form == "hidden":
            teacher = {"teacher_hidden": t_hidden, "teacher_weight": t_weight}
        got = ob.token_objective_from_hidden(
            hidden,
            weight,
            teacher_logits if teacher_form == "logits" else None,
            labels,
            student_bias=bias,
            chunked=True,
            chunk_size=5,
            **teacher,
            **common,
        )
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-12, atol=1e-14)
    assert got.components.keys() == ref.components.keys()
    for key in ref.components:
        torch.testing.assert_close(
            got.components[key], ref.components[key].detach(), rtol=1e-12, atol=1e-14
        )
    for g, r in zip(
        torch.autograd.grad(got.loss, (hidden, weight, bias)),
        torch.autograd.grad(ref.loss, (hidden, weight, bias)),
        strict=True,
    ):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


def test_default_path_is_chunked_for_large_vocabularies() -> None:
    labels = randint(32_768, 1, 3, seed=40)
    hidden, weight = (
        randn(1, 3, 4, seed=41, dtype=torch.float32),
        randn(32_768, 4, seed=42, dtype=torch.float32),
    )
    with mock.patch.object(ob, "fused_linear_loss", wraps=ob.fused_linear_loss) as fused:
        ob.token_objective_from_hidden(
            hidden, weight, None, labels, kd_weight=0.0, kd_temperature=1.0
        )
        assert fused.call_count == 1
        ob.token_objective_from_hidden(
            hidden, weight[:1000], None, labels % 1000, kd_weight=0.0, kd_temperature=1.0
        )
        assert fused.call_count == 1  # small vocabulary: reference path


@pytest.mark.parametrize("with_teacher", [False, True])
def test_all_ignored_labels_give_exactly_zero(with_teacher: bool) -> None:
    labels = torch.full((2, 3), ob.IGNORE_INDEX)
    logits = randn(2, 3, 7, seed=43).requires_grad_()
    hidden, weight = randn(2, 3, 4, seed=44).requires_grad_(), randn(7, 4, seed=45).requires_grad_()
    teacher = randn(2, 3, 7, seed=46) if with_teacher else None
    outs = [
        ob.token_objective(logits, teacher, labels, kd_weight=0.5, kd_temperature=2.0),
        ob.token_objective_from_hidden(
            hidden, weight, teacher, labels, kd_weight=0.5, kd_temperature=2.0, chunked=True
        ),
    ]
    for out in outs:
        assert float(out.loss.detach()) == 0.0
        assert all(float(v) == 0.0 for v in out.components.values())
    grads = torch.autograd.grad(outs[0].loss + outs[1].loss, (logits, hidden, weight))
    assert all(bool((g == 0).all()) for g in grads)


# ---------------------------------------------------------------- feature terms


def test_feature_objective_adds_weighted_terms() -> None:
    s, t, y = randn(4, 3, seed=47), randn(4, 3, seed=48), randint(3, 4, seed=49)
    base = ob.classifier_objective(s, t, y, kd_weight=0.5, kd_temperature=2.0)
    f_s, f_t = randn(4, 2, 3, 3, seed=50), randn(4, 2, 3, 3, seed=51)
    hint = hint_loss(f_s, f_t, feature_dims=3)
    cwd = channel_wise_distillation(f_s, f_t, kd_temperature=4.0)
    out = ob.feature_objective(
        {"hint": (0.1, hint), "cwd": ob.WeightedTerm(3.0, cwd, kd_temperature=4.0)}, base=base
    )
    torch.testing.assert_close(out.loss, base.loss + 0.1 * hint + 3.0 * 16.0 * cwd)
    assert {
        "hard_ce/raw",
        "kd/weighted",
        "hint/raw",
        "hint/weighted",
        "cwd/raw",
        "cwd/weighted",
    } <= set(out.components)
    torch.testing.assert_close(out.components["cwd/weighted"], 48.0 * cwd)
    alone = ob.feature_objective({"pld": (1.0, cl.pld(s, t, labels=y))})
    torch.testing.assert_close(alone.loss, cl.pld(s, t, labels=y))
    with pytest.raises(ValueError, match="already"):
        ob.feature_objective({"kd": (1.0, hint)}, base=base)
    with pytest.raises(ValueError, match="scalar"):
        ob.feature_objective({"x": (1.0, f_s)})
    with pytest.raises(ValueError, match="at least one"):
        ob.feature_objective({})


def test_sparse_token_objective_is_the_sparse_loss_of_the_library() -> None:
    """token_objective_sparse mixes CE with topk_divergence / sampled_divergence exactly as
    token_objective mixes CE with the dense divergence (same normaliser, T² on the soft term)."""
    from distil.losses.objective import token_objective, token_objective_sparse
    from distil.losses.sparse import (
        sample_teacher_targets,
        sampled_divergence,
        teacher_topk,
        topk_divergence,
    )

    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 6, 40, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 6, 40, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[0, :2] = -100
    mask = labels != -100
    n = int(mask.sum())
    top = teacher_topk(teacher, 5, kd_temperature=2.0)
    out = token_objective_sparse(
        student, top, labels, kd_weight=0.7, kd_temperature=2.0, num_items=n
    )
    ce = torch.nn.functional.cross_entropy(student[mask], labels[mask], reduction="sum") / n
    kd = (
        topk_divergence(
            student,
            top.log_probs,
            top.ids,
            mask,
            teacher_tail_log_prob=top.tail_log_prob,
            kd_temperature=2.0,
            reduction="sum",
        )
        / n
    )
    torch.testing.assert_close(out.loss, 0.3 * ce + 0.7 * 4.0 * kd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.components["kd/raw"], kd.detach())
    # k = V: the bucketed loss is the dense one
    full = teacher_topk(teacher, 40, kd_temperature=2.0)
    dense = token_objective(
        student, teacher, labels, kd_weight=0.7, kd_temperature=2.0, num_items=n
    )
    sparse = token_objective_sparse(
        student, full, labels, kd_weight=0.7, kd_temperature=2.0, num_items=n
    )
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-10, atol=1e-10)
    samples = sample_teacher_targets(teacher, 16, kd_temperature=2.0, generator=g)
    est = token_objective_sparse(
        student, samples, labels, kd_weight=1.0, kd_temperature=2.0, num_items=n
    )
    # forward KL: the plain estimator Σ_i w_i (log p_i − log q_i), w_i = p_i / (n r_i) = 1/n here
    lq = torch.log_softmax(student / 2.0, -1).gather(-1, samples.ids)
    plain = ((samples.teacher_log_probs - lq).mean(-1)[mask]).sum() / n
    torch.testing.assert_close(est.loss, 4.0 * plain, rtol=1e-12, atol=1e-12)
    # other divergences: sampled_divergence's non-negative terms
    est_r = token_objective_sparse(
        student,
        samples,
        labels,
        kd_weight=1.0,
        kd_temperature=2.0,
        num_items=n,
        divergence="reverse_kl",
    )
    want = (
        sampled_divergence(
            student,
            samples.ids,
            samples.teacher_log_probs,
            mask,
            divergence="reverse_kl",
            proposal_log_probs=samples.proposal_log_probs,
            kd_temperature=2.0,
            reduction="sum",
        )
        / n
    )
    torch.testing.assert_close(est_r.loss, 4.0 * want, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, student)
    assert torch.isfinite(grad).all() and bool((grad[~mask] == 0).all())
