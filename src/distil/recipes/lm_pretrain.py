"""Recipe ``lm_pretrain``: train a causal LM from scratch with next-token cross-entropy.

It makes the built-in teacher: a byte-level BPE tokenizer trained on the CPython standard-library
corpus, a Llama-style model of a few million parameters trained on it, and a self-contained
Hugging Face folder (config, safetensors, tokenizer) exported to ``export_dir`` that ``lm_kd``
loads as ``teacher.model.hf``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.config.lm import EvalSection, LMDataSection
from distil.config.sections import RunSection, SchedulerName, TrainSection, require_unsharded
from distil.config.sources import LMSpec
from distil.data.corpus import PadTokenPolicy, train_bpe_tokenizer
from distil.data.lm import LMData, data_files, load_lm_data, shift_for_next_token
from distil.errors import DistilError
from distil.evaluation.lm import evaluate_models
from distil.evaluation.report import print_report, write_report
from distil.losses.chunked import loss_chunk_rows, should_use_chunked_loss
from distil.losses.objective import ObjectiveOutput, token_objective, token_objective_from_hidden
from distil.models.lm import (
    LMForward,
    build_from_spec,
    check_model_fits,
    count_parameters,
    load_causal_lm,
    save_model_folder,
)
from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size
from distil.teachers import head_of, hidden_path_matches
from distil.training.loop import finished, open_phase
from distil.training.metrics import MetricsLog
from distil.training.session import Session

logger = logging.getLogger(__name__)


class TokenizerSection(StrictModel):
    path: str | None = Field(
        default=None,
        description="an existing tokenizer folder; else one is trained on the training files",
    )
    vocab_size: int = Field(default=8192, ge=300)
    pad_policy: PadTokenPolicy = PadTokenPolicy.DEDICATED


class Config(StrictModel):
    recipe: Literal["lm_pretrain"] = "lm_pretrain"
    seed: int = 0
    run: RunSection = RunSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: LMDataSection = LMDataSection()
    model: LMSpec = LMSpec(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024)
    train: TrainSection = TrainSection(
        epochs=1,
        max_steps=160,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.1,
        scheduler=SchedulerName.cosine,
        warmup_steps=25,
        max_grad_norm=1.0,
        checkpoint_every=20,
    )
    eval: EvalSection = EvalSection(baseline=False)
    export_dir: str | None = Field(
        default="runs/lm-teacher", description="copy the trained model + tokenizer here"
    )

    @model_validator(mode="after")
    def _unsharded(self) -> Config:
        require_unsharded(self.train, "train", "lm_pretrain")
        return self


def _tokenizer(cfg: Config, s: Session) -> Any:
    if cfg.tokenizer.path is not None:
        return load_tokenizer_folder(cfg.tokenizer.path)
    folder = s.run_dir / "tokenizer"
    train_files, _ = data_files(cfg.data, s.run_dir, s.accelerator)
    if any(Path(f).suffix == ".parquet" for f in train_files):
        raise DistilError(
            "training a tokenizer reads text or JSONL files; for Parquet data set tokenizer.path"
        )
    if s.accelerator.is_main_process and not (folder / "tokenizer.json").is_file():
        train_bpe_tokenizer(
            [Path(f) for f in train_files],
            folder,
            cfg.tokenizer.vocab_size,
            pad_policy=cfg.tokenizer.pad_policy,
            model_max_length=cfg.model.max_context,
            text_field=cfg.data.text_field,
        )
    s.accelerator.wait_for_everyone()
    return load_tokenizer_folder(folder)


@dataclass(frozen=True)
class CEStep:
    """The model's forward (to hidden states when its output layer is a plain linear map), the
    model itself, and how the loss is cut."""

    model: nn.Module
    lm: Any
    vocab: int
    hidden: bool
    chunked: bool
    chunk_rows: int


def pretrain_loss_step(
    ctx: CEStep, cols: dict[str, Tensor], window_items: float
) -> ObjectiveOutput:
    """One micro-batch of next-token cross-entropy (from hidden states, in chunks when the
    vocabulary is large: no ``(B, T, V)`` logits)."""
    device = next(ctx.lm.parameters()).device
    ids, att = cols["input_ids"].to(device), cols["attention_mask"].to(device)
    targets = shift_for_next_token(cols["labels"]).to(device)  # (b, T): the one shift
    out = ctx.model(ids, att)  # (b, T, H) or (b, T, V_model)
    mix: dict[str, Any] = {"kd_weight": 0.0, "kd_temperature": 1.0, "num_items": window_items}
    mix["chunk_size"] = ctx.chunk_rows
    if ctx.hidden:
        weight, bias = head_of(ctx.lm)
        bias = None if bias is None else bias[: ctx.vocab]
        return token_objective_from_hidden(
            out, weight[: ctx.vocab], None, targets, student_bias=bias, chunked=ctx.chunked, **mix
        )
    return token_objective(out[..., : ctx.vocab], None, targets, **mix)


def train_model(
    s: Session,
    cfg: Config,
    model: Any,
    data: LMData,
    tokenizer: Any,
    log: MetricsLog,
    vocab: int,
    hidden: bool,
    chunked: bool,
) -> Any:
    """Pre-train ``model`` on ``data.train``; return it (or the finished one of an earlier call)."""
    if (final := finished(s, "model")) is not None:
        return load_causal_lm(final, dtype=torch.float32)
    acc = s.accelerator
    phase = open_phase(
        s,
        "model",
        model=model,
        forward=LMForward(model, hidden=hidden),
        train=cfg.train,
        num_examples=len(data.train),
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        log=log,
        unit="token",
    )
    rows = loss_chunk_rows(None, vocab, fused=chunked, device=acc.device)
    ctx = CEStep(phase.model, model, vocab, hidden, chunked, rows)
    for step in phase.steps():
        # supervised targets of the whole window per rank (DDP averages over ranks)
        window = float(data.targets_per_example[step.batch.numpy()].sum()) / acc.num_processes
        tokens = 0
        for m, ids in enumerate(step.micro_batches):
            cols = data.collate(data.train, ids.tolist())
            with phase.accumulate(m):
                out = pretrain_loss_step(ctx, cols, window)
            phase.backward(out, micro=m)
            tokens += int(cols["attention_mask"].sum())
        phase.optimizer_step(count=tokens * acc.num_processes)
    trained: Any = phase.unwrapped().lm
    phase.finish(
        export=lambda folder: save_model_folder(
            trained, folder, tokenizer=tokenizer, overwrite=True
        )
    )
    return trained


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Train the model, evaluate it on held-out data, export it, and return the report."""
    acc = s.accelerator
    tokenizer = _tokenizer(cfg, s)
    model = build_from_spec(cfg.model, tokenizer, seed=cfg.seed)
    check_model_fits(model, tokenizer, cfg.data.max_length, "model")
    vocab = tokenizer_vocab_size(tokenizer)
    data = load_lm_data(cfg.data, tokenizer, s.run_dir, acc)
    probe = data.collate(data.train, [0])
    hidden = hidden_path_matches(model, probe["input_ids"], probe["attention_mask"])
    chunked = hidden and should_use_chunked_loss(
        cfg.train.batch_size // acc.num_processes // cfg.train.grad_accum * cfg.data.max_length,
        vocab,
    )
    s.announce(
        f"lm_pretrain: {count_parameters(model).total:,}-parameter Llama ({cfg.model.num_layers} layers × {cfg.model.hidden_size}), "
        f"tokenizer {vocab} ids, loss = next-token CE ({'chunked' if chunked else 'full logits'}); {len(data.train)} train / "
        f"{len(data.eval)} held-out examples of {cfg.data.max_length} tokens; {acc.num_processes} process(es) on {acc.device}"
    )
    log = MetricsLog(s.run_dir / "metrics.jsonl", acc, acc.is_main_process)
    model = train_model(s, cfg, model, data, tokenizer, log, vocab, hidden, chunked)
    if not acc.is_main_process:
        return {}
    if cfg.export_dir is not None:
        target, tmp = Path(cfg.export_dir), Path(f"{cfg.export_dir}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(s.run_dir / "model" / "final", tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        logger.info("exported the model and its tokenizer to %s", target)
    rows, samples = evaluate_models(
        [("model", model.to(acc.device), None)], data, vocab, cfg.eval, tokenizer, cfg.seed
    )
    summary_file = s.run_dir / "model" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    columns = [
        ("model", "model"),
        ("perplexity", "held-out ppl"),
        ("ce", "CE nats/tok"),
        ("params", "params"),
        ("gen_tokens_per_s", "gen tok/s"),
    ]
    report = {
        "title": "lm_pretrain: causal LM trained from scratch",
        "recipe": "lm_pretrain",
        "table": {"columns": [{"key": k, "label": lbl} for k, lbl in columns], "rows": rows},
        "highlights": {
            "held-out": f"{int(rows[0]['tokens']):,} next-token targets",
            "exported to": cfg.export_dir or "-",
        },
        "sections": {"Sample generations": samples},
        "details": {"train_summary": summary, "seed": cfg.seed, "vocab_size": vocab},
    }
    write_report(s.run_dir, report)
    print_report(report, s.console)
    return report
