"""Recipe ``lm_kd``: token-level logit distillation of a Hugging Face causal LM into a smaller one.

The student minimises ``(1 - kd_weight) * CE(next token) + kd_weight * T² * D(teacher_T ‖ student_T)``
over supervised next-token positions, with ``D`` any divergence of ``distil.losses``; the mix lives
in ``distil.losses.objective``. For large vocabularies the loss runs from final hidden states in
chunks and never builds ``(B, T, V)`` logits. The same student is then trained without the teacher
(the baseline), and the report compares teacher, KD student and baseline on held-out data.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.cache.writer import cache_complete, write_cache
from distil.config.base import StrictModel
from distil.config.lm import (
    STUDENT_SEED,
    TEACHER_SEED,
    CacheTargets,
    EvalSection,
    KDSection,
    LMDataFormat,
    LMDataSection,
    OnPolicySection,
    OverlengthPolicy,
    StudentSection,
    TeacherSection,
    cache_job,
)
from distil.config.sections import RunSection, SchedulerName, Sharding, TrainSection
from distil.config.sources import (
    CacheWrite,
    EnsembleModel,
    FromTeacher,
    HFModel,
    ModelSource,
    describe_model,
)
from distil.data.lm import IGNORE_INDEX, LMData, load_lm_data, shift_for_next_token
from distil.errors import DistilError
from distil.evaluation import lm as lm_eval
from distil.evaluation.calibration import fidelity_part
from distil.evaluation.cost import weight_bytes
from distil.evaluation.hacking import Monitor, hacking_verdict
from distil.evaluation.lm import evaluate_models
from distil.evaluation.report import (
    cost_part,
    print_report,
    quality_part,
    read_metrics_rows,
    write_report,
)
from distil.generation import eos_token_ids
from distil.losses.chunked import loss_chunk_rows, should_use_chunked_loss
from distil.losses.objective import (
    ObjectiveOutput,
    token_objective,
    token_objective_from_hidden,
    token_objective_sparse,
)
from distil.models.lm import (
    LMForward,
    check_model_fits,
    count_parameters,
    decoder_layers,
    load_causal_lm,
    load_lm,
    make_student,
    rebuild_lm,
    save_model_folder,
    torch_dtype,
)
from distil.models.vocab import (
    TOKENIZER_FILES,
    check_same_tokenizer,
    check_vocab_alignment,
    load_tokenizer_folder,
    output_vocab_rows,
    tokenizer_fingerprint,
)
from distil.recipes import lm_kd_cross
from distil.teachers import LiveLMTeacher, Teacher, TeacherSignal, head_of, hidden_path_matches
from distil.teachers.cached import CachedTeacher, open_lm_cache
from distil.teachers.ensemble import EnsembleTeacher
from distil.training.loop import Phase, finished, open_phase
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

logger = logging.getLogger(__name__)


class Config(StrictModel):
    recipe: Literal["lm_kd"] = "lm_kd"
    seed: int = 0
    run: RunSection = RunSection()
    tokenizer: str | None = Field(
        default=None, description="tokenizer folder; the teacher's folder when null"
    )
    data: LMDataSection = LMDataSection()
    teacher: TeacherSection = TeacherSection()
    student: StudentSection = StudentSection()
    train: TrainSection = TrainSection(
        epochs=1, batch_size=8, lr=1e-3, scheduler=SchedulerName.linear, max_grad_norm=1.0
    )
    kd: KDSection = KDSection()
    on_policy: OnPolicySection = OnPolicySection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        """The checks that read the config only (the context-length one needs the models)."""
        if self.on_policy.fraction > 0 and self.kd.kd_weight == 0:
            raise ValueError(
                "on_policy.fraction > 0 needs a teacher to score the samples: set kd.kd_weight > 0 "
                "(or on_policy.fraction=0)"
            )
        if self.on_policy.fraction > 0 and self.teacher.cache is not None:
            raise ValueError(
                "on_policy.fraction > 0 needs a live teacher (a cache cannot score text the student "
                "writes during training): drop teacher.cache or set on_policy.fraction=0"
            )
        ensemble = isinstance(self.teacher.model, EnsembleModel)
        if ensemble and (self.teacher.cache is not None or self.kd.chunked):
            raise ValueError(
                "teacher.model.ensemble combines the members' full logits: set kd.chunked=false "
                "and drop teacher.cache"
            )
        if self.tokenizer is None and not isinstance(self.teacher.model, HFModel) and not ensemble:
            raise ValueError("tokenizer: a teacher built from a spec needs a tokenizer folder")
        if isinstance(self.student.model, FromTeacher) and ensemble:
            raise ValueError(
                "student.model.from_teacher: an ensemble has no one set of blocks to copy"
            )
        if self.train.sharding is Sharding.fsdp:
            blocked = {
                "kd.chunked=true": self.kd.chunked is True,  # reads the sharded output layer
                "on_policy.fraction > 0": self.on_policy.fraction > 0,  # ranks sample apart
                "eval.monitor.every > 0": self.eval.monitor.every > 0,  # measured on one rank
            }
            bad = [k for k, on in blocked.items() if on]
            if bad:
                raise ValueError(f"train.sharding=fsdp does not go with {', '.join(bad)}")
        if self.student.tokenizer is not None:
            self._cross_tokenizer_checks(ensemble)
        return self

    def _cross_tokenizer_checks(self, ensemble: bool) -> None:
        """What distillation across tokenizers (``student.tokenizer``) cannot do."""
        cache = self.teacher.cache
        refusals = [
            (
                self.kd.chunked is True,
                "kd.chunked: the cross-tokenizer losses compare full "
                "distributions: set kd.chunked=null or false",
            ),
            (ensemble, "teacher.model.ensemble: an ensemble is not supported across tokenizers"),
            (
                self.train.sharding is Sharding.fsdp,
                "train.sharding=fsdp: the student is trained with DDP across tokenizers",
            ),
            (
                self.data.format is LMDataFormat.CHAT,
                "data.format=chat: the two chat templates "
                "render different text around the turns; use text or prompt_completion data",
            ),
            (
                self.data.format is LMDataFormat.PROMPT_COMPLETION
                and self.data.overlength is OverlengthPolicy.TRUNCATE,
                "data.overlength=truncate: cutting both tokenizations at the same text is not "
                "supported; filter or shorten the examples",
            ),
            (
                self.eval.monitor.every > 0,
                "eval.monitor: the teacher-hacking monitor measures "
                "token-level KL, which needs one vocabulary; set eval.monitor.every=0",
            ),
            (
                cache is not None
                and (cache.targets is not CacheTargets.TOPK or cache.tail_samples > 0),
                "teacher.cache: a cross-tokenizer cache stores the top-k of each merged group "
                "distribution: use targets=topk and tail_samples=0",
            ),
        ]
        problems = [message for refused, message in refusals if refused]
        if problems:
            raise ValueError(
                "student.tokenizer (distillation across tokenizers): " + "; ".join(problems)
            )


@dataclass(frozen=True)
class LMStep:
    """What one micro-batch needs besides its collated columns: the student's forward, the
    teacher (live or cached) and the loss settings of the phase."""

    model: nn.Module  # LMForward (DDP-wrapped when several processes)
    lm: PreTrainedModel  # the student itself: its output layer feeds the chunked loss
    vocab_size: int
    hidden: bool  # the forward stops at the final hidden states
    chunked: bool
    chunk_rows: int
    device: torch.device
    teacher: Teacher | None = None
    kd: KDSection | None = None


def lm_loss_step(
    ctx: LMStep, cols: dict[str, Tensor], window_items: float, *, sampled: bool
) -> ObjectiveOutput:
    """One micro-batch of token-level KD: ``(1 - w)·CE + w·T²·D(teacher_T ‖ student_T)`` over
    the supervised next-token positions (CE alone without a teacher); on the student's own
    samples (``sampled``) the divergence alone, at full weight. What the teacher answers decides
    the path: full logits, hidden states for the chunked loss, or a cache's sparse targets."""
    ids, att = cols["input_ids"].to(ctx.device), cols["attention_mask"].to(ctx.device)
    targets = shift_for_next_token(cols["labels"]).to(ctx.device)  # (b, T): the one shift
    teacher, kd = ctx.teacher, ctx.kd
    t_out = None
    if teacher is not None:  # its own precision and device
        t_out = teacher({**cols, "input_ids": ids, "attention_mask": att, "targets": targets})
    out_s = ctx.model(ids, att)  # (b, T, H) or (b, T, V_model)
    mix: dict[str, Any] = {
        "kd_weight": 1.0 if sampled else (kd.kd_weight if kd and teacher else 0.0),
        "kd_temperature": kd.kd_temperature if kd and teacher else 1.0,
        "num_items": window_items,
    }
    if kd is not None:
        mix |= {"divergence": kd.divergence.value, **kd.divergence_params}
    if t_out is not None and t_out.sparse is not None:  # exact top-k + tail (or sampled) loss
        _check_cache_covers(t_out.sparse_mask, targets, cols)
        logits = out_s[..., : ctx.vocab_size]
        if ctx.hidden:
            weight, bias = head_of(ctx.lm)
            logits = out_s @ weight[: ctx.vocab_size].T
            logits = logits if bias is None else logits + bias[: ctx.vocab_size]
        return token_objective_sparse(logits, t_out.sparse, targets, **mix)
    t_logits = None if t_out is None else t_out.logits
    if ctx.hidden:
        weight, bias = head_of(ctx.lm)
        return token_objective_from_hidden(
            out_s,
            weight[: ctx.vocab_size],
            t_logits,
            targets,
            student_bias=None if bias is None else bias[: ctx.vocab_size],
            teacher_hidden=None if t_out is None else t_out.hidden,
            teacher_weight=None if t_out is None else t_out.weight,
            teacher_bias=None if t_out is None else t_out.bias,
            chunked=ctx.chunked,
            chunk_size=ctx.chunk_rows,
            **mix,
        )
    return token_objective(
        out_s[..., : ctx.vocab_size], t_logits, targets, chunk_size=ctx.chunk_rows, **mix
    )


