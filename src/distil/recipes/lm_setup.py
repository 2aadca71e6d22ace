"""Setup shared by the causal-LM recipes (``lm_kd``, ``lm_pretrain``): config sections, data, models.

Everything here runs before step 0, so bad input (missing tokenizer files, a chat dataset
without a template, sequences longer than the context, different tokenizers, data with no
supervised token) stops the run with a clear message before any training.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.data.corpus import build_stdlib_corpus
from distil.data.lm import (
    IGNORE_INDEX,
    LMDataFormat,
    LMDataOptions,
    OverlengthPolicy,
    build_lm_dataset,
    collate_lm_batch,
    load_local_records,
    pad_token_id_for,
)
from distil.errors import DistilError
from distil.losses.chunked import default_chunk_size, logits_chunk_size
from distil.losses.divergences import Divergence
from distil.models.lm import (
    CausalLMSpec,
    build_causal_lm,
    check_fits_context,
    init_student_from_teacher,
    load_causal_lm,
)
from distil.models.vocab import (
    TOKENIZER_FILES,
    check_distillation_vocab,
    load_tokenizer_folder,
    output_vocab_rows,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class LMSpecSection(StrictModel):
    """A Llama-style model built in code (the built-in teacher/student, tests)."""

    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    max_context: int = Field(default=256, ge=2)
    num_kv_heads: int | None = Field(default=None, ge=1)
    tie_word_embeddings: bool = False
    vocab_size: int | None = Field(
        default=None, ge=1, description="embedding rows; the tokenizer's size when null"
    )

    def build(self, tokenizer: PreTrainedTokenizerBase, *, seed: int) -> PreTrainedModel:
        """A randomly initialised float32 model with the tokenizer's special ids in its config."""
        spec = CausalLMSpec(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size or len(tokenizer),
            max_context=self.max_context,
            num_kv_heads=self.num_kv_heads,
            tie_word_embeddings=self.tie_word_embeddings,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_token_id_for(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
        )
        return build_causal_lm(spec, seed=seed)


class LMDataSection(StrictModel):
    """Local files (text, JSONL, Parquet) or the built-in corpus, and how they become examples."""

    builtin: Literal["stdlib"] | None = Field(
        default=None, description="the CPython standard-library corpus"
    )
    corpus_max_bytes: int | None = Field(
        default=None, ge=1, description="cap on the built-in corpus size"
    )
    train_files: list[str] | None = None
    eval_files: list[str] | None = Field(
        default=None, description="held-out files; else the last eval_fraction of train"
    )
    eval_fraction: float = Field(default=0.05, gt=0, lt=1)
    format: LMDataFormat = LMDataFormat.TEXT
    max_length: int = Field(
        default=256, ge=2, description="tokens per example (the block size of packed text)"
    )
    overlength: OverlengthPolicy = OverlengthPolicy.ERROR
    drop_unsupervised: bool = False
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    train_limit: int | None = Field(
        default=None, ge=1, description="use only the first N training examples"
    )
    eval_limit: int | None = Field(
        default=64, ge=1, description="evaluate on the first N held-out examples"
    )
    shuffle: bool = Field(
        default=True, description="a seeded permutation per epoch; false keeps file order"
    )

    @model_validator(mode="after")
    def _one_source(self) -> LMDataSection:
        if (self.builtin is None) == (self.train_files is None):
            raise ValueError(
                "set exactly one of data.builtin (stdlib) or data.train_files (local files)"
            )
        if self.builtin is not None and self.format is not LMDataFormat.TEXT:
            raise ValueError("the built-in corpus is raw text: use data.format=text")
        return self

    def options(self) -> LMDataOptions:
        return LMDataOptions(
            data_format=self.format,
            max_length=self.max_length,
            overlength=self.overlength,
            drop_unsupervised=self.drop_unsupervised,
            text_field=self.text_field,
            prompt_field=self.prompt_field,
            completion_field=self.completion_field,
            messages_field=self.messages_field,
        )


class ModelSource(str, Enum):
    FROM_TEACHER = "from_teacher"  # a subset of the teacher's layers (DistilBERT-style)
    CHECKPOINT = "checkpoint"  # a local Hugging Face folder
    SCRATCH = "scratch"  # random init from a spec


class TorchDtype(str, Enum):
    AUTO = "auto"  # the checkpoint's dtype (float32 for a spec)
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class TeacherSection(StrictModel):
    hf: str | None = Field(
        default=None, description="local Hugging Face folder (config, safetensors, tokenizer)"
    )
    spec: LMSpecSection | None = Field(
        default=None, description="a random teacher built in code (tests)"
    )
    seed: int = 1
    dtype: TorchDtype = TorchDtype.AUTO
    device: str | None = Field(
        default=None, description="e.g. cpu or cuda:1; the student's device when null"
    )
    trust_remote_code: bool = False
    cache: str | None = Field(
        default=None,
        description="a `distil cache` folder: lm_kd trains from it (the live teacher still scores the report)",
    )

    @model_validator(mode="after")
    def _one(self) -> TeacherSection:
        if (self.hf is None) == (self.spec is None):
            raise ValueError("set exactly one of teacher.hf (a local folder) or teacher.spec")
        return self


class StudentSection(StrictModel):
    init: ModelSource = ModelSource.FROM_TEACHER
    hf: str | None = Field(default=None, description="folder for init=checkpoint")
    spec: LMSpecSection | None = Field(default=None, description="shape for init=scratch")
    layers: list[int] | None = Field(
        default=None, description="teacher layers to keep (init=from_teacher)"
    )
    num_layers: int | None = Field(
        default=None, ge=1, description="or: keep this many, evenly spread"
    )
    seed: int = 17
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> StudentSection:
        need = {
            ModelSource.CHECKPOINT: ("hf",),
            ModelSource.SCRATCH: ("spec",),
            ModelSource.FROM_TEACHER: (),
        }[self.init]
        given = [k for k in ("hf", "spec") if getattr(self, k) is not None]
        if sorted(given) != sorted(need):
            raise ValueError(
                f"student.init={self.init.value} takes {list(need) or 'neither hf nor spec'}, got {given or 'none'}"
            )
        picks = (self.layers is not None) + (self.num_layers is not None)
        if self.init is ModelSource.FROM_TEACHER and picks != 1:
            raise ValueError(
                "student.init=from_teacher needs exactly one of student.layers or student.num_layers"
            )
        if self.init is not ModelSource.FROM_TEACHER and picks:
            raise ValueError(
                f"student.layers/num_layers only apply to init=from_teacher, not {self.init.value}"
            )
        return self


class KDSection(StrictModel):
    kd_weight: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="weight of the soft term; 1 - it weighs the hard LM loss",
    )
    kd_temperature: float = Field(default=1.0, gt=0)
    divergence: Divergence = Divergence.FORWARD_KL
    divergence_params: dict[str, float] = Field(
        default_factory=dict, description="e.g. {beta: 0.5} for generalized_jsd"
    )
    chunked: bool | None = Field(
        default=None, description="chunked loss from hidden states; auto: on for large vocabularies"
    )
    chunk_size: int | None = Field(default=None, ge=1)


