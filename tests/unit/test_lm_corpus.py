"""The stdlib corpus builder and the byte-level BPE tokenizer trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from distil.data.corpus import (
    DEDICATED_PAD_TOKEN,
    EOS_TOKEN,
    PadTokenPolicy,
    build_stdlib_corpus,
    list_stdlib_files,
    stdlib_root,
    train_bpe_tokenizer,
    train_unigram_tokenizer,
)
from distil.errors import DistilError


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture()
def fake_stdlib(tmp_path: Path) -> Path:
    """A source tree laid out like the stdlib, with the folders the builder must skip."""
    root = tmp_path / "lib"
    for i in range(20):
        _write(root / f"mod{i:02d}.py", f"def f{i}(x):\n    return x + {i}\n" * (i + 1))
    _write(root / "pkg" / "__init__.py", "")  # empty: skipped
    _write(root / "pkg" / "core.py", "class Core:\n    pass\n")
    _write(root / "test" / "test_mod.py", "def test():\n    assert True\n")
    _write(root / "pkg" / "tests" / "test_core.py", "import pkg\n")
    _write(root / "idlelib" / "idle_test" / "test_x.py", "x = 1\n")
    _write(root / "site-packages" / "thirdparty.py", "import numpy\n")
    _write(root / "__pycache__" / "cached.py", "x = 2\n")
    return root


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_list_files_is_sorted_and_skips_tests_and_site_packages(fake_stdlib: Path) -> None:
    names = [p.relative_to(fake_stdlib).as_posix() for p in list_stdlib_files(fake_stdlib)]
    assert names == sorted(names)
    assert "pkg/core.py" in names
    assert not [n for n in names if n.startswith(("test/", "site-packages/", "__pycache__/"))]
    assert "pkg/tests/test_core.py" not in names and "idlelib/idle_test/test_x.py" not in names

    with_tests = [
        p.relative_to(fake_stdlib).as_posix()
        for p in list_stdlib_files(fake_stdlib, include_tests=True)
    ]
    assert {"test/test_mod.py", "pkg/tests/test_core.py", "idlelib/idle_test/test_x.py"} <= set(
        with_tests
    )
    assert "site-packages/thirdparty.py" not in with_tests


def test_corpus_splits_are_disjoint_deterministic_and_by_file(
    fake_stdlib: Path, tmp_path: Path
) -> None:
    options: dict[str, Any] = {
        "source_root": fake_stdlib,
        "validation_fraction": 0.1,
        "test_fraction": 0.1,
        "split_seed": 3,
    }
    first = build_stdlib_corpus(tmp_path / "a", **options)
    second = build_stdlib_corpus(tmp_path / "b", **options)

    paths = {s.name: [r["path"] for r in _records(s.path)] for s in first.splits}
    # 21 non-empty files: 10% each for validation and test, rounded.
    assert [len(paths[n]) for n in ("train", "validation", "test")] == [17, 2, 2]
    all_paths = paths["train"] + paths["validation"] + paths["test"]
    assert len(set(all_paths)) == len(all_paths) == 21
    assert "pkg/__init__.py" not in all_paths  # empty files are skipped
    for name in ("train", "validation", "test"):
        assert paths[name] == sorted(paths[name])
        assert first.split(name).path.read_bytes() == second.split(name).path.read_bytes()
        assert [r["example_id"] for r in _records(first.split(name).path)] == list(
            range(len(paths[name]))
        )
    assert first.fingerprint == second.fingerprint
    record = next(r for r in _records(first.split("train").path) if r["path"] == "mod03.py")
    assert record["text"] == (fake_stdlib / "mod03.py").read_text()

    other_seed = build_stdlib_corpus(tmp_path / "c", **{**options, "split_seed": 4})
    assert other_seed.fingerprint != first.fingerprint
    manifest = json.loads((tmp_path / "a" / "corpus.json").read_text())
    assert manifest["files"]["validation"] == paths["validation"]


def test_size_cap_keeps_a_subset_under_the_cap(fake_stdlib: Path, tmp_path: Path) -> None:
    info = build_stdlib_corpus(tmp_path / "capped", source_root=fake_stdlib, max_total_bytes=2_000)
    assert 0 < sum(s.num_bytes for s in info.splits) <= 2_000
    with pytest.raises(DistilError, match="too few"):
        build_stdlib_corpus(tmp_path / "tiny", source_root=fake_stdlib, max_total_bytes=60)


def test_real_stdlib_corpus_with_a_small_cap(tmp_path: Path) -> None:
    info = build_stdlib_corpus(tmp_path / "stdlib", max_total_bytes=150_000)
    assert info.source_root == stdlib_root()
    assert 0 < sum(s.num_bytes for s in info.splits) <= 150_000
    assert all(s.num_documents >= 1 for s in info.splits)
    assert not any("/test/" in f"/{r['path']}" for r in _records(info.split("train").path))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 10 KB of real stdlib source as one JSONL corpus file."""
    out = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    texts = [
        (stdlib_root() / name).read_text(encoding="utf-8")[:5_000]
        for name in ("abc.py", "bisect.py")
    ]
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return out


