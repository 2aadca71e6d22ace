"""``lm_kd`` across tokenizers: the student reads text with its own tokenizer.

``lm_kd`` hands over here when ``student.tokenizer`` differs from the teacher's. Every example is
tokenized by both tokenizers and aligned once (``distil.data.lm_pairs``); on-policy samples are
decoded and re-tokenized for the teacher as they are drawn. The loss is

    ``(1 - kd_weight)·CE(student's next token) + kd_weight·T²·D_cross(teacher ‖ student)``

with ``D_cross`` one of ``distil.losses.cross_tokenizer`` over aligned groups (the CE is
normalised over the student's tokens, the soft term over the groups). The same student is then
trained without the teacher, and the report compares teacher, KD student and baseline in held-out
bits per byte, the only unit the three share (``docs/cross-tokenizer.md``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from distil.alignment.groups import AlignmentKind, align_spans, batch_groups
from distil.alignment.offsets import ByteSpanEncoder, Special, TokenSpans
from distil.alignment.vocab import (
    SharedVocabulary,
    first_token_map,
    min_edit_distance_map,
    shared_vocabulary,
)
from distil.cache.manifest import teacher_fingerprint
from distil.cache.writer import cache_complete, id_dtype
from distil.config.lm import STUDENT_SEED, TEACHER_SEED
from distil.config.sources import CacheWrite
from distil.data.lm import IGNORE_INDEX, collate_lm_batch, shift_for_next_token
from distil.data.lm_pairs import PairedLMData, load_paired_lm_data
from distil.errors import DistilError
from distil.evaluation.bits_per_byte import bits_per_byte
from distil.evaluation.cost import weight_bytes
from distil.evaluation.lm import generation_speed
from distil.evaluation.report import cost_part, print_report, quality_part, write_report
from distil.generation import eos_token_ids
from distil.losses.cross_tokenizer import CrossTokenizerLoss, group_log_probs
from distil.losses.objective import ObjectiveOutput, cross_tokenizer_objective, token_objective
from distil.models.lm import (
    LMForward,
    check_model_fits,
    count_parameters,
    load_causal_lm,
    load_lm,
    make_student,
    save_model_folder,
    torch_dtype,
)
from distil.models.vocab import output_vocab_rows, tokenizer_fingerprint
from distil.teachers import LiveLMTeacher, Teacher, TeacherSignal
from distil.teachers.cross import (
    CrossTokenizerCache,
    group_targets,
    paired_dataset_fingerprint,
    write_cross_cache,
)
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.on_policy import (
    SamplingSettings,
    completion_batch,
    is_on_policy_step,
    prompt_of,
    sample_completions,
)
from distil.training.session import Session

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from distil.recipes.lm_kd import Config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrossStep:
    """What one micro-batch needs: the student's forward, the teacher (live or a cache), the
    vocabularies and the loss settings (``loss_params`` go to the cross-tokenizer loss)."""

    model: nn.Module  # LMForward to logits (DDP-wrapped when several processes)
    student_vocab: int
    device: torch.device
    alignment: AlignmentKind
    teacher: Teacher | None = None
    kd_weight: float = 0.0
    kd_temperature: float = 1.0
    loss: CrossTokenizerLoss = CrossTokenizerLoss.HYBRID
    loss_params: dict[str, Any] | None = None


def cross_loss_step(
    ctx: CrossStep,
    cols: dict[str, Tensor],
    window_items: float,
    window_groups: float,
    *,
    sampled: bool,
) -> ObjectiveOutput:
    """One micro-batch: ``(1 - w)·CE + w·T²·D_cross`` over the batch's aligned groups (CE alone
    without a teacher; on the student's own samples the soft term alone, at full weight)."""
    ids, att = cols["input_ids"].to(ctx.device), cols["attention_mask"].to(ctx.device)
    targets = shift_for_next_token(cols["labels"]).to(ctx.device)  # (b, T_s): the one shift
    logits = ctx.model(ids, att)[..., : ctx.student_vocab]  # (b, T_s, V_s)
    if ctx.teacher is None:
        return token_objective(
            logits, None, targets, kd_weight=0.0, kd_temperature=1.0, num_items=window_items
        )
    t_targets = shift_for_next_token(cols["teacher_labels"]).to(ctx.device)  # (b, T_t)
    groups = batch_groups(ctx.alignment, cols["groups"], targets, t_targets)
    t_out = ctx.teacher(
        {
            "input_ids": cols["teacher_input_ids"],
            "attention_mask": cols["teacher_attention_mask"],
            "example_id": cols["example_id"],
            "targets": t_targets,
            "aligned_groups": groups,
        }
    )
    return cross_tokenizer_objective(
        logits,
        t_out.logits,
        groups,
        kd_weight=1.0 if sampled else ctx.kd_weight,
        kd_temperature=ctx.kd_temperature,
        loss=ctx.loss,
        num_items=window_items,
        num_groups=window_groups,
        teacher_group_log_probs=t_out.group_log_probs,
        **(ctx.loss_params or {}),
    )


