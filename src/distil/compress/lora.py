"""LoRA students through peft: adapters on a pretrained student, trained by distillation, then
merged into the weights (one plain folder) or kept separate (a small adapter folder next to
the unchanged base).

A LoRA layer computes ``W x + (alpha / r) * B A x`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``;
``B`` starts at zero so the wrapped student starts as the pretrained one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from distil.compress import require
from distil.errors import DistilError

logger = logging.getLogger(__name__)

LLAMA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
"""Default LoRA targets of a Llama-style student: attention queries/values and the MLP."""


@dataclass(frozen=True)
class TrainableCount:
    """Parameter counts of a (LoRA-wrapped) model.

    Attributes:
        trainable: Parameters with ``requires_grad``.
        total: All parameters (the frozen base included).
    """

    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        """``trainable / total``."""
        return self.trainable / self.total if self.total else 0.0


def count_trainable(model: nn.Module) -> TrainableCount:
    """Trainable and total parameters, each shared tensor once."""
    parameters = list(model.parameters())
    return TrainableCount(
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        total=sum(p.numel() for p in parameters),
    )


def default_targets(model: nn.Module) -> list[str]:
    """``LLAMA_TARGETS`` present in ``model``, else every ``nn.Linear`` but a ``head``/LM head."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    llama = [t for t in LLAMA_TARGETS if t in names]
    if llama:
        return llama
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else getattr(model, "head", None)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output
        }
    )


def add_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    dropout: float = 0.0,
) -> Any:
    """Wrap a pretrained student with LoRA adapters; only the adapters train.

    Args:
        model: The student (wrapped in place by peft: its targets become LoRA layers).
        rank: ``r``, the adapters' inner width.
        alpha: Scale numerator: updates are multiplied by ``alpha / rank``.
        target_modules: Module name suffixes to adapt; :func:`default_targets` when ``None``.
        dropout: Dropout on the adapter input.

    Returns:
        The ``peft.PeftModel``.

    Raises:
        DistilError: For a rank below 1 or targets that match nothing.
    """
    require("peft")
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise DistilError(f"LoRA rank must be at least 1, got {rank}")
    targets = list(target_modules) if target_modules is not None else default_targets(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise DistilError(
            f"LoRA target_modules {missing or targets} match no module of {type(model).__name__}; "
            f"choose from its Linear layers, e.g. {sorted(default_targets(model))}"
        )
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none"
    )
    wrapped = get_peft_model(model, config)
    counts = count_trainable(wrapped)
    logger.info(
        "LoRA r=%d alpha=%g on %s: %d trainable of %d parameters (%.2f%%)",
        rank,
        alpha,
        targets,
        counts.trainable,
        counts.total,
        100 * counts.fraction,
    )
    return wrapped


def merge_lora(wrapped: Any) -> nn.Module:
    """Fold the adapters into the base weights (``W + alpha/r * B A``) and drop them.

    Returns:
        The base model with merged weights (a plain model again).
    """
    merged: nn.Module = wrapped.merge_and_unload()
    return merged


def save_lora(wrapped: Any, folder: Path | str, *, merged: bool, tokenizer: Any = None) -> Path:
    """Save a LoRA student.

    Args:
        wrapped: The ``PeftModel``.
        folder: Output folder.
        merged: ``True``: merge and save a plain model folder that ``from_pretrained`` loads
            without peft. ``False``: save only the adapters (``adapter_config.json`` +
            ``adapter_model.safetensors``), loaded with :func:`load_lora` onto the base.
        tokenizer: Saved alongside when given.

    Returns:
        The folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if merged:
        model = merge_lora(wrapped)
        model.save_pretrained(str(folder))  # type: ignore[operator]
    else:
        wrapped.save_pretrained(str(folder), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return folder


def load_lora(base: nn.Module, adapter_folder: Path | str) -> Any:
    """Put saved adapters onto the base model they were trained on (a ``PeftModel``)."""
    from peft import PeftModel

    adapter_folder = Path(adapter_folder)
    if not (adapter_folder / "adapter_config.json").is_file():
        raise DistilError(
            f"{adapter_folder} has no adapter_config.json; is it a LoRA adapter folder?"
        )
    return PeftModel.from_pretrained(base, str(adapter_folder))
