"""``distil advise``: propose student shapes for a teacher and a target, before training anything.

For a transformer teacher (a Hugging Face folder's ``config.json``, an inline shape, or a config
naming one) the candidates are depth and width cuts of the teacher:

- **depth** cuts keep the width, so the student can start from a subset of the teacher's layers
  (``distil.models.lm.init_student_from_teacher``, DistilBERT-style uniform spacing);
- **width** cuts keep the head size and shrink heads, MLP and model width together (random init);
- the **capacity-gap** candidate is the shape closest to ``N_T / 2.5`` parameters — the law of
  capacity gap (METHODS.md N.1, arXiv:2311.07052) finds the best teacher for a student of
  ``N_S`` parameters near ``2.5 · N_S``; a teacher much larger than that teaches worse, and
  ``pick_teacher`` chooses among several teachers accordingly.

Each candidate comes with estimated parameters, training memory and speed-up (see
:func:`estimate`), and the report says whether a live teacher or a teacher-output cache fits a
memory budget for a dataset size. Small classifier teachers (a ``classifier_kd`` config with a
zoo model) are built and measured instead of estimated.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.markup import escape

from distil.errors import DistilError

logger = logging.getLogger(__name__)

CAPACITY_GAP_RATIO = 2.5  # N_T* ≈ 2.5 · N_S (METHODS.md N.1)
WIDTH_FACTORS = (1.0, 0.75, 2 / 3, 0.5, 0.375, 1 / 3, 0.25, 0.125)
OPTIMIZER_BYTES_PER_PARAM = 16  # fp32 weights + fp32 grads + AdamW's two fp32 moments
NOT_GATED = (
    "gpt2",
    "gpt_neo",
    "gpt_neox",
    "gptj",
    "bert",
    "roberta",
    "distilbert",
    "opt",
    "bloom",
    "falcon",
    "phi",
    "xlm-roberta",
    "electra",
)
LEARNED_POSITIONS = (
    "gpt2",
    "gpt_neo",
    "bert",
    "roberta",
    "distilbert",
    "opt",
    "xlm-roberta",
    "electra",
)
QKV_BIAS = ("qwen2", "qwen2_moe", "qwen2_vl")
SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | float | int, *, binary: bool = False) -> float:
    """``"125M"`` → 1.25e8, ``"1e6"`` → 1e6; with ``binary`` (memory sizes) ``"24GB"`` and
    ``"24GiB"`` are both 24·2³⁰, as accelerator memory is quoted."""
    if isinstance(text, int | float):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise DistilError(f"cannot read {text!r} as a number (e.g. 125M, 24GB, 1e6)")
    unit = match.group(2)
    if binary and unit:
        return float(match.group(1)) * 1024 ** "kmgt".index("g" if unit == "b" else unit) * 1024
    return float(match.group(1)) * SIZE_UNITS[unit]


@dataclass(frozen=True)
class TransformerShape:
    """The size-relevant shape of a transformer (decoder or encoder).

    Attributes:
        num_layers: Transformer blocks.
        hidden_size: Model width ``d``.
        num_heads: Attention heads.
        num_kv_heads: Key/value heads (grouped-query attention).
        head_dim: Size of one head (``d / num_heads`` unless the config says otherwise).
        intermediate_size: MLP width.
        vocab_size: Embedding rows.
        tie_word_embeddings: The output head shares the input embedding.
        gated_mlp: Three MLP matrices (SwiGLU, Llama family) instead of two.
        bias: Linear layers and norms have biases (GPT-2, BERT).
        max_context: Learned position embeddings of this many rows when ``learned_positions``.
        learned_positions: A position-embedding table (GPT-2, BERT) rather than RoPE.
        qkv_bias: Only the query/key/value projections have biases (Qwen2, Llama's
            ``attention_bias``), in a model without other biases.
        model_type: The Hugging Face ``model_type``, for the reader.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    gated_mlp: bool = True
    bias: bool = False
    max_context: int = 2048
    learned_positions: bool = False
    qkv_bias: bool = False
    model_type: str = "llama"

    def layer_params(self) -> int:
        """Parameters of one block."""
        d, q, kv = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        )
        attn = (
            d * q
            + 2 * d * kv
            + q * d
            + (q + 2 * kv + d if self.bias else q + 2 * kv if self.qkv_bias else 0)
        )
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate_size
        mlp += (self.intermediate_size + d) if self.bias else 0
        norms = 2 * d * (2 if self.bias else 1)
        return attn + mlp + norms

    def embedding_params(self) -> int:
        """Input embedding, position table and an untied output head."""
        emb = self.vocab_size * self.hidden_size
        if self.learned_positions:
            emb += self.max_context * self.hidden_size
        if not self.tie_word_embeddings:
            emb += self.vocab_size * self.hidden_size
        return emb

    def params(self) -> int:
        """All parameters (final norm included; a tied head counted once)."""
        final_norm = self.hidden_size * (2 if self.bias else 1)
        return self.num_layers * self.layer_params() + self.embedding_params() + final_norm

    def non_embedding_params(self) -> int:
        """Parameters of the blocks and the final norm."""
        return self.params() - self.embedding_params()

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token: 2 per weight of every matmul (blocks and the output head)
        plus attention scores and values over ``context`` positions."""
        matmul = self.num_layers * self.layer_params() + self.vocab_size * self.hidden_size
        attention = 2 * self.num_layers * context * self.num_heads * self.head_dim
        return 2.0 * matmul + 2.0 * attention

    def weights_read_per_token(self) -> int:
        """Weights a batch-1 decoding step reads: every block and the output head (an embedding
        lookup reads one row). Batch-1 generation is bound by this memory traffic."""
        return self.num_layers * self.layer_params() + self.vocab_size * self.hidden_size

    def describe(self) -> str:
        """``12L × 768d, 12 heads (4 kv), ffn 3072``."""
        kv = f" ({self.num_kv_heads} kv)" if self.num_kv_heads != self.num_heads else ""
        return f"{self.num_layers}L × {self.hidden_size}d, {self.num_heads} heads{kv}, ffn {self.intermediate_size}"


def shape_from_hf_config(config: Mapping[str, Any]) -> TransformerShape:
    """Read a Hugging Face ``config.json`` (Llama/Mistral/Qwen/Gemma, GPT-2, BERT families).

    Raises:
        DistilError: If the layer count, width or heads are missing.
    """

    def first(*keys: str) -> Any:
        for key in keys:
            if config.get(key) is not None:
                return config[key]
        return None

    model_type = str(config.get("model_type", "unknown"))
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    hidden = first("hidden_size", "n_embd", "d_model", "dim")
    heads = first("num_attention_heads", "n_head", "num_heads")
    if not all(isinstance(v, int) for v in (layers, hidden, heads)):
        raise DistilError(
            f"config.json of model_type {model_type!r} lacks num_hidden_layers/hidden_size/num_attention_heads; "
            "give the shape inline: layers=12,hidden=768,heads=12,ffn=3072,vocab=32000"
        )
    not_gated = model_type in NOT_GATED
    ffn = first("intermediate_size", "n_inner", "ffn_dim", "hidden_dim") or 4 * hidden
    head_dim = first("head_dim") or hidden // heads
    tie = config.get("tie_word_embeddings")
    return TransformerShape(
        num_layers=layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=first("num_key_value_heads", "num_kv_heads") or heads,
        head_dim=head_dim,
        intermediate_size=ffn,
        vocab_size=first("vocab_size") or 32000,
        tie_word_embeddings=bool(tie) if tie is not None else not_gated,
        gated_mlp=not not_gated,
        bias=not_gated,
        max_context=first("max_position_embeddings", "n_positions", "n_ctx") or 2048,
        learned_positions=model_type in LEARNED_POSITIONS,
        model_type=model_type,
        qkv_bias=not not_gated and (model_type in QKV_BIAS or bool(config.get("attention_bias"))),
    )


INLINE_KEYS = {
    "layers": "num_layers",
    "hidden": "hidden_size",
    "heads": "num_heads",
    "kv_heads": "num_kv_heads",
    "head_dim": "head_dim",
    "ffn": "intermediate_size",
    "vocab": "vocab_size",
    "context": "max_context",
    "tie": "tie_word_embeddings",
    "gated": "gated_mlp",
    "bias": "bias",
    "qkv_bias": "qkv_bias",
    "type": "model_type",
}


def shape_from_inline(spec: str) -> TransformerShape:
    """``"layers=12,hidden=768,heads=12,ffn=3072,vocab=32000[,kv_heads=4,tie=true]"``."""
    values: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, _, raw = item.partition("=")
        if key not in INLINE_KEYS or not raw:
            raise DistilError(f"{item!r}: expected KEY=VALUE with KEY among {sorted(INLINE_KEYS)}")
        field = INLINE_KEYS[key]
        if field in ("tie_word_embeddings", "gated_mlp", "bias", "qkv_bias"):
            values[field] = raw.lower() in ("1", "true", "yes")
        elif field == "model_type":
            values[field] = raw
        else:
            values[field] = int(parse_count(raw))
    missing = [k for k in ("layers", "hidden", "heads") if INLINE_KEYS[k] not in values]
    if missing:
        raise DistilError(
            f"inline teacher shape lacks {missing} (e.g. layers=12,hidden=768,heads=12,ffn=3072,vocab=32000)"
        )
    values.setdefault("num_kv_heads", values["num_heads"])
    values.setdefault("head_dim", values["hidden_size"] // values["num_heads"])
    values.setdefault("intermediate_size", 4 * values["hidden_size"])
    values.setdefault("vocab_size", 32000)
    return TransformerShape(**values)


def params_on_disk(folder: Path) -> int | None:
    """Exact parameter count from the safetensors headers of a folder (no tensor is loaded)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                total += math.prod(f.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------------------------------------
# Candidates and estimates


@dataclass(frozen=True)
class Budget:
    """What the student is trained with, for the memory estimates.

    Attributes:
        memory_bytes: Accelerator memory available to one training process.
        dataset_tokens: Tokens (or examples, for classifiers) the teacher has to label.
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        top_k: Teacher log-probs kept per token by a cache.
        epochs: Passes over the data (a cache is written once and read each epoch).
        activation_bytes: Bytes per activation element (2 for bf16 mixed precision).
        teacher_bytes_per_param: Bytes per teacher weight when loaded for inference (2 = bf16).
    """

    memory_bytes: float | None = None
    dataset_tokens: float | None = None
    batch_size: int = 8
    seq_len: int = 1024
    top_k: int = 64
    epochs: int = 1
    activation_bytes: int = 2
    teacher_bytes_per_param: int = 2


@dataclass(frozen=True)
class Candidate:
    """A proposed student: shape, how it is initialised, and what it is estimated to cost."""

    name: str
    shape: TransformerShape
    init: str
    params: int
    size_ratio: float  # teacher params / student params
    speedup_b1: float  # weights read per decoded token, teacher / student
    speedup_throughput: float  # forward FLOPs per token, teacher / student
    train_memory_bytes: float
    meets_target: bool
    why: str

    def as_row(self) -> dict[str, Any]:
        """A flat dict for tables and JSON."""
        return {
            "candidate": self.name,
            "shape": self.shape.describe(),
            "init": self.init,
            "params": self.params,
            "teacher/student": self.size_ratio,
            "speed-up b1 (est.)": self.speedup_b1,
            "speed-up throughput (est.)": self.speedup_throughput,
            "train memory (est.)": self.train_memory_bytes,
            "meets target": self.meets_target,
        }


def activation_bytes_per_layer(shape: TransformerShape, budget: Budget) -> float:
    """Activation memory one block keeps for the backward pass, without recomputation:
    ``s·b·d·(34 + 5·a·s/d)`` bytes in 16-bit (Korthikanti et al. 2022), scaled to
    ``budget.activation_bytes``."""
    s, b, d, a = budget.seq_len, budget.batch_size, shape.hidden_size, shape.num_heads
    return s * b * d * (34 + 5 * a * s / d) * budget.activation_bytes / 2


def logits_bytes(shape: TransformerShape, budget: Budget) -> float:
    """One fp32 ``(B, T, V)`` logits tensor with its gradient (distil's chunked losses avoid most of it)."""
    return 2.0 * budget.batch_size * budget.seq_len * shape.vocab_size * 4


def student_train_bytes(shape: TransformerShape, budget: Budget) -> float:
    """Weights, gradients and AdamW state, activations of every block, and the logits."""
    return (
        OPTIMIZER_BYTES_PER_PARAM * shape.params()
        + shape.num_layers * activation_bytes_per_layer(shape, budget)
        + logits_bytes(shape, budget)
    )


def live_teacher_bytes(shape: TransformerShape, budget: Budget, params: int | None = None) -> float:
    """A frozen teacher under ``no_grad``: its weights, one block's activations and its logits."""
    n = params if params is not None else shape.params()
    one_block = (
        budget.batch_size
        * budget.seq_len
        * (4 * shape.hidden_size + 2 * shape.intermediate_size)
        * budget.activation_bytes
    )
    return (
        budget.teacher_bytes_per_param * n
        + one_block
        + budget.batch_size * budget.seq_len * shape.vocab_size * 4
    )


def cache_bytes(dataset_tokens: float, top_k: int) -> float:
    """A top-k teacher-output cache: per token, k (bf16 log-prob + int32 id) and an fp32 tail mass."""
    return dataset_tokens * (top_k * (2 + 4) + 4)


def _width_cut(shape: TransformerShape, factor: float) -> TransformerShape | None:
    heads = max(1, round(shape.num_heads * factor))
    kv = shape.num_kv_heads
    while kv > 1 and (kv > heads or heads % kv):
        kv -= 1
    hidden = (
        heads * shape.head_dim
        if shape.hidden_size == shape.num_heads * shape.head_dim
        else round(shape.hidden_size * heads / shape.num_heads)
    )
    ffn = max(8, round(shape.intermediate_size * heads / shape.num_heads / 8) * 8)
    if hidden <= 0:
        return None
    return replace(
        shape, num_heads=heads, num_kv_heads=max(kv, 1), hidden_size=hidden, intermediate_size=ffn
    )


def all_shapes(teacher: TransformerShape) -> list[TransformerShape]:
    """Every depth × width cut of the teacher (the teacher itself excluded)."""
    widths: dict[int, TransformerShape] = {}
    for factor in WIDTH_FACTORS:
        cut = _width_cut(teacher, factor)
        if cut is not None:
            widths.setdefault(cut.num_heads, cut)
    out = []
    for cut in widths.values():
        for layers in range(1, teacher.num_layers + 1):
            shape = replace(cut, num_layers=layers)
            if shape != teacher:
                out.append(shape)
    return out


def estimate(
    teacher: TransformerShape,
    student: TransformerShape,
    budget: Budget,
    teacher_params: int | None = None,
) -> dict[str, float]:
    """Estimated size and speed of ``student`` against ``teacher``.

    ``speedup_b1``: batch-1 decoding reads every weight once per token, so the ratio of weights
    read bounds it (per-layer launch overheads make shallow students gain more on GPUs, wide
    students less). ``speedup_throughput``: large batches are compute-bound, so the ratio of
    forward FLOPs at ``budget.seq_len``. Measure before trusting either: ``distil advise --measure``.
    """
    n_t = teacher_params or teacher.params()
    scale = n_t / teacher.params()  # corrects the formula by the teacher's true count when known
    n_s = round(student.params() * scale)
    return {
        "params": n_s,
        "size_ratio": n_t / n_s,
        "speedup_b1": teacher.weights_read_per_token() / student.weights_read_per_token(),
        "speedup_throughput": teacher.flops_per_token(budget.seq_len)
        / student.flops_per_token(budget.seq_len),
        "train_memory_bytes": student_train_bytes(student, budget),
    }


def pick_teacher(n_student: float, candidates: Mapping[str, float]) -> str:
    """The teacher whose size is closest to ``2.5 · n_student`` (the law of capacity gap).

    Args:
        n_student: Student parameters.
        candidates: ``{name: parameters}`` of the available teachers.
    """
    if not candidates:
        raise DistilError("pick_teacher needs at least one candidate teacher")
    return min(candidates, key=lambda name: abs(candidates[name] - CAPACITY_GAP_RATIO * n_student))


def propose(
    teacher: TransformerShape,
    *,
    speedup: float | None = None,
    size_ratio: float | None = None,
    max_params: float | None = None,
    budget: Budget | None = None,
    teacher_params: int | None = None,
) -> list[Candidate]:
    """Student shapes for a target, best first.

    Args:
        teacher: The teacher's shape.
        speedup: Wanted batch-1 speed-up over the teacher (estimated from weights read).
        size_ratio: Wanted student/teacher parameter fraction (0.25 = four times smaller).
        max_params: Wanted largest student, in parameters.
        budget: Training set-up for the memory estimate.
        teacher_params: The teacher's exact count (from its weights) when known.

    Returns:
        Up to five candidates: the shallowest-enough depth cut (layer-subset init), the widest
        width cut, a balanced depth-and-width cut, and the capacity-gap size; each says whether
        it meets every given target.
    """
    budget = budget or Budget()
    n_t = teacher_params or teacher.params()
    limit = min(
        [x for x in (max_params, size_ratio * n_t if size_ratio else None) if x is not None],
        default=None,
    )

    def build(name: str, shape: TransformerShape, why: str) -> Candidate:
        est = estimate(teacher, shape, budget, teacher_params)
        meets = (speedup is None or est["speedup_b1"] >= speedup) and (
            limit is None or est["params"] <= limit
        )
        if shape.hidden_size == teacher.hidden_size and shape.num_heads == teacher.num_heads:
            from distil.models.lm import uniform_layer_indices

            init = f"teacher layers {list(uniform_layer_indices(teacher.num_layers, shape.num_layers))}"
        else:
            init = "random (width differs from the teacher)"
        return Candidate(
            name,
            shape,
            init,
            int(est["params"]),
            est["size_ratio"],
            est["speedup_b1"],
            est["speedup_throughput"],
            est["train_memory_bytes"],
            meets,
            why,
        )

    shapes = all_shapes(teacher)
    scored = [(s, estimate(teacher, s, budget, teacher_params)) for s in shapes]

    def ok(est: Mapping[str, float]) -> bool:
        return (speedup is None or est["speedup_b1"] >= speedup) and (
            limit is None or est["params"] <= limit
        )

    def largest(pool: list[tuple[TransformerShape, dict[str, float]]]) -> TransformerShape | None:
        fitting = [s for s, e in pool if ok(e)]
        return max(fitting, key=lambda s: s.params(), default=None)

    out: list[Candidate] = []
    same_width = [(s, e) for s, e in scored if s.hidden_size == teacher.hidden_size]
    depth = largest(same_width)
    if depth is not None:
        out.append(
            build(
                "depth cut",
                depth,
                "keeps the teacher's width, so it starts from a subset of its layers; the cheapest to train well",
            )
        )
    same_depth = [
        (s, e)
        for s, e in scored
        if s.num_layers == teacher.num_layers and s.hidden_size < teacher.hidden_size
    ]
    width = largest(same_depth)
    if width is not None:
        out.append(
            build(
                "width cut",
                width,
                "keeps every layer and shrinks heads and MLP; gains throughput more than batch-1 latency",
            )
        )
    balanced_pool = [
        (s, e)
        for s, e in scored
        if s.hidden_size < teacher.hidden_size
        and s.num_layers < teacher.num_layers
        and abs(
            math.log((s.num_layers / s.hidden_size) / (teacher.num_layers / teacher.hidden_size))
        )
        < math.log(2)
    ]
    balanced = largest(balanced_pool)
    if balanced is not None:
        out.append(
            build(
                "balanced cut",
                balanced,
                "shrinks depth and width together, keeping the teacher's aspect ratio",
            )
        )
    target_n = n_t / CAPACITY_GAP_RATIO
    # Within 15 % of N_T / 2.5, prefer a shape that can start from the teacher's layers.
    closeness = {s: abs(math.log(e["params"] / target_n)) for s, e in scored}
    near = [s for s in shapes if closeness[s] < math.log(1.15)]
    gap_shape = min(
        near or shapes, key=lambda s: (s.hidden_size != teacher.hidden_size, closeness[s])
    )
    out.append(
        build(
            "capacity-gap size",
            gap_shape,
            f"about N_T / {CAPACITY_GAP_RATIO} parameters: the student this teacher teaches best",
        )
    )
    unique: dict[TransformerShape, Candidate] = {}
    for cand in out:
        unique.setdefault(cand.shape, cand)
    return list(unique.values())


def memory_plan(
    teacher: TransformerShape,
    student: TransformerShape,
    budget: Budget,
    teacher_params: int | None = None,
) -> dict[str, Any]:
    """Whether a live teacher, or a cache of its top-k outputs, fits ``budget`` for a student."""
    student_b = student_train_bytes(student, budget)
    live_b = live_teacher_bytes(teacher, budget, teacher_params)
    plan: dict[str, Any] = {
        "student_train_bytes": student_b,
        "live_teacher_bytes": live_b,
        "live_total_bytes": student_b + live_b,
    }
    if budget.memory_bytes is not None:
        plan["live_fits"] = student_b + live_b <= budget.memory_bytes
        plan["cache_fits"] = student_b <= budget.memory_bytes
    if budget.dataset_tokens is not None:
        plan["cache_bytes"] = cache_bytes(budget.dataset_tokens, budget.top_k)
        plan["full_logits_cache_bytes"] = budget.dataset_tokens * teacher.vocab_size * 2
        plan["teacher_passes_saved_by_cache"] = max(budget.epochs - 1, 0)
    plan["advice"] = _placement_advice(plan, budget)
    return plan


def _placement_advice(plan: Mapping[str, Any], budget: Budget) -> str:
    if "live_fits" not in plan:
        return "give --memory (accelerator memory per process) to check what fits"
    if plan["live_fits"]:
        if budget.epochs > 1 and "cache_bytes" in plan:
            return (
                f"a live teacher fits; a top-{budget.top_k} cache would save {budget.epochs - 1} teacher pass(es) "
                "over the data at the price of its disk space (and of a fixed, offline teacher signal)"
            )
        return "a live teacher fits next to the student: no cache needed for one epoch"
    if plan["cache_fits"]:
        return (
            f"a live teacher does not fit next to the student; cache the teacher's top-{budget.top_k} outputs first "
            "(`distil cache`), then train the student from the cache"
        )
    return (
        "the student alone does not fit: lower the batch size (raise grad_accum) or the sequence length, "
        "turn on activation checkpointing, shard optimizer state across GPUs (FSDP/DeepSpeed through "
        "accelerate), or pick a smaller student"
    )


# ---------------------------------------------------------------------------------------------
# Teacher loading and the whole advice


_SPEC_TO_INLINE = {
    "num_layers": "layers",
    "hidden_size": "hidden",
    "num_heads": "heads",
    "num_kv_heads": "kv_heads",
    "intermediate_size": "ffn",
    "vocab_size": "vocab",
    "max_context": "context",
    "tie_word_embeddings": "tie",
}


def teacher_spec_from_config(data: Mapping[str, Any], source: str = "config") -> str:
    """The teacher a recipe config names, as a spec :func:`load_teacher_shape` reads.

    A Hugging Face folder (``teacher.model.hf``), the folder a pip package ships
    (``teacher.model.package``), or a shape built in code (``teacher.model.spec``, given back as
    an inline shape).

    Raises:
        DistilError: If the config names no transformer teacher, or its folder does not exist.
    """
    from distil.models.lm import missing_folder_error

    teacher = data.get("teacher")
    if not isinstance(teacher, Mapping):
        raise DistilError(f"{source}: has no teacher section; give the teacher folder instead")
    model = teacher.get("model") if isinstance(teacher.get("model"), Mapping) else teacher
    assert isinstance(model, Mapping)
    folder = model.get("hf")
    if model.get("package") and not folder:
        from distil.models.encoder import package_model_folder

        folder = str(package_model_folder(str(model["package"])))
    if folder:
        if not Path(str(folder)).is_dir():
            raise missing_folder_error(str(folder), "teacher folder")
        return str(folder)
    spec = model.get("spec")
    if isinstance(spec, Mapping):
        return ",".join(
            f"{_SPEC_TO_INLINE[k]}={v}"
            for k, v in spec.items()
            if k in _SPEC_TO_INLINE and v is not None
        )
    raise DistilError(
        f"{source}: advise reads transformer teachers (teacher.model {{hf: FOLDER}}, "
        "{package: NAME} or {spec: ...}) and zoo classifiers; this teacher is neither: give its "
        "folder or an inline shape (layers=12,hidden=768,heads=12,...)"
    )


def load_teacher_shape(spec: str) -> tuple[TransformerShape, int | None, str]:
    """Read a teacher from a Hugging Face folder, an inline shape (optionally prefixed
    ``shape:``), or a YAML config naming one. Returns the shape, the exact parameter count when
    weights are present, and a description of where it came from.

    Raises:
        DistilError: If the spec is none of those.
    """
    path = Path(spec)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise DistilError(f"{path} has no config.json; is it a Hugging Face model folder?")
        return (
            shape_from_hf_config(json.loads(config_path.read_text())),
            params_on_disk(path),
            f"folder {path}",
        )
    if path.suffix in (".yaml", ".yml") and path.is_file():
        from distil.config.loading import load_yaml

        found = teacher_spec_from_config(load_yaml(path), str(path))
        shape, n, _ = load_teacher_shape(found)
        return shape, n, f"{path} → {found}"
    inline = spec.removeprefix("shape:").strip()
    if "=" in inline:
        return shape_from_inline(inline), None, "inline shape"
    raise DistilError(
        f"{spec!r} is neither a model folder, a YAML config nor an inline shape like layers=12,hidden=768,heads=12"
    )


def advise(
    teacher_spec: str,
    *,
    speedup: float | None = None,
    size_ratio: float | None = None,
    max_params: float | None = None,
    budget: Budget | None = None,
    measure: bool = False,
) -> dict[str, Any]:
    """The whole advice for a transformer teacher, as a JSON-ready dict.

    Args:
        teacher_spec: A Hugging Face folder, a YAML config naming one, or an inline shape.
        speedup: Wanted batch-1 speed-up over the teacher.
        size_ratio: Wanted student/teacher parameter fraction.
        max_params: Wanted largest student.
        budget: Training set-up and memory budget.
        measure: Also build teacher and candidates with random weights and time them on CPU.
    """
    budget = budget or Budget()
    shape, exact, source = load_teacher_shape(teacher_spec)
    n_t = exact or shape.params()
    candidates = propose(
        shape,
        speedup=speedup,
        size_ratio=size_ratio,
        max_params=max_params,
        budget=budget,
        teacher_params=exact,
    )
    advice: dict[str, Any] = {
        "kind": "transformer",
        "teacher": {
            "source": source,
            "shape": shape.describe(),
            "params": n_t,
            "params_formula": shape.params(),
            "params_exact": exact is not None,
            **asdict(shape),
        },
        "target": {"speedup": speedup, "size_ratio": size_ratio, "max_params": max_params},
        "budget": asdict(budget),
        "capacity_gap": {
            "ratio": CAPACITY_GAP_RATIO,
            "best_student_params": n_t / CAPACITY_GAP_RATIO,
            "note": (
                "law of capacity gap (METHODS.md N.1): the best teacher for a student of N_S parameters has about "
                f"{CAPACITY_GAP_RATIO}·N_S; for a much smaller student, distil through an intermediate "
                "teacher of that size, or pick a smaller teacher (pick_teacher)"
            ),
        },
        "candidates": [
            {
                **c.as_row(),
                "why": c.why,
                "teacher_for_this_student": CAPACITY_GAP_RATIO * c.params,
                "memory": memory_plan(shape, c.shape, budget, exact),
                **{f"student_{k}": v for k, v in asdict(c.shape).items()},
            }
            for c in candidates
        ],
    }
    if measure:
        times = measure_candidates(shape, [c.shape for c in candidates])
        advice["teacher"]["measured_ms_128_tokens"] = times[0]
        for cand, ms in zip(advice["candidates"], times[1:], strict=True):
            cand["measured ms (128 tokens)"] = ms
            cand["measured speed-up"] = times[0] / ms
    return advice


def advise_classifier(
    cfg: Any, source: str, *, speedup: float | None = None, size_ratio: float | None = None
) -> dict[str, Any]:
    """Advice for a ``classifier_kd`` config's zoo teacher: width and depth cuts of its zoo
    model (and MLPs), each built and measured on CPU (parameters, batch-1 latency, peak memory).

    Args:
        cfg: A validated ``classifier_kd`` ``Config``.
        source: Where the config came from, for the reader.
        speedup: Wanted batch-1 speed-up over the teacher (measured).
        size_ratio: Wanted student/teacher parameter fraction.
    """
    import torch

    from distil.config.sources import ZooModel
    from distil.data.classification import load_data
    from distil.evaluation.cost import cpu_latency_ms, cpu_threads, peak_forward_memory_bytes
    from distil.models.classifier import build_classifier, count_parameters, logits_of

    data = load_data(cfg.data)
    spec = cfg.teacher.model
    if not isinstance(spec, ZooModel):
        raise DistilError(
            "advise builds classifier candidates for zoo teachers only; give an hf folder for a transformer"
        )

    def measure(zoo: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        torch.manual_seed(0)
        built = build_classifier(ZooModel(zoo=zoo, kwargs=kwargs), data)
        module = built.module.eval()
        inputs = built.encoder(data.test)
        one = {k: v[:1] for k, v in inputs.items()}
        with cpu_threads(1):
            latency = cpu_latency_ms(lambda: logits_of(module, one), repeats=20, min_seconds=0.1)
        return {
            "candidate": f"{zoo} {json.dumps(kwargs)}",
            "zoo": zoo,
            "kwargs": kwargs,
            "params": count_parameters(module),
            "latency_b1_ms": latency,
            "peak_memory_b1_bytes": peak_forward_memory_bytes(
                lambda: logits_of(module, one), module
            ),
        }

    kwargs = dict(spec.kwargs)
    teacher = measure(spec.zoo, kwargs)
    options: list[tuple[str, dict[str, Any]]] = []
    key = {"cnn": "channels", "resnet": "widths", "mlp": "hidden"}.get(spec.zoo)
    if key is not None:
        base = list(
            kwargs.get(key) or {"cnn": [32, 64], "resnet": [16, 32, 64], "mlp": [128]}[spec.zoo]
        )
        for factor in (0.5, 0.25, 0.125):
            options.append((spec.zoo, {**kwargs, key: [max(4, int(w * factor)) for w in base]}))
        if len(base) > 1:
            options.append((spec.zoo, {**kwargs, key: base[:-1]}))
            options.append((spec.zoo, {**kwargs, key: [max(4, int(w * 0.5)) for w in base[:-1]]}))
    options += [("mlp", {"hidden": [h]}) for h in (128, 64, 32)]
    rows = []
    for zoo, kw in options:
        row = measure(zoo, kw)
        row["size_ratio"] = teacher["params"] / row["params"]
        row["speedup_b1"] = teacher["latency_b1_ms"] / row["latency_b1_ms"]
        row["meets_target"] = (speedup is None or row["speedup_b1"] >= speedup) and (
            size_ratio is None or row["params"] <= size_ratio * teacher["params"]
        )
        rows.append(row)
    rows.sort(key=lambda r: (not r["meets_target"], -r["params"]))
    n = len(data.train)
    return {
        "kind": "classifier",
        "teacher": {"source": f"{source} (teacher.model.zoo={spec.zoo})", **teacher},
        "target": {"speedup": speedup, "size_ratio": size_ratio},
        "capacity_gap": {
            "ratio": CAPACITY_GAP_RATIO,
            "best_student_params": teacher["params"] / CAPACITY_GAP_RATIO,
        },
        "candidates": rows,
        "cache": {
            "examples": n,
            "bytes": n * data.num_classes * 4,
            "note": f"caching the teacher's logits for {n} examples takes {n * data.num_classes * 4:,} bytes; "
            "a cache pays off with augmentation-free data and several epochs",
        },
    }


def measure_candidates(
    teacher: TransformerShape, shapes: Sequence[TransformerShape], *, tokens: int = 128
) -> list[float]:
    """CPU milliseconds of one forward pass over ``tokens`` tokens at batch 1, teacher first then
    each shape, built as randomly initialised Llama-style models (weights do not change speed).

    Raises:
        DistilError: If the teacher is too large to build on a CPU (over 2e9 parameters).
    """
    import torch

    from distil.evaluation.cost import cpu_latency_ms, cpu_threads
    from distil.models.lm import CausalLMSpec, build_causal_lm

    if teacher.params() > 2e9:
        raise DistilError(
            f"--measure builds the teacher on CPU; {teacher.params():,} parameters is too many (2e9 at most)"
        )
    out = []
    for shape in [teacher, *shapes]:
        spec = CausalLMSpec(
            num_layers=shape.num_layers,
            hidden_size=shape.num_heads * shape.head_dim,
            num_heads=shape.num_heads,
            intermediate_size=shape.intermediate_size,
            vocab_size=shape.vocab_size,
            max_context=max(tokens, 16),
            num_kv_heads=shape.num_kv_heads,
            tie_word_embeddings=shape.tie_word_embeddings,
        )
        model = build_causal_lm(spec, seed=0).eval()
        ids = torch.randint(0, shape.vocab_size, (1, tokens))

        def forward(m: Any = model, x: torch.Tensor = ids) -> object:
            return m(input_ids=x)

        with torch.inference_mode(), cpu_threads(1):
            out.append(cpu_latency_ms(forward, repeats=5, warmup=2, min_seconds=0.2))
        del model
    return out


def print_advice(advice: Mapping[str, Any], console: Any) -> None:
    """Render an advice dict with rich (tables of the teacher, the candidates and what fits)."""
    from rich.table import Table

    from distil.evaluation.report import fmt, fmt_bytes, wide

    console = wide(console, 160)
    teacher = advice["teacher"]
    console.print(
        f"[bold]teacher[/bold] {teacher['source']}: {teacher.get('shape', teacher.get('candidate', ''))}, "
        f"{teacher['params']:,} parameters"
        + ("" if teacher.get("params_exact", True) else " (from the shape; no weights found)")
    )
    gap = advice["capacity_gap"]
    console.print(
        f"[bold]capacity gap[/bold] the student this teacher teaches best has about "
        f"{fmt(gap['best_student_params'])} parameters (N_T / {gap['ratio']})"
    )
    target = {k: v for k, v in advice["target"].items() if v is not None}
    table = Table(
        title="proposed students"
        + (f" for {', '.join(f'{k}={fmt(v)}' for k, v in target.items())}" if target else "")
    )
    if advice["kind"] == "transformer":
        cols = {
            "candidate": "candidate",
            "shape": "shape",
            "init": "init",
            "params": "params",
            "teacher/student": "T/S params",
            "speed-up b1 (est.)": "b1 speed-up*",
            "speed-up throughput (est.)": "throughput speed-up*",
            "train memory (est.)": "train memory*",
            "meets target": "meets target",
        }
        if any("measured speed-up" in c for c in advice["candidates"]):
            cols["measured speed-up"] = "measured speed-up (CPU)"
    else:
        cols = {
            "candidate": "candidate",
            "params": "params",
            "size_ratio": "T/S params",
            "latency_b1_ms": "CPU ms @ b1",
            "speedup_b1": "speed-up @ b1",
            "peak_memory_b1_bytes": "peak memory @ b1",
            "meets_target": "meets target",
        }
    for i, (key, label) in enumerate(cols.items()):
        table.add_column(
            label, justify="left" if i < 3 and key != "params" else "right", overflow="fold"
        )
    for cand in advice["candidates"]:
        table.add_row(*((fmt_bytes if "memory" in c else fmt)(cand.get(c)) for c in cols))
    console.print(table)
    if advice["kind"] != "transformer":
        console.print(f"  {escape(str(advice['cache']['note']))}")
        console.print(f"  [dim]{escape(str(gap.get('note', '')))}[/dim]")
        return
    console.print(
        "  [dim]* estimates: b1 = weights read per decoded token, throughput = forward FLOPs at "
        f"{advice['budget']['seq_len']} tokens, memory = AdamW fp32 state + activations + logits; "
        "check speed with --measure[/dim]"
    )
    for cand in advice["candidates"]:
        console.print(
            f"  [bold]{escape(str(cand['candidate']))}[/bold]: {escape(str(cand['why']))}"
        )
    budget = advice["budget"]
    title = f"teacher placement (batch {budget['batch_size']} × {budget['seq_len']} tokens"
    title += f", memory {fmt_bytes(budget['memory_bytes'])}" if budget["memory_bytes"] else ""
    title += (
        f", {fmt(budget['dataset_tokens'])} tokens × {budget['epochs']} epoch(s)"
        if budget["dataset_tokens"]
        else ""
    )
    mem = Table(title=title + ")")
    for c in (
        "candidate",
        "student training",
        "live teacher",
        "live total",
        "live fits",
        f"top-{budget['top_k']} cache (disk)",
        "cache fits",
    ):
        mem.add_column(c, justify="left" if c == "candidate" else "right")
    for cand in advice["candidates"]:
        m = cand["memory"]
        mem.add_row(
            cand["candidate"],
            fmt_bytes(m["student_train_bytes"]),
            fmt_bytes(m["live_teacher_bytes"]),
            fmt_bytes(m["live_total_bytes"]),
            fmt(m.get("live_fits")),
            fmt_bytes(m.get("cache_bytes")),
            fmt(m.get("cache_fits")),
        )
    console.print(mem)
    for text in dict.fromkeys(
        f"{c['candidate']}: {c['memory']['advice']}"
        if len({x["memory"]["advice"] for x in advice["candidates"]}) > 1
        else c["memory"]["advice"]
        for c in advice["candidates"]
    ):
        console.print(f"  [bold]placement[/bold] {escape(text)}")
    console.print(f"  [dim]{escape(str(gap.get('note', '')))}[/dim]")
