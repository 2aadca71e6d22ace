"""Shared test set-up: quiet, deterministic, CPU-only, small thread count, and the test tiers.

Tiers follow the folders: ``tests/unit`` (pure functions and small objects, under a minute:
``pytest tests/unit`` on every change), ``tests/integration`` (the CLI end to end on tiny models)
and ``tests/distributed`` (several processes under torchrun). Each test gets the marker of its
folder, so ``pytest -m unit`` works as well; ``python -m pytest -q`` (the README's command and
CI's) runs all three.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine a second
# OpenMP thread made them hundreds of times slower: the default tier runs single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

_TIERS = ("unit", "integration", "distributed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(__file__).parent
    for item in items:
        parts = Path(str(item.path)).relative_to(root).parts
        if parts and parts[0] in _TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
