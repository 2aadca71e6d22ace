"""Config sections shared by the diffusion recipes (``diffusion_train``, ``diffusion_distill``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.diffusion.data import DiffusionDataset
from distil.diffusion.sampling import SamplerSpec
from distil.diffusion.schedule import BetaSchedule, PredictionType

__all__ = ["DiffusionDataSection", "ProcessSection", "SampleEvalSection"]


class DiffusionDataSection(StrictModel):
    """The images: a built-in set resized to ``image_size``, optionally cut short."""

    dataset: DiffusionDataset = DiffusionDataset.FASHION_MNIST
    image_size: int = Field(default=16, ge=4)
    train_limit: int | None = Field(default=None, ge=1, description="first N training images")
    test_limit: int | None = Field(default=None, ge=2, description="first N test images")


class ProcessSection(StrictModel):
    """The noising process and what the network predicts."""

    beta_schedule: BetaSchedule = BetaSchedule.SCALED_LINEAR  # SD 1.x: paper #1's constants fit
    prediction_type: PredictionType = PredictionType.V_PREDICTION  # few-step students need v
    num_train_timesteps: int = Field(default=1000, ge=2)
    label_dropout: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="rows trained on the null class (for CFG)"
    )


class SampleEvalSection(StrictModel):
    """How samples are scored at the end of a run (see ``docs/diffusion.md``, Metric)."""

    num_images: int = Field(default=2000, ge=2, description="images per sampler row")
    batch_size: int = Field(default=500, ge=1)
    seed: int = Field(default=0, description="initial noise, shared by every row")
    samplers: list[SamplerSpec] = Field(default_factory=list)
    grid_per_class: int = Field(default=8, ge=0, description="PNG grid columns (0: no grids)")
    kid_subsets: int = Field(default=100, ge=1)
    kid_subset_size: int = Field(default=1000, ge=2)

    @model_validator(mode="after")
    def _pinned_steps(self) -> SampleEvalSection:
        from distil.diffusion.sampling import TRUNCATED_KARRAS_SETTINGS, SamplerKind

        for i, spec in enumerate(self.samplers):
            if (
                spec.kind is SamplerKind.TRUNCATED_KARRAS
                and spec.steps not in TRUNCATED_KARRAS_SETTINGS
            ):
                raise ValueError(
                    f"samplers.{i}: truncated_karras (paper #1) is pinned for "
                    f"{sorted(TRUNCATED_KARRAS_SETTINGS)} steps, not {spec.steps}"
                )
        return self
