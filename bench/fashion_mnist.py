"""Benchmark: CNN distillation on Fashion-MNIST with distil, a hand-written loop, torchdistill and TextBrewer.

Issue 6. A ~1M-parameter CNN teacher (distil zoo ``cnn``, channels 32-64-128-256-256, trained once by
distil) and a 16x smaller CNN student (channels 16-32-64-64). For each seed the same student (same
initial weights, same batches in the same order, same AdamW + cosine schedule, same objective
``(1-w)·CE + w·T²·KL(softmax(t/T) ‖ softmax(s/T))`` with w=0.5, T=2) is trained by:

* ``distil scratch``: the baseline phase of the distil logit-KD run (CE only, its own batch order);
* ``distil logit KD``: ``distil run classifier_kd`` with the teacher's checkpoint;
* ``distil logit+feature KD``: the same plus one ``kd.features`` term;
* ``distil logit KD (teacher cache)``: ``teacher.cache.path=...``, the teacher's logits computed once per run
  (the cache-writing time is part of the wall);
* ``pytorch-minimal``: a hand-written loop, the reference for time ratios;
* ``torchdistill``: a ``DistillationBox`` with ``KDLoss`` (alpha = 1-w, beta = w);
* ``TextBrewer``: ``BasicDistiller`` with soft-CE KD (``kd_loss_weight = w·T²``, ``hard_label_weight = 1-w``),
  which has the same gradient as the reference objective.

    python bench/fashion_mnist.py --seeds 0,1,2 --epochs 3 --threads 2

Each tool runs in a fresh process, tools interleaved within each seed. Timed: the student training loop
only (distil: ``train_wall_s`` of ``<run>/student/summary.json``). Every student is evaluated here with the
same code on the 10k test set. One JSON line per run goes to ``bench/results/fashion_mnist.jsonl`` as it
finishes, and the Markdown table to ``bench/results/fashion_mnist.md``. Peers run with
``bench/.venv-peers/bin/python`` (textbrewer 0.2.1, torchdistill 1.1.5 next to the same torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def rel(text: str) -> str:
    """Paths in recorded text relative to the repository, never this machine's."""
    return text.replace(str(ROOT) + "/", "")


PEERS_PY = BENCH / ".venv-peers" / "bin" / "python"
TEACHER_CH = [32, 64, 128, 256, 256]
STUDENT_CH = [16, 32, 64, 64]
BATCH, LR, WD, KD_W, KD_T = 128, 3e-3, 0.01, 0.5, 2.0
# distil's PHASES["student"] and PHASES["baseline"], and the seed offset of classifier_kd's fresh_student
STUDENT_PHASE, SCRATCH_PHASE, INIT_OFFSET = 2, 3, 17
FEATURES = "[{student: stages.2, teacher: stages.2, loss: cwd, weight: 1.0, kd_temperature: 1.0}]"
TOOLS = ["distil", "minimal", "torchdistill", "textbrewer", "distil-features", "distil-cache"]
NAMES = {
    "distil": "distil logit KD",
    "distil-scratch": "distil scratch (CE only)",
    "distil-features": "distil logit+feature KD",
    "distil-cache": "distil logit KD (teacher cache)",
    "minimal": "pytorch-minimal",
    "torchdistill": "torchdistill DistillationBox+KDLoss",
    "textbrewer": "TextBrewer BasicDistiller",
}
TEACHER_CMD = [
    "data.source={builtin: fashion-mnist}",
    "teacher.model.zoo=cnn",
    f"teacher.model.kwargs={{channels: {TEACHER_CH}}}",
    "teacher.train=true",
    "teacher.training.epochs=4",
    "teacher.training.batch_size=128",
    "teacher.training.lr=0.003",
    "teacher.training.weight_decay=0.01",
    "student.model.zoo=cnn",
    f"student.model.kwargs={{channels: {STUDENT_CH}}}",
    "train.max_steps=1",
    "train.batch_size=128",
    "eval.baseline=false",
    "run.log_with=[]",
    "run.cpu_threads=1",
    "seed=0",
]


# ----------------------------------------------------------------------------- shared pieces


