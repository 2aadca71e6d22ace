"""Teacher-output cache: run the teacher once (``distil cache``), distil from its outputs many times.

``writer`` produces sharded safetensors plus ``manifest.json`` for causal-LM teachers (top-k
or importance-sampled targets per supervised token); ``examples`` does the same for teachers
with one output per example (classifier logits, embeddings, chosen hidden states); ``reader`` gives bounded-memory
access by example id; ``manifest`` holds the format and fingerprints; ``integrity`` the
atomic writes and checksums. Training reads a cache through
:class:`distil.teachers.cached.CachedTeacher`, which satisfies the ``Teacher`` protocol.
"""

from distil.cache.integrity import CacheIntegrityError
from distil.cache.manifest import (
    CacheMismatchError,
    check_matches,
    dataset_fingerprint,
    read_manifest,
)
from distil.cache.reader import CacheReader, summarize

__all__ = [
    "CacheIntegrityError",
    "CacheMismatchError",
    "CacheReader",
    "check_matches",
    "dataset_fingerprint",
    "read_manifest",
    "summarize",
]
