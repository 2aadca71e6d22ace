"""Recipe ``reasoning_kd``: distil a reasoning teacher into a smaller student, one method per run.

The problems are checkable (``distil problems``) and the teacher's traces verified
(``distil.data.traces``). Every run trains the same student for the same budget
(``train.max_steps`` × ``train.batch_size`` sequences) with one ``method``:

- ``sft`` on ``problems.completions``: ``gold`` worked solutions (the no-teacher baseline),
  ``all_traces`` (SFT on every teacher trace) or ``correct_traces`` (rejection-sampling SFT);
- ``redi``: REDI (arXiv:2505.24850): stage 1 SFT on correct traces, stage 2 the REDI objective
  on (correct, incorrect) trace pairs of the same problems (``distil.losses.sequence``);
- ``token_kd``: ``(1 − w)·CE + w·T²·KL(teacher ‖ student)`` on the completions (``lm_kd``'s phase);
- ``on_policy``: the student samples completions and the teacher scores them (GKD with
  λ = ``on_policy.fraction``; ``lm_kd``'s phase).

Before training, ``selection`` may keep a subset of the problems at a budget (the random control,
the teacher's pass rate, LIMR's learning impact from a short probe run, or a scorer). After
training, every checkpoint is scored (pass@1 against training sequences and tokens) and the final
student (and the teacher) get pass@k, format errors, trace length and tokens per solved problem
on the held-out and harder problems.
"""

from __future__ import annotations

import copy
import json
import logging
from enum import Enum
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.config.lm import (
    STUDENT_SEED,
    TEACHER_SEED,
    KDSection,
    OnPolicySection,
    StudentSection,
    TeacherSection,
)
from distil.config.sections import RunSection, SchedulerName, TrainSection
from distil.config.sources import HFModel, LMSpec, SpecModel
from distil.data.lm import shift_for_next_token
from distil.data.reasoning import read_problems
from distil.data.selection import (
    ScorerKind,
    SelectionMethod,
    SelectionSection,
    budget_count,
    learning_impact_scores,
    mean_logprob_scores,
    per_example_nll,
    per_key_mean,
    rewards_from_losses,
    select_by_pass_rate,
    select_random,
    select_top,
)
from distil.data.traces import (
    Completions,
    TraceExamples,
    pass_rates,
    read_traces,
    redi_pairs,
    trace_examples,
    training_records,
)
from distil.errors import DistilError
from distil.evaluation.reasoning import ReasoningEvalSection, checkpoint_curve
from distil.evaluation.report import cost_part, print_report, quality_part, write_report
from distil.losses.chunked import loss_chunk_rows
from distil.losses.objective import ObjectiveOutput
from distil.losses.sequence import redi_objective, sequence_nll
from distil.models.lm import (
    LMForward,
    check_model_fits,
    count_parameters,
    load_lm,
    make_student,
    save_model_folder,
)
from distil.models.vocab import tokenizer_vocab_size
from distil.recipes.lm_kd import load_run_tokenizer, train_phase
from distil.teachers import LiveLMTeacher, TeacherSignal
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)

STAGE2_STREAM, PROBE_STREAM = 5, 6  # the random streams of REDI's stage 2 and the LIMR probe


class Method(str, Enum):
    SFT = "sft"
    REDI = "redi"
    TOKEN_KD = "token_kd"
    ON_POLICY = "on_policy"


class ProblemsSection(StrictModel):
    pool: str = Field(default="runs/reasoning-data/pool.jsonl", description="distillation problems")
    traces: str | None = Field(default="runs/reasoning-traces.jsonl", description="verified traces")
    held_out: str = "runs/reasoning-data/held_out.jsonl"
    harder: str | None = "runs/reasoning-data/harder.jsonl"
    completions: Completions = Completions.CORRECT_TRACES
    max_length: int = Field(default=192, ge=8, description="prompt + completion + EOS tokens")


