"""Causal language models: build from a small spec, load from a folder, layer-dropped students, save.

- ``build_causal_lm(spec)`` makes a randomly initialised ``LlamaForCausalLM`` (tests, the
  built-in teacher and student).
- ``load_causal_lm(folder)`` loads any ``AutoModelForCausalLM`` from a local folder, never from
  the network, with remote code only when asked.
- ``init_student_from_teacher(teacher, layer_indices)`` builds a shallower student of the same
  architecture that copies the teacher's embeddings, final norm, LM head and a subset of its
  decoder layers (DistilBERT-style layer dropping), then checks the copy tensor by tensor.
- ``save_model_folder`` writes safetensors + config (+ tokenizer) that ``from_pretrained`` reads.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distil.config.lm import TorchDtype
from distil.config.sources import (
    FromTeacher,
    HFModel,
    LMSpec,
    ModelSource,
    SpecModel,
    describe_model,
)
from distil.errors import DistilError

if TYPE_CHECKING:
    from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CausalLMSpec:
    """Shape of a Llama-style decoder-only model.

    Attributes:
        num_layers: Decoder layers.
        hidden_size: Model width.
        num_heads: Attention heads (``hidden_size`` must divide by it).
        intermediate_size: MLP width.
        vocab_size: Embedding rows (at least the tokenizer's size; may be padded above it).
        max_context: Longest sequence in tokens (``max_position_embeddings``).
        num_kv_heads: Key/value heads for grouped-query attention; ``num_heads`` when ``None``.
        tie_word_embeddings: Share the input embedding and the LM head.
        rms_norm_eps: Epsilon of the RMS norms.
        eos_token_id: Recorded in the config (generation stops there).
        pad_token_id: Recorded in the config.
        bos_token_id: Recorded in the config.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    num_kv_heads: int | None = None
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-6
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None


def llama_config_from_spec(spec: CausalLMSpec) -> LlamaConfig:
    """Translate a ``CausalLMSpec`` into a ``transformers.LlamaConfig``.

    Raises:
        DistilError: If a size is not positive or the heads do not divide the width.
    """
    from transformers import LlamaConfig

    sizes = {
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "num_heads": spec.num_heads,
        "intermediate_size": spec.intermediate_size,
        "vocab_size": spec.vocab_size,
        "max_context": spec.max_context,
    }
    not_positive = {name: value for name, value in sizes.items() if value <= 0}
    if not_positive:
        raise DistilError(f"model spec sizes must be positive: {not_positive}")
    num_kv_heads = spec.num_heads if spec.num_kv_heads is None else spec.num_kv_heads
    if spec.hidden_size % spec.num_heads or spec.num_heads % num_kv_heads:
        raise DistilError(
            f"hidden_size={spec.hidden_size} must divide by num_heads={spec.num_heads}, "
            f"and num_heads by num_kv_heads={num_kv_heads}"
        )
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=spec.max_context,
        tie_word_embeddings=spec.tie_word_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
    )


