"""Samplers: diffusers' schedulers (DDIM, DPM-Solver++ 2M, Euler, UniPC, LCM), a DDIM on any
timestep grid (what progressive-distillation students are trained on), and the training-free
few-step sampler of paper #1, all driven by a :class:`~distil.diffusion.model.Denoiser`.

Classifier-free guidance is a wrapper around a denoiser (:func:`classifier_free_guidance`: two
rows per image, batched) and a guidance-distilled student is a denoiser with the scale fixed
(:func:`distil.diffusion.model.with_guidance`: one row), so every sampler runs teachers and
students alike. :class:`CountingDenoiser` counts network evaluations (NFE) per image.

Every diffusers scheduler here uses ``timestep_spacing="trailing"`` (the first step starts at
the noisiest training timestep, T − 1; "leading" spacing starts few-step samplers at a lower
noise level than the one the initial noise has) and ends at clean data (ᾱ = 1).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.diffusion.model import (
    Denoiser,
    ModelKind,
    guided_denoiser,
    unet_denoiser,
    with_guidance,
)
from distil.diffusion.schedule import (
    CLEAN,
    NoiseSchedule,
    PredictionType,
    expand_like,
    x0_eps_from_prediction,
)
from distil.errors import DistilError

__all__ = [
    "TRUNCATED_KARRAS_SETTINGS",
    "CountingDenoiser",
    "EarlyStopOutput",
    "GeneratedImages",
    "SamplerKind",
    "SamplerSpec",
    "Trajectories",
    "TruncatedKarrasSetting",
    "classifier_free_guidance",
    "consistency_timesteps",
    "ddim_sample",
    "ddim_step",
    "ddim_timesteps",
    "generate_images",
    "karras_sigmas",
    "make_scheduler",
    "record_guided_trajectories",
    "sample",
    "sampling_denoiser",
    "scheduler_sample",
    "truncated_karras_sample",
    "truncated_karras_timesteps",
]

logger = logging.getLogger(__name__)


class SamplerKind(str, Enum):
    """The samplers: five diffusers schedulers and paper #1's sampler."""

    DDIM = "ddim"  # DDIMScheduler, η = 0
    DPMPP_2M = "dpmpp_2m"  # DPMSolverMultistepScheduler, dpmsolver++, order 2
    EULER = "euler"  # EulerDiscreteScheduler
    UNIPC = "unipc"  # UniPCMultistepScheduler (bh2, order 2)
    LCM = "lcm"  # LCMScheduler: multistep consistency sampling, for consistency students
    TRUNCATED_KARRAS = "truncated_karras"  # paper #1 (not a diffusers scheduler)


def make_scheduler(
    kind: SamplerKind | str, schedule: NoiseSchedule, prediction_type: PredictionType | str
) -> Any:
    """A diffusers scheduler on ``schedule`` for a model predicting ``prediction_type``."""
    import diffusers

    common: dict[str, Any] = {
        **schedule.diffusers_kwargs(),
        "prediction_type": PredictionType(prediction_type).value,
    }
    kind = SamplerKind(kind)
    if kind is SamplerKind.TRUNCATED_KARRAS:
        raise DistilError(
            "truncated_karras (paper #1) is not a diffusers scheduler; use truncated_karras_sample"
        )
    if kind is SamplerKind.DDIM:
        return diffusers.DDIMScheduler(
            **common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"
        )
    if kind is SamplerKind.DPMPP_2M:
        return diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    if kind is SamplerKind.EULER:
        return diffusers.EulerDiscreteScheduler(**common, timestep_spacing="trailing")
    if kind is SamplerKind.UNIPC:
        return diffusers.UniPCMultistepScheduler(**common, timestep_spacing="trailing")
    return diffusers.LCMScheduler(**common, clip_sample=False, set_alpha_to_one=True)


