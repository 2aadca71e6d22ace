"""Cut one packed text stream, tokenized by two tokenizers, into blocks that cover the same text.

Packed language-model data (documents joined by EOS, cut into blocks of ``block_size`` tokens)
is cut by the *student's* tokens. The teacher's block is every teacher token that lies inside the
units of the student block, so both read the same text; teacher tokens that straddle a block
boundary belong to neither block (their bytes are the few a block cannot align anyway: neither
side predicts its first token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distil.alignment.groups import SpanAlignment, align_spans
from distil.alignment.offsets import TokenSpans
from distil.errors import DistilError

__all__ = ["AlignedBlock", "cut_aligned_blocks"]


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
        teacher_max_length: the teacher's context; a longer teacher block is an error.

    Returns:
        One block per full student block, in order.

    Raises:
        DistilError: if a teacher block is longer than ``teacher_max_length`` (the teacher
            tokenizer splits this text much finer than the student's: use a smaller block).
    """
    if block_size < 2:
        raise DistilError(f"block_size must be at least 2, got {block_size}")
    blocks: list[AlignedBlock] = []
    for begin in range(0, len(student) - block_size + 1, block_size):
        s_block = student[begin : begin + block_size]
        lo, hi = s_block.starts[0], s_block.ends[-1]
        first = int(np.searchsorted(teacher.starts, lo, side="left"))
        stop = int(np.searchsorted(teacher.ends, hi, side="right"))
        t_block = teacher[first:stop]
        if teacher_max_length is not None and len(t_block) > teacher_max_length:
            raise DistilError(
                f"the teacher needs {len(t_block)} tokens for the text of a {block_size}-token "
                f"student block, more than its context of {teacher_max_length}; lower "
                "data.max_length"
            )
        blocks.append(AlignedBlock(s_block, t_block, align_spans(s_block, t_block)))
    return blocks
