"""Shared test set-up: quiet, deterministic, CPU-only, small thread count."""

from __future__ import annotations

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine a second
# OpenMP thread made them hundreds of times slower: the default tier runs single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
