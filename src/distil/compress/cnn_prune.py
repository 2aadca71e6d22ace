"""Output-channel pruning of CNN classifiers.

Two ways, both returning a new, smaller model (the input is left unchanged):

- :func:`prune_small_cnn`: distil's own slicing of the zoo ``SmallCNN`` (``models.classifier``):
  each stage's convolution loses output channels, its BatchNorm the same channels, and the
  consumer (the next convolution's input channels, or the head's input features) the same.
  Channels are ranked by BatchNorm ``|gamma|`` (network slimming, the criterion of seed #64),
  by the L2 norm of the convolution filter, or by their activation on calibration images
  (mean ``|a|`` over positions, L2 over images, as Minitron aggregates).
- :func:`prune_with_depgraph`: Torch-Pruning's dependency graph, for any CNN whose channels are
  coupled in ways the own slicing does not follow (residual connections of the zoo ResNet, a
  ``module:factory`` model).

:func:`zoo_kwargs_of` reads the widths of a pruned zoo model back into the zoo kwargs, so a
folder saved from it can be rebuilt with ``build_classifier``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from distil.compress import require
from distil.errors import DistilError
from distil.models.classifier import SmallCNN, SmallResNet

logger = logging.getLogger(__name__)


class ChannelImportance(str, Enum):
    """How output channels are ranked."""

    bn_scale = "bn_scale"  # |gamma| of the BatchNorm after the convolution (network slimming)
    weight_l2 = "weight_l2"  # L2 norm of the convolution filter
    activation = "activation"  # activation magnitude on calibration images (own slicing only)


def _stage_parts(model: SmallCNN) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.Module]]:
    """(conv, batch norm, activation) of every stage of a zoo ``SmallCNN``."""
    parts = []
    for index, stage in enumerate(model.stages):
        modules = list(stage.children()) if isinstance(stage, nn.Sequential) else []
        if (
            len(modules) < 3
            or not isinstance(modules[0], nn.Conv2d)
            or not isinstance(modules[1], nn.BatchNorm2d)
        ):
            raise DistilError(
                f"stage {index} of the CNN is not Conv2d → BatchNorm2d → activation; "
                "use prune_with_depgraph (Torch-Pruning) for this model"
            )
        conv, bn, act = modules[0], modules[1], modules[2]
        if conv.groups != 1:
            raise DistilError(f"stage {index} has a grouped convolution; use prune_with_depgraph")
        parts.append((conv, bn, act))
    return parts


def _l2_over_images(per_image: Tensor) -> Tensor:
    """``(N, C)`` per-image scores → ``(C,)``: the L2 norm over images."""
    return per_image.pow(2).sum(0).sqrt()


@torch.no_grad()
def small_cnn_channel_scores(
    model: SmallCNN,
    importance: ChannelImportance,
    calibration: Iterable[Tensor] | None = None,
) -> list[Tensor]:
    """Score every output channel of every stage.

    Args:
        model: A zoo ``SmallCNN``.
        importance: The criterion.
        calibration: Image batches ``(B, C, H, W)``; needed for ``activation`` only.

    Returns:
        Per stage, ``(C_stage,)`` scores; larger means more important.
    """
    parts = _stage_parts(model)
    if importance == ChannelImportance.bn_scale:
        return [bn.weight.detach().abs().clone() for _, bn, _ in parts]
    if importance == ChannelImportance.weight_l2:
        return [conv.weight.detach().flatten(1).norm(dim=1) for conv, _, _ in parts]
    if calibration is None:
        raise DistilError("activation importance needs calibration images")
    squares = [torch.zeros(conv.out_channels) for conv, _, _ in parts]

    def hook(stage: int) -> Callable[..., None]:
        def on_output(_module: nn.Module, _args: tuple[Any, ...], out: Tensor) -> None:
            per_image = out.detach().float().abs().mean(dim=(2, 3))  # (B, C)
            squares[stage] += per_image.pow(2).sum(0).cpu()

        return on_output

    handles = [act.register_forward_hook(hook(i)) for i, (_, _, act) in enumerate(parts)]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        device = next(model.parameters()).device
        for images in calibration:
            model(images.to(device))
            seen += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise DistilError("activation importance got no calibration images")
    return [s.sqrt() for s in squares]


def _top_sorted(scores: Tensor, keep: int) -> Tensor:
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def channels_after(channels: Sequence[int], *, ratio: float) -> list[int]:
    """Channels left per stage after removing ``ratio`` of each (at least one)."""
    if not 0 <= ratio < 1:
        raise DistilError(f"pruning ratio must be in [0, 1), got {ratio}")
    return [max(1, round(c * (1 - ratio))) for c in channels]


def _slice_conv(conv: nn.Conv2d, out_keep: Tensor | None, in_keep: Tensor | None) -> nn.Conv2d:
    weight = conv.weight.detach()  # (out, in, kh, kw)
    if out_keep is not None:
        weight = weight[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if conv.bias is not None:
        bias = conv.bias.detach()
        new.bias.data.copy_(bias if out_keep is None else bias[out_keep])  # type: ignore[union-attr]
    return new


def _slice_bn(bn: nn.BatchNorm2d, keep: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(keep.numel(), eps=bn.eps, momentum=bn.momentum, affine=bn.affine).to(
        device=bn.weight.device, dtype=bn.weight.dtype
    )
    state = {k: (v[keep] if v.dim() == 1 else v) for k, v in bn.state_dict().items()}
    new.load_state_dict(state)
    return new


def prune_small_cnn(model: SmallCNN, keep: Sequence[Tensor]) -> SmallCNN:
    """A copy of a zoo ``SmallCNN`` keeping the output channels ``keep[stage]`` of each stage.

    Args:
        model: The CNN (left unchanged).
        keep: Per stage, increasing channel indices to keep.

    Returns:
        The pruned copy, in the input's train/eval mode.
    """
    parts = _stage_parts(model)
    if len(keep) != len(parts):
        raise DistilError(f"keep has {len(keep)} entries for {len(parts)} stages")
    pruned = copy.deepcopy(model)
    previous: Tensor | None = None
    for stage, (stage_keep, (conv, bn, _)) in enumerate(zip(keep, parts, strict=True)):
        if stage_keep.numel() == 0 or int(stage_keep.max()) >= conv.out_channels:
            raise DistilError(
                f"stage {stage}: keep indices must be non-empty and below {conv.out_channels}"
            )
        block = pruned.stages[stage]
        assert isinstance(block, nn.Sequential)  # checked by _stage_parts
        block[0] = _slice_conv(conv, stage_keep, previous)
        block[1] = _slice_bn(bn, stage_keep)
        previous = stage_keep
    assert previous is not None
    head = model.head
    new_head = nn.Linear(previous.numel(), head.out_features, bias=head.bias is not None).to(
        device=head.weight.device, dtype=head.weight.dtype
    )
    new_head.weight.data.copy_(head.weight.detach()[:, previous])
    if head.bias is not None:
        new_head.bias.data.copy_(head.bias.detach())
    pruned.head = new_head
    pruned.train(model.training)  # the new modules are built in train mode
    return pruned


@dataclass(frozen=True)
class CNNPruneResult:
    """A pruned CNN and the channels it kept.

    Attributes:
        model: The pruned copy.
        kept: Per stage, the original indices of the kept channels (own slicing only).
        channels: The new width of every stage.
    """

    model: nn.Module
    kept: list[Tensor] | None
    channels: list[int]


def prune_small_cnn_channels(
    model: SmallCNN,
    *,
    channels: Sequence[int] | None = None,
    ratio: float | None = None,
    importance: ChannelImportance = ChannelImportance.bn_scale,
    calibration: Iterable[Tensor] | None = None,
) -> CNNPruneResult:
    """Prune a zoo ``SmallCNN`` to ``channels`` per stage (or by ``ratio``), own slicing.

    Args:
        model: The CNN (left unchanged).
        channels: New width of every stage; exclusive with ``ratio``.
        ratio: Share of every stage's channels to remove.
        importance: How channels are ranked.
        calibration: Image batches ``(B, C, H, W)`` for ``activation`` importance.
    """
    parts = _stage_parts(model)
    widths = [conv.out_channels for conv, _, _ in parts]
    if (channels is None) == (ratio is None):
        raise DistilError("give exactly one of channels or ratio")
    target = list(channels) if channels is not None else channels_after(widths, ratio=ratio or 0.0)
    bad = [
        f"stage {i}: {t} (has {w})"
        for i, (t, w) in enumerate(zip(target, widths, strict=False))
        if not 1 <= t <= w
    ]
    if len(target) != len(widths) or bad:
        raise DistilError(
            f"channels {target} must give each of the {len(widths)} stages between 1 and its "
            f"current width {widths}; {bad}"
        )
    scores = small_cnn_channel_scores(model, importance, calibration)
    keep = [_top_sorted(s, t) for s, t in zip(scores, target, strict=True)]
    logger.info("pruned CNN channels %s -> %s by %s", widths, target, importance.value)
    return CNNPruneResult(prune_small_cnn(model, keep), keep, target)


def prune_with_depgraph(
    model: nn.Module,
    example_inputs: Tensor,
    *,
    ratio: float,
    importance: ChannelImportance = ChannelImportance.weight_l2,
    ignored: Sequence[nn.Module] | None = None,
) -> nn.Module:
    """Prune ``ratio`` of the channels of every coupled group with Torch-Pruning's DepGraph.

    Args:
        model: Any CNN (left unchanged; a copy is pruned).
        example_inputs: One input batch ``(B, C, H, W)`` to trace the dependency graph.
        ratio: Share of channels removed from every group.
        importance: ``weight_l2`` (group L2 magnitude) or ``bn_scale``.
        ignored: Modules whose outputs must keep their size; default: the model's ``head``
            (or last ``nn.Linear``), so the number of classes is kept.

    Returns:
        The pruned copy.
    """
    require("torch_pruning")
    import torch_pruning as tp

    if not 0 <= ratio < 1:
        raise DistilError(f"pruning ratio must be in [0, 1), got {ratio}")
    pruned = copy.deepcopy(model)
    pruned.eval()
    if ignored is None:
        linears: list[nn.Module] = [m for m in pruned.modules() if isinstance(m, nn.Linear)]
        head = getattr(pruned, "head", None)
        ignored_modules: list[nn.Module] = (
            [head] if isinstance(head, nn.Module) else linears[-1:] if linears else []
        )
    else:  # the caller's modules belong to the original: find their copies by name
        names = {id(m): n for n, m in model.named_modules()}
        ignored_modules = [pruned.get_submodule(names[id(m)]) for m in ignored]
    scorer: Any
    if importance == ChannelImportance.weight_l2:
        scorer = tp.importance.GroupMagnitudeImportance(p=2)
    elif importance == ChannelImportance.bn_scale:
        scorer = tp.importance.BNScaleImportance()
    else:
        raise DistilError(
            "Torch-Pruning is used with weight_l2 or bn_scale importance; activation importance "
            "is available for the zoo CNN's own slicing"
        )
    pruner = tp.pruner.BasePruner(
        pruned,
        example_inputs,
        importance=scorer,
        pruning_ratio=ratio,
        ignored_layers=ignored_modules,
    )
    with torch.no_grad():
        pruner.step()
    pruned.train(model.training)
    return pruned


def zoo_kwargs_of(zoo: str, model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The zoo kwargs that rebuild a (pruned) zoo CNN or ResNet with its current widths.

    Raises:
        DistilError: For another zoo name, or widths a zoo model cannot express (the stages of
            a ResNet whose two convolutions were pruned to different widths).
    """
    out = dict(kwargs)
    if zoo == "cnn" and isinstance(model, SmallCNN):
        out["channels"] = [conv.out_channels for conv, _, _ in _stage_parts(model)]
        return out
    if zoo == "resnet" and isinstance(model, SmallResNet):
        widths = []
        for stage in model.stages:
            convs = [m.out_channels for m in stage.modules() if isinstance(m, nn.Conv2d)]
            if len(set(convs)) != 1:
                raise DistilError(
                    f"a pruned ResNet stage has convolutions of widths {sorted(set(convs))}; "
                    "the zoo ResNet has one width per stage"
                )
            widths.append(convs[0])
        stem = next(m for m in model.stem.modules() if isinstance(m, nn.Conv2d)).out_channels
        if stem != widths[0]:
            raise DistilError(f"the stem ({stem}) and first stage ({widths[0]}) widths differ")
        out["widths"] = widths
        return out
    raise DistilError(f"cannot express a pruned {type(model).__name__} as zoo {zoo!r} kwargs")
