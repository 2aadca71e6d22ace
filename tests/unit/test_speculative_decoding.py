"""distil's batched speculative decoding on tiny models: exactly lossless, counted honestly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import distil.decoding.speculative as spec
from distil.decoding.cached_lm import CachedLM
from distil.decoding.speculative import autoregressive_generate, speculative_generate
from distil.errors import DistilError
from distil.evaluation.speculative import greedy_target_calls, token_acceptance
from distil.models.lm import CausalLMSpec, build_causal_lm
from tests.helpers import make_draft_pair

NEW = 14


@torch.no_grad()
def greedy_without_cache(
    model: Any, prompt: list[int], vocab: int, eos: int | None = None
) -> list[int]:
    """The target alone, the plainest way: the whole sequence through the model at every step,
    no KV cache, argmax over the real vocabulary; stops after ``eos``."""
    ids = list(prompt)
    for _ in range(NEW):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1, :vocab].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, Any]]:
    """A tiny float64 target with 8 padded vocabulary rows and a 1-layer draft cut from it, six
    ragged prompts, and the target's own greedy continuations."""
    target, draft = make_draft_pair()
    vocab = 400
    padded = list(range(vocab, target.lm_head.weight.shape[0]))  # rows no token id maps to
    g = torch.Generator().manual_seed(3)
    lengths = [1, 7, 3, 12, 5, 9]
    prompts = [torch.randint(3, 390, (n,), generator=g).tolist() for n in lengths]
    reference = [greedy_without_cache(target, p, vocab) for p in prompts]
    yield {
        "target": target,
        "draft": draft,
        "vocab": vocab,
        "padded": padded,
        "prompts": prompts,
        "reference": reference,
    }


@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
def test_greedy_is_token_identical_to_the_target_alone(pair: dict[str, Any], gamma: int) -> None:
    prompts, reference = pair["prompts"], pair["reference"]
    for batch in (1, 4, 6):
        tokens: list[list[int]] = []
        for start in range(0, len(prompts), batch):
            result = speculative_generate(
                pair["target"],
                pair["draft"],
                prompts[start : start + batch],
                gamma=gamma,
                max_new_tokens=NEW,
                vocab_size=pair["vocab"],
            )
            tokens += result.tokens
        assert tokens == reference, (gamma, batch)
    # ragged acceptance really happened: rows advanced by different amounts in one round
    assert len(set(result.block_accepted)) > 1


def test_plain_loop_matches_transformers_greedy(pair: dict[str, Any]) -> None:
    out = autoregressive_generate(
        pair["target"], pair["prompts"], max_new_tokens=NEW, vocab_size=pair["vocab"]
    )
    assert out.tokens == pair["reference"] and out.target_calls == NEW
    prompt = pair["prompts"][1]
    hf = pair["target"].generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NEW,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        suppress_tokens=pair["padded"],
    )
    assert hf[0, len(prompt) :].tolist() == pair["reference"][1]


def test_eos_ends_each_row_where_the_target_would(pair: dict[str, Any]) -> None:
    eos = pair["reference"][1][4]  # a token the target writes: rows stop at it
    want = [greedy_without_cache(pair["target"], p, pair["vocab"], eos) for p in pair["prompts"]]
    result = speculative_generate(
        pair["target"],
        pair["draft"],
        pair["prompts"],
        gamma=3,
        max_new_tokens=NEW,
        eos_token_ids=[eos],
        vocab_size=pair["vocab"],
    )
    assert result.tokens == want
    assert any(len(t) < NEW for t in want)
    assert sum(result.block_emitted) == sum(len(t) for t in result.tokens)


def test_padded_vocab_rows_are_never_proposed_or_emitted(pair: dict[str, Any]) -> None:
    target, draft, vocab = pair["target"], pair["draft"], pair["vocab"]
    for model in (target, draft):
        assert model.lm_head.weight.shape[0] > vocab
    with torch.no_grad():
        saved = [m.lm_head.weight[vocab:].clone() for m in (target, draft)]
        for m in (target, draft):  # padded rows that would win every argmax if they were seen
            m.lm_head.weight[vocab:] = 50 * m.lm_head.weight[:1].sign()
    try:
        for temperature in (0.0, 1.0):
            result = speculative_generate(
                target,
                draft,
                pair["prompts"],
                gamma=3,
                max_new_tokens=NEW,
                sampling_temperature=temperature,
                vocab_size=vocab,
            )
            assert max(max(t) for t in result.tokens) < vocab
        assert result.tokens != [[vocab] * NEW] * len(pair["prompts"])
    finally:
        with torch.no_grad():
            for m, w in zip((target, draft), saved, strict=True):
                m.lm_head.weight[vocab:] = w


