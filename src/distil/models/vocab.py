"""Vocabulary checks for logit distillation: same tokenizer, padded embedding rows, fingerprints.

Token-level distillation compares the teacher's and the student's distributions id by id, so
both must read the same tokenizer. Two cases are handled here, before step 0:

- Same tokenizer, different embedding sizes (models often pad their embedding to a multiple of
  64 or 128): both logit tensors are sliced to the tokenizer's real size. Padded rows are never
  scored and nothing is ever padded with zero logits (a zero logit is not a zero probability).
- Different tokenizers (compared by token strings, ids and special tokens): a hard error for
  token-level losses, which name ``student.tokenizer`` (distillation across tokenizers,
  ``docs/cross-tokenizer.md``) as the way to distil anyway.

``tokenizer_fingerprint`` (from :mod:`distil.data.tokenizer_identity`) hashes everything that
decides which ids a text becomes, for caches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from distil.data.tokenizer_identity import special_tokens as _special_tokens
from distil.data.tokenizer_identity import tokenizer_fingerprint as tokenizer_fingerprint
from distil.errors import DistilError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Any of these makes a folder loadable by AutoTokenizer (fast JSON, config, or a slow vocab).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
_MAX_LISTED = 5


@dataclass(frozen=True)
class VocabAlignment:
    """How teacher and student logits map onto the shared tokenizer.

    Attributes:
        tokenizer_vocab_size: Ids the tokenizer can produce (max id + 1); logits are sliced to it.
        teacher_vocab_rows: Rows of the teacher's output layer.
        student_vocab_rows: Rows of the student's output layer.
    """

    tokenizer_vocab_size: int
    teacher_vocab_rows: int
    student_vocab_rows: int

    @property
    def needs_slicing(self) -> bool:
        """Whether either model has padded rows beyond the tokenizer's vocabulary."""
        return max(self.teacher_vocab_rows, self.student_vocab_rows) > self.tokenizer_vocab_size


