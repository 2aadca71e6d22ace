"""``distil advise``: parameter formulas against real models, candidate proposals, memory plans, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distil.cli import app
from distil.errors import DistilError
from distil.models.lm import CausalLMSpec, build_causal_lm, save_model_folder, uniform_layer_indices
from distil.planning import advise as adv

runner = CliRunner()

BASE = adv.shape_from_inline("layers=12,hidden=768,heads=12,ffn=3072,vocab=32000")


@pytest.mark.parametrize(
    ("family", "kwargs"),
    [
        ("llama", {"num_key_value_heads": 2}),
        ("llama", {"tie_word_embeddings": True}),
        ("gpt2", {}),
        ("qwen2", {"num_key_value_heads": 2}),
    ],
)
def test_parameter_formula_matches_transformers(family: str, kwargs: dict[str, object]) -> None:
    import transformers

    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=300,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[family]
        config = cls(
            vocab_size=300,
            hidden_size=32,
            intermediate_size=88,
            num_hidden_layers=2,
            num_attention_heads=4,
            **kwargs,
        )
        model = model_cls(config)
    shape = adv.shape_from_hf_config(config.to_dict())
    assert shape.params() == sum(p.numel() for p in model.parameters())


def test_folder_teacher_uses_exact_count_from_weights(tmp_path: Path) -> None:
    spec = CausalLMSpec(
        num_layers=4,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        vocab_size=200,
        max_context=64,
    )
    model = build_causal_lm(spec, seed=0)
    save_model_folder(model, tmp_path / "teacher")
    shape, exact, source = adv.load_teacher_shape(str(tmp_path / "teacher"))
    assert exact == sum(p.numel() for p in model.parameters()) == shape.params()
    assert shape.num_layers == 4 and "folder" in source


def test_proposals_meet_the_target_and_say_how_to_initialise() -> None:
    cands = adv.propose(BASE, speedup=2.0)
    names = [c.name for c in cands]
    assert names[:3] == ["depth cut", "width cut", "balanced cut"] and "capacity-gap size" in names
    for c in cands:
        if c.name != "capacity-gap size":
            assert c.meets_target and c.speedup_b1 >= 2.0
    depth = cands[0]
    assert depth.shape.hidden_size == BASE.hidden_size
    assert depth.init == f"teacher layers {list(uniform_layer_indices(12, depth.shape.num_layers))}"
    # the deepest depth cut that meets 2x: one more layer would not
    one_more = adv.estimate(
        BASE, adv.replace(depth.shape, num_layers=depth.shape.num_layers + 1), adv.Budget()
    )
    assert one_more["speedup_b1"] < 2.0
    assert cands[1].init.startswith("random") and cands[1].shape.num_layers == 12
    gap = next(c for c in cands if c.name == "capacity-gap size")
    assert abs(gap.size_ratio - adv.CAPACITY_GAP_RATIO) / adv.CAPACITY_GAP_RATIO < 0.15


def test_size_targets() -> None:
    for c in adv.propose(BASE, size_ratio=0.25):
        assert c.meets_target == (c.params <= 0.25 * BASE.params())
    assert all(c.params <= 50e6 for c in adv.propose(BASE, max_params=50e6) if c.meets_target)


def test_pick_teacher_follows_the_capacity_gap_law() -> None:
    assert adv.pick_teacher(3e9, {"7B": 7e9, "13B": 13e9, "70B": 70e9}) == "7B"
    assert adv.pick_teacher(100e6, {"125M": 125e6, "350M": 350e6, "1.3B": 1.3e9}) == "350M"
    with pytest.raises(DistilError):
        adv.pick_teacher(1.0, {})


def test_memory_plan_verdicts() -> None:
    student = adv.replace(BASE, num_layers=6)
    big = adv.memory_plan(
        BASE, student, adv.Budget(memory_bytes=80 * 2**30, dataset_tokens=1e8, epochs=3)
    )
    assert big["live_fits"] and big["cache_fits"] and "save 2 teacher pass" in big["advice"]
    assert big["cache_bytes"] == pytest.approx(1e8 * (64 * 6 + 4))
    plan = adv.memory_plan(BASE, student, adv.Budget(memory_bytes=big["student_train_bytes"] + 1))
    assert not plan["live_fits"] and plan["cache_fits"] and "distil cache" in plan["advice"]
    tiny = adv.memory_plan(BASE, student, adv.Budget(memory_bytes=1e6))
    assert not tiny["cache_fits"] and "does not fit" in tiny["advice"]


def test_parse_count() -> None:
    assert (
        adv.parse_count("125M") == 125e6
        and adv.parse_count("1.5B") == 1.5e9
        and adv.parse_count("3e5") == 3e5
    )
    assert (
        adv.parse_count("24GB", binary=True) == adv.parse_count("24GiB", binary=True) == 24 * 2**30
    )
    with pytest.raises(DistilError):
        adv.parse_count("lots")
    with pytest.raises(DistilError, match="lacks"):
        adv.shape_from_inline("hidden=64")


def test_cli_advise_folder_with_measure(tmp_path: Path) -> None:
    spec = CausalLMSpec(
        num_layers=4,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,
        vocab_size=256,
        max_context=128,
    )
    save_model_folder(build_causal_lm(spec, seed=0), tmp_path / "t")
    out = tmp_path / "advice.json"
    result = runner.invoke(
        app,
        [
            "advise",
            str(tmp_path / "t"),
            "--speedup",
            "1.5",
            "--memory",
            "1GB",
            "--dataset-tokens",
            "1M",
            "--measure",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "depth cut" in result.output and "placement" in result.output
    advice = json.loads(out.read_text())
    assert advice["teacher"]["params_exact"] and all(
        c["measured speed-up"] > 0 for c in advice["candidates"]
    )


def test_cli_advise_classifier_config_measures_candidates() -> None:
    result = runner.invoke(app, ["advise", "classifier_kd", "--speedup", "2"])
    assert result.exit_code == 0, result.output
    assert "mlp" in result.output and "caching the teacher's logits" in result.output


def test_cli_advise_bad_teacher() -> None:
    result = runner.invoke(app, ["advise", "no-such-thing"])
    assert result.exit_code == 2 and "neither" in result.output