def load_data(
    train_limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fashion-MNIST through distil's loader; ``train_limit`` keeps the subset distil's ``data.train_limit`` keeps."""
    from distil.data.classification import load_fashion_mnist

    data = load_fashion_mnist(0.25, 0)
    train = data.train
    if train_limit is not None and train_limit < len(
        train.labels
    ):  # classifier_kd.load_data with split_seed 0
        keep = (
            torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))[
                :train_limit
            ]
            .sort()
            .values
        )
        train = train.subset(keep.numpy())

    def tensor(
        images: Any,
    ) -> torch.Tensor:  # as distil's zoo encoder builds it: the strides (memory format) match too
        return torch.from_numpy(np.ascontiguousarray(images))

    return (
        tensor(train.images),
        torch.from_numpy(train.labels),
        tensor(data.test.images),
        torch.from_numpy(data.test.labels),
    )


def build(channels: list[int]) -> torch.nn.Module:
    """The distil zoo CNN (distil's own class, so a peer's student equals distil's at the same seed)."""
    from distil.models.classifier import SmallCNN

    return SmallCNN(1, 10, channels=channels)


def fresh_student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed + INIT_OFFSET)  # what classifier_kd's fresh_student does before building
    return build(STUDENT_CH)


def load_teacher(path: Path) -> torch.nn.Module:
    from distil.models.classifier import load_weights

    teacher = build(TEACHER_CH)
    load_weights(teacher, path)
    return teacher.eval().requires_grad_(False)


def cosine(total: int):
    import math

    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))


class DistilOrder(torch.utils.data.Sampler):
    """Yields distil's batches of example indices for the student phase; each ``iter()`` is the next epoch."""

    def __init__(self, dataset: Any = None, *, n: int, seed: int, batch_size: int = BATCH) -> None:
        self.n, self.seed, self.batch_size, self.epoch = n, seed, batch_size, 0

    def __iter__(self):
        from distil.training.batches import global_batches

        batches = global_batches(
            self.n,
            global_batch_size=self.batch_size,
            seed=self.seed + STUDENT_PHASE,
            epoch=self.epoch,
            drop_last=True,
        )
        self.epoch += 1
        yield from batches

    def __len__(self) -> int:
        return self.n // self.batch_size


class Indexed(torch.utils.data.Dataset):
    """``ds[index_tensor]`` is a whole batch: used with ``batch_size=None`` so a DataLoader does no per-item collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __getitem__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return len(self.y)


def reference_loss(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch.nn.functional as F

    ce = F.cross_entropy(s, y)
    kl = F.kl_div(
        F.log_softmax(s / KD_T, -1),
        F.log_softmax(t / KD_T, -1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - KD_W) * ce + KD_W * KD_T**2 * kl, ce


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- peer runners (child processes)


def run_minimal(x, y, teacher, student, seed: int, epochs: int) -> dict[str, Any]:
    """The practical floor: teacher under no_grad, student forward/backward, the reference loss, AdamW, LambdaLR."""
    from distil.training.batches import global_batches

    total = len(y) // BATCH * epochs
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(total))
    losses, ces = [], []
    student.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        for idx in global_batches(
            len(y), global_batch_size=BATCH, seed=seed + STUDENT_PHASE, epoch=epoch, drop_last=True
        ):
            xb, yb = x[idx], y[idx]
            with torch.no_grad():
                t = teacher(xb)
            loss, ce = reference_loss(student(xb), t, yb)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            ces.append(ce.detach())
    wall = time.perf_counter() - start
    return {"wall_s": wall, "losses": [float(v) for v in losses], "ces": [float(v) for v in ces]}


def install_torchvision_stub() -> bool:
    """torchdistill 1.1.5 imports torchvision's dataset/model registries at import time; nothing used here needs them."""
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        pass

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision is a stub in this benchmark")

    def module(name: str, **attrs: Any) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__path__ = []  # type: ignore[attr-defined]
        sys.modules[name] = m
        return m

    tv = module("torchvision")
    tv.datasets = module("torchvision.datasets")
    tv.models = module("torchvision.models")
    for sub in ("detection", "segmentation", "quantization"):
        setattr(tv.models, sub, module(f"torchvision.models.{sub}"))
    tv.models.resnet = module("torchvision.models.resnet", BasicBlock=refuse, conv1x1=refuse)
    tv.models.densenet = module(
        "torchvision.models.densenet", _DenseBlock=refuse, _Transition=refuse
    )
    return True