@dataclass(frozen=True)
class Sampler:
    """What on-policy steps need: sampling settings, both tokenizers' span encoders, the ids
    that end a completion and the student's vocabulary."""

    settings: SamplingSettings
    student: ByteSpanEncoder
    teacher: ByteSpanEncoder
    eos_ids: list[int]
    vocab: int


def paired_samples(
    cols: dict[str, Tensor], lm: PreTrainedModel, sampler: Sampler, data: PairedLMData
) -> dict[str, Tensor]:
    """Replace a micro-batch by the student's completions of its prompts, read by both
    tokenizers: the student's sampled ids as they are, and for the teacher the decoded text
    re-tokenized, prompt and completion as separate segments; groups cover the completion."""
    lengths = cols["attention_mask"].sum(-1).tolist()
    prompts = [
        prompt_of(ids[:n].tolist(), lab[:n].tolist(), sampler.settings.prompt_tokens)
        for ids, lab, n in zip(cols["input_ids"], cols["labels"], lengths, strict=True)
    ]
    completions = sample_completions(
        lm,
        prompts,
        sampler.settings,
        pad_token_id=data.pad_token_id,
        eos_token_ids=sampler.eos_ids,
        vocab_size=sampler.vocab,
    )
    student = completion_batch(
        prompts,
        completions,
        pad_token_id=data.pad_token_id,
        example_ids=cols["example_id"].tolist(),
    )
    rows, groups = [], []
    s_eos = sampler.student.special_id(Special.EOS)
    for e, prompt, completion in zip(
        cols["example_id"].tolist(), prompts, completions, strict=True
    ):
        # a sampled EOS (any of the ids that end a completion) is the one EOS unit
        completion = [s_eos if t in sampler.eos_ids else t for t in completion]
        p_segments, p_spans = sampler.student.segments_of_ids(prompt)
        origin = int(p_spans.ends[-1]) if len(p_spans) else 0
        c_segments, c_spans = sampler.student.segments_of_ids(completion, origin=origin)
        s_spans = TokenSpans.concatenate([p_spans, c_spans])
        t_prompt = sampler.teacher.encode_segments(_for(p_segments, sampler.teacher))
        t_completion = sampler.teacher.encode_segments(
            _for(c_segments, sampler.teacher), origin=origin
        )
        t_spans = TokenSpans.concatenate([t_prompt, t_completion])
        s_sup = np.arange(len(s_spans)) >= len(prompt)
        t_sup = np.arange(len(t_spans)) >= len(t_prompt)
        alignment = align_spans(
            s_spans, t_spans, student_supervised=s_sup, teacher_supervised=t_sup
        )
        labels = np.where(t_sup, t_spans.ids, IGNORE_INDEX)
        rows.append({"example_id": e, "input_ids": t_spans.ids.tolist(), "labels": labels.tolist()})
        groups.append(torch.from_numpy(alignment.groups.astype(np.int64)))
    teacher = collate_lm_batch(rows, pad_token_id=data.teacher_pad_token_id)
    width = max(1, max(g.shape[0] for g in groups))
    padded = torch.full((len(groups), width, 4), -1, dtype=torch.int64)
    for r, g in enumerate(groups):
        padded[r, : g.shape[0]] = g
    return {
        **student,
        "teacher_input_ids": teacher["input_ids"],
        "teacher_attention_mask": teacher["attention_mask"],
        "teacher_labels": teacher["labels"],
        "groups": padded,
    }


def _for(segments: list[str | Special], encoder: ByteSpanEncoder) -> list[str | Special]:
    """The segments another tokenizer can read: a BOS only where it has one (zero units)."""
    bos = getattr(encoder.tokenizer, "bos_token_id", None)
    return [x for x in segments if x is not Special.BOS or bos is not None]


def _window_counts(
    acc: Any, micro_cols: list[dict[str, Tensor]], kind: AlignmentKind
) -> tuple[float, float]:
    """Supervised student targets and aligned groups of a sampled window, per rank."""
    targets = groups = 0
    for c in micro_cols:
        s = shift_for_next_token(c["labels"]) != IGNORE_INDEX
        targets += int(s.sum())
        if kind is AlignmentKind.POSITIONAL:
            t = shift_for_next_token(c["teacher_labels"]) != IGNORE_INDEX
            groups += int(torch.minimum(s.sum(1), t.sum(1)).sum())
        else:
            groups += int((c["groups"][..., 0] >= 0).sum())
    if acc.num_processes == 1:
        return float(targets), float(groups)
    both = acc.reduce(
        torch.tensor([float(targets), float(groups)], device=acc.device), reduction="sum"
    )
    return float(both[0]) / acc.num_processes, float(both[1]) / acc.num_processes


def groups_per_example(data: PairedLMData, kind: AlignmentKind) -> np.ndarray:
    """The loss positions of every training example under ``kind``."""
    if kind is AlignmentKind.BYTE_SPAN:
        return data.groups_per_example
    return np.minimum(data.targets_per_example, data.teacher_targets_per_example)


def train_cross_phase(
    phase_name: str,
    s: Session,
    model: PreTrainedModel,
    data: PairedLMData,
    cfg: Config,
    *,
    log: MetricsLog,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher: Teacher | None = None,
    loss_params: dict[str, Any] | None = None,
    sampler: Sampler | None = None,
) -> PreTrainedModel:
    """Train ``model`` on the student's side of ``data`` (CE, or CE + the cross-tokenizer term
    with a teacher); with ``sampler``, a share λ of the steps trains on its own samples."""
    if (final := finished(s, phase_name)) is not None:  # finished before a crash: reuse it
        logger.info("%s: reusing finished weights from %s", phase_name, final)
        return load_causal_lm(final, dtype=torch.float32)
    acc, kd, xt = s.accelerator, cfg.kd, cfg.kd.cross_tokenizer
    phase = open_phase(
        s,
        phase_name,
        model=model,
        forward=LMForward(model, hidden=False),
        train=cfg.train,
        num_examples=len(data.train),
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        log=log,
        unit="token",
    )
    ctx = CrossStep(
        phase.model,
        len(student_tokenizer),
        acc.device,
        xt.alignment,
        teacher,
        kd.kd_weight,
        kd.kd_temperature,
        xt.loss,
        loss_params,
    )
    positions = groups_per_example(data, xt.alignment)
    for step in phase.steps():
        started = time.perf_counter()
        sampled = sampler is not None and is_on_policy_step(
            cfg.on_policy.fraction, seed=cfg.seed, step=step.index
        )
        micro_cols = [data.collate(data.train, ids.tolist()) for ids in step.micro_batches]
        if sampled:
            assert sampler is not None
            micro_cols = [paired_samples(c, model, sampler, data) for c in micro_cols]
            window_items, window_groups = _window_counts(acc, micro_cols, xt.alignment)
        else:  # every rank has the data: the window's counts without communication
            rows = step.batch.numpy()
            window_items = float(data.targets_per_example[rows].sum()) / acc.num_processes
            window_groups = float(positions[rows].sum()) / acc.num_processes
        gen_s = time.perf_counter() - started if sampled else 0.0
        tokens = 0
        for m, cols in enumerate(micro_cols):
            with phase.accumulate(m):
                out = cross_loss_step(ctx, cols, window_items, window_groups, sampled=sampled)
            phase.backward(out, micro=m)
            tokens += int(cols["attention_mask"].sum())
        extra: dict[str, float] = {"groups": window_groups * acc.num_processes}
        if sampler is not None:
            train_s = time.perf_counter() - started - gen_s
            extra |= {"on_policy": float(sampled), "gen_s": gen_s, "train_s": train_s}
        phase.optimizer_step(count=tokens * acc.num_processes, metrics=extra)
    trained: PreTrainedModel = phase.unwrapped().lm  # type: ignore[assignment]

    def export(folder: Path) -> None:
        save_model_folder(trained, folder, tokenizer=student_tokenizer, overwrite=True)

    phase.finish(export=export)
    return trained


