"""LM pruning: importance scores against references, pruning against masking, HF folder loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distil.compress.lm_prune import (
    DepthImportance,
    WidthKeep,
    WidthTarget,
    collect_lm_importance,
    layer_loss_increase,
    lm_parameter_count,
    plan_width,
    prune_causal_lm,
    prune_lm_width,
    select_layers,
    uniform_ratio_target,
)
from distil.errors import DistilError
from distil.models.lm import CausalLMSpec, build_causal_lm, count_parameters

SPEC = CausalLMSpec(
    num_layers=4,
    hidden_size=32,
    num_heads=4,
    intermediate_size=64,
    vocab_size=96,
    max_context=32,
    num_kv_heads=2,
)


def _model() -> torch.nn.Module:
    return build_causal_lm(SPEC, seed=0).eval()


def _batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, SPEC.vocab_size, (2, 12), generator=g)} for _ in range(n)
    ]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_full_width_target_is_the_same_model() -> None:
    model = _model()
    importance = collect_lm_importance(model, _batches())
    same = prune_lm_width(model, plan_width(model, importance, WidthTarget()))
    ids = _batches(1)[0]["input_ids"]
    torch.testing.assert_close(_logits(same, ids), _logits(model, ids), rtol=0, atol=0)


def test_head_and_neuron_pruning_equals_masking_them_out() -> None:
    """Removing heads and neurons is exact: the same as zeroing what reads them out."""
    model = _model()
    importance = collect_lm_importance(model, _batches())
    keep = plan_width(model, importance, WidthTarget(intermediate_size=40, num_heads=2))
    pruned = prune_lm_width(model, keep)
    masked = build_causal_lm(SPEC, seed=0).eval()
    for layer, q_rows, f_keep in zip(
        masked.model.layers, keep.query_rows, keep.neurons, strict=True
    ):
        with torch.no_grad():
            drop_q = torch.ones(layer.self_attn.o_proj.in_features, dtype=torch.bool)
            drop_q[q_rows] = False
            layer.self_attn.o_proj.weight[:, drop_q] = 0
            drop_f = torch.ones(layer.mlp.down_proj.in_features, dtype=torch.bool)
            drop_f[f_keep] = False
            layer.mlp.down_proj.weight[:, drop_f] = 0
    ids = _batches(1)[0]["input_ids"]
    torch.testing.assert_close(_logits(pruned, ids), _logits(masked, ids), rtol=1e-5, atol=1e-5)
    assert pruned.config.num_attention_heads == 2
    assert pruned.config.num_key_value_heads == 1  # the 2:1 grouped-query ratio is kept
    assert pruned.config.intermediate_size == 40


def test_dead_units_score_zero_and_are_pruned_first() -> None:
    model = _model()
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.mlp.up_proj.weight[5] = 0  # neuron 5 of layer 1 never fires
        layer.self_attn.v_proj.weight[8:16] = 0  # key-value head 1 (query heads 2, 3) is silent
    importance = collect_lm_importance(model, _batches())
    assert importance.neurons[1, 5] == 0
    assert torch.all(importance.heads[1, 2:] == 0) and torch.all(importance.heads[1, :2] > 0)
    keep = plan_width(model, importance, WidthTarget(intermediate_size=63, num_heads=2))
    assert 5 not in keep.neurons[1].tolist()
    assert keep.query_rows[1].tolist() == list(range(16))  # heads 0 and 1, 8 dims each
    assert keep.kv_rows[1].tolist() == list(range(8))


def test_block_influence_matches_a_float64_reference() -> None:
    model = _model()
    batches = _batches(2)
    importance = collect_lm_importance(model, batches)
    cosines = torch.zeros(SPEC.num_layers - 1, dtype=torch.float64)
    tokens = 0
    for batch in batches:
        with torch.no_grad():
            hidden = model(**batch, output_hidden_states=True, use_cache=False).hidden_states
        for layer in range(SPEC.num_layers - 1):  # the last entry is after the final norm
            a, b = hidden[layer].double(), hidden[layer + 1].double()
            cosines[layer] += F.cosine_similarity(a, b, dim=-1).sum()
        tokens += batch["input_ids"].numel()
    expected = 1 - cosines / tokens
    torch.testing.assert_close(
        importance.block_influence[:-1].double(), expected, rtol=1e-5, atol=1e-6
    )
    assert importance.num_tokens == tokens


def test_padding_does_not_change_the_scores() -> None:
    model = _model()
    ids = _batches(1)[0]["input_ids"][:1]  # (1, 12)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 4)], dim=1).long()
    plain = collect_lm_importance(model, [{"input_ids": ids}])
    masked = collect_lm_importance(model, [{"input_ids": padded, "attention_mask": mask}])
    for a, b in [
        (plain.block_influence, masked.block_influence),
        (plain.heads, masked.heads),
        (plain.neurons, masked.neurons),
        (plain.channels, masked.channels),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_an_identity_layer_is_the_one_depth_pruning_drops() -> None:
    model = _model()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    batches = _batches(2)
    importance = collect_lm_importance(model, batches)
    assert float(importance.block_influence[2]) == pytest.approx(0.0, abs=1e-6)
    increase = layer_loss_increase(model, batches)
    assert float(increase[2]) == pytest.approx(0.0, abs=1e-5)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4  # restored
    result = prune_causal_lm(model, batches, num_layers=3)
    assert result.kept_layers == (0, 1, 3)
    ids = batches[0]["input_ids"]
    torch.testing.assert_close(_logits(result.model, ids), _logits(model, ids))
    # At random init a layer can lower the loss; loss_increase drops the most negative one.
    by_loss = prune_causal_lm(
        model, batches, num_layers=3, depth_importance=DepthImportance.loss_increase
    )
    dropped = int(increase.argmin())
    assert by_loss.kept_layers == tuple(i for i in range(4) if i != dropped)
    assert by_loss.layer_scores is not None
    torch.testing.assert_close(by_loss.layer_scores, increase)


def test_pruned_folder_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _model()
    target = WidthTarget(hidden_size=24, intermediate_size=48, num_heads=2)
    result = prune_causal_lm(model, _batches(), width=target, num_layers=3)
    result.model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = loaded.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (24, 48, 3)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    ids = _batches(1)[0]["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(result.model, ids))
    assert count_parameters(loaded).total == lm_parameter_count(
        model.config,
        hidden_size=24,
        intermediate_size=48,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=3,
    )


def test_bad_targets_are_named() -> None:
    model = _model()
    importance = collect_lm_importance(model, _batches(1))
    with pytest.raises(DistilError, match="grouped-query ratio 2"):
        plan_width(model, importance, WidthTarget(num_heads=3))
    with pytest.raises(DistilError, match="intermediate_size=65"):
        plan_width(model, importance, WidthTarget(intermediate_size=65))
    with pytest.raises(DistilError, match="keeps between 1 and 4"):
        select_layers(importance.block_influence, 5)
    with pytest.raises(DistilError, match="no tokens"):
        collect_lm_importance(model, [])
    assert isinstance(plan_width(model, importance, WidthTarget()), WidthKeep)


def test_uniform_ratio_target_scales_every_width_by_the_square_root() -> None:
    config = _model().config
    target = uniform_ratio_target(config, 0.25)
    assert (target.hidden_size, target.intermediate_size, target.num_heads) == (16, 32, 2)
    assert target.num_heads % 2 == 0  # the grouped-query ratio of SPEC is 2
    full = lm_parameter_count(config)
    half_width = lm_parameter_count(
        config, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    assert half_width < 0.5 * full
    with pytest.raises(DistilError, match="fraction"):
        uniform_ratio_target(config, 0.0)


def test_tied_embeddings_stay_tied_after_width_pruning(tmp_path: Path) -> None:
    import dataclasses

    from transformers import AutoModelForCausalLM

    tied = build_causal_lm(dataclasses.replace(SPEC, tie_word_embeddings=True), seed=0).eval()
    result = prune_causal_lm(tied, _batches(), width=WidthTarget(hidden_size=20))
    pruned = result.model
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _batches(1)[0]["input_ids"]
    torch.testing.assert_close(_logits(loaded, ids), _logits(pruned, ids))
