"""Training and distillation losses for diffusion models: one micro-batch in, a scalar out.

Each function draws its own timesteps and noise from the ``generator`` it is given (so a
recipe's per-step seeding makes a step reproducible), calls the networks it needs, and returns a
:class:`DiffusionLoss` (the scalar to back-propagate plus detached diagnostics). None of them
loops over steps or touches an optimiser: that is the recipe's job.

Guidance convention: a *guidance scale* ``s`` combines ``u + s·(c − u)`` (s = 1 is the plain
conditional model). Meng et al. write ``(1 + w)·c − w·u``, i.e. ``s = 1 + w``; LCM samples the
same ``w``. Sources and constants of each loss are in ``docs/diffusion.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from distil.diffusion.model import Denoiser, GuidedDenoiser
from distil.diffusion.sampling import (
    Trajectories,
    classifier_free_guidance,
    ddim_step,
    ddim_timesteps,
)
from distil.diffusion.schedule import (
    CLEAN,
    NoiseSchedule,
    PredictionType,
    add_noise,
    expand_like,
    prediction_from_x0_eps,
    x0_eps_from_prediction,
)

__all__ = [
    "ConsistencyMetric",
    "DiffusionLoss",
    "XWeighting",
    "adapter_guidance_loss",
    "consistency_boundary_scalings",
    "consistency_distillation_loss",
    "consistency_function",
    "denoising_loss",
    "drop_labels",
    "guidance_distillation_loss",
    "progressive_distillation_loss",
    "progressive_distillation_target",
    "weighted_x_error",
    "x_space_weight",
]


@dataclass(frozen=True)
class DiffusionLoss:
    """A loss and its named parts, the shape the training loop reads.

    Attributes:
        loss: scalar to back-propagate (mean over the micro-batch).
        components: detached scalars for the log; ``NAME/weighted`` entries add up to ``loss``,
            others (e.g. the mean guidance scale drawn) are per-row means.
    """

    loss: Tensor
    components: dict[str, Tensor] = field(default_factory=dict)

    def scaled(self, factor: float) -> DiffusionLoss:
        """Loss and components times ``factor``: with ``factor = rows / window_rows`` the sum
        over the micro-batches of an accumulation window is the mean over the window."""
        return DiffusionLoss(
            self.loss * factor, {k: v * factor for k, v in self.components.items()}
        )


def _named(name: str, loss: Tensor, **extra: Tensor) -> DiffusionLoss:
    return DiffusionLoss(
        loss, {f"{name}/weighted": loss.detach(), **{k: v.detach() for k, v in extra.items()}}
    )


def _uniform(n: int, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(
        x.device
    )


def drop_labels(
    labels: Tensor, *, null_class: int, probability: float, generator: torch.Generator
) -> Tensor:
    """Replace each label by the null class with ``probability`` (classifier-free guidance
    training, Ho & Salimans 2022: one network learns the conditional and unconditional model)."""
    if probability <= 0.0:
        return labels
    drop = _uniform(labels.shape[0], generator).to(labels.device) < probability
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def denoising_loss(
    denoiser: Denoiser,
    images: Tensor,
    labels: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    null_class: int,
    label_dropout: float,
    generator: torch.Generator,
) -> DiffusionLoss:
    """The DDPM training loss: MSE between the network output and the target of its
    parameterisation (ε, v or x₀) at a uniformly drawn integer timestep.

    Args:
        denoiser: the network being trained.
        images: ``(B, C, H, W)`` clean images in [−1, 1].
        labels: ``(B,)`` class ids.
        schedule: the noise schedule.
        prediction_type: what the network predicts.
        null_class: the id of "no class".
        label_dropout: probability of training a row unconditionally (0.1 in Ho & Salimans).
        generator: source of timesteps, noise and label drops.

    Returns:
        the mean squared error over pixels and rows.
    """
    batch = images.shape[0]
    timesteps = torch.randint(
        0, schedule.num_train_timesteps, (batch,), generator=generator, device=generator.device
    ).to(images.device)
    noise = _randn_like(images, generator)
    alpha, sigma = schedule.alpha_sigma(timesteps)
    x_t = add_noise(images, noise, alpha, sigma)
    target = prediction_from_x0_eps(images, noise, alpha, sigma, prediction_type)
    cond = drop_labels(
        labels, null_class=null_class, probability=label_dropout, generator=generator
    )
    output = denoiser(x_t, timesteps.to(images.dtype), cond)
    loss = (output - target.to(output.dtype)).square().mean()
    return _named("denoise", loss)


class XWeighting(str, Enum):
    """Weights ω(λ_t) on an x₀-space squared error (Salimans & Ho, section 4)."""

    SNR_PLUS_ONE = "snr_plus_one"  # 1 + α²/σ²: the same as a plain MSE on v
    TRUNCATED_SNR = "truncated_snr"  # max(α²/σ², 1)


def x_space_weight(alpha: Tensor, sigma: Tensor, weighting: XWeighting | str) -> Tensor:
    """``(B,)`` ω(λ_t) for α_t, σ_t (float64)."""
    snr = alpha.square() / sigma.square().clamp_min(torch.finfo(torch.float64).tiny)
    if XWeighting(weighting) is XWeighting.SNR_PLUS_ONE:
        return snr + 1.0
    return snr.clamp_min(1.0)


def weighted_x_error(
    x0_pred: Tensor, x0_target: Tensor, alpha: Tensor, sigma: Tensor, weighting: XWeighting | str
) -> Tensor:
    """``mean_b ω(λ_t) · mean_pixels (x̂ − x̃)²`` (a scalar)."""
    per_row = (x0_pred - x0_target.to(x0_pred.dtype)).square().flatten(1).mean(1)
    return (x_space_weight(alpha, sigma, weighting).to(per_row.dtype) * per_row).mean()


def _x0_eps(
    denoiser: Denoiser,
    x_t: Tensor,
    timesteps: Tensor,
    labels: Tensor,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
) -> tuple[Tensor, Tensor]:
    alpha, sigma = schedule.alpha_sigma(timesteps)
    out = denoiser(x_t, timesteps.to(x_t.dtype), labels)
    return x0_eps_from_prediction(out, x_t, alpha, sigma, prediction_type)


def progressive_distillation_target(
    teacher: Denoiser,
    z_t: Tensor,
    labels: Tensor,
    *,
    t: Tensor,
    t_mid: Tensor,
    t_next: Tensor,
    schedule: NoiseSchedule,
    teacher_prediction_type: PredictionType | str,
) -> Tensor:
    """The x₀ a one-step DDIM student must predict at ``(z_t, t)`` to land where two teacher
    DDIM steps ``t → t_mid → t_next`` land (Salimans & Ho 2022, Algorithm 2):

    ``z' = α' x̂(z_t) + (σ'/σ)(z_t − α x̂(z_t))``, ``z'' = α'' x̂(z') + (σ''/σ')(z' − α' x̂(z'))``,
    ``x̃ = (z'' − (σ''/σ) z_t) / (α'' − (σ''/σ) α)``; with ``t_next`` = clean, ``x̃ = z''``.

    Args:
        teacher: the teacher denoiser (wrap it in CFG to distil a guided sampler).
        z_t: ``(B, C, H, W)`` noisy inputs at ``t``.
        labels: ``(B,)``.
        t, t_mid, t_next: ``(B,)`` timesteps, decreasing (``t_next`` may be CLEAN).
        schedule: the noise schedule.
        teacher_prediction_type: what the teacher predicts.

    Returns:
        ``(B, C, H, W)`` float32 x̃ (no gradient).
    """
    with torch.no_grad():
        alpha, sigma = schedule.alpha_sigma(t)
        alpha_mid, sigma_mid = schedule.alpha_sigma(t_mid)
        alpha_next, sigma_next = schedule.alpha_sigma(t_next)
        x0, eps = _x0_eps(teacher, z_t, t, labels, schedule, teacher_prediction_type)
        z_mid = expand_like(alpha_mid, z_t) * x0 + expand_like(sigma_mid, z_t) * eps
        x0_mid, eps_mid = _x0_eps(teacher, z_mid, t_mid, labels, schedule, teacher_prediction_type)
        z_next = expand_like(alpha_next, z_t) * x0_mid + expand_like(sigma_next, z_t) * eps_mid
        ratio = sigma_next / sigma  # (B,) float64, 0 when t_next is clean
        numerator = z_next.double() - expand_like(ratio, z_t).double() * z_t.double()
        denominator = expand_like(alpha_next - ratio * alpha, z_t).double()
        return (numerator / denominator).to(z_t.dtype)


def progressive_distillation_loss(
    student: Denoiser,
    teacher: Denoiser,
    images: Tensor,
    labels: Tensor,
    *,
    student_steps: int,
    schedule: NoiseSchedule,
    student_prediction_type: PredictionType | str,
    teacher_prediction_type: PredictionType | str,
    generator: torch.Generator,
    weighting: XWeighting | str = XWeighting.SNR_PLUS_ONE,
    null_class: int | None = None,
    label_dropout: float = 0.0,
) -> DiffusionLoss:
    """Progressive distillation (Salimans & Ho 2022): the student's one DDIM step on the
    ``student_steps`` grid matches the teacher's two steps on the ``2·student_steps`` grid.

    A grid index ``j ~ U{0..N−1}`` picks ``t = G_N[j]``, ``t_next = G_N[j+1]`` (clean after the
    last) and ``t_mid = G_2N[2j+1]``; :func:`progressive_distillation_target` gives x̃; the loss is
    ``ω(λ_t)·‖x̂_θ(z_t) − x̃‖²`` (``snr_plus_one`` = MSE in v, ``truncated_snr`` = max(SNR, 1)).

    Args:
        student: the network being trained (initialised from the teacher).
        teacher: the previous stage's model (frozen).
        images: ``(B, C, H, W)`` clean images in [−1, 1].
        labels: ``(B,)`` class ids.
        student_steps: N, the student's sampling steps (the teacher samples with 2N).
        schedule: the noise schedule.
        student_prediction_type, teacher_prediction_type: their parameterisations.
        generator: grid indices, noise and label drops.
        weighting: ω(λ_t).
        null_class: the null class id, needed when ``label_dropout > 0``.
        label_dropout: fraction of rows distilled unconditionally (keeps the student usable
            with classifier-free guidance).
    """
    batch = images.shape[0]
    student_grid = torch.tensor(
        [*ddim_timesteps(student_steps, schedule.num_train_timesteps), CLEAN]
    )
    teacher_grid = torch.tensor(
        [*ddim_timesteps(2 * student_steps, schedule.num_train_timesteps), CLEAN]
    )
    index = torch.randint(0, student_steps, (batch,), generator=generator, device=generator.device)
    index = index.cpu()
    t = student_grid[index].to(images.device)
    t_mid = teacher_grid[2 * index + 1].to(images.device)
    t_next = student_grid[index + 1].to(images.device)
    if label_dropout > 0.0:
        if null_class is None:
            raise ValueError("label_dropout needs null_class")
        labels = drop_labels(
            labels, null_class=null_class, probability=label_dropout, generator=generator
        )
    noise = _randn_like(images, generator)
    alpha, sigma = schedule.alpha_sigma(t)
    z_t = add_noise(images, noise, alpha, sigma)
    target = progressive_distillation_target(
        teacher,
        z_t,
        labels,
        t=t,
        t_mid=t_mid,
        t_next=t_next,
        schedule=schedule,
        teacher_prediction_type=teacher_prediction_type,
    )
    x0_student, _ = _x0_eps(student, z_t, t, labels, schedule, student_prediction_type)
    loss = weighted_x_error(x0_student, target, alpha, sigma, weighting)
    return _named("progressive", loss)


def _uniform_scales(
    batch: int, scale_range: tuple[float, float], generator: torch.Generator
) -> Tensor:
    low, high = scale_range
    if high < low:
        raise ValueError(f"guidance scale range must be (low, high), got {scale_range}")
    return (low + (high - low) * _uniform(batch, generator)).float()


def guidance_distillation_loss(
    student: GuidedDenoiser,
    teacher: Denoiser,
    images: Tensor,
    labels: Tensor,
    *,
    schedule: NoiseSchedule,
    student_prediction_type: PredictionType | str,
    teacher_prediction_type: PredictionType | str,
    null_class: int,
    guidance_range: tuple[float, float],
    generator: torch.Generator,
    weighting: XWeighting | str = XWeighting.SNR_PLUS_ONE,
) -> DiffusionLoss:
    """Guidance distillation, stage one of Meng et al. (2023, paper #81): a student that reads
    the guidance scale matches the teacher's two-pass classifier-free-guided output in one pass.

    ``s ~ U[guidance_range]`` and ``t ~ U{0..T−1}`` per row, ``z_t`` from forward-noised data;
    the loss is ``ω(λ_t)·‖x̂_η(z_t, s) − x̂^s_θ(z_t)‖²`` with ``x̂^s = x̂_u + s·(x̂_c − x̂_u)``
    (Meng's ``w`` is ``s − 1``).

    Args:
        student: the guidance-conditioned student (initialised from the teacher).
        teacher: the class-conditional teacher (frozen; trained with label dropout).
        images: ``(B, C, H, W)`` clean images in [−1, 1].
        labels: ``(B,)``.
        schedule: the noise schedule.
        student_prediction_type, teacher_prediction_type: their parameterisations.
        null_class: the id of "no class".
        guidance_range: ``(s_min, s_max)``.
        generator: scales, timesteps and noise.
        weighting: ω(λ_t).
    """
    batch = images.shape[0]
    scales = _uniform_scales(batch, guidance_range, generator).to(images.device)
    timesteps = torch.randint(
        0, schedule.num_train_timesteps, (batch,), generator=generator, device=generator.device
    ).to(images.device)
    noise = _randn_like(images, generator)
    alpha, sigma = schedule.alpha_sigma(timesteps)
    z_t = add_noise(images, noise, alpha, sigma)
    with torch.no_grad():
        guided_teacher = classifier_free_guidance(teacher, scales, null_class)
        target, _ = _x0_eps(
            guided_teacher, z_t, timesteps, labels, schedule, teacher_prediction_type
        )
    student_out = student(z_t, timesteps.to(images.dtype), labels, scales)
    x0_student, _ = x0_eps_from_prediction(student_out, z_t, alpha, sigma, student_prediction_type)
    loss = weighted_x_error(x0_student, target, alpha, sigma, weighting)
    return _named("guidance", loss, guidance_scale=scales.mean())


LCM_TIMESTEP_SCALING = 10.0
"""LCM's ``timestep_scaling_factor``: scales the timestep inside c_skip/c_out so the boundary
condition only bites near t = 0."""
LCM_SIGMA_DATA = 0.5


def consistency_boundary_scalings(
    timesteps: Tensor, timestep_scaling: float = LCM_TIMESTEP_SCALING
) -> tuple[Tensor, Tensor]:
    """LCM's ``(c_skip, c_out)`` at discrete timesteps: with ``u = scaling·t``,
    ``c_skip = σ_d²/(u² + σ_d²)``, ``c_out = u/sqrt(u² + σ_d²)`` (σ_d = 0.5), so
    ``f(x, 0) = x`` (the consistency model's boundary condition).

    Returns:
        two ``(B,)`` float64 tensors.
    """
    scaled = timesteps.to(torch.float64) * timestep_scaling
    c_skip = LCM_SIGMA_DATA**2 / (scaled.square() + LCM_SIGMA_DATA**2)
    c_out = scaled / (scaled.square() + LCM_SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def consistency_function(
    network_output: Tensor,
    x_t: Tensor,
    timesteps: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction_type: PredictionType | str,
    timestep_scaling: float = LCM_TIMESTEP_SCALING,
) -> Tensor:
    """``f_θ(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂₀(x_t, t)``: the consistency model built on a
    denoiser's output (LCM parameterisation).

    Args:
        network_output: ``(B, C, H, W)``.
        x_t: ``(B, C, H, W)`` its input.
        timesteps: ``(B,)``.
    """
    alpha, sigma = schedule.alpha_sigma(timesteps)
    x0, _ = x0_eps_from_prediction(network_output, x_t, alpha, sigma, prediction_type)
    c_skip, c_out = consistency_boundary_scalings(timesteps, timestep_scaling)
    return expand_like(c_skip, x_t) * x_t + expand_like(c_out, x_t) * x0


class ConsistencyMetric(str, Enum):
    """The distance d of consistency distillation."""

    L2 = "l2"
    PSEUDO_HUBER = "pseudo_huber"  # sqrt(d² + c²) − c (Song & Dhariwal 2023; LCM's "huber")


def consistency_distillation_loss(
    student: GuidedDenoiser,
    target_network: GuidedDenoiser,
    teacher: Denoiser,
    images: Tensor,
    labels: Tensor,
    *,
    schedule: NoiseSchedule,
    student_prediction_type: PredictionType | str,
    teacher_prediction_type: PredictionType | str,
    null_class: int,
    guidance_range: tuple[float, float],
    generator: torch.Generator,
    num_ddim_timesteps: int = 50,
    metric: ConsistencyMetric | str = ConsistencyMetric.L2,
    huber_c: float = 0.001,
    timestep_scaling: float = LCM_TIMESTEP_SCALING,
) -> DiffusionLoss:
    """Guided consistency distillation as diffusers' LCM script does it (Luo et al. 2023;
    Song et al. 2023), one micro-batch:

    1. ``j ~ U{0..M−1}`` on the M-point DDIM grid (k = T/M): ``t_start = k·(j+1) − 1``,
       ``t = max(t_start − k, 0)``; ``s ~ U[guidance_range]``;
    2. ``z = α x + σ ε`` at ``t_start``; online ``f_θ(z, t_start, s)`` (:func:`consistency_function`);
    3. the teacher's classifier-free-guided x̂₀ and ε̂ at ``t_start`` and one DDIM step to ``t``;
    4. the target ``f_θ⁻(x_prev, t, s)`` from the EMA network (no gradient);
    5. ``d(online, target)``, L2 or pseudo-Huber.

    The EMA update of ``target_network`` (decay 0.95 in LCM) is the recipe's, after the
    optimiser step.

    Args:
        student: the guidance-conditioned online network.
        target_network: its EMA copy θ⁻.
        teacher: the class-conditional teacher (frozen).
        images: ``(B, C, H, W)`` clean images in [−1, 1].
        labels: ``(B,)``.
        schedule: the noise schedule.
        student_prediction_type, teacher_prediction_type: their parameterisations.
        null_class: the id of "no class".
        guidance_range: ``(s_min, s_max)`` (LCM's ``w`` is ``s − 1``).
        generator: grid indices, scales, noise.
        num_ddim_timesteps: M (50 in LCM).
        metric: the distance d.
        huber_c: c of the pseudo-Huber metric (0.001 in LCM).
        timestep_scaling: LCM's timestep scaling of the boundary condition (10).
    """
    batch = images.shape[0]
    k = schedule.num_train_timesteps // num_ddim_timesteps
    index = torch.randint(
        0, num_ddim_timesteps, (batch,), generator=generator, device=generator.device
    )
    t_start = (k * (index + 1) - 1).to(images.device).to(torch.float64)
    t_prev = (t_start - k).clamp_min(0.0)
    scales = _uniform_scales(batch, guidance_range, generator).to(images.device)
    noise = _randn_like(images, generator)
    alpha, sigma = schedule.alpha_sigma(t_start)
    z = add_noise(images, noise, alpha, sigma)
    online = consistency_function(
        student(z, t_start.to(images.dtype), labels, scales),
        z,
        t_start,
        schedule=schedule,
        prediction_type=student_prediction_type,
        timestep_scaling=timestep_scaling,
    )
    with torch.no_grad():
        guided_teacher = classifier_free_guidance(teacher, scales, null_class)
        x0, eps = _x0_eps(guided_teacher, z, t_start, labels, schedule, teacher_prediction_type)
        x_prev = ddim_step(x0, eps, *schedule.alpha_sigma(t_prev))
        target = consistency_function(
            target_network(x_prev, t_prev.to(images.dtype), labels, scales),
            x_prev,
            t_prev,
            schedule=schedule,
            prediction_type=student_prediction_type,
            timestep_scaling=timestep_scaling,
        )
    difference = online.float() - target.float()
    if ConsistencyMetric(metric) is ConsistencyMetric.PSEUDO_HUBER:
        loss = ((difference.square() + huber_c**2).sqrt() - huber_c).mean()
    else:
        loss = difference.square().mean()
    return _named("consistency", loss, guidance_scale=scales.mean())


def adapter_guidance_loss(student: GuidedDenoiser, rows: Trajectories) -> DiffusionLoss:
    """Adapter guidance distillation (Jensen & Sadat 2025, paper #53): the adapters' one-pass
    output matches the classifier-free-guided output recorded on guided sampling trajectories
    (:func:`~distil.diffusion.sampling.record_guided_trajectories`), plain MSE in the model's
    own output space (AGD's "l2" loss on ε).

    Args:
        student: an :class:`~distil.diffusion.model.AdapterGuidedUNet` (or any guided denoiser
            with the teacher's parameterisation).
        rows: a micro-batch of recorded trajectory rows.
    """
    out = student(rows.inputs, rows.timesteps, rows.labels, rows.guidance_scales)
    loss = (out - rows.outputs.to(out.dtype)).square().mean()
    return _named("adapter_guidance", loss)