def load_tokenizer_folder(
    folder: Path | str, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder, with a clear error when its files are missing.

    Raises:
        DistilError: If the folder does not exist, has no tokenizer files, or loading fails.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        from distil.models.lm import missing_folder_error

        raise missing_folder_error(folder, "tokenizer folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        present = sorted(path.name for path in folder.iterdir())
        raise DistilError(
            f"{folder} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}; found {present}); "
            "save the tokenizer next to the model (tokenizer.save_pretrained(folder), or "
            "distil.models.lm.save_model_folder(model, folder, tokenizer=tokenizer)) or point the "
            "tokenizer path at the folder that has it"
        )
    try:
        return AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise DistilError(
            f"cannot load the tokenizer in {folder}: {str(exc).splitlines()[0]}"
        ) from exc


def tokenizer_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Number of logit rows the tokenizer can address: its largest id + 1, added tokens included.

    This is neither ``tokenizer.vocab_size`` (which leaves out added tokens) nor the model's
    ``config.vocab_size`` (which may be padded).
    """
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise DistilError("the tokenizer has an empty vocabulary")
    size = max(vocab.values()) + 1
    if size != len(tokenizer):
        logger.warning(
            "tokenizer ids have gaps: largest id + 1 = %d but len(tokenizer) = %d",
            size,
            len(tokenizer),
        )
    return int(size)


def output_vocab_rows(model: nn.Module) -> int:
    """Rows of the model's output layer (the last logits dimension), padding included."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    weight = getattr(output, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int):
        return vocab_size
    raise DistilError(f"cannot tell the output vocabulary size of {type(model).__name__}")


def check_same_tokenizer(
    teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase
) -> None:
    """Refuse teacher/student pairs whose tokenizers map strings to different ids.

    Compares the full vocabularies (token string → id, added tokens included) and the special
    tokens (eos, pad, bos, ...). When those agree but the fingerprints differ (another
    normalizer or pre-tokenizer), a warning is logged: the same text may still split differently.

    Raises:
        DistilError: Naming the differences and what to do instead.
    """
    teacher_vocab = teacher_tokenizer.get_vocab()
    student_vocab = student_tokenizer.get_vocab()
    problems: list[str] = []
    only_teacher = sorted(set(teacher_vocab) - set(student_vocab), key=teacher_vocab.__getitem__)
    only_student = sorted(set(student_vocab) - set(teacher_vocab), key=student_vocab.__getitem__)
    moved = sorted(
        (
            token
            for token in set(teacher_vocab) & set(student_vocab)
            if teacher_vocab[token] != student_vocab[token]
        ),
        key=teacher_vocab.__getitem__,
    )
    if only_teacher:
        problems.append(
            f"{len(only_teacher)} token(s) only in the teacher's, e.g. {only_teacher[:_MAX_LISTED]}"
        )
    if only_student:
        problems.append(
            f"{len(only_student)} token(s) only in the student's, e.g. {only_student[:_MAX_LISTED]}"
        )
    if moved:
        examples = [
            f"{token!r}: {teacher_vocab[token]} vs {student_vocab[token]}"
            for token in moved[:_MAX_LISTED]
        ]
        problems.append(f"{len(moved)} token(s) with different ids, e.g. {examples}")
    teacher_special = _special_tokens(teacher_tokenizer)
    student_special = _special_tokens(student_tokenizer)
    if teacher_special != student_special:
        problems.append(
            f"special tokens differ: teacher {teacher_special}, student {student_special}"
        )
    if problems:
        raise DistilError(
            "teacher and student tokenizers differ ("
            + "; ".join(problems)
            + "). Token-level losses compare distributions id by id. To distil across "
            "tokenizers, name the student's tokenizer in student.tokenizer (cross-tokenizer losses "
            "over byte-aligned token groups, docs/cross-tokenizer.md); otherwise give the student "
            "the teacher's tokenizer (and an embedding of at least its size, e.g. a student "
            "initialised from the teacher), or distil on teacher-generated text (sequence-level "
            "KD), which needs no shared vocabulary."
        )
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(student_tokenizer):
        logger.warning(
            "teacher and student tokenizers share vocabulary and special tokens but differ in normalizer, "
            "pre-tokenizer, post-processor or merges; the data is tokenized once, with the student's"
        )


def check_teacher_tokenizer(
    teacher_folder: Path | str | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    tokenizer_folder: Path | str,
    trust_remote_code: bool = False,
) -> None:
    """Refuse a tokenizer given next to a teacher folder that ships a different one.

    The teacher's outputs are indexed by its own token ids, so data tokenised with another
    tokenizer would be scored id by id against the wrong tokens. A teacher folder without
    tokenizer files (or no folder: a teacher built in code) is not checked.

    Raises:
        DistilError: Naming both folders, the differences and the fix.
    """
    if teacher_folder is None:
        return
    folder = Path(teacher_folder)
    if Path(tokenizer_folder).resolve() == folder.resolve():
        return
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return
    teacher_tokenizer = load_tokenizer_folder(folder, trust_remote_code=trust_remote_code)
    try:
        check_same_tokenizer(teacher_tokenizer, tokenizer)
    except DistilError as exc:
        raise DistilError(
            f"the tokenizer {tokenizer_folder} is not the teacher's ({folder}): {exc} "
            "Here: leave `tokenizer` unset (the teacher folder's tokenizer is used), or point it "
            "at the teacher's own tokenizer."
        ) from exc


def check_vocab_alignment(
    tokenizer: PreTrainedTokenizerBase, *, teacher_vocab_rows: int, student_vocab_rows: int
) -> VocabAlignment:
    """Check both models can score every tokenizer id and describe how logits are aligned.

    Raises:
        DistilError: If a model has fewer output rows than the tokenizer has ids.
    """
    vocab_size = tokenizer_vocab_size(tokenizer)
    short = {
        name: rows
        for name, rows in (("teacher", teacher_vocab_rows), ("student", student_vocab_rows))
        if rows < vocab_size
    }
    if short:
        raise DistilError(
            f"the tokenizer has {vocab_size} ids but the output layer of {short} has fewer rows, so some "
            "tokens cannot be scored; resize the model's embeddings (model.resize_token_embeddings(n)) or "
            "use the tokenizer the model was trained with"
        )
    alignment = VocabAlignment(vocab_size, teacher_vocab_rows, student_vocab_rows)
    logger.info(
        "vocab policy: tokenizer %d ids; teacher logits %d rows, student logits %d rows; %s",
        vocab_size,
        teacher_vocab_rows,
        student_vocab_rows,
        f"both sliced to the first {vocab_size} (padded rows never scored)"
        if alignment.needs_slicing
        else "no slicing",
    )
    return alignment


def check_distillation_vocab(
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_vocab_rows: int,
    student_vocab_rows: int,
) -> VocabAlignment:
    """Run ``check_same_tokenizer`` then ``check_vocab_alignment``: the check before step 0."""
    check_same_tokenizer(teacher_tokenizer, student_tokenizer)
    return check_vocab_alignment(
        student_tokenizer,
        teacher_vocab_rows=teacher_vocab_rows,
        student_vocab_rows=student_vocab_rows,
    )


def align_logits_to_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Keep the first ``vocab_size`` logits of the last dimension (a view, no copy).

    Args:
        logits: ``[..., V_model]`` with ``V_model >= vocab_size``.
        vocab_size: The tokenizer's size, e.g. ``VocabAlignment.tokenizer_vocab_size``.

    Returns:
        ``[..., vocab_size]``.

    Raises:
        DistilError: If the logits have fewer entries than ``vocab_size``; they are never padded.
    """
    if logits.shape[-1] < vocab_size:
        raise DistilError(
            f"logits have {logits.shape[-1]} entries but the tokenizer has {vocab_size} ids; padding logits "
            "would invent probabilities, so the model's output layer must cover the tokenizer"
        )
    return logits[..., :vocab_size]  # [..., V]


def mask_unknown_ids(scores: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Scores with every id past the tokenizer's vocabulary (padded output rows) at ``-inf``.

    The one masking step of every sampler (report generations, generation-speed measurement,
    ``distil generate``, the on-policy student): a padded row has no token, decodes to nothing
    and was never trained, so drawing it is always wrong.

    Args:
        scores: ``(..., V_model)`` next-token scores; not changed in place.
        vocab_size: Ids the tokenizer can produce (``tokenizer_vocab_size``).

    Returns:
        ``scores`` itself when ``V_model <= vocab_size``, else a copy of shape ``(..., V_model)``
        with ``[..., vocab_size:]`` at ``-inf``.
    """
    if scores.shape[-1] <= vocab_size:
        return scores
    masked = scores.clone()
    masked[..., vocab_size:] = float("-inf")
    return masked


class KnownIdsOnly:
    """A transformers logits processor that applies :func:`mask_unknown_ids` at every step."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return mask_unknown_ids(scores, self.vocab_size)
