"""Causal-LM data: packing, masking, the single next-token shift, collate and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from distil.data.corpus import PadTokenPolicy, stdlib_root, train_bpe_tokenizer_from_texts
from distil.data.lm import (
    IGNORE_INDEX,
    LMDataFormat,
    LMDataOptions,
    OverlengthPolicy,
    build_lm_dataset,
    collate_lm_batch,
    load_local_records,
    pad_token_id_for,
    shift_for_next_token,
    tokenize_chat,
    tokenize_packed_text,
    tokenize_prompt_completion,
)
from distil.errors import DistilError


def _training_texts() -> list[str]:
    return [
        (stdlib_root() / name).read_text(encoding="utf-8")[:4_000]
        for name in ("abc.py", "bisect.py")
    ]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny byte-level BPE tokenizer with a dedicated pad token and the default chat template."""
    from transformers import AutoTokenizer

    folder = train_bpe_tokenizer_from_texts(_training_texts(), tmp_path_factory.mktemp("tok"), 300)
    return AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def eos_pad_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Same, but padding with EOS (pad == eos), the case that used to lose EOS labels."""
    from transformers import AutoTokenizer

    folder = train_bpe_tokenizer_from_texts(
        _training_texts(), tmp_path_factory.mktemp("tok_eos"), 300, pad_policy=PadTokenPolicy.EOS
    )
    return AutoTokenizer.from_pretrained(str(folder))


def _records(rows: dict[str, Any]) -> Any:
    import datasets

    return datasets.Dataset.from_dict(rows)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_packing_puts_eos_between_documents_and_cuts_fixed_blocks(tokenizer: Any) -> None:
    documents = ["def a():\n    return 1\n", "x = [1, 2, 3]\n", "class B:\n    pass\n"]
    eos = tokenizer.eos_token_id
    stream = [token for doc in documents for token in [*_encode(tokenizer, doc), eos]]
    block = 8
    options = LMDataOptions(data_format=LMDataFormat.TEXT, max_length=block)

    examples = tokenize_packed_text(_records({"text": documents}), tokenizer, options)

    n_blocks = len(stream) // block
    assert len(examples) == n_blocks
    assert examples["example_id"] == list(range(n_blocks))
    packed = [token for row in examples["input_ids"] for token in row]
    assert packed == stream[: n_blocks * block]  # the tail shorter than a block is dropped
    assert all(len(row) == block for row in examples["input_ids"])
    assert examples["labels"] == examples["input_ids"]  # every token supervised, EOS included
    first_doc_end = len(_encode(tokenizer, documents[0]))
    assert packed[first_doc_end] == eos

    with pytest.raises(DistilError, match="fewer than one block"):
        tokenize_packed_text(
            _records({"text": ["x"]}), tokenizer, LMDataOptions(LMDataFormat.TEXT, 64)
        )


def test_prompt_tokens_are_masked_and_completion_ends_with_supervised_eos(tokenizer: Any) -> None:
    prompt, completion = "def add(a, b):\n", "    return a + b\n"
    options = LMDataOptions(data_format=LMDataFormat.PROMPT_COMPLETION, max_length=64)

    examples = tokenize_prompt_completion(
        _records({"prompt": [prompt], "completion": [completion]}), tokenizer, options
    )

    prompt_ids, completion_ids = _encode(tokenizer, prompt), _encode(tokenizer, completion)
    eos = tokenizer.eos_token_id
    assert examples[0]["input_ids"] == prompt_ids + completion_ids + [eos]
    assert examples[0]["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [eos]


def test_eos_stays_supervised_when_pad_equals_eos(eos_pad_tokenizer: Any) -> None:
    tokenizer = eos_pad_tokenizer
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    rows = {"prompt": ["a = ", "def f():\n"], "completion": ["1", "    return [1, 2, 3]\n"]}
    examples = build_lm_dataset(
        _records(rows), tokenizer, LMDataOptions(LMDataFormat.PROMPT_COMPLETION, 64)
    )

    batch = collate_lm_batch([examples[0], examples[1]], pad_token_id=pad_token_id_for(tokenizer))

    short = len(examples[0]["input_ids"])
    assert short < batch["input_ids"].shape[1]  # the first row is padded...
    assert batch["input_ids"][0, short:].eq(eos).all()  # ...with the EOS id,
    assert batch["labels"][0, short - 1] == eos  # yet its real EOS keeps its label
    assert batch["attention_mask"][0, short - 1] == 1
    assert batch["labels"][0, short:].eq(IGNORE_INDEX).all()  # and only padding is masked
    assert batch["attention_mask"][0, short:].eq(0).all()
    assert shift_for_next_token(batch["labels"])[0, short - 2] == eos  # EOS is a training target
    assert batch["labels"][1, -1] == eos


def test_chat_supervises_only_assistant_turns(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sum?"},
        {"role": "assistant", "content": "return a + b"},
        {"role": "user", "content": "Product?"},
        {"role": "assistant", "content": "return a * b"},
    ]
    examples = tokenize_chat(
        _records({"messages": [messages]}), tokenizer, LMDataOptions(LMDataFormat.CHAT, 128)
    )

    input_ids, labels = examples[0]["input_ids"], examples[0]["labels"]
    runs: list[list[int]] = [[]]
    for token, label in zip(input_ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if runs[-1]:
                runs.append([])
        else:
            assert label == token
            runs[-1].append(token)
    supervised_texts = [tokenizer.decode(run) for run in runs if run]
    assert supervised_texts == ["return a + b<|endoftext|>", "return a * b<|endoftext|>"]

    # Cross-check with transformers' own mask, from the {% generation %} tags of the template.
    reference = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    assert reference["input_ids"] == input_ids
    assert [label != IGNORE_INDEX for label in labels] == [
        bool(m) for m in reference["assistant_masks"]
    ]


def test_chat_without_template_names_the_fix(tokenizer: Any) -> None:
    import copy

    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    records = _records(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}
    )
    with pytest.raises(DistilError, match="chat template") as error:
        tokenize_chat(records, no_template, LMDataOptions(LMDataFormat.CHAT, 64))
    assert "tokenizer.chat_template" in str(error.value) and "prompt/completion" in str(error.value)


def test_shift_for_next_token_is_the_single_shift_and_matches_hf_loss(tokenizer: Any) -> None:
    labels = torch.tensor([[5, 6, 7, IGNORE_INDEX], [IGNORE_INDEX, 8, 9, 10]])
    assert shift_for_next_token(labels).tolist() == [
        [6, 7, IGNORE_INDEX, IGNORE_INDEX],
        [8, 9, 10, IGNORE_INDEX],
    ]
    assert labels.tolist()[0] == [5, 6, 7, IGNORE_INDEX]  # input untouched

    from distil.models.lm import CausalLMSpec, build_causal_lm

    model = build_causal_lm(CausalLMSpec(2, 32, 4, 64, len(tokenizer), 64), seed=0).eval()
    rows = {"prompt": ["x = ", "def f():\n"], "completion": ["[1, 2]", "    pass\n"]}
    examples = build_lm_dataset(
        _records(rows), tokenizer, LMDataOptions(LMDataFormat.PROMPT_COMPLETION, 64)
    )
    batch = collate_lm_batch(list(examples), pad_token_id=pad_token_id_for(tokenizer))
    with torch.no_grad():
        output = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
    targets = shift_for_next_token(batch["labels"])
    ours = torch.nn.functional.cross_entropy(
        output.logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX
    )  # full-length logits, no slicing
    torch.testing.assert_close(ours, output.loss)


def test_no_supervised_token_is_an_error_not_a_zero_loss(tokenizer: Any) -> None:
    long_prompt = "def f():\n    return 1\n" * 10
    options = LMDataOptions(
        LMDataFormat.PROMPT_COMPLETION, max_length=16, overlength=OverlengthPolicy.TRUNCATE
    )
    with pytest.raises(
        DistilError, match="none of the 1 prompt/completion examples has a supervised token"
    ):
        build_lm_dataset(
            _records({"prompt": [long_prompt], "completion": ["x"]}), tokenizer, options
        )

    mixed = _records(
        {"prompt": [long_prompt, "a"], "completion": ["x", "b"], "example_id": [70, 71]}
    )
    with pytest.raises(DistilError, match=r"no supervised token \(example_id 70\)"):
        build_lm_dataset(mixed, tokenizer, options)
    kept = build_lm_dataset(mixed, tokenizer, dataclasses.replace(options, drop_unsupervised=True))
    assert kept["example_id"] == [71]

    chat = _records({"messages": [[{"role": "user", "content": "anyone?"}]]})
    with pytest.raises(DistilError, match="supervised token"):
        build_lm_dataset(chat, tokenizer, LMDataOptions(LMDataFormat.CHAT, 64))

    masked = {"example_id": 3, "input_ids": [4, 5, 6], "labels": [IGNORE_INDEX] * 3}
    with pytest.raises(DistilError, match=r"batch of example_id \[3\] has no supervised token"):
        collate_lm_batch([masked], pad_token_id=1)


def test_too_long_examples_are_an_error_unless_truncation_is_asked(tokenizer: Any) -> None:
    rows = {
        "prompt": ["def f():\n", "a"],
        "completion": ["    return 1\n" * 10, "b"],
        "example_id": [40, 41],
    }
    options = LMDataOptions(LMDataFormat.PROMPT_COMPLETION, max_length=12)
    with pytest.raises(DistilError, match="longer than max_length=12") as error:
        build_lm_dataset(_records(rows), tokenizer, options)
    assert "example_id 40" in str(error.value) and "overlength='truncate'" in str(error.value)

    truncated = build_lm_dataset(
        _records(rows),
        tokenizer,
        dataclasses.replace(options, overlength=OverlengthPolicy.TRUNCATE),
    )
    assert [len(ids) for ids in truncated["input_ids"]] == [
        12,
        len(_encode(tokenizer, "a")) + len(_encode(tokenizer, "b")) + 1,
    ]


def test_stored_token_ids_replace_the_text_with_the_same_masking_and_truncation(
    tokenizer: Any,
) -> None:
    # Single-space tokens, as a teacher may write them: the text re-tokenises to merged tokens.
    space = tokenizer.convert_tokens_to_ids("\u0120")  # byte-level BPE's " "
    teacher_completion = [space] * 8
    text = tokenizer.decode(teacher_completion)
    assert text == " " * 8 and _encode(tokenizer, text) != teacher_completion  # not vacuous
    prompt_ids = list(tokenizer("x =")["input_ids"])
    eos = tokenizer.eos_token_id
    rows = {
        "prompt": ["x =", "a"],
        "completion": [text, "b"],
        "prompt_ids": [prompt_ids, None],  # the second row has none: its text is tokenized
        "completion_ids": [teacher_completion, None],
    }
    options = LMDataOptions(LMDataFormat.PROMPT_COMPLETION, max_length=64, stored_token_ids=True)

    examples = build_lm_dataset(_records(rows), tokenizer, options)

    assert examples[0]["input_ids"] == prompt_ids + teacher_completion + [eos]
    assert examples[0]["labels"] == [IGNORE_INDEX] * len(prompt_ids) + teacher_completion + [eos]
    plain = _encode(tokenizer, "a"), _encode(tokenizer, "b")
    assert examples[1]["input_ids"] == plain[0] + plain[1] + [eos]
    # without the option the ids columns are ignored: what distil did before
    retokenised = build_lm_dataset(
        _records(rows), tokenizer, LMDataOptions(options.data_format, 64)
    )
    assert retokenised[0]["input_ids"] == prompt_ids + _encode(tokenizer, text) + [eos]
    # the length policy sees the stored ids: 12 tokens keep the prompt and the first ones
    with pytest.raises(DistilError, match="longer than max_length=6"):
        build_lm_dataset(_records(rows), tokenizer, dataclasses.replace(options, max_length=6))
    cut = build_lm_dataset(
        _records(rows),
        tokenizer,
        dataclasses.replace(options, max_length=6, overlength=OverlengthPolicy.TRUNCATE),
    )
    kept = 6 - len(prompt_ids)
    assert cut[0]["input_ids"] == prompt_ids + teacher_completion[:kept]
    assert cut[0]["labels"] == [IGNORE_INDEX] * len(prompt_ids) + teacher_completion[:kept]
    bad = {**rows, "completion_ids": [[-1], None]}
    with pytest.raises(DistilError, match="'completion_ids' must hold a list of token ids"):
        build_lm_dataset(_records(bad), tokenizer, options)


def test_collate_is_int64_deterministic_and_carries_example_ids(tokenizer: Any) -> None:
    rows = {
        "prompt": ["p", "pp q", "r"],
        "completion": ["c c", "d", "e e e"],
        "example_id": [10, 20, 30],
    }
    examples = list(
        build_lm_dataset(
            _records(rows), tokenizer, LMDataOptions(LMDataFormat.PROMPT_COMPLETION, 32)
        )
    )
    pad = pad_token_id_for(tokenizer)

    first = collate_lm_batch(examples, pad_token_id=pad, pad_to_multiple_of=8)
    second = collate_lm_batch(examples, pad_token_id=pad, pad_to_multiple_of=8)

    assert set(first) == {"input_ids", "attention_mask", "labels", "example_id"}
    assert all(tensor.dtype == torch.int64 for tensor in first.values())
    assert first["input_ids"].shape[1] % 8 == 0
    assert first["example_id"].tolist() == [10, 20, 30]
    for key in first:
        assert torch.equal(first[key], second[key])
    lengths = first["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(e["input_ids"]) for e in examples]
    assert (first["labels"][first["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (first["input_ids"][first["attention_mask"] == 0] == pad).all()


def test_local_jsonl_parquet_and_text_files_load_in_order(tokenizer: Any, tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i} ", "completion": f"c{i}"} for i in range(3)]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    cache = tmp_path / "cache"

    from_jsonl = load_local_records(jsonl, cache_dir=cache)
    assert from_jsonl["prompt"] == ["p0 ", "p1 ", "p2 "]
    parquet = tmp_path / "pairs.parquet"
    from_jsonl.to_parquet(str(parquet))
    examples = build_lm_dataset(
        load_local_records([parquet], cache_dir=cache),
        tokenizer,
        LMDataOptions(LMDataFormat.PROMPT_COMPLETION, 32),
    )
    assert examples["example_id"] == [0, 1, 2]

    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    (text_dir / "b.txt").write_text("second\nfile\n", encoding="utf-8")
    (text_dir / "a.txt").write_text("first file\n\nwith a blank line\n", encoding="utf-8")
    documents = load_local_records(text_dir, cache_dir=cache)
    # One document per file, files in sorted order.
    assert documents["text"] == ["first file\n\nwith a blank line\n", "second\nfile\n"]

    with pytest.raises(DistilError, match="mix kinds"):
        load_local_records([jsonl, text_dir / "a.txt"], cache_dir=cache)
    with pytest.raises(DistilError, match="does not exist"):
        load_local_records(tmp_path / "missing.jsonl", cache_dir=cache)
