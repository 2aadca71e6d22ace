"""Cut one packed text stream, tokenized by two tokenizers, into blocks that cover the same text.

Packed language-model data (documents joined by EOS, cut into blocks of ``block_size`` tokens)
is cut by the *student's* tokens. The teacher's block is every teacher token that lies inside the
units of the student block, so both read the same text; teacher tokens that straddle a block
boundary belong to neither block (their bytes are the few a block cannot align anyway: neither
side predicts its first token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from distil.alignment.groups import SpanAlignment, align_spans
from distil.alignment.offsets import TokenSpans
from distil.errors import DistilError

__all__ = ["AlignedBlock", "cut_aligned_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignedBlock:
    """One training example seen by both tokenizers.

    Attributes:
        student: the student's ``block_size`` tokens and spans.
        teacher: the teacher's tokens inside the same units.
        alignment: the groups of their targets (every target supervised).
    """

    student: TokenSpans
    teacher: TokenSpans
    alignment: SpanAlignment


def cut_aligned_blocks(
    student: TokenSpans,
    teacher: TokenSpans,
    block_size: int,
    *,
    teacher_max_length: int | None = None,
) -> list[AlignedBlock]:
    """Blocks of ``block_size`` student tokens, the teacher tokens they contain, and their groups.

    Args:
        student: the whole packed stream tokenized by the student (``encode_segments``).
        teacher: the same segments tokenized by the teacher.
        block_size: student tokens per block; a last partial block is dropped (as in
            ``distil.data.lm`` packing).
        teacher_max_length: the teacher's context: a longer teacher block keeps its first
            ``teacher_max_length`` tokens (the text after them is not aligned; logged).

    Returns:
        One block per full student block, in order.
    """
    if block_size < 2:
        raise DistilError(f"block_size must be at least 2, got {block_size}")
    blocks: list[AlignedBlock] = []
    cut = 0
    for begin in range(0, len(student) - block_size + 1, block_size):
        s_block = student[begin : begin + block_size]
        lo, hi = s_block.starts[0], s_block.ends[-1]
        first = int(np.searchsorted(teacher.starts, lo, side="left"))
        stop = int(np.searchsorted(teacher.ends, hi, side="right"))
        if teacher_max_length is not None and stop - first > teacher_max_length:
            stop, cut = first + teacher_max_length, cut + 1
        t_block = teacher[first:stop]
        blocks.append(AlignedBlock(s_block, t_block, align_spans(s_block, t_block)))
    if cut:
        logger.warning(
            "%d of %d blocks need more teacher tokens than the teacher's context of %d: their "
            "teacher side is cut there and the rest of their text is not distilled",
            cut,
            len(blocks),
            teacher_max_length,
        )
    return blocks
