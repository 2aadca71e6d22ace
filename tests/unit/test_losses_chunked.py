"""Tests for distil.losses.chunked: equal to the reference path, without full-size tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from distil.losses import chunked as ch
from distil.losses.divergences import DIVERGENCES, compute_divergence

F64 = torch.float64

CASES: list[tuple[str, dict[str, float]]] = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("symmetric_kl", {"reverse_kl_weight": 0.3}),
    ("generalized_jsd", {"beta": 0.3}),
    ("skew_kl", {"skew_alpha": 0.2}),
    ("skew_reverse_kl", {"skew_alpha": 0.2}),
    ("total_variation", {}),
    ("tvd_plus_plus", {}),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: OpenMP fan-out costs more than it saves; restore the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class Problem:
    """A small LM head problem: student hidden/weight/bias, teacher hidden/weight, a mask."""

    def __init__(self, dtype: torch.dtype = F64, b: int = 2, t: int = 7, h: int = 5, v: int = 11):
        self.hidden = randn(b, t, h, seed=1, dtype=dtype).requires_grad_()
        self.weight = randn(v, h, seed=2, dtype=dtype).requires_grad_()
        self.bias = randn(v, seed=3, dtype=dtype).requires_grad_()
        self.teacher_hidden = randn(b, t, 4, seed=4, dtype=dtype)
        self.teacher_weight = randn(v, 4, seed=5, dtype=dtype) * 1.5
        self.mask = randn(b, t, seed=6) > -0.5
        self.params = (self.hidden, self.weight, self.bias)

    @property
    def teacher_logits(self) -> torch.Tensor:
        return self.teacher_hidden @ self.teacher_weight.T

    def reference(self, name: str, **kw: float) -> torch.Tensor:
        logits = self.hidden @ self.weight.T + self.bias
        return compute_divergence(name, logits, self.teacher_logits, self.mask, **kw)


def value_and_grads(
    loss_fn: Callable[[], torch.Tensor], params: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    value = loss_fn()
    return value.detach(), torch.autograd.grad(value, params)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_equals_reference_values_and_gradients(
    name: str, params: dict[str, float], teacher_form: str, chunk_size: int
) -> None:
    pb = Problem()
    teacher = (
        {"teacher_logits": pb.teacher_logits}
        if teacher_form == "logits"
        else {"teacher_hidden": pb.teacher_hidden, "teacher_weight": pb.teacher_weight}
    )
    ref_v, ref_g = value_and_grads(
        lambda: pb.reference(name, kd_temperature=1.7, **params), pb.params
    )
    got_v, got_g = value_and_grads(
        lambda: ch.chunked_divergence(
            pb.hidden,
            pb.weight,
            mask=pb.mask,
            student_bias=pb.bias,
            divergence=name,
            kd_temperature=1.7,
            chunk_size=chunk_size,
            **teacher,
            **params,
        ),
        pb.params,
    )
    torch.testing.assert_close(got_v, ref_v, rtol=1e-12, atol=1e-14)
    for got, ref in zip(got_g, ref_g, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_chunked_equals_reference_in_fp32_and_bf16() -> None:
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        pb = Problem(dtype=dtype, t=33, v=50)
        ref_v, ref_g = value_and_grads(
            lambda pb=pb: pb.reference("forward_kl", kd_temperature=2.0), pb.params
        )
        got_v, got_g = value_and_grads(
            lambda pb=pb: ch.chunked_divergence(
                pb.hidden,
                pb.weight,
                pb.teacher_logits,
                pb.mask,
                student_bias=pb.bias,
                kd_temperature=2.0,
                chunk_size=8,
            ),
            pb.params,
        )
        assert got_v.dtype == torch.float32
        torch.testing.assert_close(got_v, ref_v.float(), rtol=tol, atol=tol)
        for got, ref in zip(got_g, ref_g, strict=True):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_gradcheck_through_the_custom_backward() -> None:
    pb = Problem(b=1, t=4, h=3, v=6)
    teacher = pb.teacher_logits
    assert torch.autograd.gradcheck(
        lambda h, w, b: ch.chunked_divergence(
            h, w, teacher, pb.mask[:1], student_bias=b, divergence="generalized_jsd", chunk_size=2
        ),
        pb.params,
    )
    # The loss enters the graph linearly, so scaling it scales every gradient (grad_output).
    (g1,) = torch.autograd.grad(ch.chunked_divergence(pb.hidden, pb.weight, teacher), pb.hidden)
    (g3,) = torch.autograd.grad(
        3.0 * ch.chunked_divergence(pb.hidden, pb.weight, teacher), pb.hidden
    )
    torch.testing.assert_close(g3, 3.0 * g1)


def test_masked_positions_are_ignored_and_all_masked_is_zero() -> None:
    pb = Problem()
    teacher = pb.teacher_logits

    def run(
        hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        h = hidden.detach().clone().requires_grad_()
        return value_and_grads(
            lambda: ch.chunked_divergence(h, pb.weight, teacher, mask, chunk_size=2), (h, pb.weight)
        )

    v1, (gh1, gw1) = run(pb.hidden, pb.mask)
    garbage = pb.hidden.detach().clone()
    garbage[~pb.mask] = float("nan")
    v2, (gh2, gw2) = run(garbage, pb.mask)
    assert v1 == v2 and torch.equal(gw1, gw2) and torch.equal(gh1, gh2)
    assert bool((gh1[~pb.mask] == 0).all())
    v3, (gh3, gw3) = run(pb.hidden, torch.zeros_like(pb.mask))
    assert float(v3) == 0.0 and bool((gh3 == 0).all()) and bool((gw3 == 0).all())


def test_fused_hard_ce_and_kd_parts() -> None:
    pb = Problem()
    labels = randn(2, 7, seed=7).abs().mul(3).long() % 11
    parts = ch.fused_linear_loss(
        pb.hidden,
        pb.weight,
        pb.mask,
        student_bias=pb.bias,
        labels=labels,
        teacher_logits=pb.teacher_logits,
        hard_ce_coef=0.25,
        kd_coef=0.5,
        kd_temperature=2.0,
        chunk_size=4,
    )
    logits = pb.hidden @ pb.weight.T + pb.bias
    ce = torch.nn.functional.cross_entropy(logits[pb.mask], labels[pb.mask], reduction="sum")
    kd = compute_divergence(
        "forward_kl", logits, pb.teacher_logits, pb.mask, kd_temperature=2.0, reduction="sum"
    )
    torch.testing.assert_close(parts.hard_ce_sum, ce.detach())
    torch.testing.assert_close(parts.kd_sum, kd.detach())
    assert not parts.hard_ce_sum.requires_grad and not parts.kd_sum.requires_grad
    assert parts.num_selected == int(pb.mask.sum())
    got = torch.autograd.grad(parts.loss, pb.params)
    want = torch.autograd.grad(0.25 * ce + 0.5 * kd, pb.params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_no_grad_mode_gives_the_same_value() -> None:
    pb = Problem()
    with torch.no_grad():
        value = ch.chunked_divergence(
            pb.hidden, pb.weight, pb.teacher_logits, pb.mask, student_bias=pb.bias
        )
    assert not value.requires_grad
    torch.testing.assert_close(value, pb.reference("forward_kl").detach())


def test_default_decision_and_chunk_size() -> None:
    assert ch.should_use_chunked_loss(1, 32_768)
    assert ch.should_use_chunked_loss(16, 151_936)
    assert not ch.should_use_chunked_loss(4096, 30_522)  # BERT-size vocab, 4k tokens
    assert ch.should_use_chunked_loss(16_384, 30_522)  # ... but not at 16k tokens (>= 2**28)
    assert not ch.should_use_chunked_loss(64, 1000)
    assert ch.default_chunk_size(131_072) == 128
    assert ch.default_chunk_size(32_768) == 512
    assert ch.default_chunk_size(10**9) == 1


def test_invalid_arguments_fail_loudly() -> None:
    pb = Problem()
    with pytest.raises(ValueError, match="do not fit"):
        ch.chunked_divergence(pb.hidden, pb.weight.T, pb.teacher_logits)
    with pytest.raises(ValueError, match="not both"):
        ch.chunked_divergence(
            pb.hidden,
            pb.weight,
            pb.teacher_logits,
            teacher_hidden=pb.teacher_hidden,
            teacher_weight=pb.teacher_weight,
        )
    with pytest.raises(ValueError, match="vocabulary"):
        ch.chunked_divergence(
            pb.hidden,
            pb.weight,
            teacher_hidden=pb.teacher_hidden,
            teacher_weight=pb.teacher_weight[:5],
        )
    with pytest.raises(ValueError, match="teacher_logits"):
        ch.chunked_divergence(pb.hidden, pb.weight, pb.teacher_logits[..., :5])
    with pytest.raises(ValueError, match="needs"):
        ch.chunked_divergence(pb.hidden, pb.weight)


def largest_allocation(loss_fn: Callable[[], torch.Tensor]) -> int:
    """Largest net CPU allocation of any single profiled op during forward + backward."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_fn().backward()
    return max(event.cpu_memory_usage for event in prof.events())