def run_torchdistill(x, y, teacher, student, seed: int, epochs: int) -> dict[str, Any]:
    """torchdistill 1.1.5: DistillationBox, KDLoss(alpha=1-w, beta=w, T), AdamW + per-step LambdaLR, its own epoch loop."""
    import logging

    stubbed = install_torchvision_stub()
    from torchdistill.core.distillation import get_distillation_box

    logging.getLogger("torchdistill").setLevel(logging.WARNING)
    total = len(y) // BATCH * epochs
    config = {
        "num_epochs": epochs,
        "train_data_loader": {
            "dataset_id": "train",
            "sampler": {"class_or_func": DistilOrder, "kwargs": {"n": len(y), "seed": seed}},
            "kwargs": {"batch_size": None, "num_workers": 0},  # the sampler yields whole batches
        },
        "teacher": {
            "forward_proc": "forward_batch_only",
            "sequential": [],
            "forward_hook": {"input": [], "output": []},
            "wrapper": None,
            "requires_grad": False,
        },
        "student": {
            "forward_proc": "forward_batch_only",
            "adaptations": None,
            "sequential": [],
            "frozen_modules": [],
            "forward_hook": {"input": [], "output": []},
            "wrapper": None,
            "requires_grad": True,
        },
        "optimizer": {"key": "AdamW", "kwargs": {"lr": LR, "weight_decay": WD}},
        "scheduler": {
            "key": "LambdaLR",
            "kwargs": {"lr_lambda": cosine(total)},
            "scheduling_step": 1,
        },
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {
                "sub_terms": {
                    "kd": {
                        "weight": 1.0,
                        "criterion": {
                            "key": "KDLoss",
                            "kwargs": {
                                "student_module_path": ".",
                                "student_module_io": "output",
                                "teacher_module_path": ".",
                                "teacher_module_io": "output",
                                "temperature": KD_T,
                                "alpha": 1 - KD_W,
                                "beta": KD_W,
                                "reduction": "batchmean",
                            },
                        },
                    }
                }
            },
        },
    }
    box = get_distillation_box(
        teacher,
        student,
        {"train": Indexed(x, y)},
        config,
        torch.device("cpu"),
        None,
        False,
        lr_factor=1,
    )
    losses = []
    start = time.perf_counter()
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss)
            losses.append(loss.detach())
        box.post_epoch_process()
    wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "losses": [float(v) for v in losses],
        "torchvision": "stub" if stubbed else "real",
    }