class CountingDenoiser:
    """Wraps a denoiser and counts what it evaluates.

    Attributes:
        rows: images the network has been run on (CFG runs two per image and step).
        calls: network calls (batches).
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.rows = 0
        self.calls = 0

    def __call__(self, x_t: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        self.rows += int(x_t.shape[0])
        self.calls += 1
        return self.denoiser(x_t, timesteps, class_labels)

    def nfe_per_image(self, num_images: int) -> float:
        """Network evaluations per generated image."""
        return self.rows / max(num_images, 1)


def classifier_free_guidance(
    denoiser: Denoiser, guidance_scale: float | Tensor, null_class: int
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``u + s·(c − u)`` from one batched call on
    ``2B`` rows (the conditional rows, then the same inputs with the null class).

    The combination is taken on the network output; for ε-, v- and x₀-prediction this equals
    combining x₀ or ε estimates, because each is an affine function of the output with
    coefficients that depend only on ``x_t`` and ``t`` and the weights sum to one.
    A float ``guidance_scale == 1`` returns ``denoiser`` itself (one row per image, no second
    pass).

    Args:
        denoiser: a class-conditional denoiser trained with label dropout.
        guidance_scale: s (1 = conditional, 0 = unconditional), a float or ``(B,)`` per row.
        null_class: the id of "no class".
    """
    if isinstance(guidance_scale, float | int) and guidance_scale == 1.0:
        return denoiser

    def guided(x_t: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        null = torch.full_like(class_labels, null_class)
        out = denoiser(
            torch.cat([x_t, x_t]),
            torch.cat([timesteps, timesteps]),
            torch.cat([class_labels, null]),
        )
        cond, uncond = out.chunk(2)
        scale = torch.as_tensor(guidance_scale, dtype=out.dtype, device=out.device)
        if scale.dim() == 1:
            scale = expand_like(scale, cond)
        return uncond + scale * (cond - uncond)

    return guided


def _as_batch(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float32, device=like.device).reshape(-1).expand(batch)


@torch.no_grad()
def scheduler_sample(
    denoiser: Denoiser,
    *,
    kind: SamplerKind | str,
    num_steps: int,
    noise: Tensor,
    class_labels: Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample with a diffusers scheduler.

    Args:
        denoiser: the network (wrap it in :func:`classifier_free_guidance` for guidance).
        kind: which scheduler.
        num_steps: inference steps (network evaluations per image without guidance).
        noise: ``(B, C, H, W)`` standard normal; scaled by the scheduler's initial σ.
        class_labels: ``(B,)``.
        schedule: the model's noise schedule.
        prediction_type: what the model predicts.
        generator: for the LCM scheduler's re-noising between steps.

    Returns:
        ``(B, C, H, W)`` samples in data space (unclipped).
    """
    kind = SamplerKind(kind)
    scheduler = make_scheduler(kind, schedule, prediction_type)
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    batch = noise.shape[0]
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = denoiser(model_input, _as_batch(t, batch, x), class_labels)
        extra = {"generator": generator} if kind is SamplerKind.LCM else {}
        x = scheduler.step(output, t, x, **extra).prev_sample
    return x


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[float]:
    """The "trailing" DDIM grid, noisiest first: ``round(i·T/N) − 1`` for i = N..1 (diffusers'
    rule, so the grid equals ``DDIMScheduler(timestep_spacing="trailing")``'s).

    The grids nest: the N-step grid is every other point of the 2N-step grid (both round the same
    numbers), which is what progressive distillation needs. The sampler steps from the last
    point to clean data.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise DistilError(f"DDIM steps must be in 1..{num_train_timesteps}, got {num_steps}")
    step_ratio = num_train_timesteps / num_steps
    grid = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    return [float(t) for t in grid]


def ddim_step(x0: Tensor, eps: Tensor, alpha_to: Tensor, sigma_to: Tensor) -> Tensor:
    """The deterministic DDIM update to a lower noise level: ``α_s·x̂₀ + σ_s·ε̂``.

    Args:
        x0, eps: ``(B, C, H, W)`` estimates at the current timestep.
        alpha_to, sigma_to: ``(B,)`` α and σ of the target timestep.
    """
    return expand_like(alpha_to, x0) * x0 + expand_like(sigma_to, x0) * eps


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    *,
    timesteps: list[float],
    noise: Tensor,
    class_labels: Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
) -> Tensor:
    """Deterministic DDIM along ``timesteps`` (noisiest first, possibly fractional), then to
    clean data: ``len(timesteps)`` network evaluations per image.

    Args:
        denoiser: the network.
        timesteps: the grid, e.g. :func:`ddim_timesteps`.
        noise: ``(B, C, H, W)`` the state at ``timesteps[0]``.
        class_labels: ``(B,)``.
        schedule: the noise schedule.
        prediction_type: what the model predicts.

    Returns:
        ``(B, C, H, W)`` x₀ estimates after the last step.
    """
    x = noise
    batch = noise.shape[0]
    for i, t in enumerate(timesteps):
        t_now = _as_batch(t, batch, x)
        t_next = _as_batch(timesteps[i + 1] if i + 1 < len(timesteps) else CLEAN, batch, x)
        alpha, sigma = schedule.alpha_sigma(t_now)
        x0, eps = x0_eps_from_prediction(
            denoiser(x, t_now, class_labels), x, alpha, sigma, prediction_type
        )
        x = ddim_step(x0, eps, *schedule.alpha_sigma(t_next))
    return x


def consistency_timesteps(
    num_steps: int, num_ddim_timesteps: int = 50, num_train_timesteps: int = 1000
) -> list[float]:
    """The timesteps of multistep consistency sampling: evenly spaced picks from the
    distillation grid ``k·j − 1`` (k = T / num_ddim_timesteps), noisiest first (diffusers'
    ``LCMScheduler.set_timesteps``)."""
    if not 1 <= num_steps <= num_ddim_timesteps:
        raise DistilError(f"consistency steps must be in 1..{num_ddim_timesteps}, got {num_steps}")
    k = num_train_timesteps // num_ddim_timesteps
    origin = (np.arange(1, num_ddim_timesteps + 1) * k - 1)[::-1]
    picks = np.floor(np.linspace(0, num_ddim_timesteps, num=num_steps, endpoint=False)).astype(int)
    return [float(t) for t in origin[picks]]


# --- paper #1: "Hyperparameters are all you need" (arXiv:2510.02390) ---------------------------


@dataclass(frozen=True)
class TruncatedKarrasSetting:
    """The per-step-count constants of paper #1's SD 1.5 script (``txt2img.py --stop_steps``).

    Attributes:
        reference_points: N_ref, points of the reference Karras σ schedule.
        reference_rho: ρ of the reference schedule.
        truncation_index: k, the reference point where sampling stops (the early stop).
        solver_order: 1 = DPM-Solver++ first order (DDIM in data-prediction form), 2 = 2M.
    """

    reference_points: int
    reference_rho: float
    truncation_index: int
    solver_order: int


TRUNCATED_KARRAS_SETTINGS: dict[int, TruncatedKarrasSetting] = {
    4: TruncatedKarrasSetting(8, 5.0, 5, 1),
    5: TruncatedKarrasSetting(8, 5.0, 6, 1),
    6: TruncatedKarrasSetting(8, 5.0, 6, 1),
    8: TruncatedKarrasSetting(12, 7.0, 9, 2),  # the "8 full trick"; without it k = 8
}
TIMESTEP_RHO = 1.2
"""ρ of the Karras spacing applied in timestep space (paper #1)."""


class EarlyStopOutput(str, Enum):
    """What paper #1's sampler returns at its early stop."""

    STATE = "state"  # the paper: the state at σ_end, still noisy (the VAE decodes it directly)
    DENOISED = "denoised"  # one more evaluation: the x₀ estimate at σ_end (not in the paper)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """``(n,)`` float64 Karras et al. (2022) levels from ``sigma_max`` down to ``sigma_min``:
    ``(σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`` (no final zero)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def truncated_karras_timesteps(
    schedule: NoiseSchedule, num_steps: int, setting: TruncatedKarrasSetting | None = None
) -> Tensor:
    """Paper #1's ``num_steps + 1`` fractional timesteps, noisiest first, ending at the early stop.

    1. A reference Karras schedule of ``N_ref`` levels from the model's σ_max to σ_min (ρ_ref);
    2. ``t_start = t(σ_ref[0])`` (= T − 1) and ``t_end = t(σ_ref[k])``, ``t(σ)`` interpolating
       log σ between integer timesteps;
    3. ``num_steps + 1`` timesteps from t_start to t_end with the Karras formula in timestep
       space at ρ = 1.2.

    Returns:
        ``(num_steps + 1,)`` float64.
    """
    chosen = setting or TRUNCATED_KARRAS_SETTINGS.get(num_steps)
    if chosen is None:
        raise DistilError(
            f"paper #1's sampler is pinned for {sorted(TRUNCATED_KARRAS_SETTINGS)} steps, not {num_steps}; "
            "pick one of those step counts (or pass a TruncatedKarrasSetting)"
        )
    table = schedule.ve_sigma_table()
    reference = karras_sigmas(
        chosen.reference_points, float(table[0]), float(table[-1]), chosen.reference_rho
    )
    ends = schedule.timestep_of_ve_sigma(reference[[0, chosen.truncation_index]])
    t_start, t_end = float(ends[0]), float(ends[1])
    return karras_sigmas(num_steps + 1, t_end, t_start, TIMESTEP_RHO)


def _data_prediction(
    denoiser: Denoiser,
    x_ve: Tensor,
    ve_sigma: float,
    class_labels: Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
) -> Tensor:
    """k-diffusion's ``D(x, σ)``: the x₀ estimate for a VE state ``x = x₀ + σ·ε``, evaluated at
    the timestep ``t(σ)`` (log-σ interpolation, as the paper's code) on the VP input
    ``x / sqrt(σ² + 1)``."""
    batch = x_ve.shape[0]
    scale = 1.0 / (ve_sigma**2 + 1.0) ** 0.5
    timestep = schedule.timestep_of_ve_sigma(torch.tensor([ve_sigma], dtype=torch.float64))
    t = _as_batch(float(timestep), batch, x_ve)
    alpha = torch.full((batch,), scale, dtype=torch.float64)
    sigma = torch.full((batch,), ve_sigma * scale, dtype=torch.float64)
    x_t = x_ve * scale
    x0, _ = x0_eps_from_prediction(
        denoiser(x_t, t, class_labels), x_t, alpha, sigma, prediction_type
    )
    return x0


@torch.no_grad()
def truncated_karras_sample(
    denoiser: Denoiser,
    *,
    num_steps: int,
    noise: Tensor,
    class_labels: Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    output: EarlyStopOutput | str = EarlyStopOutput.STATE,
    setting: TruncatedKarrasSetting | None = None,
) -> Tensor:
    """The training-free few-step sampler of "Hyperparameters are all you need" (paper #1).

    The timesteps of :func:`truncated_karras_timesteps`; σ at each by linear interpolation of ᾱ;
    the initial state ``noise·σ_0``; DPM-Solver++ in data-prediction form (first order for 4-6
    steps, 2M for 8, from the pinned table); sampling stops at σ_end without a step to σ = 0.

    Args:
        denoiser: the network (wrap it in :func:`classifier_free_guidance` for guidance).
        num_steps: 4, 5, 6 or 8 (the pinned settings).
        noise: ``(B, C, H, W)`` standard normal.
        class_labels: ``(B,)``.
        schedule: the model's noise schedule.
        prediction_type: what the model predicts (converted to D(x, σ)).
        output: the noisy state at σ_end (the paper) or one more evaluation's x₀ estimate.
        setting: override the pinned constants.

    Returns:
        ``(B, C, H, W)``: the VE state ``x₀ + σ_end·ε`` (STATE) or the x₀ estimate (DENOISED).
    """
    chosen = setting or TRUNCATED_KARRAS_SETTINGS.get(num_steps)
    timesteps = truncated_karras_timesteps(schedule, num_steps, chosen)
    assert chosen is not None
    sigmas = [float(s) for s in schedule.ve_sigma(timesteps)]
    x = noise * sigmas[0]
    previous: Tensor | None = None
    h_last = 0.0
    for i in range(num_steps):
        denoised = _data_prediction(denoiser, x, sigmas[i], class_labels, schedule, prediction_type)
        h = float(np.log(sigmas[i] / sigmas[i + 1]))  # step in λ = −log σ
        if chosen.solver_order == 1 or previous is None:
            direction = denoised
        else:
            r = h_last / h
            direction = (1.0 + 1.0 / (2.0 * r)) * denoised - (1.0 / (2.0 * r)) * previous
        x = (sigmas[i + 1] / sigmas[i]) * x - float(np.expm1(-h)) * direction
        previous, h_last = denoised, h
    if EarlyStopOutput(output) is EarlyStopOutput.DENOISED:
        return _data_prediction(denoiser, x, sigmas[-1], class_labels, schedule, prediction_type)
    return x


# --- one entry point for every sampler, with its cost -------------------------------------------


class SamplerSpec(StrictModel):
    """A sampler, its step count, and the guidance scale to sample at."""

    kind: SamplerKind = SamplerKind.DDIM
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = Field(default=1.0, ge=0.0)
    early_stop_output: EarlyStopOutput = EarlyStopOutput.STATE  # truncated_karras only

    @property
    def label(self) -> str:
        """A short name for tables and file names, e.g. ``ddim-8`` or ``truncated_karras-8-denoised``."""
        suffix = (
            "-denoised"
            if self.kind is SamplerKind.TRUNCATED_KARRAS
            and self.early_stop_output is EarlyStopOutput.DENOISED
            else ""
        )
        return f"{self.kind.value}-{self.steps}{suffix}"


def sample(
    denoiser: Denoiser,
    spec: SamplerSpec,
    *,
    noise: Tensor,
    class_labels: Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run the sampler of ``spec`` (guidance is the denoiser's business: see
    :func:`sampling_denoiser`). Returns ``(B, C, H, W)`` in data space, unclipped."""
    if spec.kind is SamplerKind.TRUNCATED_KARRAS:
        return truncated_karras_sample(
            denoiser,
            num_steps=spec.steps,
            noise=noise,
            class_labels=class_labels,
            schedule=schedule,
            prediction_type=prediction_type,
            output=spec.early_stop_output,
        )
    return scheduler_sample(
        denoiser,
        kind=spec.kind,
        num_steps=spec.steps,
        noise=noise,
        class_labels=class_labels,
        schedule=schedule,
        prediction_type=prediction_type,
        generator=generator,
    )


def sampling_denoiser(
    module: nn.Module, kind: ModelKind, *, guidance_scale: float, null_class: int
) -> tuple[Denoiser, CountingDenoiser]:
    """The denoiser to sample a model folder's module at a guidance scale, and the counter of
    its network evaluations: classifier-free guidance (two rows per image) around a plain UNet,
    the scale as an input (one row) for a guidance-conditioned or adapter student."""
    if kind is ModelKind.UNET:
        network = CountingDenoiser(unet_denoiser(module))
        return classifier_free_guidance(network, guidance_scale, null_class), network
    network = CountingDenoiser(with_guidance(guided_denoiser(module), guidance_scale))
    return network, network


@dataclass(frozen=True)
class GeneratedImages:
    """Samples and what they cost.

    Attributes:
        images: ``(N, C, H, W)`` in data space (unclipped).
        labels: ``(N,)`` the classes asked for.
        nfe_per_image: network evaluations per image (CFG counts two).
        seconds_per_image: wall time per image.
        cpu_seconds_per_image: process CPU time per image (all threads).
    """

    images: Tensor
    labels: Tensor
    nfe_per_image: float
    seconds_per_image: float
    cpu_seconds_per_image: float


@torch.no_grad()
def generate_images(
    denoiser: Denoiser,
    spec: SamplerSpec,
    *,
    labels: Tensor,
    image_shape: tuple[int, int, int],
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    seed: int,
    batch_size: int = 500,
    counter: CountingDenoiser | None = None,
) -> GeneratedImages:
    """Generate one image per label, in batches, timing the whole run.

    The initial noise depends only on ``seed`` and the batch layout, so two samplers given the
    same seed start from the same noise (paired comparisons).

    Args:
        counter: the :class:`CountingDenoiser` around the network inside ``denoiser`` (so that
            the two rows of classifier-free guidance count as two evaluations); by default
            ``denoiser`` itself is counted, right for one-pass denoisers.
    """
    if counter is None:
        counter = CountingDenoiser(denoiser)
        denoiser = counter
    counter.rows = counter.calls = 0
    noise_generator = torch.Generator().manual_seed(seed)
    step_generator = torch.Generator().manual_seed(seed + 1)
    outputs = []
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for begin in range(0, len(labels), batch_size):
        batch_labels = labels[begin : begin + batch_size]
        noise = torch.randn((len(batch_labels), *image_shape), generator=noise_generator)
        outputs.append(
            sample(
                denoiser,
                spec,
                noise=noise,
                class_labels=batch_labels,
                schedule=schedule,
                prediction_type=prediction_type,
                generator=step_generator,
            )
        )
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    n = max(len(labels), 1)
    return GeneratedImages(
        images=torch.cat(outputs) if outputs else torch.empty(0, *image_shape),
        labels=labels,
        nfe_per_image=counter.nfe_per_image(len(labels)),
        seconds_per_image=wall / n,
        cpu_seconds_per_image=cpu / n,
    )


@dataclass(frozen=True)
class Trajectories:
    """States visited by a guided sampler and the guided outputs there (AGD's training data).

    Attributes:
        inputs: ``(K, C, H, W)`` the model inputs (after the scheduler's input scaling).
        timesteps: ``(K,)`` float.
        labels: ``(K,)``.
        guidance_scales: ``(K,)`` the scale of the trajectory each row belongs to.
        outputs: ``(K, C, H, W)`` the classifier-free-guided output at that input.
    """

    inputs: Tensor
    timesteps: Tensor
    labels: Tensor
    guidance_scales: Tensor
    outputs: Tensor

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def rows(self, index: Tensor) -> Trajectories:
        """A subset of rows (a training micro-batch)."""
        return Trajectories(
            self.inputs[index],
            self.timesteps[index],
            self.labels[index],
            self.guidance_scales[index],
            self.outputs[index],
        )


@torch.no_grad()
def record_guided_trajectories(
    denoiser: Denoiser,
    spec: SamplerSpec,
    *,
    labels: Tensor,
    guidance_scales: Tensor,
    image_shape: tuple[int, int, int],
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    null_class: int,
    seed: int,
    batch_size: int = 500,
) -> Trajectories:
    """Run a classifier-free-guided sampler and keep every (input, guided output) pair it
    visits: ``len(labels) · spec.steps`` rows (AGD trains its adapters on these instead of on
    forward-noised data, so training sees the states guided sampling actually reaches).

    Args:
        denoiser: the class-conditional teacher.
        spec: the sampler (its ``guidance_scale`` is ignored: ``guidance_scales`` is per row).
        labels: ``(N,)`` classes, one trajectory each.
        guidance_scales: ``(N,)`` the scale of each trajectory.
        image_shape: ``(C, H, W)``.
        schedule, prediction_type: the teacher's.
        null_class: the id of "no class".
        seed: initial noise.
        batch_size: trajectories run together.
    """
    records: list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]] = []
    noise_generator = torch.Generator().manual_seed(seed)
    for begin in range(0, len(labels), batch_size):
        batch_labels = labels[begin : begin + batch_size]
        batch_scales = guidance_scales[begin : begin + batch_size].float()
        guided = classifier_free_guidance(denoiser, batch_scales, null_class)

        def recording(
            x_t: Tensor,
            timesteps: Tensor,
            class_labels: Tensor,
            guided: Denoiser = guided,
            scales: Tensor = batch_scales,
        ) -> Tensor:
            out = guided(x_t, timesteps, class_labels)
            records.append(
                (x_t.clone(), timesteps.clone(), class_labels.clone(), scales, out.clone())
            )
            return out

        noise = torch.randn((len(batch_labels), *image_shape), generator=noise_generator)
        sample(
            recording,
            spec,
            noise=noise,
            class_labels=batch_labels,
            schedule=schedule,
            prediction_type=prediction_type,
        )
    columns = list(zip(*records, strict=True))
    return Trajectories(*(torch.cat(list(column)) for column in columns))