def test_tokenizer_training_is_byte_identical_twice(small_corpus: Path, tmp_path: Path) -> None:
    first = train_bpe_tokenizer([small_corpus], tmp_path / "t1", vocab_size=320)
    second = train_bpe_tokenizer([small_corpus], tmp_path / "t2", vocab_size=320)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()


def test_saved_tokenizer_round_trips_through_auto_tokenizer(
    small_corpus: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    folder = train_bpe_tokenizer(
        [small_corpus], tmp_path / "tok", vocab_size=320, model_max_length=128
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == 320
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token == DEDICATED_PAD_TOKEN and tokenizer.pad_token_id == 1
    assert tokenizer.model_max_length == 128
    text = "def résumé(x):\n    return x  # ünïcode ✓\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: lossless on any text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        "<|user|>\nhi<|endoftext|><|assistant|>\nhello<|endoftext|>"
    )
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nhi<|endoftext|><|assistant|>\n"
    role_id = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert tokenizer("<|assistant|>", add_special_tokens=False)["input_ids"] == [role_id]


def test_eos_pad_policy_and_vocab_too_small(small_corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = train_bpe_tokenizer(
        [small_corpus],
        tmp_path / "eos",
        vocab_size=300,
        pad_policy=PadTokenPolicy.EOS,
        chat_template=None,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 0
    assert DEDICATED_PAD_TOKEN not in tokenizer.get_vocab()
    assert not tokenizer.chat_template
    with pytest.raises(DistilError, match="vocab_size=100 cannot hold"):
        train_bpe_tokenizer([small_corpus], tmp_path / "small", vocab_size=100)


def test_unigram_tokenizer_is_lossless_deterministic_and_loadable(
    small_corpus: Path, tmp_path: Path
) -> None:
    """The second tokenizer of cross-tokenizer distillation: Metaspace pieces, byte fallback for
    characters no piece covers, the same special tokens and ids as the BPE."""
    from transformers import AutoTokenizer

    first = train_unigram_tokenizer([small_corpus], tmp_path / "u1", vocab_size=600)
    second = train_unigram_tokenizer([small_corpus], tmp_path / "u2", vocab_size=600)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(str(first))
    assert len(tokenizer) <= 600
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert sum(p.startswith("<0x") for p in pieces) == 256
    assert any(p.startswith("▁") and len(p) > 1 for p in pieces)
    for text in ("def résumé(x):\n    return x  # ünïcode ✓ 😀\n", "  leading", "<0x41> literal"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    indent = tokenizer.convert_ids_to_tokens(
        tokenizer("x\n        y", add_special_tokens=False)["input_ids"]
    )
    assert indent.count("▁") >= 7  # Metaspace: a space starts a piece, indentation is one per space
    assert (
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
        == "<|user|>\nhi<|endoftext|><|assistant|>\n"
    )
    with pytest.raises(DistilError, match="vocab_size=200 cannot hold"):
        train_unigram_tokenizer([small_corpus], tmp_path / "small", vocab_size=200)


def test_a_smaller_bpe_of_the_same_corpus_is_nested(small_corpus: Path, tmp_path: Path) -> None:
    """The easy control: BPE merges are learned in order, so a smaller vocabulary trained on the
    same corpus is a prefix of the larger one."""
    from transformers import AutoTokenizer

    small = AutoTokenizer.from_pretrained(
        str(train_bpe_tokenizer([small_corpus], tmp_path / "s", 300))
    )
    large = AutoTokenizer.from_pretrained(
        str(train_bpe_tokenizer([small_corpus], tmp_path / "l", 400))
    )
    assert small.get_vocab().items() <= large.get_vocab().items()