class REDISection(StrictModel):
    """REDI's constants; the defaults are the released recipe's (``distil.losses.sequence``)."""

    positive_weight: float = Field(default=1.0, ge=0, description="c+ (reinforce_chosen_coef)")
    negative_weight: float = Field(default=0.8, ge=0, description="α (reinforce_rejected_coef)")
    negative_reweight_gamma: float | None = Field(
        default=None, gt=0, description="off in the paper"
    )
    stage2_share: float = Field(default=0.2, gt=0, lt=1, description="of train.max_steps")
    stage2_lr_ratio: float = Field(default=0.02, gt=0, description="paper: 1e-6 / 5e-5")
    max_pairs_per_problem: int | None = Field(default=None, ge=1)


class Config(StrictModel):
    recipe: Literal["reasoning_kd"] = "reasoning_kd"
    seed: int = 0
    run: RunSection = RunSection()
    tokenizer: str | None = Field(default=None, description="the teacher's folder when null")
    teacher: TeacherSection = TeacherSection(model=HFModel(hf="runs/reasoning-teacher"))
    student: StudentSection = StudentSection(
        model=SpecModel(
            spec=LMSpec(num_layers=2, hidden_size=96, num_heads=4, intermediate_size=384)
        )
    )
    method: Method = Method.SFT
    problems: ProblemsSection = ProblemsSection()
    selection: SelectionSection = SelectionSection()
    train: TrainSection = TrainSection(
        epochs=1000,
        max_steps=600,
        batch_size=32,
        lr=3e-3,
        weight_decay=0.1,
        scheduler=SchedulerName.cosine,
        warmup_steps=30,
        max_grad_norm=1.0,
        checkpoint_every=150,
    )
    redi: REDISection = REDISection()
    kd: KDSection = KDSection()
    on_policy: OnPolicySection = OnPolicySection()
    eval: ReasoningEvalSection = ReasoningEvalSection()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        m, sel = self.method, self.selection
        needs_traces = (
            self.problems.completions is not Completions.GOLD
            or m is Method.REDI
            or sel.method is SelectionMethod.PASS_RATE
            or (sel.method is SelectionMethod.SCORER and sel.scorer is ScorerKind.TEACHER_LOGPROB)
        )
        if needs_traces and self.problems.traces is None:
            raise ValueError("problems.traces: this method, completions or selection reads traces")
        if m is Method.REDI and self.problems.completions is not Completions.CORRECT_TRACES:
            raise ValueError(
                "method=redi trains stage 1 on correct traces: set problems.completions=correct_traces"
            )
        if m is Method.ON_POLICY and (self.on_policy.fraction == 0 or self.kd.kd_weight == 0):
            raise ValueError("method=on_policy: set on_policy.fraction > 0 and kd.kd_weight > 0")
        if m is not Method.ON_POLICY and self.on_policy.fraction > 0:
            raise ValueError(f"on_policy.fraction > 0 belongs to method=on_policy, not {m.value}")
        if m is Method.TOKEN_KD and self.kd.kd_weight == 0:
            raise ValueError("method=token_kd with kd.kd_weight=0 is plain SFT: use method=sft")
        if self.train.max_steps is None:
            raise ValueError("train.max_steps: every arm trains for the same steps; set it")
        return self


def choose_problems(
    cfg: Config,
    s: Session,
    problems: list[dict[str, Any]],
    traces: list[dict[str, Any]] | None,
    student: Any,
    tokenizer: Any,
    log: MetricsLog,
) -> list[Any]:
    """The pool problems this run trains on: without selection, every problem that has a
    sequence of the chosen kind (a problem without a correct trace has none to imitate)."""
    sel = cfg.selection
    records = training_records(
        problems, traces, [p["id"] for p in problems], cfg.problems.completions
    )
    has = {r["id"] for r in records}
    ids = [p["id"] for p in problems if p["id"] in has]
    if sel.method is SelectionMethod.ALL:
        return ids
    budget = budget_count(len(ids), sel.budget)
    if sel.method is SelectionMethod.RANDOM:
        return select_random(ids, budget, seed=cfg.seed)
    if sel.method is SelectionMethod.PASS_RATE:
        rates = pass_rates(traces or [])
        return select_by_pass_rate(
            {i: rates.get(i, 0.0) for i in ids}, budget, sel.prefer, seed=cfg.seed
        )
    if sel.method is SelectionMethod.LEARNING_IMPACT:
        scores = learning_impact_probe(cfg, s, records, student, tokenizer, log)
    elif sel.scorer is ScorerKind.TEACHER_LOGPROB:
        scored = [t for t in traces or [] if t["id"] in set(ids)]
        scores = per_key_mean([t["id"] for t in scored], mean_logprob_scores(scored))
    else:  # a scorer model: each problem's mean token log-likelihood under it
        assert sel.scorer_model is not None
        scorer = load_lm(HFModel(hf=sel.scorer_model), tokenizer, seed=0).to(s.accelerator.device)
        data = trace_examples(records, tokenizer, max_length=cfg.problems.max_length)
        nll = per_example_nll(scorer, _batches(data), vocab_size=tokenizer_vocab_size(tokenizer))
        scores = per_key_mean(data.problem_ids, [-nll[i] for i in range(len(data))])
    return select_top({i: scores.get(i, float("-inf")) for i in ids}, budget, seed=cfg.seed)