def test_no_full_size_tensor_is_allocated() -> None:
    n, h, v, chunk = 512, 16, 2048, 64
    hidden = randn(n, h, seed=8, dtype=torch.float32).requires_grad_()
    weight = randn(v, h, seed=9, dtype=torch.float32).requires_grad_()
    t_hidden, t_weight = (
        randn(n, h, seed=10, dtype=torch.float32),
        randn(v, h, seed=11, dtype=torch.float32),
    )
    full_bytes = n * v * 4
    reference = largest_allocation(
        lambda: compute_divergence("forward_kl", hidden @ weight.T, t_hidden @ t_weight.T)
    )
    chunked = largest_allocation(
        lambda: ch.chunked_divergence(
            hidden, weight, teacher_hidden=t_hidden, teacher_weight=t_weight, chunk_size=chunk
        )
    )
    assert reference >= full_bytes
    assert chunked <= 2 * chunk * v * 4 < full_bytes


def test_every_divergence_runs_chunked() -> None:
    assert {name for name, _ in CASES} == set(DIVERGENCES)


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_chunked_logits_loss_equals_plain_autograd(name: str, params: dict[str, float]) -> None:
    pb = Problem()
    logits = (pb.hidden @ pb.weight.T + pb.bias).detach().requires_grad_()
    labels = randn(2, 7, seed=12).abs().mul(4).long() % 11
    parts = ch.chunked_logits_loss(
        logits,
        pb.mask,
        labels=labels,
        teacher_logits=pb.teacher_logits,
        hard_ce_coef=0.4,
        kd_coef=0.6,
        divergence=name,
        kd_temperature=1.7,
        chunk_size=3,
        **params,
    )
    ce = torch.nn.functional.cross_entropy(logits[pb.mask], labels[pb.mask], reduction="sum")
    kd = compute_divergence(
        name, logits, pb.teacher_logits, pb.mask, kd_temperature=1.7, reduction="sum", **params
    )
    torch.testing.assert_close(parts.loss, (0.4 * ce + 0.6 * kd).detach(), rtol=1e-12, atol=1e-14)
    (got,) = torch.autograd.grad(parts.loss, logits)
    (want,) = torch.autograd.grad(0.4 * ce + 0.6 * kd, logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert bool((got[~pb.mask] == 0).all())


def test_chunked_logits_loss_gradcheck_dtype_and_double_backward() -> None:
    pb = Problem(b=1, t=4, h=3, v=6)
    logits = (pb.hidden @ pb.weight.T).detach().requires_grad_()
    teacher = pb.teacher_logits
    assert torch.autograd.gradcheck(
        lambda z: ch.chunked_logits_loss(z, teacher_logits=teacher, kd_coef=0.5, chunk_size=3).loss,
        (logits,),
    )
    # retain_graph: a second backward gives the same gradient (the stored buffer is not reused).
    loss = ch.chunked_logits_loss(logits, teacher_logits=teacher, chunk_size=2).loss
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g1, g2)
    half = logits.detach().to(torch.bfloat16).requires_grad_()
    out = ch.chunked_logits_loss(half, teacher_logits=teacher.to(torch.bfloat16), chunk_size=2)
    (g_half,) = torch.autograd.grad(out.loss, half)
    assert out.loss.dtype == torch.float32 and g_half.dtype == torch.bfloat16
    empty = ch.chunked_logits_loss(
        logits, torch.zeros(1, 4, dtype=torch.bool), teacher_logits=teacher
    )
    (g0,) = torch.autograd.grad(empty.loss, logits)
    assert float(empty.loss.detach()) == 0.0 and bool((g0 == 0).all())


