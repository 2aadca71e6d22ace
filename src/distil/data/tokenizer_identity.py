"""Which tokenizer made some token ids: a fingerprint of everything that decides the ids of a text.

It lives in the data layer because data readers need it too: a ``distil generate`` folder stores
the teacher's own token ids with the tokenizer's fingerprint, and :mod:`distil.data.lm` uses
those ids only for a tokenizer with the same fingerprint (``distil.models.vocab`` re-exports it
for caches and vocabulary checks).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_FINGERPRINT_SECTIONS = ("model", "normalizer", "pre_tokenizer", "post_processor", "added_tokens")


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A sha256 over what decides token ids: vocabulary, merges, special and added tokens.

    For fast tokenizers it hashes the ``model`` (type, vocab, merges), ``normalizer``,
    ``pre_tokenizer``, ``post_processor`` and ``added_tokens`` sections of ``tokenizer.json``
    plus the special-token map, as canonical JSON (sorted keys). The decoder, padding and
    truncation state and the chat template are left out: they do not change the ids of a text.
    Other tokenizers are hashed by their vocabulary and special tokens only (logged).

    Returns:
        A 64-character hex digest, equal for tokenizers that tokenize identically.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    canonical: dict[str, Any] = {"special_tokens": special_tokens(tokenizer)}
    if backend is not None:
        serialized = json.loads(backend.to_str())
        canonical.update({section: serialized.get(section) for section in _FINGERPRINT_SECTIONS})
    else:
        logger.warning(
            "%s is not a fast tokenizer; fingerprinting its vocabulary only",
            type(tokenizer).__name__,
        )
        canonical["vocab"] = sorted(
            tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])
        )
    payload = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The special-token map as plain strings (or lists of strings), for comparison and hashing."""
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    return {
        name: [str(token) for token in value] if isinstance(value, list | tuple) else str(value)
        for name, value in sorted(special.items())
    }
