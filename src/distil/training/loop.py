"""The phase loop every recipe shares: written once here, called from a short loop in each recipe.

A recipe trains in *phases* (the teacher, the KD student, the no-teacher baseline, ...). Each
phase walks optimiser steps over a deterministic data order; what differs between recipes is
what one micro-batch costs (the recipe's named loss step). Everything else lives here:

- reuse of a finished phase (``final/`` with its ``COMPLETE`` marker),
- the number of steps, the batch/process/accumulation divisibility check,
- the optimiser and the learning-rate schedule,
- resume from the newest intact checkpoint (data position, RNG, optimiser) and the
  housekeeping that goes with it (metrics rows of replayed steps dropped),
- ``accelerator.prepare`` (DDP when several processes), the per-step seed that makes a resumed
  run repeat the uninterrupted one, the rank slices of each global batch, ``no_sync`` on all
  micro-batches but the last, autocast,
- the non-finite guard, agreed by all ranks, that saves the last good state before stopping,
- clipping, the optimiser step, metrics, checkpoints, the progress bar,
- the epoch-0 data-coverage audit, ``summary.json``, the export into ``final/``.

A recipe's loop then reads::

    phase = open_phase(s, "student", model=student, train=cfg.train, num_examples=n, seed=cfg.seed)
    for step in phase.steps():
        for m, ids in enumerate(step.micro_batches):
            with phase.accumulate(m):
                out = loss_step(ids, step.window_items)   # the recipe's own: what KD does
            phase.backward(out, micro=m)
        phase.optimizer_step()
    phase.finish(export=save_student)
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from distil.config.sections import Sharding, TrainSection
from distil.errors import DistilError
from distil.training.batches import global_batches, rank_slice
from distil.training.checkpoint import (
    MARKER,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from distil.training.metrics import MetricsLog, peak_memory_mb, reset_peak_memory
from distil.training.optim import build_optimizer, build_scheduler
from distil.training.progress import progress_bar, rate_text
from distil.training.session import Session
from distil.training.sharding import GatheredState, ShardedState, shard, total_norm

logger = logging.getLogger(__name__)

# Random streams of the phases: the data order of a phase is drawn from ``seed + stream`` and
# its per-step RNG from ``seed + 1_000_003 * stream + 7919 * step + rank``, so phases (and ranks)
# never share random numbers while every one of them is a pure function of the seed.
PHASE_STREAMS: dict[str, int] = {"teacher": 1, "student": 2, "baseline": 3, "model": 4}


def step_seed(seed: int, stream: int, step: int, rank: int) -> int:
    """The seed of optimiser step ``step`` on ``rank``: a resumed run repeats it exactly."""
    return seed + 1_000_003 * stream + 7919 * step + rank


class LossOutput(Protocol):
    """What a loss step returns: the scalar to differentiate and its named parts (for logs)."""

    @property
    def loss(self) -> Tensor: ...

    @property
    def components(self) -> dict[str, Tensor]: ...


def finished(s: Session, name: str) -> Path | None:
    """The ``final/`` folder of phase ``name`` when it finished before (in this run folder)."""
    final = s.run_dir / name / "final"
    return final if (final / MARKER).is_file() else None


@dataclass
class Step:
    """One optimiser step as the recipe sees it.

    Attributes:
        index: The number of optimiser steps taken before this one (0 for the first).
        epoch: The epoch this step's batch comes from.
        batch: ``(global_batch_size,)`` example indices of the whole step, all ranks.
        micro_batches: This rank's example indices of each micro-batch (``grad_accum`` of them).
        window_items: Examples per rank over the accumulation window: the normaliser that makes
            a loss summed over micro-batches a mean over the window (DDP then averages ranks).
        ends_epoch: Whether this is the last batch of its epoch.
    """

    index: int
    epoch: int
    batch: Tensor
    micro_batches: list[Tensor]
    window_items: float
    ends_epoch: bool


@dataclass
class Phase:
    """A training phase in progress. Made by :func:`open_phase`; see the module docstring."""

    session: Session
    name: str
    train: TrainSection
    trainable: nn.Module
    model: nn.Module
    optimizer: Any
    scheduler: Any
    total: int
    seed: int
    stream: int
    num_examples: int
    shuffle: bool
    unit: str
    config_key: str
    log: MetricsLog
    state: TrainState
    resumed_from: int | None = None
    extra: nn.Module | None = None
    sharded: bool = False  # FSDP: ``model`` is the sharded root; checkpoints gather full states
    _sums: dict[str, float] = field(default_factory=dict)
    _count: float = 0.0
    _seen: list[int] = field(default_factory=list)
    _seen_written: bool = False
    _position: tuple[int, int] = (0, 0)
    _epoch: int = 0
    _stepped: bool = True
    _wall: float = 0.0
    _started: float = 0.0
    _rss_at_start: float = 0.0

    @property
    def dir(self) -> Path:
        return self.session.run_dir / self.name

    @property
    def step(self) -> int:
        """Optimiser steps taken so far (after a resume: counted from the start of the phase)."""
        return self.state.step

    @property
    def accelerator(self) -> Any:
        return self.session.accelerator

    # --- the step walk ------------------------------------------------------------------------

    def _batches(self, epoch: int) -> list[Tensor]:
        return global_batches(
            self.num_examples,
            global_batch_size=self.train.batch_size,
            seed=self.seed + self.stream,
            epoch=epoch,
            drop_last=True,
            shuffle=self.shuffle,
        )

    def steps(self) -> Iterator[Step]:
        """The remaining optimiser steps, each seeded, with this rank's micro-batches.

        Raises:
            DistilError: If the recipe's loop body did not call :meth:`optimizer_step`.
        """
        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        epoch, start = self.state.epoch, self.state.batch_in_epoch
        if epoch == 0:  # resumed inside epoch 0: the batches before it are a pure function of seed
            for done in self._batches(0)[:start]:
                for micro in done.tensor_split(self.train.grad_accum):
                    self._seen.extend(rank_slice(micro, rank=rank, world_size=world).tolist())
        self._started = time.perf_counter()
        with progress_bar(acc.is_main_process) as bar:
            task = bar.add_task(self.name, total=self.total, completed=self.step, rate="", info="")
            while self.step < self.total:
                batches = self._batches(epoch)
                for b in range(start, len(batches)):
                    if self.step >= self.total:
                        break
                    torch.manual_seed(step_seed(self.seed, self.stream, self.step, rank))
                    self.model.train()
                    if self.extra is not None:
                        self.extra.train()
                    micros = [
                        rank_slice(m, rank=rank, world_size=world)
                        for m in batches[b].tensor_split(self.train.grad_accum)
                    ]
                    if epoch == 0:
                        self._seen.extend(i for m in micros for i in m.tolist())
                    self._position = (epoch, b + 1) if b + 1 < len(batches) else (epoch + 1, 0)
                    self.state, self._epoch = TrainState(self.step, epoch, b, {}), epoch
                    self._sums, self._stepped = {}, False
                    yield Step(
                        index=self.step,
                        epoch=epoch,
                        batch=batches[b],
                        micro_batches=micros,
                        window_items=len(batches[b]) / world,
                        ends_epoch=b + 1 == len(batches),
                    )
                    if not self._stepped:
                        raise DistilError(
                            f"{self.name}: the loop body must end with phase.optimizer_step()"
                        )
                    elapsed = time.perf_counter() - self._started
                    loss = sum(v for k, v in self._sums.items() if k.endswith("/weighted"))
                    bar.update(
                        task,
                        advance=1,
                        rate=rate_text(self._count, elapsed, self.unit),
                        info=f"loss {loss:.4f}",
                    )
                else:
                    if epoch == 0:
                        self._write_seen()
                    epoch, start = epoch + 1, 0
                    continue
                break
        self._wall = time.perf_counter() - self._started

    @contextlib.contextmanager
    def accumulate(self, micro: int) -> Iterator[None]:
        """Around one micro-batch's forward: ``no_sync`` (no gradient all-reduce) on every
        micro-batch but the last of the step, and the run's autocast."""
        acc = self.accelerator
        last = micro == self.train.grad_accum - 1
        if self.sharded:  # FSDP: reduce-scatter gradients on the last micro-batch only
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            sync: Any = contextlib.nullcontext()
        else:
            sync = contextlib.nullcontext() if last else acc.no_sync(self.model)
        with sync, acc.autocast():
            yield

    def backward(self, out: LossOutput, *, micro: int) -> None:
        """Stop on a non-finite loss (every rank agrees, the last good state is saved), else
        backpropagate and add the loss components to the step's sums."""
        self._stop_if_not_finite(out.loss, micro)
        self.accelerator.backward(out.loss)
        for k, v in out.components.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)

    def optimizer_step(self, *, count: float, metrics: dict[str, Any] | None = None) -> None:
        """Clip, step, log and checkpoint.

        Args:
            count: How many ``unit`` (samples, tokens) this step processed over all ranks; the
                progress bar's rate and ``summary.json`` count them.
            metrics: Extra values logged with this step (e.g. on-policy timings).
        """
        acc, world = self.accelerator, self.accelerator.num_processes
        if self.extra is not None and world > 1:  # outside DDP: average their gradients by hand
            for p in self.extra.parameters():
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        if self.sharded and self.train.max_grad_norm is not None:  # DTensor-aware clipping
            norm = torch.nn.utils.clip_grad_norm_(params, self.train.max_grad_norm)
            grad_norm = total_norm([norm])
        elif self.train.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(params, self.train.max_grad_norm))
        else:  # nothing to clip: the norm is logged, and no pass rescales the gradients
            if getattr(acc, "scaler", None) is not None:  # fp16: log the true norm
                acc.unscale_gradients()
            grad_norm = total_norm([p.grad for p in params if p.grad is not None])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state = TrainState(self.step + 1, *self._position, {})
        self._count += count
        self._stepped = True
        loss = sum(v for k, v in self._sums.items() if k.endswith("/weighted"))
        row = {
            **self._sums,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "epoch": self._epoch,
            **(metrics or {}),
        }
        self.log.log(row, step=self.step, phase=self.name)
        if self.step % self.train.checkpoint_every == 0 or self.step == self.total:
            self._save(self.dir / "checkpoints")

    def log_values(self, values: dict[str, Any]) -> None:
        """Log values at the current step (e.g. an evaluation at the end of an epoch)."""
        self.log.log(values, step=self.step, phase=self.name)

    def unwrapped(self) -> nn.Module:
        """The trained model without its DDP/compile wrapper."""
        module: nn.Module = self.accelerator.unwrap_model(self.model)
        return module

    # --- the end --------------------------------------------------------------------------------

    def finish(
        self, *, export: Callable[[Path], object], summary: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write ``summary.json`` and export the trained model into ``final/`` (main process),
        with the ``COMPLETE`` marker last; return the summary."""
        acc = self.accelerator
        if not self._seen_written:
            self._write_seen()
        wall = self._wall
        done = self.step - (self.resumed_from or 0)
        units = f"{self.unit}s"
        result = {
            "train_wall_s": wall,
            "steps": self.total,
            "resumed_at_step": self.resumed_from or 0,
            units: self._count,
            f"{units}_per_s": self._count / max(wall, 1e-9),
            "steps_per_s": done / max(wall, 1e-9),
            **peak_memory_mb(acc.device),
            "rss_at_start_mb": self._rss_at_start,
            **(summary or {}),
        }
        self.log.log(result, step=self.step, phase=self.name)
        final = self.dir / "final"
        if acc.is_main_process:
            self.session.write_json(self.dir / "summary.json", result)
            export(final)
            (final / MARKER).write_text("ok\n")
        acc.wait_for_everyone()
        return result

    # --- internals ------------------------------------------------------------------------------

    def _write_seen(self) -> None:
        rank = self.accelerator.process_index
        self.session.write_json(self.dir / f"seen-epoch0-rank{rank}.json", self._seen)
        self._seen_written = True

    def _save(self, folder: Path) -> None:
        model: Any = self.trainable
        optimizer: Any = self.optimizer
        if self.sharded:  # every process takes part in gathering the full states
            model = GatheredState(ShardedState(self.model).state_dict())
            optimizer = GatheredState(ShardedState(self.model, self.optimizer).state_dict())
        if self.accelerator.is_main_process:
            save_checkpoint(
                folder,
                model=model,
                optimizer=optimizer,
                scheduler=self.scheduler,
                state=self.state,
                keep=self.train.keep_checkpoints,
            )
        self.accelerator.wait_for_everyone()

    def full_state(self) -> dict[str, Tensor]:
        """The trained model's full state dict (the sharded root's names), on the main process;
        collective when sharded."""
        return ShardedState(self.model).state_dict() if self.sharded else self.model.state_dict()

    def _stop_if_not_finite(self, loss: Tensor, micro: int) -> None:
        acc = self.accelerator
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], device=acc.device)
        if acc.num_processes > 1:  # every rank stops together, or the others hang in all-reduce
            bad = acc.reduce(bad, reduction="sum")
        if bad.item() == 0:
            return
        last_good = self.dir / "last-good"
        self._save(last_good)
        st = self.state
        raise DistilError(
            f"{self.name}: the loss is {loss.item()} at step {st.step} (epoch {st.epoch}, "
            f"batch {st.batch_in_epoch}, micro-batch {micro}); the last good state is saved in "
            f"{last_good}. Lower {self.config_key}.lr, set {self.config_key}.max_grad_norm, or "
            "check the data for NaN/inf values"
        )


def open_phase(
    s: Session,
    name: str,
    *,
    model: nn.Module,
    train: TrainSection,
    num_examples: int,
    seed: int,
    log: MetricsLog,
    extra: nn.Module | None = None,
    forward: nn.Module | None = None,
    stream: int | None = None,
    shuffle: bool = True,
    unit: str = "sample",
    config_key: str = "train",
    blocks: list[nn.Module] | None = None,
) -> Phase:
    """Set up phase ``name``: steps, optimiser, schedule, resume and ``accelerator.prepare``.

    Args:
        s: The run session.
        name: The phase's folder under the run folder (``student``, ``baseline``, ...).
        model: The module whose parameters are trained (a student, a teacher trained here).
        train: The optimisation settings of this phase.
        num_examples: The size of the training set; batches are drawn from ``range(num_examples)``.
        seed: The run's seed; with ``stream`` it fixes the data order and per-step RNG.
        log: The run's metrics log.
        extra: Modules trained with ``model`` but not part of the exported student (feature
            projectors): optimised, clipped and checkpointed with it, kept out of DDP with their
            gradients averaged over ranks at each step.
        forward: The module that runs ``model``'s forward and is wrapped for several processes
            (e.g. a wrapper that stops at the final hidden states); ``model`` itself when None.
        stream: The phase's random stream; :data:`PHASE_STREAMS` by name when None.
        shuffle: A seeded permutation per epoch; False keeps the dataset's order.
        unit: What ``count`` counts in the progress bar and summary (sample, token, sentence).
        config_key: The config section of ``train`` (``train``, ``teacher.training``), named in
            error messages.
        blocks: With ``train.sharding: fsdp``, the modules sharded as units (transformer layers);
            the root (``forward``, else ``model``) holds the rest.

    Raises:
        DistilError: If the global batch does not split evenly over processes and
            micro-batches, or the data is smaller than one batch.
    """
    acc = s.accelerator
    world = acc.num_processes
    if train.batch_size % (world * train.grad_accum):
        raise DistilError(
            f"{config_key}.batch_size={train.batch_size} must be divisible by processes × "
            f"grad_accum = {world} × {train.grad_accum}; change {config_key}.batch_size or "
            f"{config_key}.grad_accum"
        )
    steps_per_epoch = num_examples // train.batch_size
    if steps_per_epoch == 0:
        raise DistilError(
            f"{name}: {num_examples} training examples is fewer than one batch "
            f"({config_key}.batch_size={train.batch_size})"
        )
    total = steps_per_epoch * train.epochs
    if train.max_steps is not None:
        total = min(train.max_steps, total)
    trainable = model if extra is None else nn.ModuleDict({"model": model, "extra": extra})
    sharded = train.sharding is Sharding.fsdp
    root = forward if forward is not None else model
    if sharded:  # before the optimiser: sharding replaces the parameters by DTensor shards
        if extra is not None:
            raise DistilError(
                f"{config_key}.sharding=fsdp does not shard feature projectors; use sharding=none"
            )
        shard(root, blocks or [])
    optimizer = build_optimizer(
        trainable.parameters(),
        name=train.optimizer.value,
        lr=train.lr,
        weight_decay=train.weight_decay,
    )
    scheduler = build_scheduler(
        optimizer, name=train.scheduler.value, total_steps=total, warmup_steps=train.warmup_steps
    )
    state, resumed_from = TrainState(step=0, epoch=0, batch_in_epoch=0, extra={}), None
    phase_dir = s.run_dir / name
    if s.resume and acc.is_main_process:  # saves a kill interrupted: never read, now removed
        for leftover in (phase_dir / "checkpoints").glob(".tmp-step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    ckpt = latest_checkpoint(phase_dir / "checkpoints") if s.resume else None
    if ckpt is not None:
        holders: tuple[Any, Any] = (trainable, optimizer)
        if sharded:  # the full states on file are scattered into this process's shards
            holders = (ShardedState(root), ShardedState(root, optimizer))
        state = load_checkpoint(ckpt, model=holders[0], optimizer=holders[1], scheduler=scheduler)
        resumed_from = state.step
        if acc.is_main_process:
            drop_replayed_rows(s.run_dir / "metrics.jsonl", phase=name, after_step=state.step)
            s.console.print(
                f"[bold]{name}[/bold]: resumed from {ckpt.name} (step {state.step} of {total}, "
                f"epoch {state.epoch}, batch {state.batch_in_epoch})"
            )
        acc.wait_for_everyone()
    if sharded:
        prepared = root  # sharded already: no DDP wrapper
    else:
        prepared, optimizer = acc.prepare(root, optimizer)
    if extra is not None:
        extra.to(acc.device)
    reset_peak_memory(acc.device)
    return Phase(
        session=s,
        name=name,
        train=train,
        trainable=trainable,
        model=prepared,
        optimizer=optimizer,
        scheduler=scheduler,
        total=total,
        seed=seed,
        stream=PHASE_STREAMS[name] if stream is None else stream,
        num_examples=num_examples,
        shuffle=shuffle,
        unit=unit,
        config_key=config_key,
        log=log,
        state=state,
        resumed_from=resumed_from,
        extra=extra,
        sharded=sharded,
        _rss_at_start=peak_memory_mb(acc.device).get("rss_mb", 0.0),
    )


def drop_replayed_rows(path: Path, *, phase: str, after_step: int) -> int:
    """Remove the metrics rows of ``phase`` logged after ``after_step``: a resumed run replays
    those steps and logs them again, and the curves must not fold back. Returns how many."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from the kill
            dropped += 1
            continue
        if row.get("phase") == phase and int(row.get("step", 0)) > after_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped
