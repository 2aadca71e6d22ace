"""Fixtures shared by several unit-test modules."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import make_tokenizer_pair


@pytest.fixture(scope="session")
def tokenizer_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Loaded tokenizers of ``make_tokenizer_pair`` (trained once per session, ~2 s)."""
    from distil.models.vocab import load_tokenizer_folder

    paths = make_tokenizer_pair(tmp_path_factory.mktemp("tokenizers"))
    return {name: load_tokenizer_folder(path) for name, path in paths.items()}
