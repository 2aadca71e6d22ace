"""The forward (noising) process of a discrete-time diffusion model and the conversions between
what a network predicts (ε, v or x₀) and the clean image / noise pair.

Conventions (Ho et al. 2020; Salimans & Ho 2022 for v):

* ``x_t = α_t·x₀ + σ_t·ε`` with ``α_t = sqrt(ᾱ_t)``, ``σ_t = sqrt(1 − ᾱ_t)`` (variance preserving);
* ``v = α_t·ε − σ_t·x₀``; so ``x₀ = α_t·x_t − σ_t·v`` and ``ε = σ_t·x_t + α_t·v``;
* timesteps are the training indices ``0 .. T−1`` as floats; fractional timesteps read ᾱ by
  linear interpolation between the neighbouring indices (the rule of paper #1's code), and the
  timestep :data:`CLEAN` (``−1``) means clean data, ``ᾱ = 1`` (diffusers' ``set_alpha_to_one``),
  the target of a sampler's last step;
* the VE ("k-diffusion") view of the same process: ``σ_VE = σ_t/α_t`` and
  ``x_VE = x_t/α_t = x₀ + σ_VE·ε``.

The ᾱ tables come from diffusers' own scheduler code so a sampler here and a diffusers scheduler
read exactly the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CLEAN",
    "BetaSchedule",
    "NoiseSchedule",
    "PredictionType",
    "add_noise",
    "expand_like",
    "make_noise_schedule",
    "prediction_from_x0_eps",
    "x0_eps_from_prediction",
]

CLEAN = -1.0
"""The timestep of clean data (ᾱ = 1): where the last step of a sampler lands."""


class BetaSchedule(str, Enum):
    """The variance schedules a model can be trained with (diffusers' names in the docstrings)."""

    LINEAR = "linear"  # DDPM: β linear from 1e-4 to 0.02 ("linear")
    SCALED_LINEAR = "scaled_linear"  # Stable Diffusion 1.x: √β linear from 0.00085 to 0.012
    COSINE = "cosine"  # Nichol & Dhariwal, β capped at 0.999 ("squaredcos_cap_v2")


class PredictionType(str, Enum):
    """What the network outputs (diffusers' ``prediction_type`` values)."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


# diffusers' scheduler arguments per schedule; the SD 1.x pair is the one paper #1's constants
# were tuned on (σ_min 0.0292, σ_max 14.61).
_DIFFUSERS_BETAS: dict[BetaSchedule, dict[str, Any]] = {
    BetaSchedule.LINEAR: {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
    BetaSchedule.SCALED_LINEAR: {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
    },
    BetaSchedule.COSINE: {"beta_schedule": "squaredcos_cap_v2"},
}


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ over the training timesteps of one model.

    Attributes:
        beta_schedule: the family the table was built from.
        alphas_cumprod: ``(T,)`` float64, ᾱ_t for t = 0..T−1 (decreasing).
    """

    beta_schedule: BetaSchedule
    alphas_cumprod: Tensor

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def max_timestep(self) -> float:
        """The noisiest training timestep, T − 1: where samplers start."""
        return float(self.num_train_timesteps - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        """Arguments that make a diffusers scheduler use this schedule (prediction type apart)."""
        return {
            "num_train_timesteps": self.num_train_timesteps,
            **_DIFFUSERS_BETAS[self.beta_schedule],
        }

    def alpha_bar(self, timesteps: Tensor) -> Tensor:
        """ᾱ at (possibly fractional) timesteps; 1 at :data:`CLEAN` or below.

        Args:
            timesteps: any shape, float, in ``[−1, T−1]``.

        Returns:
            float64 tensor of the same shape.
        """
        t = timesteps.to(torch.float64)
        table = self.alphas_cumprod.to(t.device)
        clamped = t.clamp(0.0, self.max_timestep)
        low = clamped.floor().long()
        high = clamped.ceil().long()
        frac = clamped - low.to(torch.float64)
        interpolated = (1.0 - frac) * table[low] + frac * table[high]
        return torch.where(t < 0, torch.ones_like(interpolated), interpolated)

    def alpha_sigma(self, timesteps: Tensor) -> tuple[Tensor, Tensor]:
        """``(α_t, σ_t)`` at timesteps, float64, each the shape of ``timesteps``."""
        abar = self.alpha_bar(timesteps)
        return abar.sqrt(), (1.0 - abar).clamp_min(0.0).sqrt()

    def ve_sigma(self, timesteps: Tensor) -> Tensor:
        """The VE noise level ``σ_t/α_t = sqrt((1 − ᾱ_t)/ᾱ_t)`` (k-diffusion's σ), float64."""
        abar = self.alpha_bar(timesteps)
        return ((1.0 - abar) / abar).sqrt()

    def ve_sigma_table(self) -> Tensor:
        """``(T,)`` VE σ at the integer timesteps, float64 (increasing)."""
        abar = self.alphas_cumprod.to(torch.float64)
        return ((1.0 - abar) / abar).sqrt()

    def timestep_of_ve_sigma(self, ve_sigma: Tensor) -> Tensor:
        """The fractional timestep of a VE σ, by linear interpolation of log σ between the
        integer timesteps (k-diffusion's ``sigma_to_t``, used by paper #1's code); clamped to
        ``[0, T−1]``.

        Args:
            ve_sigma: any shape, positive.

        Returns:
            float64 timesteps of the same shape.
        """
        log_table = self.ve_sigma_table().log().to(ve_sigma.device)  # (T,) increasing
        log_sigma = ve_sigma.to(torch.float64).log()
        flat = log_sigma.reshape(-1)
        # index of the last table entry ≤ log σ, kept one below the end so high = low + 1 exists
        low = (torch.searchsorted(log_table, flat, right=True) - 1).clamp(0, len(log_table) - 2)
        lo, hi = log_table[low], log_table[low + 1]
        w = ((flat - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (low.to(torch.float64) + w).reshape(ve_sigma.shape)


def make_noise_schedule(
    beta_schedule: BetaSchedule | str, num_train_timesteps: int = 1000
) -> NoiseSchedule:
    """The ᾱ table of a schedule, computed by diffusers' ``DDPMScheduler`` (so it matches every
    diffusers scheduler built with :meth:`NoiseSchedule.diffusers_kwargs`)."""
    from diffusers import DDPMScheduler

    kind = BetaSchedule(beta_schedule)
    scheduler: Any = DDPMScheduler(
        num_train_timesteps=num_train_timesteps, **_DIFFUSERS_BETAS[kind]
    )
    return NoiseSchedule(kind, scheduler.alphas_cumprod.to(torch.float64).clone())


def expand_like(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` → ``(B, 1, 1, 1)`` (as many ones as ``like`` needs), in ``like``'s dtype."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """``x_t = α·x₀ + σ·ε``.

    Args:
        x0: ``(B, C, H, W)`` clean images.
        noise: ``(B, C, H, W)`` standard normal.
        alpha: ``(B,)`` α_t.
        sigma: ``(B,)`` σ_t.
    """
    return expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise


def x0_eps_from_prediction(
    prediction: Tensor,
    x_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    prediction_type: PredictionType | str,
) -> tuple[Tensor, Tensor]:
    """The clean-image and noise estimates implied by a network output.

    Args:
        prediction: ``(B, C, H, W)`` the network output.
        x_t: ``(B, C, H, W)`` the noisy input it was given.
        alpha, sigma: ``(B,)`` the input's α_t and σ_t.
        prediction_type: what ``prediction`` is.

    Returns:
        ``(x0, eps)``, each ``(B, C, H, W)``. For ε-prediction x₀ divides by α_t, which blows up
        where α_t → 0 (the first step of a few-step sampler): a reason to use v-prediction there.
    """
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    kind = PredictionType(prediction_type)
    if kind is PredictionType.EPSILON:
        return (x_t - s * prediction) / a, prediction
    if kind is PredictionType.V_PREDICTION:
        return a * x_t - s * prediction, s * x_t + a * prediction
    # x₀-prediction: ε is undefined where σ = 0 (clean input); keep it finite there
    eps = (x_t - a * prediction) / s.clamp_min(torch.finfo(x_t.dtype).tiny)
    return prediction, torch.where(s > 0, eps, torch.zeros_like(eps))


def prediction_from_x0_eps(
    x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: PredictionType | str
) -> Tensor:
    """The network output that means ``(x0, eps)`` at ``(α, σ)``: the regression target of
    training and of every distillation loss (expressed in the student's parameterisation).

    Args:
        x0, eps: ``(B, C, H, W)``.
        alpha, sigma: ``(B,)``.
        prediction_type: the parameterisation of the target.
    """
    kind = PredictionType(prediction_type)
    if kind is PredictionType.EPSILON:
        return eps
    if kind is PredictionType.V_PREDICTION:
        return expand_like(alpha, x0) * eps - expand_like(sigma, x0) * x0
    return x0


def log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """λ = log(α²/σ²) (the paper's λ_t); +inf at clean data."""
    return 2.0 * (alpha.log() - sigma.log())


def snr_weight_max1(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Salimans & Ho's "truncated SNR" weight ``max(α²/σ², 1)`` on an x-space error."""
    snr = (alpha / sigma.clamp_min(math.ulp(1.0))) ** 2
    return snr.clamp_min(1.0)
