"""Held-out bits per byte: a language-model quality number that does not depend on the tokenizer.

Perplexity is per token, and a token of one tokenizer is not a token of another: a model that
splits text into more, shorter tokens has an easier next-token problem and a lower perplexity
for the same quality. Bits per byte divides the *total* negative log-likelihood of a text by its
UTF-8 bytes instead:

    bpb = Σ_tokens NLL_nats / (bytes · ln 2) = CE_nats_per_token · tokens / (bytes · ln 2)

so the models of a cross-tokenizer distillation (teacher, student, baseline) are comparable.

Every byte of every text is scored exactly once: a text is tokenized without special tokens and
preceded by one start token (BOS if the tokenizer has one, else EOS: in the packed training
stream a document follows an EOS), so its first token is predicted too. A text longer than the
context is scored in windows of ``max_length`` tokens that advance by ``stride`` tokens; each
window scores only the tokens no earlier window scored, with the window's other tokens as
context (Hugging Face's strided perplexity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distil.errors import DistilError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["BitsPerByte", "bits_per_byte", "scoring_windows"]


@dataclass(frozen=True)
class BitsPerByte:
    """Total likelihood of held-out texts and its per-byte and per-token rates.

    Attributes:
        nll_nats: summed negative log-likelihood of every scored token, in nats.
        tokens: scored tokens (every text token once).
        bytes: UTF-8 bytes of the texts.
    """

    nll_nats: float
    tokens: int
    bytes: int

    @property
    def bits_per_byte(self) -> float:
        """``nll_nats / (bytes · ln 2)``."""
        return self.nll_nats / (max(self.bytes, 1) * math.log(2))

    @property
    def ce_nats_per_token(self) -> float:
        """Mean cross-entropy per scored token, in nats (this tokenizer's perplexity is its exp)."""
        return self.nll_nats / max(self.tokens, 1)

    @property
    def bytes_per_token(self) -> float:
        """How many bytes one token covers on these texts."""
        return self.bytes / max(self.tokens, 1)

    def as_dict(self) -> dict[str, float]:
        """The numbers a report row shows."""
        return {
            "bits_per_byte": self.bits_per_byte,
            "ce_nats_per_token": self.ce_nats_per_token,
            "perplexity": math.exp(min(self.ce_nats_per_token, 700.0)),
            "tokens": float(self.tokens),
            "bytes": float(self.bytes),
            "bytes_per_token": self.bytes_per_token,
        }


def scoring_windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``length`` ids whose first id is context only.

    Args:
        length: ids in the sequence (the start token included).
        max_length: ids per window (the model context), at least 2.
        stride: how far each window moves, in ``1 .. max_length - 1``.

    Returns:
        ``(begin, end, score_from)`` per window: the window is ``ids[begin:end]`` and positions
        ``score_from .. end - 1`` are scored (predicted by the logits one position earlier).
        Every position ``1 .. length - 1`` is scored exactly once.
    """
    if max_length < 2 or not 1 <= stride < max_length:
        raise ValueError(
            f"need max_length >= 2 and 1 <= stride < max_length, got {max_length}, {stride}"
        )
    windows: list[tuple[int, int, int]] = []
    scored, begin = 1, 0
    while scored < length:
        end = min(begin + max_length, length)
        windows.append((begin, end, scored))
        scored = end
        begin += stride
    return windows


def _start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            return int(token_id)
    raise DistilError(
        f"tokenizer {type(tokenizer).__name__} has neither a BOS nor an EOS token to start a text "
        "with; pass start_token_id"
    )


@torch.no_grad()
def bits_per_byte(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    *,
    max_length: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    stride: int | None = None,
    start_token_id: int | None = None,
    vocab_size: int | None = None,
) -> BitsPerByte:
    """Held-out bits per byte of a causal LM with its own tokenizer.

    Args:
        model: a causal LM: ``model(input_ids=(B, L), attention_mask=(B, L), use_cache=False)``
            returns ``.logits`` of shape ``(B, L, V_model)``. Evaluated in eval mode and
            returned to its previous mode.
        tokenizer: the model's tokenizer.
        texts: held-out documents (empty ones are skipped).
        max_length: tokens per window, at most the model's context.
        device: where the model runs.
        batch_size: windows per forward pass.
        stride: tokens a window advances (default ``max_length - 1``: each window keeps one
            token of the previous one as context); smaller strides give every scored token more
            context at more cost.
        start_token_id: the context token before every text; default BOS, else EOS.
        vocab_size: logits are sliced to this many entries (default ``len(tokenizer)``), so
            padded embedding rows never take probability mass.

    Returns:
        The summed NLL, scored tokens and bytes (``.bits_per_byte`` is the number).
    """
    start = _start_token(tokenizer) if start_token_id is None else int(start_token_id)
    vocab = len(tokenizer) if vocab_size is None else int(vocab_size)
    step = max_length - 1 if stride is None else int(stride)
    windows: list[tuple[list[int], int]] = []  # (ids, first scored position within the window)
    n_bytes = 0
    n_tokens = 0
    for text in texts:
        if not text:
            continue
        ids = [start, *tokenizer.encode(text, add_special_tokens=False)]
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids) - 1
        for begin, end, score_from in scoring_windows(len(ids), max_length, step):
            windows.append((ids[begin:end], score_from - begin))
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    nll = 0.0
    for i in range(0, len(windows), batch_size):
        nll += _window_nll(model, windows[i : i + batch_size], vocab, device)
    if hasattr(model, "train"):
        model.train(was_training)
    return BitsPerByte(nll_nats=nll, tokens=n_tokens, bytes=n_bytes)


def _window_nll(
    model: Any, windows: Sequence[tuple[list[int], int]], vocab: int, device: torch.device | str
) -> float:
    """Summed NLL (nats, float64) of the scored positions of a batch of windows."""
    width = max(len(ids) for ids, _ in windows)
    input_ids = torch.zeros(len(windows), width, dtype=torch.long)
    attention = torch.zeros(len(windows), width, dtype=torch.long)
    scored = torch.zeros(len(windows), width, dtype=torch.bool)  # position p scored (p >= 1)
    for row, (ids, score_from) in enumerate(windows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        scored[row, score_from : len(ids)] = True
    input_ids, attention = input_ids.to(device), attention.to(device)
    logits: Tensor = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    predictors = logits[:, :-1, :vocab].float()  # (B, L-1, V): position p-1 predicts p
    targets = input_ids[:, 1:]
    mask = scored[:, 1:].to(predictors.device)
    log_probs = predictors[mask].log_softmax(-1)  # (N, V)
    picked = log_probs.gather(-1, targets[mask].unsqueeze(-1))  # (N, 1)
    return float(-picked.double().sum())