def run_textbrewer(x, y, teacher, student, seed: int, epochs: int) -> dict[str, Any]:
    """TextBrewer 0.2.1 BasicDistiller: soft-CE KD weighted w·T², hard CE (from the student adaptor) weighted 1-w."""
    import tempfile

    import torch.nn.functional as F

    os.environ.setdefault("TQDM_DISABLE", "1")
    from textbrewer import BasicDistiller, DistillationConfig, TrainingConfig

    class TakesLabels(torch.nn.Module):  # TextBrewer calls model(*batch) with batch = (x, y)
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, xb: torch.Tensor, yb: torch.Tensor | None = None) -> torch.Tensor:
            return self.net(xb)

    entropies: list[
        torch.Tensor
    ] = []  # H(teacher_T) per batch: TextBrewer's soft CE = KL + H, logged to compare losses

    def adaptor_t(batch: Any, out: torch.Tensor) -> dict[str, Any]:
        lp = F.log_softmax(out / KD_T, -1)
        entropies.append(-(lp.exp() * lp).sum(-1).mean())
        return {"logits": out}

    def adaptor_s(batch: Any, out: torch.Tensor) -> dict[str, Any]:
        return {"logits": out, "losses": F.cross_entropy(out, batch[1])}

    total = len(y) // BATCH * epochs
    loader = torch.utils.data.DataLoader(
        Indexed(x, y), batch_size=None, sampler=DistilOrder(n=len(y), seed=seed)
    )
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WD)
    losses, ces = [], []
    with tempfile.TemporaryDirectory() as out_dir:
        tcfg = TrainingConfig(
            device="cpu",
            log_dir=None,
            output_dir=out_dir,
            ckpt_frequency=1,
            ckpt_epoch_frequency=epochs,
        )
        dcfg = DistillationConfig(
            temperature=KD_T,
            kd_loss_type="ce",
            kd_loss_weight=KD_W * KD_T**2,
            hard_label_weight=1 - KD_W,
        )
        distiller = BasicDistiller(
            tcfg, dcfg, TakesLabels(teacher), TakesLabels(student), adaptor_t, adaptor_s
        )

        def write_loss(
            total_loss: torch.Tensor, writer_step: int, losses_dict: dict | None = None
        ) -> None:
            losses.append(total_loss.detach())  # TextBrewer's own hook, called once per step
            ces.append(losses_dict["unweighted_hard_label_loss"].detach())

        distiller.write_loss = write_loss
        start = time.perf_counter()
        distiller.train(
            opt,
            loader,
            num_epochs=epochs,
            scheduler_class=torch.optim.lr_scheduler.LambdaLR,
            scheduler_args={"lr_lambda": cosine(total)},
            max_grad_norm=-1.0,
        )
        wall = time.perf_counter() - start
    offset = [KD_W * KD_T**2 * float(h) for h in entropies]
    return {
        "wall_s": wall,
        "losses": [float(v) - o for v, o in zip(losses, offset, strict=True)],
        "reported_losses_head": [float(v) for v in losses[:3]],
        "ces": [float(v) for v in ces],
    }


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    x, y, _, _ = load_data(args.train_limit)
    teacher = load_teacher(Path(args.teacher))
    student = fresh_student(args.seed)
    fn = {"minimal": run_minimal, "torchdistill": run_torchdistill, "textbrewer": run_textbrewer}[
        args.child
    ]
    res = fn(x, y, teacher, student, args.seed, args.epochs)
    from safetensors.torch import save_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in student.state_dict().items()},
        str(out / "model.safetensors"),
    )
    res.update(
        samples=len(y) // BATCH * args.epochs * BATCH,
        peak_rss_mb=peak_rss_mb(),
        threads=torch.get_num_threads(),
    )
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- the harness


def distil_overrides(
    seed: int, epochs: int, threads: int, teacher: Path, train_limit: int | None
) -> list[str]:
    return [
        *([f"data.train_limit={train_limit}"] if train_limit else []),
        "data.source={builtin: fashion-mnist}",
        "teacher.model.zoo=cnn",
        f"teacher.model.kwargs={{channels: {TEACHER_CH}}}",
        f"teacher.model.weights={teacher}",
        "teacher.train=false",
        "student.model.zoo=cnn",
        f"student.model.kwargs={{channels: {STUDENT_CH}}}",
        f"train.epochs={epochs}",
        f"train.batch_size={BATCH}",
        f"train.lr={LR}",
        f"train.weight_decay={WD}",
        "train.optimizer=adamw",
        "train.scheduler=cosine",
        "train.warmup_steps=0",
        "train.checkpoint_every=100000",
        "train.eval_every_epoch=false",
        f"kd.kd_weight={KD_W}",
        f"kd.kd_temperature={KD_T}",
        "kd.divergence=forward_kl",
        f"seed={seed}",
        f"run.cpu_threads={threads}",
        "run.log_with=[]",
    ]