def _batches(data: TraceExamples, size: int = 64) -> list[dict[str, Tensor]]:
    return [data.collate(range(i, min(i + size, len(data)))) for i in range(0, len(data), size)]


def sft_loss_step(
    model: nn.Module, cols: dict[str, Tensor], window: float, vocab: int
) -> ObjectiveOutput:
    """SFT on one micro-batch of traces: the token NLL summed, divided by the window's tokens."""
    device = next(model.parameters()).device
    logits = model(cols["input_ids"].to(device), cols["attention_mask"].to(device))  # (b, T, V)
    targets = shift_for_next_token(cols["labels"]).to(device)  # (b, T): the one shift
    return sequence_nll(logits[..., :vocab], targets, num_items=window)


def redi_loss_step(
    model: nn.Module,
    cols: dict[str, Tensor],
    positive: Tensor,
    counts: tuple[float, float],
    vocab: int,
    redi: REDISection,
) -> ObjectiveOutput:
    """REDI's stage 2 on one micro-batch: mean length-normalised log-likelihood of the window's
    positives pulled up (weight c⁺), of its negatives pushed down (weight α)."""
    device = next(model.parameters()).device
    logits = model(cols["input_ids"].to(device), cols["attention_mask"].to(device))  # (b, T, V)
    return redi_objective(
        logits[..., :vocab],
        shift_for_next_token(cols["labels"]).to(device),
        positive.to(device),
        positive_weight=redi.positive_weight,
        negative_weight=redi.negative_weight,
        negative_reweight_gamma=redi.negative_reweight_gamma,
        num_positive=counts[0],
        num_negative=counts[1],
    )


def train_sequences(
    s: Session,
    name: str,
    model: Any,
    data: TraceExamples,
    train: TrainSection,
    *,
    cfg: Config,
    log: MetricsLog,
    tokenizer: Any,
    vocab: int,
    redi: bool = False,
    stream: int | None = None,
) -> Any:
    """SFT on ``data`` (with ``redi``: REDI's stage 2); the trained model."""
    if (final := finished(s, name)) is not None:
        return load_lm(HFModel(hf=str(final)), tokenizer, seed=0, dtype=torch.float32)
    acc = s.accelerator
    phase = open_phase(
        s,
        name,
        model=model,
        forward=LMForward(model, hidden=False),
        train=train,
        num_examples=len(data),
        seed=cfg.seed,
        log=log,
        unit="token",
        stream=stream,
    )
    for step in phase.steps():
        batch, world = step.batch.numpy(), acc.num_processes
        window = float(data.targets_per_example[batch].sum()) / world  # per rank: DDP averages
        positives = float(data.is_positive[batch].sum()) / world
        counts = (positives, len(batch) / world - positives)
        tokens = 0
        for m, ids in enumerate(step.micro_batches):
            cols = data.collate(ids.tolist())
            with phase.accumulate(m):
                if redi:
                    flags = torch.as_tensor(data.is_positive[ids.numpy()])
                    out = redi_loss_step(phase.model, cols, flags, counts, vocab, cfg.redi)
                else:
                    out = sft_loss_step(phase.model, cols, window, vocab)
            phase.backward(out, micro=m)
            tokens += int(cols["attention_mask"].sum())
        phase.optimizer_step(count=tokens * world)
    trained: Any = phase.unwrapped().lm
    phase.finish(
        export=lambda f: save_model_folder(trained, f, tokenizer=tokenizer, overwrite=True)
    )
    return trained