def test_shifted_non_contiguous_logits_are_read_in_place() -> None:
    # Next-token losses usually see logits[:, :-1]; indexing must not depend on contiguity.
    full = randn(2, 8, 11, seed=13).requires_grad_()
    teacher = randn(2, 8, 11, seed=14)
    labels = randn(2, 7, seed=15).abs().mul(4).long() % 11
    mask = randn(2, 7, seed=16) > -0.3
    shifted = full[:, :-1]
    assert not shifted.is_contiguous()
    kwargs = {"labels": labels, "hard_ce_coef": 0.5, "kd_coef": 0.5, "chunk_size": 3}
    got = ch.chunked_logits_loss(shifted, mask, teacher_logits=teacher[:, :-1], **kwargs)
    want = ch.chunked_logits_loss(
        shifted.contiguous(), mask, teacher_logits=teacher[:, :-1].contiguous(), **kwargs
    )
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    (g_got,) = torch.autograd.grad(got.loss, full)
    (g_want,) = torch.autograd.grad(want.loss, full)
    assert torch.equal(g_got, g_want) and bool((g_got[:, -1] == 0).all())


@pytest.mark.parametrize("kd_temperature", [1.0, 1.7])
@pytest.mark.parametrize("ce_coef", [0.0, 0.3])
@pytest.mark.parametrize("teacher_rules_out_tokens", [False, True])
def test_closed_form_forward_kl_and_ce_equal_autograd(
    kd_temperature: float, ce_coef: float, teacher_rules_out_tokens: bool
) -> None:
    """Forward KL (+ CE) take a closed-form gradient path, including the T = 1 case where one
    softmax serves both terms, teachers that give tokens zero probability, and coefficients that
    arrive as float64 tensors (exact token counts)."""
    pb = Problem()
    teacher = pb.teacher_logits.clone()
    if teacher_rules_out_tokens:
        teacher[..., :3] = float("-inf")  # e.g. a masked or padded vocabulary range
    labels = randn(2, 7, seed=21).abs().mul(4).long() % 11
    logits = (pb.hidden @ pb.weight.T + pb.bias).detach().requires_grad_()
    kd_coef = torch.tensor(0.7, dtype=F64)
    parts = ch.chunked_logits_loss(
        logits,
        pb.mask,
        labels=labels,
        teacher_logits=teacher,
        hard_ce_coef=ce_coef,
        kd_coef=kd_coef,
        kd_temperature=kd_temperature,
        chunk_size=3,
    )
    ce = torch.nn.functional.cross_entropy(logits[pb.mask], labels[pb.mask], reduction="sum")
    kd = compute_divergence(
        "forward_kl", logits, teacher, pb.mask, kd_temperature=kd_temperature, reduction="sum"
    )
    want_loss = ce_coef * ce + 0.7 * kd
    torch.testing.assert_close(parts.loss, want_loss.detach(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(parts.kd_sum, kd.detach(), rtol=1e-12, atol=1e-13)
    (got,) = torch.autograd.grad(parts.loss, logits)
    (want,) = torch.autograd.grad(want_loss, logits)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    fused = ch.fused_linear_loss(
        pb.hidden,
        pb.weight,
        pb.mask,
        student_bias=pb.bias,
        labels=labels,
        teacher_logits=teacher,
        hard_ce_coef=ce_coef,
        kd_coef=kd_coef,
        kd_temperature=kd_temperature,
        chunk_size=4,
    )
    torch.testing.assert_close(fused.loss, want_loss.detach(), rtol=1e-12, atol=1e-13)
    ref_logits = pb.hidden @ pb.weight.T + pb.bias
    ref = ce_coef * torch.nn.functional.cross_entropy(
        ref_logits[pb.mask], labels[pb.mask], reduction="sum"
    ) + 0.7 * compute_divergence(
        "forward_kl", ref_logits, teacher, pb.mask, kd_temperature=kd_temperature, reduction="sum"
    )
    for g, w in zip(
        torch.autograd.grad(fused.loss, pb.params), torch.autograd.grad(ref, pb.params), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13)


def test_logits_chunks_are_cache_sized_on_cpu() -> None:
    assert ch.logits_chunk_size(8192) == 64 and ch.logits_chunk_size(131_072) == 4
    assert ch.logits_chunk_size(8192, "cuda") == ch.default_chunk_size(8192) == 2048


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_coef", [0.0, 0.3])
@pytest.mark.parametrize("k", [4, 11])
def test_closed_form_topk_loss_equals_the_sparse_reference(
    kd_temperature: float, ce_coef: float, k: int
) -> None:
    """CE + bucketed forward KL with a closed-form gradient equals the autograd formula of
    distil.losses.sparse, including k = V (empty tail) and a float64 tensor coefficient."""
    from distil.losses.sparse import teacher_topk, topk_divergence

    pb = Problem()
    logits = (pb.hidden @ pb.weight.T + pb.bias).detach().requires_grad_()  # (2, 7, 11)
    labels = randn(2, 7, seed=31).abs().mul(4).long() % 11
    top = teacher_topk(pb.teacher_logits, k, kd_temperature=kd_temperature)
    kd_coef = torch.tensor(0.7, dtype=F64)
    parts = ch.chunked_topk_logits_loss(
        logits,
        pb.mask,
        teacher_topk_log_probs=top.log_probs,
        teacher_topk_ids=top.ids,
        teacher_tail_log_prob=top.tail_log_prob,
        labels=labels,
        hard_ce_coef=ce_coef,
        kd_coef=kd_coef,
        kd_temperature=kd_temperature,
        chunk_size=3,
    )
    ce = torch.nn.functional.cross_entropy(logits[pb.mask], labels[pb.mask], reduction="sum")
    kd = topk_divergence(
        logits,
        top.log_probs,
        top.ids,
        pb.mask,
        teacher_tail_log_prob=top.tail_log_prob,
        kd_temperature=kd_temperature,
        reduction="sum",
    )
    want = ce_coef * ce + 0.7 * kd
    torch.testing.assert_close(parts.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.kd_sum, kd.detach(), rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(parts.loss, logits)
    (ref,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert bool((got[~pb.mask] == 0).all())


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_coef", [0.0, 0.3])
@pytest.mark.parametrize("k", [4, 11])
def test_closed_form_topk_with_sampled_tail_equals_the_reference(
    kd_temperature: float, ce_coef: float, k: int
) -> None:
    """The closed-form chunked loss with tail samples equals topk_sampled_tail_kl (+ CE) in fp64,
    values and gradients, with duplicate drawn ids, masked positions and k = V."""
    from distil.losses.sparse import sample_tail_targets, teacher_topk, topk_sampled_tail_kl

    pb = Problem()
    logits = (pb.hidden @ pb.weight.T + pb.bias).detach().requires_grad_()  # (2, 7, 11)
    labels = randn(2, 7, seed=31).abs().mul(4).long() % 11
    top = teacher_topk(pb.teacher_logits, k, kd_temperature=kd_temperature)
    ids, lp = sample_tail_targets(
        pb.teacher_logits,
        top.ids,
        5,
        kd_temperature=kd_temperature,
        generator=torch.Generator().manual_seed(3),
    )
    kd_coef = torch.tensor(0.7, dtype=F64)
    parts = ch.chunked_topk_logits_loss(
        logits,
        pb.mask,
        teacher_topk_log_probs=top.log_probs,
        teacher_topk_ids=top.ids,
        teacher_tail_log_prob=top.tail_log_prob,
        labels=labels,
        hard_ce_coef=ce_coef,
        kd_coef=kd_coef,
        kd_temperature=kd_temperature,
        chunk_size=3,
        teacher_tail_sample_ids=ids,
        teacher_tail_sample_log_probs=lp,
    )
    ce = torch.nn.functional.cross_entropy(logits[pb.mask], labels[pb.mask], reduction="sum")
    kd = topk_sampled_tail_kl(
        logits,
        top._replace(tail_sample_ids=ids, tail_sample_log_probs=lp),
        pb.mask,
        kd_temperature=kd_temperature,
        reduction="sum",
    )
    want = ce_coef * ce + 0.7 * kd
    torch.testing.assert_close(parts.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.kd_sum, kd.detach(), rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(parts.loss, logits)
    (ref,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert bool((got[~pb.mask] == 0).all())


@pytest.mark.parametrize("kd_temperature", [1.0, 2.0])
@pytest.mark.parametrize("proposal_temperature", [None, 2.5])
def test_closed_form_sampled_loss_equals_the_plain_estimator(
    kd_temperature: float, proposal_temperature: float | None
) -> None:
    """Chunked CE + importance-sampled forward KL with a closed-form gradient equals the fp64
    autograd formula ``Σ_i w_i (log p_i − log q_i)``, ``w_i = p_i / (n r_i)``; masked rows get 0."""
    from distil.losses.sparse import sample_teacher_targets

    pb = Problem()
    logits = (pb.hidden @ pb.weight.T + pb.bias).detach().requires_grad_()  # (2, 7, 11)
    labels = randn(2, 7, seed=31).abs().mul(4).long() % 11
    drawn = sample_teacher_targets(
        pb.teacher_logits,
        6,
        kd_temperature=kd_temperature,
        proposal_temperature=proposal_temperature,
        generator=torch.Generator().manual_seed(5),
    )
    proposal = None if proposal_temperature is None else drawn.proposal_log_probs
    parts = ch.chunked_sampled_logits_loss(
        logits,
        pb.mask,
        sample_ids=drawn.ids,
        teacher_sample_log_probs=drawn.teacher_log_probs,
        proposal_log_probs=proposal,
        labels=labels,
        hard_ce_coef=0.3,
        kd_coef=0.7,
        kd_temperature=kd_temperature,
        chunk_size=3,
    )
    lq = torch.log_softmax(logits / kd_temperature, -1).gather(-1, drawn.ids)  # (2, 7, 6)
    w = (drawn.teacher_log_probs - drawn.proposal_log_probs).exp() / 6
    kd = (w * (drawn.teacher_log_probs - lq)).sum(-1)[pb.mask].sum()
    ce = torch.nn.functional.cross_entropy(logits[pb.mask], labels[pb.mask], reduction="sum")
    want = 0.3 * ce + 0.7 * kd
    torch.testing.assert_close(parts.loss, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(parts.kd_sum, kd.detach(), rtol=1e-12, atol=1e-12)
    (got,) = torch.autograd.grad(parts.loss, logits)
    (ref,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert bool((got[~pb.mask] == 0).all())


def test_plain_sampled_estimator_is_unbiased() -> None:
    """Mean value and gradient of the chunked sampled KL over many draws match the exact KL."""
    from distil.losses.sparse import sample_teacher_targets

    s, t = randn(1, 9, seed=50) * 1.5, randn(1, 9, seed=51) * 1.5
    draws = 4000
    drawn = sample_teacher_targets(
        t.expand(draws, 9), 4, generator=torch.Generator().manual_seed(52)
    )
    student = s.expand(draws, 9).clone().requires_grad_()
    mask = torch.ones(draws, dtype=torch.bool)
    parts = ch.chunked_sampled_logits_loss(
        student, mask, sample_ids=drawn.ids, teacher_sample_log_probs=drawn.teacher_log_probs
    )
    (grad,) = torch.autograd.grad(
        parts.loss, student
    )  # row i holds the gradient of its own estimate
    per_row = []
    with torch.no_grad():
        for i in range(0, draws, 1000):
            sub = ch.chunked_sampled_logits_loss(
                s.expand(1000, 9),
                mask[:1000],
                sample_ids=drawn.ids[i : i + 1000],
                teacher_sample_log_probs=drawn.teacher_log_probs[i : i + 1000],
            )
            per_row.append(float(sub.kd_sum) / 1000)
    s_true = s.clone().requires_grad_()
    exact = DIVERGENCES["forward_kl"](s_true, t)
    (true_grad,) = torch.autograd.grad(exact, s_true)
    assert abs(sum(per_row) / len(per_row) - float(exact.detach())) < 0.05
    assert bool(((grad.mean(0) - true_grad[0]).abs() < 5 * grad.std(0) / draws**0.5 + 1e-9).all())