class OnPolicySection(StrictModel):
    """GKD-style on-policy distillation: on a share ``fraction`` (λ) of the steps the student
    samples completions of the batch's prompts and the teacher scores them; the divergence is
    taken on the sampled tokens only (no hard CE: there is no reference text)."""

    fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="λ: 0 = off-policy KD on the dataset, 1 = every step on student samples",
    )
    sampling_temperature: float = Field(
        default=1.0, ge=0, description="the student's sampling temperature; 0 = greedy"
    )
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)
    prompt_tokens: int = Field(
        default=64,
        ge=1,
        description="prompt cut from packed text; prompt/completion and chat data use their own prompt",
    )


class MonitorSection(StrictModel):
    """Teacher-hacking monitor (Tiapkin et al. 2025): every ``every`` steps, the student's KL to
    the teacher on a fixed held-out set (and to an ``oracle`` model when given) is measured next
    to the training divergence (the proxy); the report flags a proxy that improves while the
    held-out or oracle measure worsens."""

    every: int = Field(default=0, ge=0, description="steps between measurements; 0 = off")
    examples: int = Field(default=16, ge=1, description="held-out examples measured")
    oracle: str | None = Field(
        default=None,
        description="folder of a ground-truth LM with the same tokenizer (e.g. the teacher's own teacher)",
    )
    tolerance: float = Field(
        default=0.02,
        ge=0,
        description="relative rise above its best value that counts as worsening",
    )