def learning_impact_probe(
    cfg: Config, s: Session, records: list[Any], student: Any, tokenizer: Any, log: MetricsLog
) -> dict[Any, float]:
    """LIMR's learning-impact score of each problem from a short SFT run on every candidate:
    the reward ``exp(−mean token NLL)`` of its sequences at ``probe_points`` evenly spaced steps
    against the average trajectory. Saved in ``probe/scores.json`` (a resumed run reuses it)."""
    saved = s.run_dir / "probe" / "scores.json"
    if saved.is_file():
        return {key: value for key, value in json.loads(saved.read_text())}
    sel, vocab = cfg.selection, tokenizer_vocab_size(tokenizer)
    data = trace_examples(records, tokenizer, max_length=cfg.problems.max_length)
    short = cfg.train.model_copy(
        update={"max_steps": sel.probe_steps, "checkpoint_every": sel.probe_steps}
    )
    model = copy.deepcopy(student)
    phase = open_phase(
        s,
        "probe",
        model=model,
        forward=LMForward(model, hidden=False),
        train=short,
        num_examples=len(data),
        seed=cfg.seed,
        log=log,
        unit="token",
        stream=PROBE_STREAM,
    )
    points = {round(sel.probe_steps * (k + 1) / sel.probe_points) for k in range(sel.probe_points)}
    losses: list[list[float]] = []
    for step in phase.steps():
        window = float(data.targets_per_example[step.batch.numpy()].sum())
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = sft_loss_step(phase.model, data.collate(ids.tolist()), window, vocab)
            phase.backward(out, micro=m)
        phase.optimizer_step(count=window)
        if step.index + 1 in points:  # what LIM reads: every example's loss at this point
            nll = per_example_nll(phase.unwrapped().lm, _batches(data), vocab_size=vocab)
            losses.append([nll[i] for i in range(len(data))])
    if len(losses) != len(points):  # resumed after the probe ended but before its scores
        raise DistilError(
            f"{s.run_dir / 'probe'} holds a finished probe without its scores; delete that "
            "folder and resume to probe again"
        )
    trained: Any = phase.unwrapped().lm
    phase.finish(
        export=lambda f: save_model_folder(trained, f, tokenizer=tokenizer, overwrite=True)
    )
    rewards = rewards_from_losses(np.asarray(losses).T)  # (examples, K)
    per_problem = [per_key_mean(data.problem_ids, list(column)) for column in rewards.T]
    keys = list(per_problem[0])
    scores = learning_impact_scores(np.asarray([[p[k] for p in per_problem] for k in keys]))
    result = dict(zip(keys, scores.tolist(), strict=True))
    s.write_json(saved, [[k, v] for k, v in result.items()])
    return result


def method_name(cfg: Config) -> str:
    """The arm's name in tables: the method, what it trains on, and the selection."""
    names = {
        Completions.GOLD: "no teacher (gold SFT)",
        Completions.ALL_TRACES: "SFT on all traces",
        Completions.CORRECT_TRACES: "rejection-sampling SFT",
    }
    other = {
        Method.REDI: "REDI",
        Method.TOKEN_KD: "token-level KD",
        Method.ON_POLICY: "on-policy KD",
    }
    name = names[cfg.problems.completions] if cfg.method is Method.SFT else other[cfg.method]
    sel = cfg.selection
    return (
        name if sel.method is SelectionMethod.ALL else f"{name}, {sel.method.value} {sel.budget:g}"
    )


