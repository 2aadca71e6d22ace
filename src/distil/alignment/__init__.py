"""Cross-tokenizer alignment: per-token byte spans, aligned token groups, vocabulary maps.

* :mod:`~distil.alignment.offsets` byte spans of every token for any Hugging Face tokenizer
  (fast offsets, or an explicit decode-based fallback);
* :mod:`~distil.alignment.groups` groups of tokens of two tokenizations that cover the same
  bytes, computed once per example, and the index tensors the losses consume;
* :mod:`~distil.alignment.packing` a packed stream cut into blocks both tokenizers read;
* :mod:`~distil.alignment.vocab` token surfaces, shared vocabulary entries, MinED mapping.

The losses that read these live in :mod:`distil.losses.cross_tokenizer`.
"""

from distil.alignment.groups import (
    AlignedGroups,
    AlignmentKind,
    SpanAlignment,
    align_spans,
    alignment_stats,
    batch_groups,
    collate_groups,
    groups_from_padded,
    positional_alignment,
)
from distil.alignment.offsets import (
    ByteOffsetMethod,
    ByteSpanEncoder,
    Special,
    TokenSpans,
    char_to_byte_table,
)
from distil.alignment.packing import AlignedBlock, cut_aligned_blocks
from distil.alignment.vocab import (
    SharedVocabulary,
    VocabMatch,
    first_token_map,
    min_edit_distance_map,
    shared_vocabulary,
    token_surfaces,
)

__all__ = [
    "AlignedBlock",
    "AlignedGroups",
    "AlignmentKind",
    "ByteOffsetMethod",
    "ByteSpanEncoder",
    "SharedVocabulary",
    "SpanAlignment",
    "Special",
    "TokenSpans",
    "VocabMatch",
    "align_spans",
    "alignment_stats",
    "batch_groups",
    "char_to_byte_table",
    "collate_groups",
    "cut_aligned_blocks",
    "first_token_map",
    "groups_from_padded",
    "min_edit_distance_map",
    "positional_alignment",
    "shared_vocabulary",
    "token_surfaces",
]