class GenerationSection(StrictModel):
    prompts: int = Field(default=3, ge=0, description="sample generations shown side by side")
    prompt_tokens: int = Field(default=32, ge=1)
    max_new_tokens: int = Field(default=48, ge=1)
    sampling_temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    speed_batch: int = Field(default=4, ge=1)
    speed_new_tokens: int = Field(default=32, ge=1)


class EvalSection(StrictModel):
    baseline: bool = Field(default=True, description="also train the student without the teacher")
    batch_size: int = Field(default=8, ge=1)
    fidelity_tokens: int = Field(
        default=2048,
        ge=1,
        description="held-out token positions whose full logits feed agreement, KL/JSD and calibration",
    )
    generation: GenerationSection = GenerationSection()
    monitor: MonitorSection = MonitorSection()


@dataclass
class LMData:
    """Tokenized, masked splits plus what the loop needs from them."""

    train: datasets.Dataset
    eval: datasets.Dataset
    targets_per_example: np.ndarray  # supervised next-token targets of each training example
    pad_token_id: int

    def collate(self, split: datasets.Dataset, indices: list[int]) -> dict[str, torch.Tensor]:
        """Collate the examples at ``indices`` (int64 tensors, right-padded)."""
        cols = split[indices]
        rows = [
            {"example_id": e, "input_ids": i, "labels": lab}
            for e, i, lab in zip(cols["example_id"], cols["input_ids"], cols["labels"], strict=True)
        ]
        return collate_lm_batch(rows, pad_token_id=self.pad_token_id)

    def eval_batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        n = len(self.eval)
        return [
            self.collate(self.eval, list(range(i, min(i + batch_size, n))))
            for i in range(0, n, batch_size)
        ]


def data_files(
    section: LMDataSection, work_dir: Path, accelerator: Any
) -> tuple[list[str], list[str] | None]:
    """The train and held-out files; the built-in corpus is written into ``work_dir`` first."""
    if section.builtin is None:
        assert section.train_files is not None
        return section.train_files, section.eval_files
    corpus_dir = work_dir / "stdlib-corpus"
    if (
        accelerator.is_main_process
    ):  # deterministic, a second or two; one writer, then everyone reads
        build_stdlib_corpus(corpus_dir, max_total_bytes=section.corpus_max_bytes, test_fraction=0.0)
    accelerator.wait_for_everyone()
    return [str(corpus_dir / "train.jsonl")], [str(corpus_dir / "validation.jsonl")]


