"""A causal LM and its KV cache over a batch of rows that advance by different amounts.

Speculative decoding accepts a different number of tokens in every row, so after a round the
rows of one batch hold sequences of different lengths. The cache tensors stay rectangular
(``[B, heads, L, head_dim]`` per layer); a boolean ``valid[r, c]`` says whether cache column
``c`` holds a token of row ``r``, and is the 2-D attention mask of the next forward pass. A row's
token positions (RoPE) count only its own valid tokens, so a column that is not valid for a row
(left padding of a ragged prompt, a rejected draft token, an empty slot of a ragged feed) is
invisible to it. Rolling back rejected tokens marks their columns invalid; columns invalid for
every row at the end are cropped at once, and the valid columns are packed to the right
(:meth:`CachedLM.compact`) when a quarter of the cache is holes, so attention never pays for
much more than the longest row.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from distil.errors import DistilError

COMPACT_WASTE_FRACTION = 0.25  # pack the cache once this share of its columns is removable


class CachedLM:
    """One model's KV cache, validity mask and per-row positions, for a batch of ``batch_size`` rows.

    Attributes:
        model: A Hugging Face causal LM in eval mode.
        valid: ``(B, L)`` bool, True where cache column ``c`` holds a token of row ``r``.
        lengths: ``(B,)`` int64, the tokens of each row in the cache (the next token's position).
        calls: Forward passes run so far.
    """

    def __init__(self, model: Any, batch_size: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.model = model
        # Models that can skip the LM head on positions nobody reads (a long prompt's) say so.
        self.can_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache = DynamicCache(config=model.config)
        self._layers()  # refuse caches that cannot be rolled back per row, before any work
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.calls = 0

    @torch.no_grad()
    def step(self, tokens: Tensor, present: Tensor, *, keep: int | None = None) -> Tensor:
        """Run the model on new tokens and append them to the cache.

        Args:
            tokens: ``(B, W)`` token ids; entries where ``present`` is False are placeholders.
            present: ``(B, W)`` bool, which entries are tokens of their row (a row's present
                entries are its next tokens in order; absent ones are invisible to every row).
            keep: Return logits for the last ``keep`` positions only (the LM head is then not
                run on the others where the model supports it); all ``W`` when None.

        Returns:
            Logits ``(B, keep or W, V_model)``; rows of absent entries are meaningless.
        """
        offsets = present.long().cumsum(-1) - 1  # (B, W)
        positions = torch.where(present, self.lengths[:, None] + offsets, 0)  # (B, W)
        mask = torch.cat([self.valid, present], dim=1)  # (B, L + W)
        extra = {"logits_to_keep": keep} if keep is not None and self.can_keep else {}
        out = self.model(
            input_ids=tokens,
            attention_mask=mask.long(),
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            **extra,
        )
        self.calls += 1
        self.valid = mask
        self.lengths = self.lengths + present.sum(-1)
        logits: Tensor = out.logits
        return logits if keep is None else logits[:, -keep:]

    def drop_last(self, counts: Tensor) -> None:
        """Roll back the last ``counts[r]`` tokens of each row (they must be its most recent
        cache columns, e.g. rejected draft tokens appended by the last :meth:`step`).

        Args:
            counts: ``(B,)`` int64, tokens to forget per row (0 keeps the row as it is).
        """
        width = self.valid.shape[1]
        if width == 0 or int(counts.max()) == 0:
            return
        column = torch.arange(width, device=self.valid.device)  # (L,)
        self.valid = self.valid & (column[None, :] < width - counts[:, None])
        self.lengths = self.lengths - counts
        self._crop_tail()

    def select_rows(self, keep: Tensor) -> None:
        """Keep only the rows at indices ``keep`` ``(B',)`` (finished rows leave the batch)."""
        self.valid = self.valid[keep]
        self.lengths = self.lengths[keep]
        if self.valid.shape[1]:
            self.cache.batch_select_indices(keep)
        self._crop_tail()

    def compact(self, *, force: bool = False) -> None:
        """Pack each row's valid columns to the right (left padding) and drop the columns no row
        needs, when at least a quarter of the cache would go (always with ``force``).

        Costs one copy of the cache; attention over holes costs a read of them per forward pass,
        so packing once they are a quarter of the columns bounds that overhead.
        """
        width = self.valid.shape[1]
        keep = int(self.valid.sum(-1).max()) if width else 0
        if width - keep == 0 or not (force or width - keep >= COMPACT_WASTE_FRACTION * width):
            return
        column = torch.arange(width, device=self.valid.device)
        # Sort key: invalid columns first, then valid ones, each in their original order.
        key = torch.where(self.valid, column + width, column)  # (B, L)
        order = key.argsort(dim=-1, stable=True)[:, width - keep :]  # (B, keep)
        self.valid = self.valid.gather(1, order)
        for layer in self._layers():
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, index)
            layer.values = layer.values.gather(2, index)

    def _crop_tail(self) -> None:
        """Crop trailing columns that no row uses (a cheap slice of every layer)."""
        width = self.valid.shape[1]
        used = self.valid.any(0).nonzero()
        last = int(used.max()) + 1 if used.numel() else 0
        if last < width:
            self.valid = self.valid[:, :last]
            if last == 0:
                self.cache.crop(-width)
            else:
                self.cache.crop(-(width - last))

    def _layers(self) -> list[Any]:
        from transformers.cache_utils import DynamicLayer

        layers = list(self.cache.layers)
        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise DistilError(
                f"{type(self.model).__name__} uses cache layers {sorted(odd)}; batched speculative "
                "decoding packs full-attention caches (DynamicLayer) only: run it at batch size 1 "
                "or with a full-attention model"
            )
        return layers