def _check_cache_covers(mask: Tensor | None, targets: Tensor, cols: dict[str, Tensor]) -> None:
    """A cache must hold a target at every supervised position of the batch."""
    missing = (targets != IGNORE_INDEX) & ~(
        mask if mask is not None else torch.zeros_like(targets, dtype=torch.bool)
    )
    if bool(missing.any()):
        raise DistilError(
            f"the teacher cache has no target at {int(missing.sum())} supervised positions of examples "
            f"{cols['example_id'].tolist()}: it was written for other masks; rewrite it with this config"
        )


def train_phase(
    phase_name: str,
    s: Session,
    model: PreTrainedModel,
    data: LMData,
    tcfg: TrainSection,
    *,
    seed: int,
    shuffle: bool,
    log: MetricsLog,
    vocab_size: int,
    hidden: bool,
    tokenizer: PreTrainedTokenizerBase,
    teacher: Teacher | None = None,
    kd: KDSection | None = None,
    chunked: bool = False,
    chunk_rows: int = 256,
    on_policy: OnPolicySection | None = None,
    monitor: Monitor | None = None,
) -> PreTrainedModel:
    """Train ``model`` on ``data.train`` (CE, or CE + KD with a teacher); return the trained model.

    With ``on_policy`` (and a teacher), a share λ of the steps trains on completions the student
    samples for the batch's prompts, scored by the teacher; with ``monitor``, held-out KL to the
    teacher (and oracle) is logged every ``monitor.every`` steps."""
    if (final := finished(s, phase_name)) is not None:  # finished before a crash: reuse it
        logger.info("%s: reusing finished weights from %s", phase_name, final)
        return load_causal_lm(final, dtype=torch.float32)
    acc = s.accelerator
    skeleton = model.config  # an unsharded copy is rebuilt from it for the export
    phase = open_phase(
        s,
        phase_name,
        model=model,
        forward=LMForward(model, hidden=hidden),
        train=tcfg,
        num_examples=len(data.train),
        seed=seed,
        shuffle=shuffle,
        log=log,
        unit="token",
        blocks=list(decoder_layers(model)[1]),
    )
    ctx = LMStep(
        phase.model, model, vocab_size, hidden, chunked, chunk_rows, acc.device, teacher, kd
    )
    on_policy_steps, generation_s = 0, 0.0
    if monitor is not None and phase.step == 0 and acc.is_main_process:  # the starting point
        log.log(monitor.measure(model), step=0, phase=phase_name)
    for step in phase.steps():
        started = time.perf_counter()
        sampled = (
            on_policy is not None
            and teacher is not None
            and is_on_policy_step(on_policy.fraction, seed=seed, step=step.index)
        )
        micro_cols = [data.collate(data.train, ids.tolist()) for ids in step.micro_batches]
        # the supervised targets of the whole window (all micro-batches, all ranks) per rank,
        # because DDP averages gradients over ranks; every rank has the data: no communication
        window_items = float(data.targets_per_example[step.batch.numpy()].sum()) / acc.num_processes
        if sampled:  # the student writes the completions; lengths differ: count them again
            assert on_policy is not None
            micro_cols = [
                _student_samples(c, model, on_policy, data, tokenizer, vocab_size)
                for c in micro_cols
            ]
            window_items = _window_targets(acc, micro_cols)
            if acc.is_main_process and (
                step.index % tcfg.checkpoint_every == 0 or not on_policy_steps
            ):
                _keep_sample(phase.dir, step.index, micro_cols[0], tokenizer)
        gen_s = time.perf_counter() - started if sampled else 0.0
        on_policy_steps, generation_s = on_policy_steps + sampled, generation_s + gen_s
        tokens = 0
        for m, cols in enumerate(micro_cols):
            with phase.accumulate(m):
                out = lm_loss_step(ctx, cols, window_items, sampled=sampled)
            phase.backward(out, micro=m)
            tokens += int(cols["attention_mask"].sum())
        extra: dict[str, float] = {}
        if on_policy is not None and on_policy.fraction > 0:
            train_s = time.perf_counter() - started - gen_s
            extra = {"on_policy": float(sampled), "gen_s": gen_s, "train_s": train_s}
        if monitor is not None and monitor.due(step.index + 1) and acc.is_main_process:
            extra |= monitor.measure(model)
        phase.optimizer_step(count=tokens * acc.num_processes, metrics=extra)
    trained = _trained_model(phase, skeleton)

    def export(folder: Path) -> None:
        save_model_folder(trained, folder, tokenizer=tokenizer, overwrite=True)

    sampling = {"on_policy_steps": on_policy_steps, "generation_s": generation_s}
    phase.finish(export=export, summary=sampling if on_policy_steps else {})
    return trained