def loss_parameters(
    cfg: Config, teacher_tokenizer: Any, student_tokenizer: Any, s: Session
) -> dict[str, Any]:
    """The cross-tokenizer loss's own settings, with the vocabulary correspondence it needs
    (computed once per run: the MinED map of two 8k vocabularies takes about a minute)."""
    kd, xt = cfg.kd, cfg.kd.cross_tokenizer
    params: dict[str, Any] = {"merge": xt.merge.value}
    if xt.loss is CrossTokenizerLoss.HYBRID:
        shared: SharedVocabulary = shared_vocabulary(
            teacher_tokenizer, student_tokenizer, match=xt.vocab_match
        )
        params |= {
            "shared_vocabulary": shared.to(s.accelerator.device),
            "matched_divergence": kd.divergence.value,
            "matched_weight": xt.matched_weight,
            "unmatched_weight": xt.unmatched_weight,
            **kd.divergence_params,
        }
    elif xt.loss in (CrossTokenizerLoss.MIN_ED, CrossTokenizerLoss.FIRST_TOKEN):
        started = time.perf_counter()
        mapper = min_edit_distance_map if xt.loss is CrossTokenizerLoss.MIN_ED else first_token_map
        vocab_map = mapper(teacher_tokenizer, student_tokenizer)
        logger.info("%s vocabulary map in %.1f s", xt.loss.value, time.perf_counter() - started)
        params |= {
            "vocab_map": vocab_map.to(s.accelerator.device),
            "divergence": kd.divergence.value,
            **kd.divergence_params,
        }
    return params