def test_calls_are_counted_and_follow_from_top1_agreement(pair: dict[str, Any]) -> None:
    """Forward passes counted by hooks equal the result's; per row, the rounds equal the ones
    derived from α's agreement sequence on the target's text (greedy τ is determined by it)."""
    target, draft = pair["target"], pair["draft"]
    calls = Counter[str]()
    hooks = [
        m.register_forward_hook(lambda *_, name=name: calls.update([name]))
        for name, m in (("target", target), ("draft", draft))
    ]
    try:
        result = speculative_generate(
            target, draft, pair["prompts"], gamma=4, max_new_tokens=NEW, vocab_size=pair["vocab"]
        )
    finally:
        for h in hooks:
            h.remove()
    assert (calls["target"], calls["draft"]) == (result.target_calls, result.draft_calls)
    acceptance = token_acceptance(
        target, draft, pair["prompts"], pair["reference"], vocab_size=pair["vocab"]
    )
    for row in range(len(pair["prompts"])):
        derived, accepted = greedy_target_calls(acceptance.agree[acceptance.row == row].tolist(), 4)
        mine = [a for r, a in zip(result.block_row, result.block_accepted, strict=True) if r == row]
        assert (len(mine), mine) == (derived, accepted)
    rounds_per_row = Counter(result.block_row)
    assert result.target_calls == max(rounds_per_row.values())  # one pass serves every row


def test_parity_with_transformers_assisted_generation(pair: dict[str, Any]) -> None:
    target, draft = pair["target"], pair["draft"]
    calls = Counter[str]()
    hook = target.register_forward_hook(lambda *_: calls.update(["target"]))
    saved = draft.generation_config.to_dict()
    draft.generation_config.num_assistant_tokens = 3
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    try:
        for prompt in pair["prompts"][:3]:
            calls.clear()
            out = target.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                assistant_model=draft,
                do_sample=False,
                max_new_tokens=NEW,
                eos_token_id=None,
                pad_token_id=0,
                suppress_tokens=pair["padded"],
            )
            hf_calls = calls["target"]
            ours = speculative_generate(
                target, draft, [prompt], gamma=3, max_new_tokens=NEW, vocab_size=pair["vocab"]
            )
            assert ours.tokens[0] == out[0, len(prompt) :].tolist()
            assert ours.target_calls == hf_calls
    finally:
        hook.remove()
        draft.generation_config.update(**saved)


def test_sampled_rows_do_not_depend_on_their_batch(pair: dict[str, Any]) -> None:
    kwargs = {"gamma": 3, "max_new_tokens": NEW, "sampling_temperature": 1.0, "seed": 7}
    together = speculative_generate(pair["target"], pair["draft"], pair["prompts"], **kwargs)
    alone = speculative_generate(pair["target"], pair["draft"], pair["prompts"][:1], **kwargs)
    assert together.tokens[0] == alone.tokens[0]


def test_cached_lm_rollback_and_packing_match_a_full_forward(pair: dict[str, Any]) -> None:
    target = pair["target"]
    lm = CachedLM(target, 2, torch.device("cpu"))
    rows = [[5, 6, 7], [8, 9, 10, 11, 12]]
    lm.step(
        torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]]),
        torch.tensor([[0, 0, 1, 1, 1], [1] * 5]).bool(),
    )
    lm.step(torch.tensor([[20, 21, 22], [30, 31, 32]]), torch.ones(2, 3, dtype=torch.bool))
    lm.drop_last(torch.tensor([2, 0]))  # row 0 rejects 21, 22; row 1 keeps all
    rows = [[5, 6, 7, 20], [8, 9, 10, 11, 12, 30, 31, 32]]
    lm.step(torch.tensor([[0, 40], [41, 42]]), torch.tensor([[0, 1], [1, 1]]).bool())
    rows = [rows[0] + [40], rows[1] + [41, 42]]
    lm.compact(force=True)
    assert lm.valid.shape[1] == max(len(r) for r in rows) and lm.lengths.tolist() == [5, 10]
    logits = lm.step(torch.tensor([[50], [51]]), torch.ones(2, 1, dtype=torch.bool))
    for r, extra in enumerate((50, 51)):
        full = target(input_ids=torch.tensor([rows[r] + [extra]])).logits[0, -1]
        torch.testing.assert_close(logits[r, -1], full, rtol=1e-10, atol=1e-10)


