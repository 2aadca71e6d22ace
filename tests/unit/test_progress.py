"""Progress for long library phases, and no misleading transformers warnings where distil
handles lengths itself (issue 13 items 14 and 15)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from distil.data.corpus import stdlib_root, train_bpe_tokenizer_from_texts
from distil.data.lm import LMDataFormat, LMDataOptions, build_lm_dataset
from distil.training.progress import phase_progress


def test_phase_progress_shows_a_bar_only_for_phases_that_take_a_while(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with phase_progress(
        "tokenizing [bold]7[/bold] docs", 7, unit="docs", after_seconds=0.0
    ) as done:
        for _ in range(7):
            done(1)
    out = capsys.readouterr().out
    assert "tokenizing [bold]7[/bold] docs" in out  # markup shown as written, not interpreted
    assert "7/7" in out
    with phase_progress("quick", 3, unit="docs", after_seconds=1e9) as done:
        done(3)
    assert capsys.readouterr().out == ""
    with phase_progress("not rank 0", 3, unit="docs", enabled=False, after_seconds=0.0) as done:
        done(3)
    assert capsys.readouterr().out == ""


@pytest.fixture(scope="module")
def short_context_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from distil.models.vocab import load_tokenizer_folder

    text = (stdlib_root() / "abc.py").read_text(encoding="utf-8")[:4000]
    folder = tmp_path_factory.mktemp("tok")
    return load_tokenizer_folder(
        train_bpe_tokenizer_from_texts([text], folder / "tok", 300, model_max_length=16)
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_packing_long_documents_logs_no_indexing_errors_warning(
    short_context_tokenizer: Any,
) -> None:
    import datasets

    # transformers' own logger (it does not propagate to the root logger pytest watches)
    seen = _Records()
    logging.getLogger("transformers").addHandler(seen)
    try:
        text = (stdlib_root() / "bisect.py").read_text(encoding="utf-8")[:3000]
        records = datasets.Dataset.from_dict({"text": [text, text[::-1]]})
        options = LMDataOptions(data_format=LMDataFormat.TEXT, max_length=16)
        packed = build_lm_dataset(records, short_context_tokenizer, options)
    finally:
        logging.getLogger("transformers").removeHandler(seen)
    assert len(packed) > 10  # documents far longer than the model's 16 tokens, cut into blocks
    assert not [m for m in seen.messages if "indexing errors" in m]