def build_causal_lm(spec: CausalLMSpec, *, seed: int | None = None) -> PreTrainedModel:
    """Build a randomly initialised ``LlamaForCausalLM`` in float32.

    Args:
        spec: The model's shape.
        seed: Seeds the initialisation without touching the global RNG state; ``None`` uses
            the global RNG as it is.

    Returns:
        The model, in train mode.
    """
    from transformers import LlamaForCausalLM

    config = llama_config_from_spec(spec)
    if seed is None:
        return LlamaForCausalLM(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


BUILTIN_TEACHER_FOLDER = Path(
    "runs/lm-teacher"
)  # where `distil run lm_pretrain` exports by default


def missing_folder_error(folder: Path | str, what: str) -> DistilError:
    """The error for a model or tokenizer folder that does not exist, with the way to make it.

    The shipped ``lm_kd``, ``distil cache`` and ``distil generate`` configs read the built-in
    teacher, which only exists after ``distil run lm_pretrain``: a newcomer who skipped that step
    is told so instead of "not found".
    """
    folder = Path(folder)
    message = f"{what} {folder} does not exist"
    if folder.resolve() == BUILTIN_TEACHER_FOLDER.resolve():
        message += (
            "; it is the built-in teacher: run `distil run lm_pretrain` first (it exports the "
            f"model and tokenizer to {BUILTIN_TEACHER_FOLDER}), or set teacher.hf to a model folder of yours"
        )
    else:
        message += " (only local folders are loaded; check the path)"
    return DistilError(message)


def load_causal_lm(
    folder: Path | str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load an ``AutoModelForCausalLM`` from a local folder (never downloads).

    Args:
        folder: A ``save_pretrained`` folder with ``config.json`` and weights.
        trust_remote_code: Run model code shipped in the folder; off unless asked.
        dtype: Parameter dtype; the checkpoint's when ``None``.

    Returns:
        The model, in eval mode (``from_pretrained``'s default).

    Raises:
        DistilError: If the folder or its ``config.json`` is missing, or loading fails.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise missing_folder_error(folder, "model folder")
    if not (folder / "config.json").is_file():
        present = sorted(path.name for path in folder.iterdir())
        raise DistilError(
            f"model folder {folder} has no config.json (it has {present}); is the path right?"
        )
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as exc:
        raise DistilError(
            f"cannot load a causal LM from {folder}: {str(exc).splitlines()[0]}"
        ) from exc
    logger.info(
        "loaded %s from %s (%s, trust_remote_code=%s)",
        type(model).__name__,
        folder,
        model.dtype,
        trust_remote_code,
    )
    return model


def model_context_length(model: PreTrainedModel) -> int:
    """The longest input the model's position embeddings allow (``max_position_embeddings``)."""
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int):
        raise DistilError(
            f"{type(model).__name__} config has no max_position_embeddings; set max_length explicitly"
        )
    return context


def check_fits_context(max_length: int, model: PreTrainedModel, *, role: str = "model") -> None:
    """Refuse a data ``max_length`` beyond the model's context.

    Rotary models do not fail on positions past ``max_position_embeddings``; they silently
    extrapolate, so the check has to be explicit.

    Args:
        max_length: Longest example of the data (``LMDataOptions.max_length``).
        model: The teacher or the student.
        role: Named in the error, e.g. ``"teacher"``.

    Raises:
        DistilError: If ``max_length`` exceeds the model's context.
    """
    context = model_context_length(model)
    if max_length > context:
        raise DistilError(
            f"data max_length={max_length} is longer than the {role}'s context of {context} tokens "
            "(config.max_position_embeddings); lower max_length to at most the context"
        )


def uniform_layer_indices(num_teacher_layers: int, num_student_layers: int) -> tuple[int, ...]:
    """Spread ``num_student_layers`` indices evenly over the teacher's layers, ends included.

    ``round(i * (n - 1) / (k - 1))`` for ``i`` in ``0..k-1``; 12 → 6 gives DistilBERT's
    ``(0, 2, 4, 7, 9, 11)``. One student layer takes the teacher's first layer.

    Raises:
        DistilError: If the student would not be smaller than or equal to the teacher.
    """
    if not 1 <= num_student_layers <= num_teacher_layers:
        raise DistilError(
            f"a student needs between 1 and {num_teacher_layers} layers (the teacher's), got {num_student_layers}"
        )
    if num_student_layers == 1:
        return (0,)
    step = (num_teacher_layers - 1) / (num_student_layers - 1)
    return tuple(round(i * step) for i in range(num_student_layers))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the model's stack of decoder layers (the ``ModuleList`` of ``num_hidden_layers``).

    Returns:
        The module path (e.g. ``model.layers``) and the list.

    Raises:
        DistilError: If there is not exactly one such list.
    """
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise DistilError(
            f"{type(model).__name__} has no config.num_hidden_layers; cannot find its decoder layers"
        )
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    if len(found) != 1:
        raise DistilError(
            f"expected one list of {num_layers} decoder layers in {type(model).__name__}, found "
            f"{[name for name, _ in found]}; layer dropping does not support this architecture"
        )
    return found[0]


def init_student_from_teacher(
    teacher: PreTrainedModel,
    layer_indices: Sequence[int] | None = None,
    *,
    num_layers: int | None = None,
) -> PreTrainedModel:
    """Build a shallower copy of ``teacher`` keeping only some of its decoder layers.

    Everything outside the decoder stack (embeddings, final norm, LM head) is copied, and
    student layer ``j`` is a copy of teacher layer ``layer_indices[j]``. The result is then
    checked tensor by tensor with ``verify_student_from_teacher``.

    Args:
        teacher: A Hugging Face decoder-only model with one list of decoder layers.
        layer_indices: Increasing teacher layer indices to keep; exclusive with ``num_layers``.
        num_layers: Keep this many layers, spread by ``uniform_layer_indices``.

    Returns:
        The student, same class, dtype and device as the teacher, in train mode.

    Raises:
        DistilError: If neither or both of ``layer_indices``/``num_layers`` are given, indices are
            out of range or not increasing, or the copy check fails.
    """
    layers_name, teacher_layers = decoder_layers(teacher)
    n_teacher = len(teacher_layers)
    if (layer_indices is None) == (num_layers is None):
        raise DistilError("give exactly one of layer_indices or num_layers")
    indices = (
        uniform_layer_indices(n_teacher, num_layers)
        if num_layers is not None
        else tuple(layer_indices or ())
    )
    if (
        not indices
        or any(not 0 <= i < n_teacher for i in indices)
        or list(indices) != sorted(set(indices))
    ):
        raise DistilError(
            f"layer_indices {list(indices)} must be increasing, distinct and within 0..{n_teacher - 1} "
            f"(the teacher has {n_teacher} decoder layers)"
        )

    student_config = copy.deepcopy(teacher.config)
    student_config.num_hidden_layers = len(indices)
    # Some configs describe each layer (e.g. sliding vs full attention); keep the chosen ones.
    layer_types = getattr(student_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_teacher:
        student_config.layer_types = [layer_types[i] for i in indices]
    student = type(teacher)(student_config)
    # transformers wraps PreTrainedModel.to in a decorator that mypy reads as unbound.
    student.to(dtype=teacher.dtype, device=teacher.device)  # type: ignore[call-arg]

    teacher_state = teacher.state_dict()
    student_state = {
        student_key: teacher_state[teacher_key].detach().clone()
        for student_key, teacher_key in _student_to_teacher_keys(
            student.state_dict(), layers_name, indices
        ).items()
    }
    student.load_state_dict(student_state, strict=True)
    student.train()
    verify_student_from_teacher(teacher, student, indices)
    logger.info(
        "student initialised from %s: %d of %d decoder layers %s, embeddings/norm/head copied",
        type(teacher).__name__,
        len(indices),
        n_teacher,
        list(indices),
    )
    return student


def _student_to_teacher_keys(
    student_state: dict[str, torch.Tensor], layers_name: str, layer_indices: Sequence[int]
) -> dict[str, str]:
    """Map each student state-dict key to the teacher key it is copied from."""
    layer_key = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.(.+)$")
    mapping: dict[str, str] = {}
    for key in student_state:
        match = layer_key.match(key)
        if match is None:
            mapping[key] = key
        else:
            student_layer, rest = int(match.group(1)), match.group(2)
            mapping[key] = f"{layers_name}.{layer_indices[student_layer]}.{rest}"
    return mapping


def verify_student_from_teacher(
    teacher: PreTrainedModel, student: PreTrainedModel, layer_indices: Sequence[int]
) -> None:
    """Check that every student tensor equals the teacher tensor it was copied from.

    Raises:
        DistilError: Naming the first differing or missing tensors.
    """
    layers_name, student_layers = decoder_layers(student)
    if len(student_layers) != len(layer_indices):
        raise DistilError(
            f"student has {len(student_layers)} decoder layers but {len(layer_indices)} indices were given"
        )
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    mismatched = []
    for student_key, teacher_key in _student_to_teacher_keys(
        student_state, layers_name, layer_indices
    ).items():
        teacher_tensor = teacher_state.get(teacher_key)
        if teacher_tensor is None or not torch.equal(student_state[student_key], teacher_tensor):
            mismatched.append(f"{student_key} <- {teacher_key}")
    if mismatched:
        raise DistilError(
            f"student init check failed for {len(mismatched)} tensor(s), e.g. {mismatched[:3]}; "
            "the student does not hold the teacher's weights"
        )


@dataclass(frozen=True)
class ParameterCount:
    """Parameter counts of a model; shared (tied) tensors are counted once."""

    total: int
    trainable: int
    embedding: int  # input embedding plus a separate (untied) output embedding

    @property
    def non_embedding(self) -> int:
        """Parameters outside the embeddings, the usual measure of model size for scaling."""
        return self.total - self.embedding


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count a model's parameters, each shared tensor once."""
    parameters = list(
        model.parameters()
    )  # nn.Module.parameters() already yields a tied tensor once
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    embedding = 0
    get_input = getattr(model, "get_input_embeddings", None)
    get_output = getattr(model, "get_output_embeddings", None)
    input_embedding = get_input() if callable(get_input) else None
    output_embedding = get_output() if callable(get_output) else None
    if isinstance(input_embedding, nn.Module):
        embedding += sum(p.numel() for p in input_embedding.parameters())
    if isinstance(output_embedding, nn.Module):
        input_ids = (
            {id(p) for p in input_embedding.parameters()}
            if isinstance(input_embedding, nn.Module)
            else set()
        )
        embedding += sum(p.numel() for p in output_embedding.parameters() if id(p) not in input_ids)
    return ParameterCount(total=total, trainable=trainable, embedding=embedding)


def save_model_folder(
    model: PreTrainedModel,
    folder: Path | str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a model (safetensors + config) and optionally its tokenizer for ``from_pretrained``.

    Args:
        model: The model to save.
        folder: Target folder.
        tokenizer: Saved alongside, so the folder is self-contained.
        overwrite: Allow writing into a non-empty folder.

    Returns:
        The folder.

    Raises:
        DistilError: If the folder is not empty and ``overwrite`` is False, or no safetensors
            file was written.
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise DistilError(
            f"model folder {folder} is not empty; choose a new folder or pass overwrite=True"
        )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    if not any(folder.glob("*.safetensors")):
        raise DistilError(
            f"saving to {folder} wrote no .safetensors file; distil only writes safetensors weights"
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    logger.info(
        "saved %s%s to %s",
        type(model).__name__,
        " and its tokenizer" if tokenizer is not None else "",
        folder,
    )
    return folder


# --------------------------------------------------------------------------------------------
# Models from config sources (the causal-LM recipes, `distil cache`, `distil generate`)
# --------------------------------------------------------------------------------------------


def build_from_spec(
    spec: LMSpec, tokenizer: PreTrainedTokenizerBase, *, seed: int
) -> PreTrainedModel:
    """A randomly initialised float32 model of ``spec`` with the tokenizer's special ids."""
    from distil.data.lm import pad_token_id_for

    shape = CausalLMSpec(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        vocab_size=spec.vocab_size or len(tokenizer),
        max_context=spec.max_context,
        num_kv_heads=spec.num_kv_heads,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id_for(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
    )
    return build_causal_lm(shape, seed=seed)


def torch_dtype(choice: TorchDtype, default: torch.dtype) -> torch.dtype:
    """The dtype a config names; ``default`` (the checkpoint's) for ``auto``."""
    return default if choice is TorchDtype.AUTO else getattr(torch, choice.value)


def load_lm(
    source: ModelSource,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """A causal LM from a local folder (``hf``) or built from a shape (``spec``, seeded by the
    source's own seed, else ``seed``).

    Raises:
        DistilError: For a kind a causal LM cannot be made from.
    """
    if isinstance(source, HFModel):
        return load_causal_lm(source.hf, trust_remote_code=source.trust_remote_code, dtype=dtype)
    if isinstance(source, SpecModel):
        model = build_from_spec(
            source.spec, tokenizer, seed=source.seed if source.seed is not None else seed
        )
        return model if dtype is None else model.to(dtype=dtype)  # type: ignore[call-arg]
    raise DistilError(
        f"a causal LM is made from {{hf: FOLDER}} or {{spec: ...}}, not {describe_model(source)}"
    )


def make_student(
    source: ModelSource, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, seed: int
) -> tuple[PreTrainedModel, str]:
    """The student's initial float32 weights and a line saying where they came from.

    Raises:
        DistilError: If a student checkpoint carries a tokenizer that differs from the teacher's.
    """
    from distil.models.vocab import (
        TOKENIZER_FILES,
        check_distillation_vocab,
        load_tokenizer_folder,
        output_vocab_rows,
    )

    if isinstance(source, FromTeacher):
        sub = source.from_teacher
        model = init_student_from_teacher(
            teacher, sub.layers, num_layers=sub.num_layers if sub.layers is None else None
        )
        return model.float(), f"teacher layers {sub.layers or sub.num_layers} (layer-dropped copy)"
    if isinstance(source, HFModel):
        model = load_causal_lm(
            source.hf, trust_remote_code=source.trust_remote_code, dtype=torch.float32
        )
        if any((Path(source.hf) / f).is_file() for f in TOKENIZER_FILES):
            check_distillation_vocab(
                tokenizer,
                load_tokenizer_folder(source.hf),
                teacher_vocab_rows=output_vocab_rows(teacher),
                student_vocab_rows=output_vocab_rows(model),
            )
        return model, f"checkpoint {source.hf}"
    model = load_lm(source, tokenizer, seed=seed).float()
    return model, describe_model(source)


def check_model_fits(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int, role: str
) -> None:
    """Refuse a model whose context is shorter than the data or whose output cannot score every token id."""
    from distil.models.vocab import output_vocab_rows, tokenizer_vocab_size

    check_fits_context(max_length, model, role=role)
    rows, ids = output_vocab_rows(model), tokenizer_vocab_size(tokenizer)
    if rows < ids:
        raise DistilError(
            f"the {role}'s output layer has {rows} rows but the tokenizer has {ids} ids; use the tokenizer it was trained with"
        )


class LMForward(nn.Module):
    """Runs a causal LM to its final hidden states (``hidden=True``) or logits, so that DDP wraps
    exactly the forward the loss uses; the output layer is then applied inside the chunked loss."""

    def __init__(self, lm: PreTrainedModel, *, hidden: bool) -> None:
        super().__init__()
        self.lm, self.hidden = lm, hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.hidden:
            return final_hidden(self.lm, input_ids, attention_mask)  # (B, T, H)
        logits: torch.Tensor = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # (B, T, V_model)
        return logits


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's final (normalised) hidden states ``(B, T, H)``, without the output layer."""
    base = getattr(model, "base_model", model)
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden: torch.Tensor = out.last_hidden_state  # (B, T, H)
    return hidden


def rebuild_lm(config: Any, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain (unsharded) float32 causal LM of ``config`` holding the full ``state`` (built with
    the caller's RNG untouched: its throwaway initialisation draws from a forked generator)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    return model.float().eval()