def _trained_model(phase: Phase, config: Any) -> PreTrainedModel:
    """The trained LM: the phase's own, or, when it was sharded, a plain model rebuilt from the
    gathered shards (every process gathers; the main process gets the model)."""
    if not phase.sharded:
        model: PreTrainedModel = phase.unwrapped().lm  # type: ignore[assignment]
        return model
    full = phase.full_state()
    if not phase.accelerator.is_main_process:
        return phase.unwrapped().lm  # type: ignore[return-value]
    return rebuild_lm(config, {k.removeprefix("lm."): v for k, v in full.items()})


def _window_targets(acc: Any, micro_cols: list[dict[str, Tensor]]) -> float:
    """Supervised targets of the window per rank when ranks sampled texts of different
    lengths: one all-reduce of the count."""
    local = sum(int((shift_for_next_token(c["labels"]) != IGNORE_INDEX).sum()) for c in micro_cols)
    if acc.num_processes == 1:
        return float(local)
    count = torch.tensor([float(local)], device=acc.device)
    return float(acc.reduce(count, reduction="sum").item()) / acc.num_processes


def _student_samples(
    cols: dict[str, Tensor],
    lm: PreTrainedModel,
    opc: OnPolicySection,
    data: LMData,
    tokenizer: Any,
    vocab: int,
) -> dict[str, Tensor]:
    """Replace a dataset micro-batch by the student's completions of its prompts."""
    lengths = cols["attention_mask"].sum(-1).tolist()
    prompts = [
        prompt_of(ids[:n].tolist(), lab[:n].tolist(), opc.prompt_tokens)
        for ids, lab, n in zip(cols["input_ids"], cols["labels"], lengths, strict=True)
    ]
    settings = SamplingSettings(
        opc.sampling_temperature, opc.top_p, opc.max_new_tokens, opc.prompt_tokens
    )
    completions = sample_completions(
        lm,
        prompts,
        settings,
        pad_token_id=data.pad_token_id,
        eos_token_ids=eos_token_ids(tokenizer, lm),
        vocab_size=vocab,
    )
    return completion_batch(
        prompts,
        completions,
        pad_token_id=data.pad_token_id,
        example_ids=cols["example_id"].tolist(),
    )


