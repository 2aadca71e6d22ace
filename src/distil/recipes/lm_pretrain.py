"""Recipe ``lm_pretrain``: train a causal LM from scratch with next-token cross-entropy.

It makes the built-in teacher: a byte-level BPE tokenizer trained on the CPython standard-library
corpus, a Llama-style model of a few million parameters trained on it, and a self-contained
Hugging Face folder (config, safetensors, tokenizer) exported to ``export_dir`` that ``lm_kd``
loads as ``teacher.hf``. The loop is ``lm_kd``'s with no teacher.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from distil.config.base import StrictModel
from distil.config.sections import RunSection, SchedulerName, TrainSection
from distil.data.corpus import PadTokenPolicy, train_bpe_tokenizer
from distil.errors import DistilError
from distil.evaluation.report import print_report, write_report
from distil.losses.chunked import should_use_chunked_loss
from distil.models.lm import count_parameters
from distil.models.vocab import load_tokenizer_folder, tokenizer_vocab_size
from distil.recipes.lm_kd import evaluate_models, train_phase
from distil.recipes.lm_setup import (
    EvalSection,
    LMDataSection,
    LMSpecSection,
    check_model_fits,
    data_files,
    load_lm_data,
    loss_chunk_rows,
)
from distil.teachers import hidden_path_matches
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
    data: LMDataSection = LMDataSection(builtin="stdlib")
    model: LMSpecSection = LMSpecSection(
        num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024
    )
    train: TrainSection = TrainSection(
        epochs=1,
        max_steps=500,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.1,
        scheduler=SchedulerName.cosine,
        warmup_steps=25,
        max_grad_norm=1.0,
        checkpoint_every=50,
    )
    eval: EvalSection = EvalSection(baseline=False)
    export_dir: str | None = Field(
        default="runs/lm-teacher", description="copy the trained model + tokenizer here"
    )


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


def main(cfg: Config, s: Session) -> dict[str, Any]:
    """Train the model, evaluate it on held-out data, export it, and return the report."""
    acc = s.accelerator
    tokenizer = _tokenizer(cfg, s)
    model = cfg.model.build(tokenizer, seed=cfg.seed)
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
    model = train_phase(
        "model",
        s,
        model,
        data,
        cfg.train,
        seed=cfg.seed,
        shuffle=cfg.data.shuffle,
        log=log,
        vocab_size=vocab,
        hidden=hidden,
        tokenizer=tokenizer,
        chunked=chunked,
        chunk_rows=loss_chunk_rows(None, vocab, fused=chunked, device=acc.device),
    )
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