def build_report(
    cfg: Config,
    rows: list[dict[str, Any]],
    kinds: dict[str, dict[str, float]],
    details: dict[str, Any],
) -> dict[str, Any]:
    """Teacher and student on the held-out and harder problems (overall and per kind), what the
    student trained on, and the learning curve (in ``details``)."""
    splits = ["held_out", *(["harder"] if cfg.problems.harder else [])]
    per_split = [
        *(f"pass@{k}" for k in cfg.eval.ks),
        "format_errors",
        "trace_tokens",
        "tokens_per_solved",
    ]
    metrics = [(f"{sp}/{key}", f"{sp} {key}") for sp in splits for key in per_split]
    student = rows[-1]["model"]
    roles = {"student": student} | ({"teacher": rows[0]["model"]} if len(rows) > 1 else {})
    labels = sorted({k for by in kinds.values() for k in by})
    headline = [
        ("model", "model"),
        *((f"{sp}/pass@{k}", f"{sp} pass@{k}") for sp in splits for k in cfg.eval.ks),
    ]
    return {
        "title": f"reasoning_kd: {student}",
        "recipe": "reasoning_kd",
        "roles": roles,
        "table": {
            "columns": [{"key": k, "label": label} for k, label in headline],
            "rows": [{k: r.get(k) for k, _ in headline} for r in rows],
        },
        "highlights": {
            "trained on": f"{rows[-1]['train_sequences']:,} sequences of {rows[-1]['train_problems']:,} problems",
            **{f"student {label}": rows[-1].get(k) for k, label in headline[1:]},
        },
        "quality": quality_part(
            rows,
            metrics,
            roles=roles,
            primary="held_out/pass@1",
            per_class={
                "labels": labels,
                "values": {m: [by.get(k) for k in labels] for m, by in kinds.items()},
                "metric": "held-out pass@1 by kind",
            },
        ),
        "cost": cost_part(
            rows,
            [
                ("params", "params"),
                ("train_sequences", "training sequences"),
                ("train_tokens", "training tokens"),
            ],
        ),
        "details": details,
    }


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Select the problems, train the student with ``cfg.method``, evaluate, report."""
    acc = s.accelerator
    tokenizer = load_run_tokenizer(cfg.tokenizer, cfg.teacher.model)
    vocab = tokenizer_vocab_size(tokenizer)
    teacher = load_lm(cfg.teacher.model, tokenizer, seed=TEACHER_SEED)
    student, source = make_student(
        cfg.student.model, teacher, tokenizer, seed=STUDENT_SEED + cfg.seed
    )
    for role, m in (("teacher", teacher), ("student", student)):
        check_model_fits(m, tokenizer, cfg.problems.max_length, role)
    problems = read_problems(cfg.problems.pool)
    traces = read_traces(cfg.problems.traces) if cfg.problems.traces else None
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    keep = choose_problems(cfg, s, problems, traces, student, tokenizer, log)
    if acc.is_main_process:
        s.write_json(s.run_dir / "selected.json", keep)
    records = training_records(problems, traces, keep, cfg.problems.completions)
    data = trace_examples(records, tokenizer, max_length=cfg.problems.max_length)
    name, train = method_name(cfg), cfg.train.model_copy(update={"keep_checkpoints": 10_000})
    s.announce(
        f"reasoning_kd: {name}; student {source} ({count_parameters(student).total:,} params, "
        f"seed {cfg.seed}); {len(keep)} of {len(problems)} problems ({cfg.selection.method.value} "
        f"selection), {len(data)} training sequences ({cfg.problems.completions.value}, "
        f"{int(data.is_positive.sum())} verified correct); budget {train.max_steps} steps × "
        f"{train.batch_size} sequences; every checkpoint kept for the learning curve"
    )
    common: dict[str, Any] = {"cfg": cfg, "log": log, "tokenizer": tokenizer, "vocab": vocab}
    phases = ["student"]
    if cfg.method is Method.SFT:
        trained = train_sequences(s, "student", copy.deepcopy(student), data, train, **common)
    elif cfg.method is Method.REDI:
        assert train.max_steps is not None
        steps2 = max(1, round(train.max_steps * cfg.redi.stage2_share))
        stage1 = train.model_copy(update={"max_steps": train.max_steps - steps2})
        first = train_sequences(s, "student", copy.deepcopy(student), data, stage1, **common)
        chosen = set(keep)
        pairs = redi_pairs(
            [t for t in traces or [] if t["id"] in chosen],
            seed=cfg.seed,
            max_pairs_per_problem=cfg.redi.max_pairs_per_problem,
        )
        paired = trace_examples(
            [t for pair in pairs for t in pair], tokenizer, max_length=cfg.problems.max_length
        )
        stage2 = train.model_copy(
            update={
                "max_steps": steps2,
                "lr": train.lr * cfg.redi.stage2_lr_ratio,
                "warmup_steps": round(0.1 * steps2),
                "scheduler": SchedulerName.linear,
            }
        )
        r = cfg.redi
        s.announce(
            f"reasoning_kd: REDI stage 1 = {stage1.max_steps} steps of SFT on the correct traces; "
            f"stage 2 = {steps2} steps of {r.positive_weight:g}·mean(−log π(y⁺)/|y⁺|) + "
            f"{r.negative_weight:g}·mean(log π(y⁻)/|y⁻|) on {len(pairs)} pairs at lr {stage2.lr:g} "
            f"(linear, 10 % warm-up), negative re-weighting γ={r.negative_reweight_gamma}"
        )
        trained = train_sequences(
            s, "stage2", first, paired, stage2, redi=True, stream=STAGE2_STREAM, **common
        )
        phases.append("stage2")
    else:
        live = LiveLMTeacher(
            teacher,
            vocab_size=vocab,
            device=acc.device,
            dtype=teacher.dtype,
            output_device=acc.device,
            signal=TeacherSignal.LOGITS,
        )
        trained = train_phase(
            "student",
            s,
            copy.deepcopy(student),
            data.as_lm_data(),
            train,
            seed=cfg.seed,
            shuffle=True,
            log=log,
            vocab_size=vocab,
            hidden=False,
            tokenizer=tokenizer,
            teacher=live,
            kd=cfg.kd,
            chunk_rows=loss_chunk_rows(None, vocab, fused=False, device=acc.device),
            on_policy=cfg.on_policy if cfg.method is Method.ON_POLICY else None,
        )
    if not acc.is_main_process:
        return {}
    ev, n = cfg.eval, cfg.eval.problems
    splits = {"held_out": read_problems(cfg.problems.held_out)[:n]}
    if cfg.problems.harder:
        splits["harder"] = read_problems(cfg.problems.harder)[:n]
    curve = []
    if ev.curve_samples:
        dirs = [s.run_dir / p for p in phases]
        curve = checkpoint_curve(
            dirs, student, tokenizer, splits, ev, sequences_per_step=train.batch_size, seed=cfg.seed
        )
        for point in curve:
            log.log(
                {k: v for k, v in point.items() if k != "step"}, step=point["step"], phase="eval"
            )
    summaries = [json.loads((s.run_dir / p / "summary.json").read_text()) for p in phases]
    extra = {
        "train_sequences": len(data),
        "train_problems": len(keep),
        "train_tokens": sum(x.get("tokens", 0) for x in summaries),
    }
    rows, kinds = [], {}
    for label, model in ([("teacher", teacher)] if ev.teacher else []) + [
        (name, trained.to(acc.device))
    ]:
        scores = {
            sp: ev.score(model, tokenizer, recs, seed=cfg.seed) for sp, recs in splits.items()
        }
        row: dict[str, Any] = {"model": label, "params": count_parameters(model).total}
        for sp, sc in scores.items():
            row |= sc.row(f"{sp}/")
        rows.append(row | (extra if label == name else {}))
        by_kind = scores["held_out"].by_group.items()
        kinds[label] = {
            g.removeprefix("kind="): v["pass@1"] or 0.0 for g, v in by_kind if g.startswith("kind=")
        }
    details = {
        "method": cfg.method.value,
        "completions": cfg.problems.completions.value,
        "selection": cfg.selection.model_dump(mode="json"),
        "problems": {"pool": len(problems), "trained_on": len(keep), "ids": "selected.json"},
        "seed": cfg.seed,
        "curve": curve,
        "phases": dict(zip(phases, summaries, strict=True)),
    }
    report = build_report(cfg, rows, kinds, details)
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report