def load_lm_data(
    section: LMDataSection, tokenizer: PreTrainedTokenizerBase, work_dir: Path, accelerator: Any
) -> LMData:
    """Load, tokenize and mask the data (every process does the same, deterministically).

    Raises:
        DistilError: From ``distil.data.lm`` on bad data, or if a split ends up empty.
    """
    train_files, eval_files = data_files(section, work_dir, accelerator)
    options = section.options()
    train = build_lm_dataset(load_local_records(train_files), tokenizer, options)
    if eval_files is not None:
        held_out = build_lm_dataset(load_local_records(eval_files), tokenizer, options)
    else:
        n_eval = max(1, round(len(train) * section.eval_fraction))
        if len(train) - n_eval < 1:
            raise DistilError(
                f"{len(train)} example(s) cannot be split into train and held-out; add data or set data.eval_files"
            )
        held_out = train.select(range(len(train) - n_eval, len(train)))
        train = train.select(range(len(train) - n_eval))
    if section.train_limit is not None:
        train = train.select(range(min(section.train_limit, len(train))))
    if section.eval_limit is not None:
        held_out = held_out.select(range(min(section.eval_limit, len(held_out))))
    counts = [
        sum(1 for t in row[1:] if t != IGNORE_INDEX)
        for batch in train.iter(batch_size=1024)
        for row in batch["labels"]
    ]
    logger.info(
        "data: %d training and %d held-out examples of up to %d tokens",
        len(train),
        len(held_out),
        section.max_length,
    )
    _release_freed_memory()
    return LMData(train, held_out, np.asarray(counts, dtype=np.int64), pad_token_id_for(tokenizer))


def _release_freed_memory() -> None:
    """Give the heap freed by tokenization back to the OS (glibc keeps it otherwise).

    Packing builds Python lists of every token of the corpus; after they are freed the process
    still holds the pages (measured: 807 MB resident after loading the built-in corpus, 512 MB
    after ``malloc_trim``), which would count against the training run's memory.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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


MAX_CHUNK_ROWS = 256


def loss_chunk_rows(
    chunk_size: int | None,
    vocab_size: int,
    *,
    fused: bool,
    device: torch.device | str | None = None,
) -> int:
    """Rows per chunk of the token loss: ``kd.chunk_size``, else the loss library's default.

    ``fused`` (loss from hidden states): the library's default capped at 256 rows; it sizes
    chunks to ~16M elements, i.e. 2048 rows at V = 8192, so one chunk would hold a whole CPU
    batch. Over materialised logits: :func:`distil.losses.chunked.logits_chunk_size`, small
    chunks that stay in the CPU caches (64 rows at V = 8192 on CPU).
    """
    if chunk_size:
        return chunk_size
    if fused:
        return min(default_chunk_size(vocab_size), MAX_CHUNK_ROWS)
    return logits_chunk_size(vocab_size, device)


def torch_dtype(choice: TorchDtype, default: torch.dtype) -> torch.dtype:
    return default if choice is TorchDtype.AUTO else getattr(torch, choice.value)


def load_teacher_model(
    section: TeacherSection, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel:
    """The teacher from its local folder, or built from its spec (tests)."""
    if section.hf is not None:
        return load_causal_lm(section.hf, trust_remote_code=section.trust_remote_code)
    assert section.spec is not None
    return section.spec.build(tokenizer, seed=section.seed)


def make_student(
    section: StudentSection, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, str]:
    """The student's initial float32 weights and a line saying where they came from.

    Raises:
        DistilError: If a student checkpoint carries a tokenizer that differs from the teacher's.
    """
    if section.init is ModelSource.FROM_TEACHER:
        num_layers = None if section.layers is not None else section.num_layers
        model = init_student_from_teacher(teacher, section.layers, num_layers=num_layers)
        return (
            model.float(),
            f"teacher layers {section.layers or section.num_layers} (layer-dropped copy)",
        )
    if section.init is ModelSource.CHECKPOINT:
        assert section.hf is not None
        model = load_causal_lm(
            section.hf, trust_remote_code=section.trust_remote_code, dtype=torch.float32
        )
        if any((Path(section.hf) / f).is_file() for f in TOKENIZER_FILES):
            check_distillation_vocab(
                tokenizer,
                load_tokenizer_folder(section.hf),
                teacher_vocab_rows=output_vocab_rows(teacher),
                student_vocab_rows=output_vocab_rows(model),
            )
        return model, f"checkpoint {section.hf}"
    assert section.spec is not None
    model = section.spec.build(tokenizer, seed=section.seed).float()
    return model, f"scratch ({section.spec.num_layers} layers × {section.spec.hidden_size})"