def _keep_sample(phase_dir: Path, step: int, cols: dict[str, Tensor], tokenizer: Any) -> None:
    """Append the first row of a sampled batch (prompt and the student's completion) to
    ``samples.jsonl`` in the phase folder, so what the student wrote can be read later."""
    labels, ids = cols["labels"][0], cols["input_ids"][0]
    supervised = (labels != IGNORE_INDEX).nonzero()
    start = int(supervised[0]) if len(supervised) else len(ids)
    end = int(cols["attention_mask"][0].sum())
    record = {
        "step": step,
        "prompt": tokenizer.decode(ids[:start].tolist(), skip_special_tokens=True),
        "completion": tokenizer.decode(ids[start:end].tolist(), skip_special_tokens=False),
    }
    phase_dir.mkdir(parents=True, exist_ok=True)
    with (phase_dir / "samples.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_teacher_cache(cfg: Config, session: Callable[[], Session]) -> tuple[Path, bool, str]:
    """``distil cache``: write (or complete) ``teacher.cache`` ahead of training. The writer
    splits shards over ``RANK``/``WORLD_SIZE`` itself; returns the folder, whether this process
    merged the manifest, and what it did."""
    if cfg.student.tokenizer is not None:
        raise DistilError(
            "a cross-tokenizer cache (student.tokenizer is set) is written by the run itself: "
            "run `distil run` with teacher.cache.write=auto"
        )
    result = write_cache(cache_job(cfg))
    merging = "" if result.merged else "; rank 0 merges the manifest"
    done = f"wrote {result.shards_written} shard(s), {result.shards_skipped} already complete"
    return result.path, result.merged, done + merging


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run the recipe in the session's run folder; return the report."""
    acc = s.accelerator
    tokenizer = load_run_tokenizer(cfg.tokenizer, cfg.teacher.model)
    if cfg.student.tokenizer is not None:
        student_tokenizer = load_student_tokenizer(cfg.student.tokenizer)
        if tokenizer_fingerprint(student_tokenizer) != tokenizer_fingerprint(tokenizer):
            return lm_kd_cross.run(cfg, s, tokenizer, student_tokenizer)
        s.announce(
            "lm_kd: student.tokenizer tokenizes like the teacher's: token-level distillation"
        )
    members = [load_lm(m, tokenizer, seed=TEACHER_SEED) for m in teacher_sources(cfg.teacher.model)]
    teacher_model = members[0]
    student_init, student_source = make_student(
        cfg.student.model, teacher_model, tokenizer, seed=STUDENT_SEED
    )
    for role, m in [("teacher", t) for t in members] + [("student", student_init)]:
        check_model_fits(m, tokenizer, cfg.data.max_length, role)
    _check_context(cfg, [*members, student_init])
    vocab = check_vocab_alignment(
        tokenizer,
        teacher_vocab_rows=min(output_vocab_rows(t) for t in members),
        student_vocab_rows=output_vocab_rows(student_init),
    ).tokenizer_vocab_size
    data = load_lm_data(cfg.data, tokenizer, s.run_dir, acc)
    probe = data.collate(data.train, [0])
    sharded = cfg.train.sharding is Sharding.fsdp  # logits from forward: the head is sharded
    hidden = not sharded and hidden_path_matches(
        student_init, probe["input_ids"], probe["attention_mask"]
    )
    chunked = cfg.kd.chunked
    if chunked is None and sharded:
        chunked = False
    if chunked is None:
        tokens_per_micro = cfg.train.batch_size // acc.num_processes // cfg.train.grad_accum
        chunked = len(members) == 1 and should_use_chunked_loss(
            tokens_per_micro * cfg.data.max_length, vocab
        )
    if chunked and not (
        hidden and hidden_path_matches(teacher_model, probe["input_ids"], probe["attention_mask"])
    ):
        raise DistilError(
            "kd.chunked needs plain linear output layers (logits = hidden @ W.T + b) on both models; "
            "set kd.chunked=false"
        )
    t_device = torch.device(cfg.teacher.device) if cfg.teacher.device else acc.device
    lives = [
        LiveLMTeacher(
            m,
            vocab_size=vocab,
            device=t_device,
            dtype=torch_dtype(cfg.teacher.dtype, m.dtype),
            output_device=acc.device,
            signal=TeacherSignal.HIDDEN if chunked else TeacherSignal.LOGITS,
        )
        for m in members
    ]
    for live in lives:
        live.check_deterministic(probe)
    teacher = lives[0]
    train_teacher: Teacher = teacher
    if isinstance(cfg.teacher.model, EnsembleModel):
        ens = cfg.teacher.model
        train_teacher = EnsembleTeacher(
            lives,
            [m.weight for m in ens.ensemble],
            rule=ens.combine,
            weighting=ens.weighting,
            kd_temperature=cfg.kd.kd_temperature,
            names=[describe_model(m.model) for m in ens.ensemble],
        )
    if cfg.teacher.cache is not None:  # train from its top-k, written here when missing
        train_teacher = lm_teacher_cache(cfg, s, tokenizer, data, teacher, chunked)
    monitor = _monitor(cfg, data, vocab, teacher, t_device, acc.device, tokenizer)
    kd, opc = cfg.kd, cfg.on_policy
    if opc.fraction > 0:
        s.announce(_on_policy_line(cfg))
    rows = f"{loss_chunk_rows(kd.chunk_size, vocab, fused=chunked, device=acc.device)} rows"
    precision = cfg.train.mixed_precision.value
    s.announce(
        f"lm_kd: teacher {train_teacher.describe()}; student {student_source} "
        f"({count_parameters(student_init).total:,} params, float32"
        f"{', autocast ' + precision if precision != 'no' else ''}); "
        f"loss = {_loss_line(kd, opc.fraction)} "
        f"({'chunked from hidden states' if chunked else 'full logits'}, loss in chunks of {rows}); "
        f"vocab policy: tokenizer {vocab} ids, logits sliced to it (teacher "
        f"{output_vocab_rows(teacher_model)} rows, student {output_vocab_rows(student_init)}); "
        f"data {cfg.data.format.value}{f' ({data.token_ids})' if data.token_ids else ''}, "
        f"{len(data.train)} train / {len(data.eval)} held-out examples; "
        f"{_regime(kd.kd_weight, opc.fraction)}; {acc.num_processes} process(es) on {acc.device}, "
        "each running the teacher on its own shard"
    )
    if cfg.eval.baseline and kd.kd_weight == 0:
        s.announce(
            "lm_kd: no baseline: with kd.kd_weight=0 the student's objective is the baseline's "
            "(CE on the same data), so a gain over it would be noise"
        )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    common: dict[str, Any] = {
        "seed": cfg.seed,
        "shuffle": cfg.data.shuffle,
        "log": log,
        "vocab_size": vocab,
        "hidden": hidden,
        "tokenizer": tokenizer,
        "chunk_rows": loss_chunk_rows(cfg.kd.chunk_size, vocab, fused=chunked, device=acc.device),
    }
    student = train_phase(
        "student",
        s,
        copy.deepcopy(student_init),
        data,
        cfg.train,
        teacher=train_teacher if kd.kd_weight > 0 else None,  # kd_weight 0: plain SFT, teacher idle
        kd=kd,
        chunked=chunked,
        on_policy=opc if opc.fraction > 0 else None,
        monitor=monitor,
        **common,
    )
    baseline = None
    if cfg.eval.baseline and kd.kd_weight > 0:
        baseline = train_phase(
            "baseline", s, copy.deepcopy(student_init), data, cfg.train, chunked=chunked, **common
        )
    if not acc.is_main_process:
        return {}
    report = build_report(cfg, s, data, tokenizer, teacher, student, baseline, vocab)
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report


def load_student_tokenizer(folder: str) -> PreTrainedTokenizerBase:
    """The student's own tokenizer; a folder that is not a text tokenizer is refused.

    Raises:
        DistilError: If the folder holds no tokenizer, or one that does not turn text into ids
            and back (e.g. an image processor: alignment across tokenizers is for text).
    """
    tokenizer = load_tokenizer_folder(folder)
    probe = "def f(x):\n    return x"
    try:
        ids = tokenizer.encode(probe, add_special_tokens=False)
        text = tokenizer.decode(ids)
    except Exception as error:  # a processor of another modality fails in its own way
        raise DistilError(
            f"student.tokenizer {folder} does not encode and decode text ({error}); distillation "
            "across tokenizers aligns text, not another modality"
        ) from error
    if not ids or not isinstance(text, str):
        raise DistilError(
            f"student.tokenizer {folder} turns text into no ids; it is not a text tokenizer"
        )
    if tokenizer.eos_token_id is None:
        raise DistilError(
            f"student.tokenizer {folder} has no EOS token; packed text and completions need one"
        )
    return tokenizer


def teacher_sources(source: ModelSource) -> list[ModelSource]:
    """The teacher's model source, or each ensemble member's."""
    if isinstance(source, EnsembleModel):
        return [m.model for m in source.ensemble]
    return [source]


def load_run_tokenizer(folder: str | None, teacher: ModelSource) -> PreTrainedTokenizerBase:
    """The run's tokenizer (``tokenizer``, else the teacher's folder), checked against every
    teacher folder that carries one: the data must be the teacher's ids."""
    folders = [m.hf for m in teacher_sources(teacher) if isinstance(m, HFModel)]
    tokenizer = load_tokenizer_folder(folder or folders[0])
    for other in folders:
        if (folder or len(folders) > 1) and any(
            (Path(other) / f).is_file() for f in TOKENIZER_FILES
        ):
            check_same_tokenizer(load_tokenizer_folder(other), tokenizer)
    return tokenizer


def lm_teacher_cache(
    cfg: Config, s: Session, tokenizer: Any, data: LMData, teacher: LiveLMTeacher, chunked: bool
) -> CachedTeacher:
    """Open ``teacher.cache`` for this run, writing (or completing) it first when it is missing
    and ``write`` is ``auto``; refused unless it was made for this teacher, data and settings."""
    settings = cfg.teacher.cache
    assert settings is not None
    acc = s.accelerator
    if settings.write is CacheWrite.AUTO and not cache_complete(settings.path):
        started = time.perf_counter()
        write_cache(cache_job(cfg), teacher_model=teacher.model, tokenizer=tokenizer)
        acc.wait_for_everyone()
        if acc.is_main_process:
            s.write_json(
                s.run_dir / "teacher-cache.json",
                {"path": settings.path, "seconds": time.perf_counter() - started},
            )
    cached = open_lm_cache(
        settings.path,
        tokenizer=tokenizer,
        dataset=data.train,
        sequence_length=cfg.data.max_length,
        kd_temperature=cfg.kd.kd_temperature,
        vocab_size=teacher.vocab_size,
        teacher_model=teacher.model,
        output_device=acc.device,
        signal=TeacherSignal.LOGITS if chunked else TeacherSignal.SPARSE,
        data_settings=cfg.data.model_dump(mode="json"),  # a mismatch names the setting
    )
    how = (
        "dense logits rebuilt from it (chunked path: tail mass spread evenly over the other ids)"
        if chunked
        else "the importance-sampled estimate of the divergence (unbiased)"
        if cached.reader.sampled
        else f"the exact top-{cached.k} head + sampled tail: an unbiased forward-KL estimate "
        "(no dense teacher logits)"
        if cached.reader.manifest.get("tail_samples")
        else f"the exact top-{cached.k} + tail divergence on k + 1 buckets (no dense teacher logits)"
    )
    s.announce(f"lm_kd: the student learns from the {cached.describe()}, through {how}")
    return cached


def _monitor(
    cfg: Config,
    data: LMData,
    vocab: int,
    teacher: LiveLMTeacher,
    t_device: torch.device,
    device: torch.device,
    tokenizer: Any,
) -> Monitor | None:
    """The teacher-hacking monitor (held-out KL to the teacher, and to an oracle), when asked."""
    mon = cfg.eval.monitor
    if not mon.every:
        return None
    oracle = None
    if mon.oracle is not None:
        oracle_model = load_causal_lm(Path(mon.oracle), dtype=teacher.model.dtype)
        check_same_tokenizer(load_tokenizer_folder(mon.oracle), tokenizer)
        oracle = LiveLMTeacher(
            oracle_model,
            vocab_size=vocab,
            device=t_device,
            dtype=teacher.model.dtype,
            output_device=device,
            signal=TeacherSignal.LOGITS,
        )
    batches = data.eval_batches(cfg.eval.batch_size)
    return Monitor(
        mon.every, batches[: max(1, mon.examples // cfg.eval.batch_size)], vocab, teacher, oracle
    )


def _on_policy_line(cfg: Config) -> str:
    opc, kd = cfg.on_policy, cfg.kd
    share = "every step" if opc.fraction >= 1 else f"~{100 * opc.fraction:.0f}% of steps"
    return (
        f"lm_kd: on-policy fraction λ={opc.fraction:g}: on {share} the student samples completions "
        f"(sampling_temperature={opc.sampling_temperature:g}, top_p={opc.top_p:g}, "
        f"≤{opc.max_new_tokens} new tokens, KV cache, eval mode) for the batch's prompts, the "
        f"teacher scores them and the loss is T²·{kd.divergence.value} on the sampled tokens only "
        "(no hard CE there); other steps use the dataset; generation and training time logged "
        "separately (gen_s, train_s); samples kept in student/samples.jsonl"
    )


def _loss_line(kd: KDSection, fraction: float) -> str:
    """What the student minimises, as the mode line states it: true for every regime."""
    soft = f"T²·{kd.divergence.value}{kd.divergence_params or ''} at kd_temperature={kd.kd_temperature:g}"
    if kd.kd_weight == 0:
        return "CE on the data (kd_weight=0: no teacher term)"
    if fraction >= 1:
        return f"{soft} on the student's own samples (no CE: every step is on-policy)"
    mixed = f"{1 - kd.kd_weight:g}·CE + {kd.kd_weight:g}·{soft}"
    if fraction > 0:
        return f"{mixed} on dataset steps, {soft} alone on sampled steps"
    return mixed


def _regime(kd_weight: float, fraction: float) -> str:
    """The training regime, for the mode line."""
    if kd_weight == 0:
        return "kd_weight=0: fine-tuning on the data alone (e.g. teacher-generated, sequence-level KD); the teacher only evaluates"
    if fraction >= 1:
        return "on-policy (λ=1: the teacher scores the student's samples on every step)"
    if fraction > 0:
        return f"mixed: on-policy on ~{100 * fraction:.0f}% of steps (λ={fraction:g}), off-policy (teacher scores the dataset) on the rest"
    return "off-policy (teacher scores the dataset)"


def _check_context(cfg: Config, models: list[PreTrainedModel]) -> None:
    """Refuse on-policy sequences longer than a model's context, before step 0."""
    opc = cfg.on_policy
    if opc.fraction == 0:
        return
    prompt = opc.prompt_tokens if cfg.data.format.value == "text" else cfg.data.max_length
    for i, m in enumerate(models):
        role = "student" if i == len(models) - 1 else "teacher"
        context = int(getattr(m.config, "max_position_embeddings", 0) or 0)
        if context and prompt + opc.max_new_tokens > context:
            raise DistilError(
                f"on-policy sequences reach {prompt} prompt + {opc.max_new_tokens} new tokens = "
                f"{prompt + opc.max_new_tokens}, beyond the {role}'s context of {context}: lower "
                "on_policy.max_new_tokens or "
                f"{'on_policy.prompt_tokens' if cfg.data.format.value == 'text' else 'data.max_length'}"
            )


def build_report(
    cfg: Config,
    s: Session,
    data: LMData,
    tokenizer: Any,
    teacher: LiveLMTeacher,
    student: Any,
    baseline: Any | None,
    vocab: int,
) -> dict[str, Any]:
    """Teacher, KD student and baseline side by side on the held-out data: quality (perplexity,
    gap closed), fidelity (agreement, KL/JSD, calibration), cost (size, latency, memory, speed)."""
    device = s.accelerator.device
    models: list[tuple[str, Any, Teacher | None]] = [
        ("teacher", teacher.model, None),
        ("student (KD)", student.to(device), teacher),
    ]
    if baseline is not None:
        models.append(("baseline (no teacher)", baseline.to(device), teacher))
    rows, samples = evaluate_models(models, data, vocab, cfg.eval, tokenizer, cfg.seed)
    rows[0] |= {"agreement": 1.0, "kl_teacher_student": 0.0}
    batches = data.eval_batches(cfg.eval.batch_size)
    one = batches[0]["input_ids"][:1]  # (1, T): batch-1 latency and memory of a full sequence
    fidelity_logits: dict[str, Tensor] = {}
    labels = torch.empty(0, dtype=torch.long)
    forward = lm_eval.forward_speeds({role: model for role, model, _ in models}, one)
    for row, (_, model, _) in zip(rows, models, strict=True):
        row["size_ratio"] = rows[0]["params"] / row["params"]
        row["size_bytes"] = weight_bytes(model)
        row |= forward[row["model"]]
        row["peak_memory_bytes"] = lm_eval.forward_cost(model, one, measure_latency=False)[
            "peak_memory_bytes"
        ]
        fidelity_logits[row["model"]], labels = lm_eval.held_out_logits(
            model, batches, vocab_size=vocab, max_rows=cfg.eval.fidelity_tokens
        )
    roles = {"teacher": rows[0]["model"], "student": rows[1]["model"]}
    highlights: dict[str, Any] = {"held-out": f"{int(rows[0]['tokens']):,} next-token targets"}
    if baseline is not None:
        roles["baseline"] = rows[2]["model"]
        kd_ppl, base_ppl = rows[1]["perplexity"], rows[2]["perplexity"]
        highlights["perplexity KD vs baseline"] = (
            f"{kd_ppl:.2f} vs {base_ppl:.2f} ({100 * (kd_ppl / base_ppl - 1):+.1f}%)"
        )
    highlights["student is smaller by"] = (
        f"{rows[1]['size_ratio']:.1f}x params; {rows[1]['gen_speedup_verdict']}"
    )
    summaries = {
        p: json.loads(f.read_text())
        for p in ("student", "baseline")
        if (f := s.run_dir / p / "summary.json").is_file()
    }
    columns = [
        ("model", "model"),
        ("perplexity", "held-out ppl"),
        ("ce", "CE nats/tok"),
        ("agreement", "top-1 agree"),
        ("kl_teacher_student", "KL(t‖s)"),
        ("params", "params"),
        ("size_ratio", "smaller by"),
        ("gen_tokens_per_s", "gen tok/s"),
        ("gen_speedup", "gen speed-up"),
    ]
    greedy = cfg.eval.generation.sampling_temperature == 0
    seq = int(one.shape[1])
    quality = quality_part(
        rows,
        [("ce", "CE nats/token"), ("perplexity", "perplexity")],
        roles=roles,
        primary="ce",
        higher_is_better=False,
    )
    if quality["gap_closed"] is not None:
        highlights["CE gap closed (student - baseline) / (teacher - baseline)"] = quality[
            "gap_closed"
        ]
    extra: dict[str, Any] = {}
    if cfg.eval.monitor.every:
        extra["monitor"] = hacking_verdict(
            read_metrics_rows(s.run_dir), tolerance=cfg.eval.monitor.tolerance
        )
    return extra | {
        "title": "lm_kd: token-level distillation of a causal LM",
        "recipe": "lm_kd",
        "roles": roles,
        "table": {"columns": [{"key": k, "label": lbl} for k, lbl in columns], "rows": rows},
        "highlights": highlights,
        "quality": quality,
        "fidelity": fidelity_part(
            fidelity_logits,
            labels,
            teacher=rows[0]["model"],
            split=f"the first {labels.shape[0]:,} held-out next-token positions (full-vocabulary logits)",
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("size_ratio", "teacher/model params"),
                ("size_bytes", "weights bytes"),
                ("peak_memory_bytes", f"peak forward memory @ 1x{seq}"),
                ("latency_b1_ms", f"CPU ms, 1x{seq} forward (1 thread)"),
                ("forward_speedup", "forward speed-up"),
                ("gen_tokens_per_s", f"gen tok/s @ b{cfg.eval.generation.speed_batch}"),
                ("gen_speedup", "gen speed-up"),
            ],
        ),
        "sections": {"Sample generations" + (" (greedy)" if greedy else ""): samples},
        "details": {
            "kd": cfg.kd.model_dump(mode="json"),
            "seed": cfg.seed,
            "processes": s.accelerator.num_processes,
            "train_summaries": summaries,
            "vocab_size": vocab,
        },
    }