def _phase_losses(run: Path, phase: str) -> tuple[list[float], list[float]]:
    rows = [
        json.loads(line)
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rows = [r for r in rows if r.get("phase") == phase and "hard_ce/raw" in r]
    total = [sum(v for k, v in r.items() if k.endswith("/weighted")) for r in rows]
    return total, [r["hard_ce/raw"] for r in rows]


def run_distil(
    tool: str,
    seed: int,
    epochs: int,
    threads: int,
    teacher: Path,
    out: Path,
    train_limit: int | None,
) -> list[dict[str, Any]]:
    extra = {
        "distil": ["eval.baseline=true"],
        "distil-features": ["eval.baseline=false", f"kd.features={FEATURES}"],
        "distil-cache": ["eval.baseline=false", f"teacher.cache.path={out / 'teacher-cache'}"],
    }[tool]
    cmd = [
        sys.executable,
        "-m",
        "distil",
        "run",
        "classifier_kd",
        *distil_overrides(seed, epochs, threads, teacher, train_limit),
        *extra,
        "--run-dir",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    results = []
    for phase in ["student", "baseline"] if tool == "distil" else ["student"]:
        summary = json.loads((out / phase / "summary.json").read_text())
        losses, ces = _phase_losses(out, phase)
        wall, extra_s = summary["train_wall_s"], 0.0
        if tool == "distil-cache":  # the cache is written in this run: its time is part of the cost
            extra_s = json.loads((out / "teacher-cache.json").read_text())["seconds"]
        results.append(
            {
                "tool": "distil-scratch" if phase == "baseline" else tool,
                "wall_s": wall + extra_s,
                "train_loop_s": wall,
                "cache_write_s": extra_s if tool == "distil-cache" else None,
                "samples": summary["samples"],
                "peak_rss_mb": summary["peak_rss_mb"],
                "losses": losses,
                "ces": ces,
                "threads": threads,
                "weights": rel(str(out / phase / "final" / "model.safetensors")),
                "command": rel(
                    "distil run classifier_kd "
                    + " ".join(f"'{a}'" if " " in a else a for a in cmd[5:])
                ),
            }
        )
    return results


def run_peer(
    tool: str,
    seed: int,
    epochs: int,
    threads: int,
    teacher: Path,
    out: Path,
    train_limit: int | None,
) -> list[dict[str, Any]]:
    py = sys.executable if tool == "minimal" else str(PEERS_PY)
    cmd = [
        py,
        __file__,
        "--child",
        tool,
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--threads",
        str(threads),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        *(["--train-limit", str(train_limit)] if train_limit else []),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{tool} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(line.removeprefix("RESULT "))
    res.update(
        tool=tool,
        weights=rel(str(out / "model.safetensors")),
        train_loop_s=res["wall_s"],
        command=f"bench/fashion_mnist.py --child {tool} (peers venv)"
        if tool != "minimal"
        else "bench/fashion_mnist.py --child minimal",
    )
    return [res]


class LoadSampler:
    """Samples the 1-minute load average every few seconds while a run goes."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.values, self._stop = every, [os.getloadavg()[0]], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.values.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.values.append(os.getloadavg()[0])


def test_accuracy(weights: Path, channels: list[int], x: torch.Tensor, y: torch.Tensor) -> float:
    """The one evaluation of every model: argmax accuracy on the 10k test images, eval mode, batches of 1000."""
    from distil.models.classifier import load_weights

    model = build(channels)
    load_weights(model, weights)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(-1) for xb in x.split(1000)])
    return float((pred == y).float().mean())


def ensure_teacher(work: Path, threads: int) -> Path:
    path = work / "teacher-run" / "teacher" / "final" / "model.safetensors"
    if not path.is_file():
        print(
            f"training the teacher once: {work / 'teacher-run'} (~10 min on one thread)", flush=True
        )
        cmd = [
            sys.executable,
            "-m",
            "distil",
            "run",
            "classifier_kd",
            *TEACHER_CMD,
            "--run-dir",
            str(work / "teacher-run"),
        ]
        subprocess.run(
            cmd,
            check=True,
            cwd=ROOT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
        )
    return path


def spread(values: list[float]) -> str:
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * sd:.2f}"


def make_table(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["tool"], []).append(r)
    ref = statistics.median(r["samples_per_s"] for r in by["minimal"]) if "minimal" in by else None
    order = [
        "distil-scratch",
        "distil",
        "distil-features",
        "distil-cache",
        "minimal",
        "torchdistill",
        "textbrewer",
    ]
    lines = [
        "| row | seeds | test acc % (mean ± sd) | per-seed acc % | samples/s (median) | vs pytorch-minimal | train walls s (per seed) | first loss | final loss (last 10) | max abs loss diff vs distil | peak RSS MB | load 1m (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tool in [t for t in order if t in by]:
        rs = sorted(by[tool], key=lambda r: r["seed"])
        sps = statistics.median(r["samples_per_s"] for r in rs)
        diffs = [
            r["max_abs_loss_diff_vs_distil"]
            for r in rs
            if r.get("max_abs_loss_diff_vs_distil") is not None
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    NAMES[tool],
                    str(len(rs)),
                    spread([r["test_accuracy"] for r in rs]),
                    ", ".join(f"{100 * r['test_accuracy']:.2f}" for r in rs),
                    f"{sps:,.0f}",
                    f"{sps / ref:.2f}x" if ref else "-",
                    ", ".join(f"{r['wall_s']:.0f}" for r in rs),
                    f"{statistics.fmean(r['first_loss'] for r in rs):.4f}",
                    f"{statistics.fmean(r['final_loss'] for r in rs):.4f}",
                    f"{max(diffs):.1e}" if diffs else "-",
                    f"{statistics.median(r['peak_rss_mb'] for r in rs):,.0f}",
                    f"{statistics.fmean(r['load_1m_mean'] for r in rs):.1f}",
                ]
            )
            + " |"
        )
    lines.append(
        f"| teacher (distil, 4 epochs) | 1 | {100 * meta['teacher_accuracy']:.2f} | - | - | - | - | - | - | - | - | - |"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=2, help="torch/OpenMP threads of every measured run"
    )
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--work", default=str(BENCH / "artifacts" / "fashion_mnist"))
    ap.add_argument("--results", default=str(BENCH / "results" / "fashion_mnist.jsonl"))
    ap.add_argument("--teacher", help="teacher weights (default: train once into WORK/teacher-run)")
    ap.add_argument(
        "--table-only", action="store_true", help="rebuild the table from the results file"
    )
    ap.add_argument("--child", choices=["minimal", "torchdistill", "textbrewer"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument(
        "--train-limit",
        type=int,
        help="train on distil's data.train_limit subset (pilots and smoke tests)",
    )
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(1)  # the harness only evaluates; measured runs are separate processes
    work, results = Path(args.work), Path(args.results)
    teacher = (
        Path(args.teacher).resolve()
        if args.teacher
        else ensure_teacher(work, args.threads).resolve()
    )
    _, _, x_test, y_test = load_data()
    meta = {
        "teacher_accuracy": test_accuracy(teacher, TEACHER_CH, x_test, y_test),
        "teacher_params": sum(p.numel() for p in build(TEACHER_CH).parameters()),
        "student_params": sum(p.numel() for p in build(STUDENT_CH).parameters()),
    }
    key = f"epochs{args.epochs}-threads{args.threads}" + (
        f"-limit{args.train_limit}" if args.train_limit else ""
    )
    tools = args.tools.split(",")
    if not args.table_only:
        results.parent.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(int(s) for s in args.seeds.split(",")):
            ref_losses: list[float] | None = None
            rotated = (
                tools[i % len(tools) :] + tools[: i % len(tools)]
            )  # spread the machine's drift over the tools
            for tool in sorted(
                rotated, key=lambda t: t != "distil"
            ):  # distil first: the parity reference of the seed
                out = work / "out" / key / f"seed{seed}" / tool
                shutil.rmtree(
                    out, ignore_errors=True
                )  # distil refuses a run folder that holds a run
                with LoadSampler() as load:
                    runner = run_distil if tool.startswith("distil") else run_peer
                    recs = runner(
                        tool, seed, args.epochs, args.threads, teacher, out, args.train_limit
                    )
                for r in recs:
                    losses = r.pop("losses")
                    ces = r.pop("ces", None)
                    (out / f"{r['tool']}-losses.json").write_text(
                        json.dumps({"losses": losses, "ces": ces})
                    )
                    if r["tool"] == "distil":
                        ref_losses = losses
                    same_math = r["tool"] in (
                        "distil",
                        "minimal",
                        "torchdistill",
                        "textbrewer",
                        "distil-cache",
                    )
                    diff = (
                        max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
                        if same_math and ref_losses is not None and len(losses) == len(ref_losses)
                        else None
                    )
                    rec = {
                        "tool": r["tool"],
                        "name": NAMES[r["tool"]],
                        "seed": seed,
                        "epochs": args.epochs,
                        "key": key,
                        "test_accuracy": test_accuracy(
                            ROOT / r["weights"], STUDENT_CH, x_test, y_test
                        ),
                        "wall_s": round(r["wall_s"], 2),
                        "train_loop_s": round(r["train_loop_s"], 2),
                        "cache_write_s": r.get("cache_write_s"),
                        "samples": r["samples"],
                        "samples_per_s": round(r["samples"] / r["wall_s"], 1),
                        "first_loss": losses[0],
                        "final_loss": statistics.fmean(losses[-10:]),
                        "steps": len(losses),
                        "first_ce": ces[0] if ces else None,
                        "final_ce": statistics.fmean(ces[-10:]) if ces else None,
                        "max_abs_loss_diff_vs_distil": diff,
                        "peak_rss_mb": round(r["peak_rss_mb"], 1),
                        "threads": r.get("threads"),
                        "load_1m_mean": round(statistics.fmean(load.values), 2),
                        "load_1m_max": round(max(load.values), 2),
                        "command": r["command"],
                        "teacher_accuracy": meta["teacher_accuracy"],
                        "teacher_params": meta["teacher_params"],
                        "student_params": meta["student_params"],
                        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    if "reported_losses_head" in r:
                        rec["textbrewer_reported_first_loss"] = r["reported_losses_head"][0]
                    print(json.dumps(rec), flush=True)
                    with results.open(
                        "a"
                    ) as f:  # written at once: a killed benchmark keeps its runs
                        f.write(json.dumps(rec) + "\n")
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    records = [r for r in records if r.get("key") == key]
    limit = (
        f"{args.train_limit:,} of the 60,000 training images (distil's data.train_limit subset)"
        if args.train_limit
        else "all 60,000 training images"
    )
    md = [
        f"# Fashion-MNIST distillation ({key})",
        "",
        "Harness command: `python bench/fashion_mnist.py "
        + " ".join(a for a in sys.argv[1:] if a != "--table-only")
        + "`",
        "",
        f"Student training: {args.epochs} epoch(s) over {limit}, batch {BATCH}, AdamW lr {LR} wd {WD}, cosine to 0, "
        f"(1-w)·CE + w·T²·KL with w={KD_W}, T={KD_T}; {args.threads} torch threads per run; every student evaluated on the 10k test set.",
        f"Teacher: distil zoo cnn {TEACHER_CH}, {meta['teacher_params']:,} params, test accuracy "
        f"{100 * meta['teacher_accuracy']:.2f}%. Student: cnn {STUDENT_CH}, {meta['student_params']:,} params "
        f"({meta['teacher_params'] / meta['student_params']:.1f}x smaller).",
        "",
        make_table(records, meta),
        "",
        "Teacher command (trained once; ~18 min on one busy thread): `distil run classifier_kd "
        + " ".join(f"'{c}'" if " " in c else c for c in TEACHER_CMD)
        + " --run-dir bench/artifacts/fashion_mnist/teacher-run`",
        "",
        "Timing noise: the machine is shared (see the load column); the same tool's wall varies by 2x or more "
        "between runs, so read ratios as medians of interleaved runs, not as precise numbers.",
        "",
        "Per run (in run order):",
        "",
        "| seed | row | test acc % | train wall s | samples/s | first loss | final loss | first CE | final CE | load 1m mean (max) | finished (UTC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ce0 = "-" if r.get("first_ce") is None else f"{r['first_ce']:.5f}"
        ce1 = "-" if r.get("final_ce") is None else f"{r['final_ce']:.5f}"
        md.append(
            f"| {r['seed']} | {NAMES[r['tool']]} | {100 * r['test_accuracy']:.2f} | {r['wall_s']:.1f}"
            + (
                f" (cache {r['cache_write_s']:.1f} + loop {r['train_loop_s']:.1f})"
                if r.get("cache_write_s")
                else ""
            )
            + f" | {r['samples_per_s']:,.0f} | {r['first_loss']:.5f} | {r['final_loss']:.5f} | {ce0} | {ce1} | "
            f"{r['load_1m_mean']:.1f} ({r['load_1m_max']:.1f}) | {r['time_utc'][11:19]} |"
        )
    md += [
        "",
        "distil commands of seed 0 (the peers are `bench/fashion_mnist.py --child TOOL`, run by the harness):",
        "",
    ]
    for r in records:
        if r["seed"] == records[0]["seed"] and r["tool"] in (
            "distil",
            "distil-features",
            "distil-cache",
        ):
            md += [
                f"* {NAMES[r['tool']]}:",
                "",
                "  ```bash",
                "  " + rel(r["command"]),
                "  ```",
                "",
            ]
    md_path = results.with_suffix(".md")
    md_path.write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
