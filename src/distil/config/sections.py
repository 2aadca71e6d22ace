"""Config sections shared by recipes. Each default lives here and nowhere else."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import Field, field_validator, model_validator

from distil.config.base import StrictModel


class OptimizerName(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class SchedulerName(str, Enum):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"


class DeviceName(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Sharding(str, Enum):
    """How processes hold the trained model: ``none`` (a full replica each, DDP) or ``fsdp``
    (each a 1/N shard of parameters, gradients and optimiser state; PyTorch FSDP2)."""

    none = "none"
    fsdp = "fsdp"


class MixedPrecision(str, Enum):
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


# Accelerate tracker name -> the packages that provide it (any one is enough).
TRACKER_PACKAGES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "trackio": ("trackio",),
    "swanlab": ("swanlab",),
}


class RunSection(StrictModel):
    """Where the run folder goes and what it is called (``output_dir/name-timestamp``)."""

    output_dir: str = "runs"
    name: str | None = Field(default=None, description="defaults to the recipe name")
    cpu_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per process (None: torch's default)"
    )
    log_with: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Accelerate trackers: tensorboard, wandb, mlflow (the last two need their package)",
    )

    @field_validator("log_with")
    @classmethod
    def _trackers_available(cls, value: list[str]) -> list[str]:
        # Accelerate drops a tracker whose package is missing with a debug message only, and
        # fails deep inside for an unknown name: say it here, at validation time, instead.
        import importlib.util

        for name in value:
            if name not in TRACKER_PACKAGES:
                raise ValueError(f"unknown tracker {name!r}; known: {sorted(TRACKER_PACKAGES)}")
            packages = TRACKER_PACKAGES[name]
            if not any(importlib.util.find_spec(p) is not None for p in packages):
                raise ValueError(
                    f"tracker {name!r} needs the {packages[0]!r} package, which is not installed: "
                    f"pip install {packages[0]}, or remove it from run.log_with"
                )
        return value


class TrainSection(StrictModel):
    """The optimisation loop. ``batch_size`` is the global batch, split across processes."""

    epochs: int = Field(default=10, ge=1)
    max_steps: int | None = Field(
        default=None, ge=1, description="stop after this many optimiser steps"
    )
    batch_size: int = Field(default=64, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: OptimizerName = OptimizerName.adamw
    scheduler: SchedulerName = SchedulerName.cosine
    warmup_steps: int = Field(default=0, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    checkpoint_every: int = Field(
        default=100, ge=1, description="optimiser steps between checkpoints"
    )
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every_epoch: bool = True
    device: DeviceName = DeviceName.auto
    mixed_precision: MixedPrecision = MixedPrecision.no
    sharding: Sharding = Field(
        default=Sharding.none,
        description="fsdp: shard the trained model over the processes (torchrun); checkpoints "
        "stay full, so a run resumes with another number of processes",
    )


class ModelSpec(StrictModel):
    """Exactly one of ``zoo`` (built-in name), ``hf`` (local Hugging Face folder) or
    ``factory`` (``package.module:function`` returning an ``nn.Module``)."""

    zoo: str | None = None
    hf: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        given = [k for k in ("zoo", "hf", "factory") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of zoo, hf, factory (got {given or 'none'})")
        return self


def require_unsharded(train: TrainSection, key: str, recipe: str) -> None:
    """Refuse ``sharding: fsdp`` in a recipe that does not shard its model (yet), by key."""
    if train.sharding is Sharding.fsdp:
        raise ValueError(f"{key}.sharding: {recipe} trains replicas (DDP); fsdp is for lm_kd")