def cross_cache(
    cfg: Config,
    s: Session,
    data: PairedLMData,
    live: LiveLMTeacher,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
) -> CrossTokenizerCache:
    """Open ``teacher.cache`` as a cross-tokenizer cache, writing it first when it is missing
    and ``write`` is ``auto``; refused unless made for this teacher, both tokenizers, this
    data and alignment, merge strategy and temperature."""
    settings = cfg.teacher.cache
    assert settings is not None
    xt, acc = cfg.kd.cross_tokenizer, s.accelerator
    temperature = settings.kd_temperature or cfg.kd.kd_temperature
    if temperature != cfg.kd.kd_temperature:
        raise DistilError(
            f"teacher.cache.kd_temperature={temperature} differs from kd.kd_temperature="
            f"{cfg.kd.kd_temperature}: a cross-tokenizer cache stores merged distributions at the "
            "training temperature; leave teacher.cache.kd_temperature null"
        )
    spec = {
        "teacher_fingerprint": teacher_fingerprint(live.model),
        "teacher_tokenizer": tokenizer_fingerprint(teacher_tokenizer),
        "student_tokenizer": tokenizer_fingerprint(student_tokenizer),
        "dataset_fingerprint": paired_dataset_fingerprint(data.train),
        "kd_temperature": temperature,
        "merge": xt.merge.value,
        "alignment": xt.alignment.value,
        "k": settings.k,
        "value_dtype": settings.value_dtype.value,
    }
    max_groups = cfg.data.max_length
    if settings.write is CacheWrite.AUTO and not cache_complete(settings.path):
        started = time.perf_counter()

        def compute(indices: list[int]) -> dict[str, Tensor]:
            cols = data.collate(data.train, indices)
            targets = shift_for_next_token(cols["labels"])
            t_targets = shift_for_next_token(cols["teacher_labels"])
            groups = batch_groups(xt.alignment, cols["groups"], targets, t_targets)
            logits = live(
                {
                    "input_ids": cols["teacher_input_ids"],
                    "attention_mask": cols["teacher_attention_mask"],
                }
            ).logits
            assert logits is not None
            merged = group_log_probs(
                logits.float().cpu(),
                t_targets,
                groups.example,
                groups.teacher_first,
                groups.teacher_last,
                merge=xt.merge,
                kd_temperature=temperature,
            )
            return group_targets(
                merged, groups, k=settings.k, max_groups=max_groups, batch_size=len(indices)
            )

        if acc.is_main_process:
            write_cross_cache(
                settings.path,
                example_ids=[int(e) for e in data.train["example_id"]],
                compute=compute,
                spec=spec,
                value_dtype=getattr(torch, settings.value_dtype.value),
                id_dtype=id_dtype(live.vocab_size),
                examples_per_shard=settings.examples_per_shard,
                batch_size=settings.batch_size,
            )
            s.write_json(
                s.run_dir / "teacher-cache.json",
                {"path": settings.path, "seconds": time.perf_counter() - started},
            )
        acc.wait_for_everyone()
    cached = CrossTokenizerCache(
        settings.path, expect=spec, vocab_size=live.vocab_size, output_device=acc.device
    )
    s.announce(f"lm_kd: the student learns from the {cached.describe()}")
    return cached


