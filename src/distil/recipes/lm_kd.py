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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.config.sections import RunSection, SchedulerName, TrainSection
from distil.data.lm import IGNORE_INDEX, shift_for_next_token
from distil.errors import DistilError
from distil.evaluation import lm as lm_eval
from distil.evaluation.calibration import fidelity_part
from distil.evaluation.cost import weight_bytes
from distil.evaluation.hacking import Monitor, hacking_verdict
from distil.evaluation.report import (
    cost_part,
    print_report,
    quality_part,
    read_metrics_rows,
    write_report,
)
from distil.generation import eos_token_ids
from distil.losses.chunked import should_use_chunked_loss
from distil.losses.objective import (
    ObjectiveOutput,
    token_objective,
    token_objective_from_hidden,
    token_objective_sparse,
)
from distil.losses.sparse import SampledTargets, TopKTargets
from distil.models.lm import count_parameters, load_causal_lm, save_model_folder
from distil.models.vocab import (
    TOKENIZER_FILES,
    check_same_tokenizer,
    check_vocab_alignment,
    load_tokenizer_folder,
    output_vocab_rows,
)
from distil.recipes.lm_setup import (
    EvalSection,
    KDSection,
    LMData,
    LMDataSection,
    OnPolicySection,
    StudentSection,
    TeacherSection,
    check_model_fits,
    load_lm_data,
    load_teacher_model,
    loss_chunk_rows,
    make_student,
    torch_dtype,
)
from distil.teachers import LiveLMTeacher, Teacher, TeacherSignal, head_of, hidden_path_matches
from distil.teachers.cached import CachedTeacher, open_lm_cache
from distil.teachers.live import final_hidden
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

logger = logging.getLogger(__name__)


class Config(StrictModel):
    recipe: Literal["lm_kd"] = "lm_kd"
    seed: int = 0
    run: RunSection = RunSection()
    tokenizer: str | None = Field(
        default=None, description="tokenizer folder; teacher.hf when null"
    )
    data: LMDataSection = LMDataSection(builtin="stdlib")
    teacher: TeacherSection = TeacherSection(hf="runs/lm-teacher")
    student: StudentSection = StudentSection(num_layers=2)
    train: TrainSection = TrainSection(
        epochs=1, batch_size=8, lr=1e-3, scheduler=SchedulerName.linear, max_grad_norm=1.0
    )
    kd: KDSection = KDSection()
    on_policy: OnPolicySection = OnPolicySection()
    eval: EvalSection = EvalSection()


class LMForward(nn.Module):
    """Runs a causal LM to its final hidden states (``hidden=True``) or logits, so that DDP wraps
    exactly the forward the loss uses; the output layer is then applied inside the chunked loss."""

    def __init__(self, lm: PreTrainedModel, *, hidden: bool) -> None:
        super().__init__()
        self.lm, self.hidden = lm, hidden

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if self.hidden:
            return final_hidden(self.lm, input_ids, attention_mask)  # (B, T, H)
        return self.lm(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).logits  # (B, T, V_model)


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
    samples (``sampled``) the divergence alone, at full weight. The teacher's signal decides the
    path: full logits, hidden states for the chunked loss, or a cache's sparse targets."""
    ids, att = cols["input_ids"].to(ctx.device), cols["attention_mask"].to(ctx.device)
    targets = shift_for_next_token(cols["labels"]).to(ctx.device)  # (b, T): the one shift
    teacher, kd = ctx.teacher, ctx.kd
    sparse = None
    if isinstance(teacher, CachedTeacher) and not ctx.chunked:
        sparse = _sparse_targets(teacher, ids, att, cols, targets)
    t_out = teacher(ids, att) if teacher is not None and sparse is None else None  # own precision
    out_s = ctx.model(ids, att)  # (b, T, H) or (b, T, V_model)
    mix: dict[str, Any] = {
        "kd_weight": 1.0 if sampled else (kd.kd_weight if kd and teacher else 0.0),
        "kd_temperature": kd.kd_temperature if kd and teacher else 1.0,
        "num_items": window_items,
    }
    if kd is not None:
        mix |= {"divergence": kd.divergence.value, **kd.divergence_params}
    if sparse is not None:  # exact top-k + tail (or sampled) loss from the cache
        logits = out_s[..., : ctx.vocab_size]
        if ctx.hidden:
            weight, bias = head_of(ctx.lm)
            logits = out_s @ weight[: ctx.vocab_size].T
            logits = logits if bias is None else logits + bias[: ctx.vocab_size]
        return token_objective_sparse(logits, sparse, targets, **mix)
    if ctx.hidden:
        weight, bias = head_of(ctx.lm)
        return token_objective_from_hidden(
            out_s,
            weight[: ctx.vocab_size],
            None if t_out is None else t_out.logits,
            targets,
            student_bias=None if bias is None else bias[: ctx.vocab_size],
            teacher_hidden=None if t_out is None else t_out.hidden,
            teacher_weight=None if t_out is None else t_out.weight,
            teacher_bias=None if t_out is None else t_out.bias,
            chunked=ctx.chunked,
            chunk_size=ctx.chunk_rows,
            **mix,
        )
    t_logits = None if t_out is None else t_out.logits
    return token_objective(
        out_s[..., : ctx.vocab_size], t_logits, targets, chunk_size=ctx.chunk_rows, **mix
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
        if sampled:
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
        else:
            # the supervised targets of the whole window (all micro-batches, all ranks) per rank,
            # because DDP averages gradients over ranks; every rank has the data: no communication
            window_items = (
                float(data.targets_per_example[step.batch.numpy()].sum()) / acc.num_processes
            )
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
    extra_summary: dict[str, Any] = {}
    if on_policy_steps:
        extra_summary = {"on_policy_steps": on_policy_steps, "generation_s": generation_s}
    trained: PreTrainedModel = phase.unwrapped().lm  # type: ignore[assignment]

    def export(folder: Path) -> None:
        save_model_folder(trained, folder, tokenizer=tokenizer, overwrite=True)

    phase.finish(export=export, summary=extra_summary)
    return trained


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


def _sparse_targets(
    teacher: Any, ids: Tensor, att: Tensor, cols: dict[str, Tensor], targets: Tensor
) -> TopKTargets | SampledTargets:
    """The cached teacher's sparse targets for a batch (looked up by example id), after checking
    that the cache holds a target at every supervised position."""
    got = (
        teacher.sampled_targets(ids, att, cols["example_id"])
        if teacher.reader.sampled
        else teacher.targets(ids, att, cols["example_id"])
    )
    missing = (targets != IGNORE_INDEX) & ~got.mask
    if bool(missing.any()):
        raise DistilError(
            f"the teacher cache {teacher.path} has no target at {int(missing.sum())} supervised positions of "
            f"examples {cols['example_id'].tolist()}: it was written for other masks; re-run `distil cache` with this config"
        )
    return got.samples if teacher.reader.sampled else got.topk


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


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Run the recipe in the session's run folder; return the report."""
    acc = s.accelerator
    tokenizer = load_tokenizer_folder(
        cfg.tokenizer or cfg.teacher.hf or "", trust_remote_code=cfg.teacher.trust_remote_code
    )
    teacher_model = load_teacher_model(cfg.teacher, tokenizer)
    student_init, student_source = make_student(cfg.student, teacher_model, tokenizer)
    for role, m in (("teacher", teacher_model), ("student", student_init)):
        check_model_fits(m, tokenizer, cfg.data.max_length, role)
    _check_on_policy(cfg, teacher_model, student_init)
    if (
        cfg.tokenizer
        and cfg.teacher.hf
        and any((Path(cfg.teacher.hf) / f).is_file() for f in TOKENIZER_FILES)
    ):
        check_same_tokenizer(
            load_tokenizer_folder(cfg.teacher.hf), tokenizer
        )  # the data must be the teacher's ids
    vocab = check_vocab_alignment(
        tokenizer,
        teacher_vocab_rows=output_vocab_rows(teacher_model),
        student_vocab_rows=output_vocab_rows(student_init),
    ).tokenizer_vocab_size
    data = load_lm_data(cfg.data, tokenizer, s.run_dir, acc)
    probe = data.collate(data.train, [0])
    hidden = hidden_path_matches(student_init, probe["input_ids"], probe["attention_mask"])
    chunked = (
        cfg.kd.chunked
        if cfg.kd.chunked is not None
        else should_use_chunked_loss(
            cfg.train.batch_size // acc.num_processes // cfg.train.grad_accum * cfg.data.max_length,
            vocab,
        )
    )
    if chunked and not (
        hidden and hidden_path_matches(teacher_model, probe["input_ids"], probe["attention_mask"])
    ):
        raise DistilError(
            "kd.chunked needs plain linear output layers (logits = hidden @ W.T + b) on both models; set kd.chunked=false"
        )
    t_device = torch.device(cfg.teacher.device) if cfg.teacher.device else acc.device
    teacher = LiveLMTeacher(
        teacher_model,
        vocab_size=vocab,
        device=t_device,
        dtype=torch_dtype(cfg.teacher.dtype, teacher_model.dtype),
        output_device=acc.device,
        signal=TeacherSignal.HIDDEN if chunked else TeacherSignal.LOGITS,
    )
    teacher.check_deterministic(probe["input_ids"], probe["attention_mask"])
    train_teacher: Teacher = teacher
    if (
        cfg.teacher.cache is not None
    ):  # train from `distil cache` outputs; refused unless made for this run
        train_teacher = open_lm_cache(
            cfg.teacher.cache,
            tokenizer=tokenizer,
            dataset=data.train,
            sequence_length=cfg.data.max_length,
            kd_temperature=cfg.kd.kd_temperature,
            vocab_size=vocab,
            teacher_model=teacher.model,
            output_device=acc.device,
        )
        assert isinstance(train_teacher, CachedTeacher)
        how = (
            "dense logits rebuilt from it (chunked path: tail mass spread evenly over the other ids)"
            if chunked
            else "the importance-sampled estimate of the divergence (unbiased)"
            if train_teacher.reader.sampled
            else f"the exact top-{train_teacher.k} head + sampled tail: an unbiased forward-KL estimate (no dense teacher logits)"
            if train_teacher.reader.manifest.get("tail_samples")
            else f"the exact top-{train_teacher.k} + tail divergence on k + 1 buckets (no dense teacher logits)"
        )
        s.announce(f"lm_kd: the student learns from the {train_teacher.describe()}, through {how}")
    kd, opc = cfg.kd, cfg.on_policy
    monitor = None
    if cfg.eval.monitor.every:
        mon = cfg.eval.monitor
        oracle = None
        if mon.oracle is not None:
            oracle_model = load_causal_lm(Path(mon.oracle), dtype=teacher.model.dtype)
            check_same_tokenizer(load_tokenizer_folder(mon.oracle), tokenizer)
            oracle = LiveLMTeacher(
                oracle_model,
                vocab_size=vocab,
                device=t_device,
                dtype=teacher.model.dtype,
                output_device=acc.device,
                signal=TeacherSignal.LOGITS,
            )
        monitor = Monitor(
            mon.every,
            data.eval_batches(cfg.eval.batch_size)[: max(1, mon.examples // cfg.eval.batch_size)],
            vocab,
            teacher,
            oracle,
        )
    if opc.fraction > 0:
        s.announce(
            f"lm_kd: on-policy fraction λ={opc.fraction:g}: on {'every step' if opc.fraction >= 1 else f'~{100 * opc.fraction:.0f}% of steps'} "
            f"the student samples completions (sampling_temperature={opc.sampling_temperature:g}, top_p={opc.top_p:g}, "
            f"≤{opc.max_new_tokens} new tokens, KV cache, eval mode) for the batch's prompts, the teacher scores them and "
            f"the loss is T²·{kd.divergence.value} on the sampled tokens only (no hard CE there); other steps use the dataset; "
            f"generation and training time logged separately (gen_s, train_s); samples kept in student/samples.jsonl"
        )
    s.announce(
        f"lm_kd: teacher {teacher.describe()}; student {student_source} ({count_parameters(student_init).total:,} params, float32"
        f"{', autocast ' + cfg.train.mixed_precision.value if cfg.train.mixed_precision.value != 'no' else ''}); "
        f"loss = {1 - kd.kd_weight:g}·CE + {kd.kd_weight:g}·T²·{kd.divergence.value}{kd.divergence_params or ''} at kd_temperature={kd.kd_temperature:g} "
        f"({'chunked from hidden states' if chunked else 'full logits'}, loss in chunks of {loss_chunk_rows(kd.chunk_size, vocab, fused=chunked, device=acc.device)} rows); vocab policy: tokenizer {vocab} ids, logits sliced to it "
        f"(teacher {output_vocab_rows(teacher_model)} rows, student {output_vocab_rows(student_init)}); data {cfg.data.format.value}, "
        f"{len(data.train)} train / {len(data.eval)} held-out examples; {_regime(kd.kd_weight, opc.fraction)}; "
        f"{acc.num_processes} process(es) on {acc.device}, each running the teacher on its own shard"
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
    if cfg.eval.baseline:
        baseline = train_phase(
            "baseline", s, copy.deepcopy(student_init), data, cfg.train, chunked=chunked, **common
        )
    if not acc.is_main_process:
        return {}
    report = build_report(cfg, s, data, tokenizer, teacher, student, baseline, vocab)
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report


def _regime(kd_weight: float, fraction: float) -> str:
    """The training regime, for the mode line."""
    if kd_weight == 0:
        return "kd_weight=0: fine-tuning on the data alone (e.g. teacher-generated, sequence-level KD); the teacher only evaluates"
    if fraction >= 1:
        return "on-policy (λ=1: the teacher scores the student's samples on every step)"
    if fraction > 0:
        return f"mixed: on-policy on ~{100 * fraction:.0f}% of steps (λ={fraction:g}), off-policy (teacher scores the dataset) on the rest"
    return "off-policy (teacher scores the dataset)"


def _check_on_policy(cfg: Config, teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Refuse on-policy settings that cannot run, before step 0 (never a silent fallback)."""
    opc = cfg.on_policy
    if opc.fraction == 0:
        return
    if cfg.kd.kd_weight == 0:
        raise DistilError(
            "on_policy.fraction > 0 needs a teacher to score the samples: set kd.kd_weight > 0 (or on_policy.fraction=0)"
        )
    if cfg.teacher.cache is not None:
        raise DistilError(
            "on_policy.fraction > 0 needs a live teacher (a cache cannot score text the student writes during training): drop teacher.cache or set on_policy.fraction=0"
        )
    prompt = opc.prompt_tokens if cfg.data.format.value == "text" else cfg.data.max_length
    for role, m in (("teacher", teacher), ("student", student)):
        context = int(getattr(m.config, "max_position_embeddings", 0) or 0)
        if context and prompt + opc.max_new_tokens > context:
            raise DistilError(
                f"on-policy sequences reach {prompt} prompt + {opc.max_new_tokens} new tokens = {prompt + opc.max_new_tokens}, "
                f"beyond the {role}'s context of {context}: lower on_policy.max_new_tokens or "
                f"{'on_policy.prompt_tokens' if cfg.data.format.value == 'text' else 'data.max_length'}"
            )


def evaluate_models(
    models: list[tuple[str, Any, Teacher | None]],
    data: LMData,
    vocab: int,
    ev: EvalSection,
    tokenizer: Any,
    seed: int,
) -> tuple[list[dict[str, Any]], str]:
    """Report rows (held-out metrics, size, generation speed) and side-by-side sample generations."""
    gen, batches = ev.generation, data.eval_batches(ev.batch_size)
    speed = {
        "speed_batch": gen.speed_batch,
        "speed_prompt_tokens": gen.prompt_tokens,
        "speed_new_tokens": gen.speed_new_tokens,
    }
    rows = [
        lm_eval.model_summary(
            role, m, batches, vocab_size=vocab, teacher=t, pad_token_id=data.pad_token_id, **speed
        )
        for role, m, t in models
    ]
    samples = []
    for i, prompt in enumerate(lm_eval.prompts_from(data.eval, gen.prompts, gen.prompt_tokens)):
        samples.append(
            f"### Prompt {i + 1}\n\n```\n{tokenizer.decode(prompt, skip_special_tokens=True)}\n```\n"
        )
        for role, model, _ in models:
            text = lm_eval.generate_texts(
                model,
                [prompt],
                tokenizer,
                max_new_tokens=gen.max_new_tokens,
                sampling_temperature=gen.sampling_temperature,
                seed=seed,
            )[0]
            samples.append(f"**{role}**\n\n```\n{text}\n```\n")
    return rows, "\n".join(samples)


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
    for row, (_, model, _) in zip(rows, models, strict=True):
        row["size_ratio"] = rows[0]["params"] / row["params"]
        row["gen_speedup"] = row["gen_tokens_per_s"] / rows[0]["gen_tokens_per_s"]
        row["size_bytes"] = weight_bytes(model)
        cost = lm_eval.forward_cost(model, one)
        row["latency_b1_ms"], row["peak_memory_bytes"] = (
            cost["latency_ms"],
            cost["peak_memory_bytes"],
        )
        fidelity_logits[row["model"]], labels = lm_eval.held_out_logits(
            model, batches, vocab_size=vocab, max_rows=cfg.eval.fidelity_tokens
        )
    for row in rows:
        row["forward_speedup"] = rows[0]["latency_b1_ms"] / row["latency_b1_ms"]
    roles = {"teacher": rows[0]["model"], "student": rows[1]["model"]}
    highlights: dict[str, Any] = {"held-out": f"{int(rows[0]['tokens']):,} next-token targets"}
    if baseline is not None:
        roles["baseline"] = rows[2]["model"]
        kd_ppl, base_ppl = rows[1]["perplexity"], rows[2]["perplexity"]
        highlights["perplexity KD vs baseline"] = (
            f"{kd_ppl:.2f} vs {base_ppl:.2f} ({100 * (kd_ppl / base_ppl - 1):+.1f}%)"
        )
    highlights["student is smaller by"] = (
        f"{rows[1]['size_ratio']:.1f}x params, generates {rows[1]['gen_speedup']:.1f}x the tokens/s"
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