def test_refuses_what_cannot_run(pair: dict[str, Any]) -> None:
    target, draft = pair["target"], pair["draft"]
    with pytest.raises(DistilError, match="gamma"):
        speculative_generate(target, draft, [[1]], gamma=0, max_new_tokens=2)
    with pytest.raises(DistilError, match="at least one token"):
        speculative_generate(target, draft, [[1], []], gamma=2, max_new_tokens=2)
    with pytest.raises(DistilError, match="context"):
        speculative_generate(target, draft, [[1] * 60], gamma=2, max_new_tokens=10)
    with pytest.raises(DistilError, match="output rows"):
        speculative_generate(target, draft, [[1]], gamma=2, max_new_tokens=2, vocab_size=10**6)


# --------------------------------------------------------------------------------------------
# Sampling: the output is distributed as the target's


V, ROWS, NEW_SAMPLED, SAMPLES = 6, 8, 3, 4000


def _peaked_model(layers: int, seed: int) -> Any:
    """A tiny Llama with 6 real ids and 2 padded rows, its head scaled so that next-token
    distributions are peaked and differ between seeds (acceptance about 0.45)."""
    spec_ = CausalLMSpec(
        num_layers=layers,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        vocab_size=ROWS,
        max_context=16,
    )
    model = build_causal_lm(spec_, seed=seed).double().eval()
    with torch.no_grad():
        model.lm_head.weight *= 15.0
    return model


def _exact_joint(model: Any, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """The target's exact probability of every sequence of NEW_SAMPLED tokens after ``prompt``."""
    joint: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(NEW_SAMPLED):
        seqs = list(joint)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(s) for s in seqs])).logits
        probs = torch.softmax(logits[:, -1, :V], -1)
        joint = {
            (*s, v): joint[s] * float(probs[i, v]) for i, s in enumerate(seqs) for v in range(V)
        }
    return joint


def _chi_square_p(tokens: list[list[int]], joint: dict[tuple[int, ...], float]) -> float:
    """Pearson's test of the observed sequences against ``joint``; cells expected < 5 pooled."""
    n = len(tokens)
    counts = Counter(tuple(t) for t in tokens)
    expected = torch.tensor([joint[s] * n for s in joint], dtype=torch.float64)
    observed = torch.tensor([float(counts.get(s, 0)) for s in joint], dtype=torch.float64)
    big = expected >= 5
    e = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    o = torch.cat([observed[big], observed[~big].sum().reshape(1)])
    o, e = o[e > 0], e[e > 0]
    chi2, dof = float(((o - e) ** 2 / e).sum()), o.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(chi2 / 2)))


def test_sampled_output_is_distributed_as_the_target() -> None:
    """Sequences of 3 tokens from two prompts of different lengths (left padding, ragged
    acceptance, rejections, residual draws and bonus tokens all occur with γ = 2) against the
    target's exact joint distribution. Seeds are fixed: the test is deterministic. The same test
    rejects the draft's own samples and a rule that redraws rejections from p instead of the
    residual, so it has the power to catch a wrong rule."""
    target, draft = _peaked_model(2, 0), _peaked_model(1, 5)
    prompts = [[1, 2, 3], [4, 0]]
    batch = [prompts[i % 2] for i in range(2 * SAMPLES)]
    kwargs = {"max_new_tokens": NEW_SAMPLED, "sampling_temperature": 1.0, "vocab_size": V}
    result = speculative_generate(target, draft, batch, gamma=2, seed=0, **kwargs)
    acceptance = sum(result.block_accepted) / sum(result.block_proposed)
    assert 0.2 < acceptance < 0.8  # both branches of the rule are exercised
    joints = [_exact_joint(target, p) for p in prompts]
    for i in range(2):
        assert _chi_square_p(result.tokens[i::2], joints[i]) > 1e-3
    own = autoregressive_generate(draft, batch[:SAMPLES:2], seed=0, **kwargs)
    assert _chi_square_p(own.tokens, joints[0]) < 1e-9


def test_a_wrong_residual_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    target, draft = _peaked_model(2, 0), _peaked_model(1, 5)
    monkeypatch.setattr(spec, "residual_distribution", lambda p, q: p)
    result = speculative_generate(
        target,
        draft,
        [[1, 2, 3]] * SAMPLES,
        gamma=2,
        max_new_tokens=NEW_SAMPLED,
        sampling_temperature=1.0,
        vocab_size=V,
    )
    assert _chi_square_p(result.tokens, _exact_joint(target, [1, 2, 3])) < 1e-9