def run(cfg: Config, s: Session, teacher_tokenizer: Any, student_tokenizer: Any) -> dict[str, Any]:
    """The recipe across tokenizers; returns the report (``lm_kd.main`` calls it)."""
    acc, kd, xt, opc = s.accelerator, cfg.kd, cfg.kd.cross_tokenizer, cfg.on_policy
    teacher_model = load_lm(cfg.teacher.model, teacher_tokenizer, seed=TEACHER_SEED)
    student_init, student_source = make_student(
        cfg.student.model, teacher_model, student_tokenizer, seed=STUDENT_SEED
    )
    check_model_fits(teacher_model, teacher_tokenizer, cfg.data.max_length, "teacher")
    check_model_fits(student_init, student_tokenizer, cfg.data.max_length, "student")
    t_context = int(getattr(teacher_model.config, "max_position_embeddings", 0) or 0)
    data = load_paired_lm_data(
        cfg.data,
        student_tokenizer,
        teacher_tokenizer,
        s.run_dir,
        acc,
        byte_offsets=xt.byte_offsets,
        teacher_max_length=t_context or cfg.data.max_length,
    )
    t_device = torch.device(cfg.teacher.device) if cfg.teacher.device else acc.device
    live = LiveLMTeacher(
        teacher_model,
        vocab_size=len(teacher_tokenizer),
        device=t_device,
        dtype=torch_dtype(cfg.teacher.dtype, teacher_model.dtype),
        output_device=acc.device,
        signal=TeacherSignal.LOGITS,
    )
    probe = data.collate(data.train, [0])
    live.check_deterministic(
        {"input_ids": probe["teacher_input_ids"], "attention_mask": probe["teacher_attention_mask"]}
    )
    train_teacher: Teacher = live
    if cfg.teacher.cache is not None:
        train_teacher = cross_cache(cfg, s, data, live, teacher_tokenizer, student_tokenizer)
    params = loss_parameters(cfg, teacher_tokenizer, student_tokenizer, s)
    sampler = None
    if opc.fraction > 0:
        sampler = Sampler(
            SamplingSettings(
                opc.sampling_temperature, opc.top_p, opc.max_new_tokens, opc.prompt_tokens
            ),
            ByteSpanEncoder(student_tokenizer, xt.byte_offsets),
            ByteSpanEncoder(teacher_tokenizer, xt.byte_offsets),
            eos_token_ids(student_tokenizer, student_init),
            len(student_tokenizer),
        )
    stats = data.alignment
    shared = params.get("shared_vocabulary")
    s.announce(
        f"lm_kd across tokenizers: teacher {train_teacher.describe()} with its tokenizer "
        f"({len(teacher_tokenizer)} ids); student {student_source} "
        f"({count_parameters(student_init).total:,} params) with {cfg.student.tokenizer} "
        f"({len(student_tokenizer)} ids); loss = {1 - kd.kd_weight:g}·CE + {kd.kd_weight:g}·T²·"
        f"{xt.loss.value} at kd_temperature={kd.kd_temperature:g} over {xt.alignment.value} "
        f"groups (merge {xt.merge.value}, byte offsets from {xt.byte_offsets.value}"
        + (
            f", {kd.divergence.value}{kd.divergence_params or ''} on {len(shared)} shared entries "
            f"({xt.vocab_match.value} match)"
            if shared is not None
            else ""
        )
        + (
            f", {kd.divergence.value} after the {xt.loss.value} vocabulary map"
            if "vocab_map" in params
            else ""
        )
        + f"); alignment of the training data: {stats['coverage']:.1%} of the student's text "
        f"covered, {stats['one_to_one']:.1%} of {int(stats['groups']):,} groups one-to-one, the "
        f"largest {int(stats['max_group_tokens'])} tokens; data {cfg.data.format.value}, "
        f"{len(data.train)} train / {len(data.eval)} held-out examples; "
        + (f"on-policy λ={opc.fraction:g}; " if opc.fraction > 0 else "off-policy; ")
        + f"{acc.num_processes} process(es) on {acc.device}"
    )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    student = train_cross_phase(
        "student",
        s,
        copy.deepcopy(student_init),
        data,
        cfg,
        log=log,
        student_tokenizer=student_tokenizer,
        teacher=train_teacher if kd.kd_weight > 0 else None,
        loss_params=params,
        sampler=sampler,
    )
    baseline = None
    if cfg.eval.baseline:
        baseline = train_cross_phase(
            "baseline",
            s,
            copy.deepcopy(student_init),
            data,
            cfg,
            log=log,
            student_tokenizer=student_tokenizer,
        )
    if not acc.is_main_process:
        return {}
    report = build_cross_report(
        cfg, s, data, teacher_model, teacher_tokenizer, student, baseline, student_tokenizer
    )
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report


def build_cross_report(
    cfg: Config,
    s: Session,
    data: PairedLMData,
    teacher: PreTrainedModel,
    teacher_tokenizer: Any,
    student: PreTrainedModel,
    baseline: PreTrainedModel | None,
    student_tokenizer: Any,
) -> dict[str, Any]:
    """Teacher, KD student and baseline on the same held-out text, in bits per byte (and each
    model's cross-entropy per token of its own tokenizer), with size and generation speed."""
    device = s.accelerator.device
    texts = data.eval_texts()
    models: list[tuple[str, Any, Any]] = [
        ("teacher", teacher, teacher_tokenizer),
        ("student (KD)", student.to(device), student_tokenizer),
    ]
    if baseline is not None:
        models.append(("baseline (no teacher)", baseline.to(device), student_tokenizer))
    gen = cfg.eval.generation
    rows: list[dict[str, Any]] = []
    for role, model, tok in models:
        bpb = bits_per_byte(
            model,
            tok,
            texts,
            max_length=cfg.data.max_length,
            device=device,
            batch_size=cfg.eval.batch_size,
        )
        prompt = torch.tensor([tok.encode(texts[0], add_special_tokens=False)[: gen.prompt_tokens]])
        prompt = prompt.expand(gen.speed_batch, -1).to(device)
        context = int(getattr(model.config, "max_position_embeddings", 0) or cfg.data.max_length)
        new = max(1, min(gen.speed_new_tokens, context - prompt.shape[1]))
        speed = generation_speed(
            model,
            prompt,
            max_new_tokens=new,
            pad_token_id=int(tok.pad_token_id or tok.eos_token_id),
            vocab_size=len(tok),  # padded head rows past the tokenizer are never sampled
        )
        rows.append(
            {
                "model": role,
                **bpb.as_dict(),
                "params": count_parameters(model).total,
                "vocab": len(tok),
                "size_bytes": weight_bytes(model),
                "gen_tokens_per_s": speed,
                "gen_bytes_per_s": speed * bpb.bytes_per_token,
            }
        )
    for row in rows:
        row["size_ratio"] = rows[0]["params"] / row["params"]
    roles = {"teacher": rows[0]["model"], "student": rows[1]["model"]}
    highlights: dict[str, Any] = {
        "held-out": f"{int(rows[0]['bytes']):,} bytes of text",
        "alignment": f"{data.alignment['coverage']:.1%} of the student's training text in aligned "
        f"groups, {data.alignment['one_to_one']:.1%} of groups one-to-one",
    }
    if baseline is not None:
        roles["baseline"] = rows[2]["model"]
        kd_bpb, base_bpb = rows[1]["bits_per_byte"], rows[2]["bits_per_byte"]
        highlights["bits per byte KD vs baseline"] = (
            f"{kd_bpb:.4f} vs {base_bpb:.4f} ({100 * (kd_bpb / base_bpb - 1):+.2f}%)"
        )
    quality = quality_part(
        rows,
        [("bits_per_byte", "bits/byte"), ("ce_nats_per_token", "CE nats/token (own)")],
        roles=roles,
        primary="bits_per_byte",
        higher_is_better=False,
    )
    if quality["gap_closed"] is not None:
        highlights["bits-per-byte gap closed (student - baseline) / (teacher - baseline)"] = (
            quality["gap_closed"]
        )
    columns = [
        ("model", "model"),
        ("bits_per_byte", "held-out bits/byte"),
        ("ce_nats_per_token", "CE nats/tok (own)"),
        ("perplexity", "ppl (own tokens)"),
        ("bytes_per_token", "bytes/token"),
        ("vocab", "vocab"),
        ("params", "params"),
        ("size_ratio", "smaller by"),
        ("gen_bytes_per_s", "gen bytes/s"),
    ]
    return {
        "title": "lm_kd: distillation across tokenizers",
        "recipe": "lm_kd",
        "roles": roles,
        "table": {"columns": [{"key": k, "label": lbl} for k, lbl in columns], "rows": rows},
        "highlights": highlights,
        "quality": quality,
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_ratio", "teacher/model params"),
                ("size_bytes", "weights bytes"),
                ("gen_tokens_per_s", f"gen tok/s @ b{gen.speed_batch}"),
                ("gen_bytes_per_s", "gen bytes/s (tokens/s × bytes/token)"),
            ],
        ),
        "details": {
            "kd": cfg.kd.model_dump(mode="json"),
            "alignment": data.alignment,
            "seed": cfg.seed,
            "processes": s.accelerator.num_processes,
            "teacher_vocab": len(teacher_tokenizer),
            "student_vocab": len(student_tokenizer),
            "teacher_vocab_rows": output_vocab_rows(teacher),
        },
    }
