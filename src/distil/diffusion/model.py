"""Class-conditional pixel-space denoisers: diffusers ``UNet2DModel`` with a null class for
classifier-free guidance, the guidance-conditioned student of guidance distillation (Meng et al.),
the frozen base with offset adapters of adapter guidance distillation (AGD, paper #53), the
callables samplers and losses read (:class:`Denoiser`, :class:`GuidedDenoiser`), an EMA update,
and a model folder (``diffusion.json`` + ``model.safetensors``).

Guidance enters a network as an embedding added where the class embedding goes (every resnet
block reads it through its time-embedding projection); it is added by a forward hook installed
for the duration of one call, so the UNet stays a stock diffusers module whose weights load into
the student unchanged.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import Field
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.diffusion.schedule import BetaSchedule, PredictionType
from distil.errors import DistilError

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "AdapterGuidedUNet",
    "Denoiser",
    "DiffusionModelCard",
    "GuidanceConditionedUNet",
    "GuidanceEmbedding",
    "GuidedDenoiser",
    "ModelKind",
    "SamplingDefaults",
    "UNetSpec",
    "build_unet",
    "card_for",
    "ema_update",
    "find_model_folder",
    "guided_denoiser",
    "load_card",
    "load_diffusion_model",
    "parameter_count",
    "save_diffusion_model",
    "unet_denoiser",
    "with_guidance",
]

logger = logging.getLogger(__name__)

CARD_FILE = "diffusion.json"
WEIGHTS_FILE = "model.safetensors"

GUIDANCE_EMBED_SCALE = 1000.0
"""Guidance scales are multiplied by this before the sinusoidal embedding, so the scales a model
sees (1 to ~10) spread over the embedding's frequencies like timesteps do (AGD's ``cfg_mult``)."""


class Denoiser(Protocol):
    """One network evaluation: ``(x_t (B, C, H, W), timesteps (B,) float, class_labels (B,) long)
    → output (B, C, H, W)`` in the model's prediction type."""

    def __call__(self, x_t: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor: ...


class GuidedDenoiser(Protocol):
    """A denoiser that also reads the guidance scale ``(B,)`` float (one pass instead of CFG's
    two)."""

    def __call__(
        self, x_t: Tensor, timesteps: Tensor, class_labels: Tensor, guidance_scale: Tensor
    ) -> Tensor: ...


class UNetSpec(StrictModel):
    """The shape of a small pixel-space UNet (diffusers ``UNet2DModel``)."""

    image_size: int = Field(default=16, ge=4)
    channels: int = Field(default=1, ge=1)
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = Field(default=1, ge=1)
    mid_attention: bool = False  # at 4x4 an attention block costs time and buys little
    norm_num_groups: int = Field(default=8, ge=1)


def build_unet(spec: UNetSpec, num_classes: int, *, seed: int = 0) -> Any:
    """A class-conditional ``UNet2DModel`` with ``num_classes + 1`` class embeddings: the last id
    (``num_classes``) is the null class that classifier-free guidance uses as "unconditional".

    Args:
        spec: the network shape.
        num_classes: number of real classes.
        seed: initialisation seed.

    Returns:
        a ``diffusers.UNet2DModel`` (typed ``Any``: diffusers ships no type information).
    """
    from diffusers import UNet2DModel

    if any(c % spec.norm_num_groups for c in spec.block_out_channels):
        raise DistilError(
            f"model.norm_num_groups={spec.norm_num_groups} must divide every width in "
            f"model.block_out_channels={list(spec.block_out_channels)}"
        )
    levels = len(spec.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=spec.image_size,
            in_channels=spec.channels,
            out_channels=spec.channels,
            block_out_channels=spec.block_out_channels,
            layers_per_block=spec.layers_per_block,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            add_attention=spec.mid_attention,
            norm_num_groups=spec.norm_num_groups,
            num_class_embeds=num_classes + 1,
        )


def unet_denoiser(unet: nn.Module) -> Denoiser:
    """The :class:`Denoiser` of a class-conditional ``UNet2DModel``."""

    def denoise(x_t: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        return unet(x_t, timesteps, class_labels=class_labels).sample

    return denoise


def guided_denoiser(model: nn.Module) -> GuidedDenoiser:
    """The :class:`GuidedDenoiser` of a :class:`GuidanceConditionedUNet` or
    :class:`AdapterGuidedUNet` (their ``forward`` has that signature)."""

    def denoise(
        x_t: Tensor, timesteps: Tensor, class_labels: Tensor, guidance_scale: Tensor
    ) -> Tensor:
        return model(x_t, timesteps, class_labels, guidance_scale)

    return denoise


def with_guidance(denoiser: GuidedDenoiser, guidance_scale: float | Tensor) -> Denoiser:
    """A guidance-conditioned denoiser at a fixed scale (a float, or ``(B,)`` one per row): one
    pass per evaluation."""

    def denoise(x_t: Tensor, timesteps: Tensor, class_labels: Tensor) -> Tensor:
        scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=x_t.device)
        return denoiser(x_t, timesteps, class_labels, scale.reshape(-1).expand(x_t.shape[0]))

    return denoise


def sinusoidal_embedding(values: Tensor, dim: int) -> Tensor:
    """``(B,)`` → ``(B, dim)`` cos/sin features at geometric frequencies (DDPM's timestep
    embedding, applied to a guidance scale)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(values, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class GuidanceEmbedding(nn.Module):
    """Guidance scale → an embedding of width ``out_dim``: Fourier features, Linear, SiLU, Linear.

    The last layer starts at zero, so a student built around a trained teacher starts as exactly
    the teacher's conditional model, whatever the scale.
    """

    def __init__(self, out_dim: int, fourier_dim: int = 32, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or out_dim
        self.fourier_dim = fourier_dim
        self.net = nn.Sequential(
            nn.Linear(fourier_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim)
        )
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, guidance_scale: Tensor) -> Tensor:
        """``(B,)`` → ``(B, out_dim)``."""
        features = sinusoidal_embedding(
            guidance_scale.float() * GUIDANCE_EMBED_SCALE, self.fourier_dim
        )
        return self.net(features)


@contextmanager
def _adding_to_output(module: nn.Module, addend: Tensor) -> Iterator[None]:
    """While the block runs, ``module``'s output gets ``addend`` added (broadcast over H, W
    for 4-D outputs); the hook is always removed."""

    def hook(_m: nn.Module, _args: Any, output: Tensor) -> Tensor:
        extra = addend if output.dim() == addend.dim() else addend[:, :, None, None]
        return output + extra.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _time_embed_dim(unet: Any) -> int:
    return int(unet.time_embedding.linear_2.out_features)


class GuidanceConditionedUNet(nn.Module):
    """A UNet that reads the guidance scale (Meng et al., stage 1): the scale's embedding is
    added to the class embedding, so one pass gives what classifier-free guidance gives in two.

    Built around a copy of the teacher (all weights trainable), it starts equal to the teacher's
    conditional model.
    """

    def __init__(self, unet: Any, fourier_dim: int = 32) -> None:
        super().__init__()
        if getattr(unet, "class_embedding", None) is None:
            raise DistilError(
                "guidance conditioning needs a class-conditional UNet (num_class_embeds)"
            )
        self.unet = unet
        self.guidance_embedding = GuidanceEmbedding(_time_embed_dim(unet), fourier_dim)

    @classmethod
    def from_teacher(
        cls, teacher_unet: nn.Module, fourier_dim: int = 32
    ) -> GuidanceConditionedUNet:
        """A student initialised from (a deep copy of) the teacher."""
        return cls(copy.deepcopy(teacher_unet), fourier_dim)

    def forward(
        self, x_t: Tensor, timesteps: Tensor, class_labels: Tensor, guidance_scale: Tensor
    ) -> Tensor:
        """``x_t (B, C, H, W)``, ``timesteps (B,)``, ``class_labels (B,)``, ``guidance_scale (B,)``
        → output ``(B, C, H, W)``."""
        addend = self.guidance_embedding(guidance_scale)  # (B, time_embed_dim)
        with _adding_to_output(self.unet.class_embedding, addend):
            return self.unet(x_t, timesteps, class_labels=class_labels).sample


class AdapterGuidedUNet(nn.Module):
    """Adapter guidance distillation (AGD, Jensen & Sadat 2025, paper #53): a frozen base UNet
    plus offset adapters, one per resnet block, that add a per-channel offset computed from the
    guidance scale and the base's own time + class embedding.

    The adapters follow AGD's "additive" (offset) architecture: an embedding of the scale plus a
    projection of the condition, an MLP, and a zero-initialised output layer per block (so the
    student starts as the base's conditional model). ``hidden_dim`` sets the adapter size; about
    2 % of the base's parameters is the paper's budget (:func:`parameter_count` reports it).
    """

    def __init__(self, base: Any, hidden_dim: int = 24, fourier_dim: int = 32) -> None:
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        self.base = base
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.fourier_dim = fourier_dim
        self.blocks = [m for m in base.modules() if isinstance(m, ResnetBlock2D)]
        if not self.blocks:
            raise DistilError(
                "adapter guidance distillation found no resnet blocks in the base UNet"
            )
        self.guidance_encoder = nn.Sequential(
            nn.Linear(fourier_dim, 2 * hidden_dim),
            nn.SiLU(),
            nn.Linear(2 * hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
        )
        self.condition_projection = nn.Linear(_time_embed_dim(base), hidden_dim)
        heads = []
        for block in self.blocks:
            head = nn.Linear(hidden_dim, int(block.conv2.out_channels))
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            heads.append(head)
        self.heads = nn.ModuleList(heads)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters (everything but the base)."""
        base_ids = {id(p) for p in self.base.parameters()}
        return [p for p in self.parameters() if id(p) not in base_ids]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The adapters alone: they load onto any checkpoint of the same base architecture."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def forward(
        self, x_t: Tensor, timesteps: Tensor, class_labels: Tensor, guidance_scale: Tensor
    ) -> Tensor:
        """``x_t (B, C, H, W)``, ``timesteps (B,)``, ``class_labels (B,)``, ``guidance_scale (B,)``
        → output ``(B, C, H, W)``."""
        base = self.base
        with torch.no_grad():  # the base's embedding of (t, c) is an input, not trained
            t_emb = base.time_proj(timesteps.reshape(-1).expand(x_t.shape[0]))
            condition = base.time_embedding(t_emb.to(x_t.dtype)) + base.class_embedding(
                class_labels
            )
        scale_features = sinusoidal_embedding(
            guidance_scale.float() * GUIDANCE_EMBED_SCALE, self.fourier_dim
        )
        hidden = torch.nn.functional.silu(
            self.guidance_encoder(scale_features) + self.condition_projection(condition)
        )  # (B, hidden_dim)
        with ExitStack() as hooks:
            for block, head in zip(self.blocks, self.heads, strict=True):
                hooks.enter_context(_adding_to_output(block, head(hidden)))
            return base(x_t, timesteps, class_labels=class_labels).sample


def parameter_count(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``θ_target ← decay·θ_target + (1 − decay)·θ_source`` for every parameter; buffers are
    copied. The two modules must have the same structure."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    for t_param, s_param in zip(target.parameters(), source.parameters(), strict=True):
        t_param.lerp_(s_param.detach(), 1.0 - decay)
    for t_buf, s_buf in zip(target.buffers(), source.buffers(), strict=True):
        t_buf.copy_(s_buf)


class ModelKind(str, Enum):
    """Which module a model folder holds."""

    UNET = "unet"  # a class-conditional UNet (teacher, progressive-distillation student)
    GUIDED_UNET = "guided_unet"  # GuidanceConditionedUNet (guidance/consistency students)
    ADAPTER_UNET = "adapter_unet"  # AdapterGuidedUNet (AGD)


class SamplingDefaults(StrictModel):
    """How a model is meant to be sampled, recorded by whoever trained it."""

    sampler: str = "ddim"
    steps: int = Field(default=50, ge=1)
    guidance_scale: float = Field(default=1.0, ge=0.0)
    consistency: bool = False  # a consistency model: samplers apply the boundary condition


class DiffusionModelCard(StrictModel):
    """What ``diffusion.json`` says about the weights next to it."""

    kind: ModelKind
    unet_config: dict[str, Any]
    num_classes: int = Field(ge=1)
    class_names: list[str]
    beta_schedule: BetaSchedule
    num_train_timesteps: int = Field(default=1000, ge=2)
    prediction_type: PredictionType
    guidance_fourier_dim: int = 32
    adapter_hidden_dim: int = 24
    sampling: SamplingDefaults = SamplingDefaults()
    notes: dict[str, Any] = Field(default_factory=dict)

    @property
    def null_class(self) -> int:
        return self.num_classes


def _unwrap_unet(module: nn.Module) -> Any:
    if isinstance(module, GuidanceConditionedUNet):
        return module.unet
    if isinstance(module, AdapterGuidedUNet):
        return module.base
    return module


def save_diffusion_model(folder: Path, module: nn.Module, card: DiffusionModelCard) -> Path:
    """Write ``model.safetensors`` and ``diffusion.json`` into ``folder`` (created)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CARD_FILE).write_text(card.model_dump_json(indent=1))
    return folder


def _build_from_card(card: DiffusionModelCard) -> nn.Module:
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_config(card.unet_config)
    if card.kind is ModelKind.UNET:
        return unet
    if card.kind is ModelKind.GUIDED_UNET:
        return GuidanceConditionedUNet(unet, card.guidance_fourier_dim)
    return AdapterGuidedUNet(unet, card.adapter_hidden_dim, card.guidance_fourier_dim)


def find_model_folder(path: Path) -> Path:
    """A model folder itself, or the model inside a run folder: ``final/``, ``model/final``
    (``diffusion_train``) or ``student/final`` (``diffusion_distill``)."""
    for candidate in (path, path / "final", path / "model" / "final", path / "student" / "final"):
        if (candidate / CARD_FILE).is_file():
            return candidate
    raise DistilError(
        f"{path}: no {CARD_FILE} here or in final/, model/final or student/final; give a "
        "diffusion model folder or a diffusion_train / diffusion_distill run folder"
    )


def load_card(path: Path) -> DiffusionModelCard:
    """The card of a model folder (or of the model inside a run folder)."""
    file = find_model_folder(path) / CARD_FILE
    try:
        return DiffusionModelCard.model_validate(json.loads(file.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        raise DistilError(f"{file} is not a valid diffusion model card: {exc}") from exc


def load_diffusion_model(path: Path) -> tuple[nn.Module, DiffusionModelCard]:
    """Read a model folder (or a run folder holding one) into an eval-mode module and its card."""
    from safetensors.torch import load_file

    card = load_card(path)
    module = _build_from_card(card)
    module.load_state_dict(load_file(str(find_model_folder(path) / WEIGHTS_FILE)))
    module.eval()
    return module, card


def card_for(
    module: nn.Module,
    *,
    class_names: list[str],
    beta_schedule: BetaSchedule,
    prediction_type: PredictionType,
    num_train_timesteps: int = 1000,
    sampling: SamplingDefaults | None = None,
    notes: dict[str, Any] | None = None,
) -> DiffusionModelCard:
    """The card that describes ``module`` (a UNet, guided UNet or adapter UNet)."""
    unet = _unwrap_unet(module)
    kind = (
        ModelKind.GUIDED_UNET
        if isinstance(module, GuidanceConditionedUNet)
        else ModelKind.ADAPTER_UNET
        if isinstance(module, AdapterGuidedUNet)
        else ModelKind.UNET
    )
    extra: dict[str, Any] = {}
    if isinstance(module, GuidanceConditionedUNet):
        extra["guidance_fourier_dim"] = module.guidance_embedding.fourier_dim
    if isinstance(module, AdapterGuidedUNet):
        extra["guidance_fourier_dim"] = module.fourier_dim
        extra["adapter_hidden_dim"] = module.condition_projection.out_features
    return DiffusionModelCard(
        kind=kind,
        unet_config=json.loads(json.dumps(dict(unet.config))),  # JSON types, as the file holds
        num_classes=len(class_names),
        class_names=class_names,
        beta_schedule=beta_schedule,
        num_train_timesteps=num_train_timesteps,
        prediction_type=prediction_type,
        sampling=sampling or SamplingDefaults(),
        notes=notes or {},
        **extra,
    )
