"""Intermediate features by module name: capture with forward hooks, layer maps, projectors.

A feature is the output of a named submodule (``"stages.1"``, ``"encoder.layer.3"``). Capture
installs one forward hook per name for the duration of a ``with`` block and always removes them,
so a model leaves the block exactly as it entered. Layer maps pair student and teacher names,
given explicitly or chosen automatically (uniform over depth, the last k, or by matching
shapes); projectors map the student's width to the teacher's where they differ and are trained
with the student (they belong to the objective and are dropped at export).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distil.config.base import StrictModel
from distil.errors import DistilError
from distil.losses.objective import WeightedTerm
from distil.losses.representation import (
    ProjectorKind,
    attention_transfer,
    channel_wise_distillation,
    hint_loss,
    make_projector,
)

__all__ = [
    "ATTENTION_MASK",
    "FeatureDistiller",
    "FeatureLoss",
    "FeatureTerm",
    "LayerMapStrategy",
    "align_features",
    "auto_layer_map",
    "build_projectors",
    "capture_features",
    "feature_distiller",
    "feature_shapes",
    "find_blocks",
    "last_k_layer_map",
    "masked_token_hint",
    "projector_key",
    "shape_layer_map",
    "uniform_layer_map",
]

logger = logging.getLogger(__name__)

LayerPair = tuple[str, str]
"""``(student_module_name, teacher_module_name)``."""

ATTENTION_MASK = "<attention_mask>"
"""Key under which :func:`capture_features` also records the ``attention_mask`` keyword the model
was called with (no module name contains ``<``). Hint terms on ``(B, L, D)`` token features use
it to compare real tokens only."""


class LayerMapStrategy(str, Enum):
    """How to pair student and teacher blocks when no explicit map is given."""

    UNIFORM = (
        "uniform"  # student block i -> teacher block ⌈(i+1)·T/S⌉-1 (TinyBERT's map; last to last)
    )
    LAST_K = "last_k"  # the last k student blocks -> the last k teacher blocks
    SHAPE = "shape"  # each student block -> the deepest teacher block with the same geometry


def _primary_output(output: Any) -> Tensor:
    """The tensor a block produces: itself, the first of a tuple, or ``last_hidden_state``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise DistilError(
        f"cannot take a feature tensor from a module output of type {type(output).__name__}"
    )


def _submodule(module: nn.Module, name: str) -> nn.Module:
    try:
        return module.get_submodule(name)
    except AttributeError:
        import difflib

        names = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise DistilError(f"no submodule named {name!r} in {type(module).__name__}{hint}") from None


@contextmanager
def capture_features(
    module: nn.Module, names: Sequence[str], *, detach: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of named submodules while the block runs.

    The yielded dict is filled on every forward (a later forward overwrites the earlier
    values); the hooks are removed when the block exits, also on an exception.

    Args:
        module: the model.
        names: submodule names as ``named_modules()`` spells them.
        detach: store detached tensors (for a teacher that runs without grad anyway).

    Yields:
        name → the module's output tensor (the first element of a tuple output), and under
        :data:`ATTENTION_MASK` the 2-D ``attention_mask`` keyword of the model's forward, if
        it was called with one (Hugging Face token models are).

    Raises:
        DistilError: for an unknown name (with close matches).
    """
    features: dict[str, Tensor] = {}
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _primary_output(output)
            features[name] = tensor.detach() if detach else tensor

        return hook

    def record_mask(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2:
            features[ATTENTION_MASK] = mask.detach()

    try:
        for name in dict.fromkeys(names):  # de-duplicated, in order
            handles.append(_submodule(module, name).register_forward_hook(hook_for(name)))
        if handles:  # token models are called with attention_mask=...; padding must not count
            handles.append(module.register_forward_pre_hook(record_mask, with_kwargs=True))
        yield features
    finally:
        for handle in handles:
            handle.remove()


def find_blocks(module: nn.Module, container: str | None = None) -> list[str]:
    """Names of the repeated blocks of a model, in depth order.

    Args:
        module: the model.
        container: the name of the ``ModuleList``/``Sequential`` that holds the blocks; None
            picks one whose children share a type, with the most children (``encoder.layer``
            of a BERT, ``stages`` of the zoo CNN).

    Returns:
        ``["<container>.0", "<container>.1", ...]``.

    Raises:
        DistilError: when the model has no such container.
    """
    if container is not None:
        holder = _submodule(module, container)
        return [f"{container}.{child}" for child, _ in holder.named_children()]
    # blocks repeat: prefer containers whose children share one type (a stage's own
    # Conv/BN/ReLU list does not), then the most children, then the shallowest
    best: tuple[tuple[bool, int, int], str] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) > 0:
            score = (len({type(c) for c in sub.children()}) == 1, len(sub), -name.count("."))
            if best is None or score > best[0]:
                best = (score, name)
    if best is None:
        raise DistilError(
            f"{type(module).__name__} has no ModuleList/Sequential of blocks; give the layer map explicitly"
        )
    prefix = f"{best[1]}." if best[1] else ""  # "" when the model itself is the Sequential
    return [f"{prefix}{child}" for child, _ in module.get_submodule(best[1]).named_children()]


def uniform_layer_map(student: Sequence[str], teacher: Sequence[str]) -> list[LayerPair]:
    """Spread the student's blocks uniformly over the teacher's depth.

    Student block ``i`` (0-based, of S) is paired with teacher block ``⌈(i+1)·T/S⌉ − 1`` (of T):
    the last student block always learns from the last teacher block. With S > T several
    student blocks share a teacher block.
    """
    if not student or not teacher:
        raise DistilError("a layer map needs at least one student and one teacher block")
    s, t = len(student), len(teacher)
    return [(student[i], teacher[-(-(i + 1) * t // s) - 1]) for i in range(s)]


def last_k_layer_map(student: Sequence[str], teacher: Sequence[str], k: int) -> list[LayerPair]:
    """Pair the last ``k`` student blocks with the last ``k`` teacher blocks, in order."""
    if k < 1 or k > min(len(student), len(teacher)):
        raise DistilError(
            f"last_k needs 1 <= k <= min(student blocks, teacher blocks) = {min(len(student), len(teacher))}, got {k}"
        )
    return list(zip(student[-k:], teacher[-k:], strict=True))


def _geometry(shape: torch.Size) -> tuple[int, ...]:
    """Everything but the width: spatial dims of ``(B, C, H, W)``, the rest of ``(B, ..., D)``."""
    if len(shape) == 4:
        return (shape[0], *shape[2:])
    return tuple(shape[:-1])


def shape_layer_map(
    student_shapes: Mapping[str, torch.Size], teacher_shapes: Mapping[str, torch.Size]
) -> list[LayerPair]:
    """Pair each student block with the deepest teacher block of the same geometry.

    Geometry is the shape without the width (channels of a map, last dim of a sequence), so a
    projector can fix the width. Pairs stay in depth order: a student block never maps to a
    teacher block shallower than the previous pair's. Blocks without a match are left out.

    Args:
        student_shapes: name → output shape, in depth order (from :func:`feature_shapes`).
        teacher_shapes: same, for the teacher.

    Returns:
        The pairs; empty if no geometry matches.
    """
    teacher_names = list(teacher_shapes)
    pairs: list[LayerPair] = []
    floor = 0
    for s_name, s_shape in student_shapes.items():
        matches = [
            i
            for i in range(floor, len(teacher_names))
            if _geometry(teacher_shapes[teacher_names[i]]) == _geometry(s_shape)
        ]
        if not matches:
            continue
        # the deepest block of a run of equal geometry is the end of a resolution stage
        j = matches[0]
        while j + 1 < len(teacher_names) and j + 1 in matches:
            j += 1
        pairs.append((s_name, teacher_names[j]))
        floor = j
    return pairs


def feature_shapes(
    module: nn.Module, names: Sequence[str], run: Callable[[], Any]
) -> dict[str, torch.Size]:
    """Output shapes of named submodules, found by running ``run()`` (a forward) once.

    Args:
        module: the model.
        names: submodule names.
        run: a no-argument callable that runs a forward of ``module`` (on a small batch).

    Returns:
        name → shape, in the order of ``names``.
    """
    was_training = module.training
    module.eval()  # a probe must not move BatchNorm statistics
    try:
        with torch.no_grad(), capture_features(module, names, detach=True) as captured:
            run()
    finally:
        module.train(was_training)
    missing = [n for n in names if n not in captured]
    if missing:
        raise DistilError(
            f"modules {missing} did not run in a forward pass; pick blocks on the forward path"
        )
    return {n: captured[n].shape for n in names}


def auto_layer_map(
    strategy: LayerMapStrategy | str,
    student_shapes: Mapping[str, torch.Size],
    teacher_shapes: Mapping[str, torch.Size],
    *,
    k: int = 1,
) -> list[LayerPair]:
    """A layer map by strategy over blocks with known shapes (see :class:`LayerMapStrategy`)."""
    strategy = LayerMapStrategy(strategy)
    student, teacher = list(student_shapes), list(teacher_shapes)
    if strategy is LayerMapStrategy.UNIFORM:
        pairs = uniform_layer_map(student, teacher)
    elif strategy is LayerMapStrategy.LAST_K:
        pairs = last_k_layer_map(student, teacher, k)
    else:
        pairs = shape_layer_map(student_shapes, teacher_shapes)
        if not pairs:
            raise DistilError(
                "no student block has the geometry of a teacher block; use strategy uniform or an explicit map"
            )
    logger.info("layer map (%s): %s", strategy.value, ", ".join(f"{s} -> {t}" for s, t in pairs))
    return pairs


def projector_key(pair: LayerPair) -> str:
    """The ``nn.ModuleDict`` key of a pair's projector (dots are not allowed in keys)."""
    return f"{pair[0]}->{pair[1]}".replace(".", "_")


def build_projectors(
    pairs: Sequence[LayerPair],
    student_shapes: Mapping[str, torch.Size],
    teacher_shapes: Mapping[str, torch.Size],
    *,
    kind: ProjectorKind | str | None = None,
) -> nn.ModuleDict:
    """One projector per pair from the student's width to the teacher's.

    ``(B, C, H, W)`` maps get a 1×1 convolution, other features a linear map on the last dim;
    equal widths get ``nn.Identity``. Train the returned modules with the student (add their
    parameters to the optimiser) and leave them out of the exported student.

    Args:
        pairs: the layer map.
        student_shapes: name → output shape of the student blocks.
        teacher_shapes: name → output shape of the teacher blocks.
        kind: force ``"linear"`` or ``"conv1x1"``; None chooses by the rank of the feature.

    Returns:
        A ``ModuleDict`` keyed by :func:`projector_key`.
    """
    projectors = nn.ModuleDict()
    for pair in pairs:
        s_shape, t_shape = student_shapes[pair[0]], teacher_shapes[pair[1]]
        if len(s_shape) != len(t_shape):
            raise DistilError(
                f"{pair[0]} {tuple(s_shape)} and {pair[1]} {tuple(t_shape)} have different ranks"
            )
        chosen = (
            ProjectorKind(kind)
            if kind is not None
            else (ProjectorKind.CONV1X1 if len(s_shape) == 4 else ProjectorKind.LINEAR)
        )
        width = 1 if chosen is ProjectorKind.CONV1X1 else -1
        projectors[projector_key(pair)] = make_projector(
            s_shape[width], t_shape[width], kind=chosen
        )
    return projectors


def align_features(
    student_features: Tensor, teacher_features: Tensor, projector: nn.Module | None = None
) -> tuple[Tensor, Tensor]:
    """Project the student's feature to the teacher's width and match spatial sizes.

    Maps of different spatial size are brought to the smaller one with adaptive average
    pooling (the larger map is summarised, never up-sampled).

    Args:
        student_features: ``(B, C_s, H_s, W_s)`` or ``(B, ..., D_s)``.
        teacher_features: ``(B, C_t, H_t, W_t)`` or ``(B, ..., D_t)``.
        projector: from :func:`build_projectors`, or None for no projection.

    Returns:
        ``(student, teacher)`` with equal shapes (for maps: equal spatial sizes; channels are
        equal after a projector).
    """
    s = projector(student_features) if projector is not None else student_features
    t = teacher_features
    if s.dim() == 4 and s.shape[2:] != t.shape[2:]:
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s = F.adaptive_avg_pool2d(s, size) if tuple(s.shape[2:]) != size else s
        t = F.adaptive_avg_pool2d(t, size) if tuple(t.shape[2:]) != size else t
    return s, t


class FeatureLoss(str, Enum):
    """Feature-KD losses for classifier maps (names used in configs)."""

    HINT = "hint"  # FitNets MSE after a projector
    CWD = "cwd"  # channel-wise distillation after a 1x1 projector (τ² applied in the objective)
    ATTENTION = "attention"  # attention transfer: channel counts may differ, no projector


class FeatureTerm(StrictModel):
    """One feature-KD term: which blocks, which loss, what weight."""

    student: str = Field(description="student module name, e.g. stages.1")
    teacher: str = Field(description="teacher module name, e.g. stages.2")
    loss: FeatureLoss = FeatureLoss.HINT
    weight: float = Field(default=1.0, ge=0)
    kd_temperature: float = Field(
        default=1.0, gt=0, description="τ of cwd (its τ² factor is applied)"
    )

    @property
    def name(self) -> str:
        """The metric name of the term: ``feature/<loss>/<student>-><teacher>``."""
        return f"feature/{self.loss.value}/{self.student}->{self.teacher}"


def masked_token_hint(
    student: Tensor, teacher: Tensor, attention_mask: Tensor, num_items: float
) -> Tensor:
    """Hint MSE of ``(B, L, D)`` token features over real tokens only.

    Per example: the mean of ``(s − t)²`` over its unpadded positions and the width; then the sum
    over examples divided by ``num_items``. Padded positions get no gradient, and a short example
    weighs as much as a long one (as without a mask, where every example has L positions).

    Args:
        student: ``(B, L, D)``, projected to the teacher's width.
        teacher: ``(B, L, D)``.
        attention_mask: ``(B, L)``, nonzero = a real token.
        num_items: examples over the accumulation window.

    Returns:
        A scalar.
    """
    keep = attention_mask.to(device=student.device) != 0
    per_token = hint_loss(
        student, teacher, keep, feature_dims=1, reduction="none"
    )  # (B, L), 0 at padding
    per_example = per_token.sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    return per_example.sum() / num_items


class FeatureDistiller(nn.Module):
    """The projectors of a list of feature terms, and the weighted terms they produce.

    It is trained with the student (put its parameters in the optimiser) and never exported.
    """

    def __init__(self, terms: Sequence[FeatureTerm], projectors: nn.ModuleDict) -> None:
        super().__init__()
        self.specs = list(terms)
        self.projectors = projectors

    @property
    def student_names(self) -> list[str]:
        return [t.student for t in self.specs]

    @property
    def teacher_names(self) -> list[str]:
        return [t.teacher for t in self.specs]

    def terms(
        self,
        student_features: Mapping[str, Tensor],
        teacher_features: Mapping[str, Tensor],
        num_items: float,
    ) -> dict[str, WeightedTerm]:
        """Weighted terms for :func:`~distil.losses.objective.feature_objective`.

        Args:
            student_features: captured student outputs by name.
            teacher_features: captured teacher outputs by name.
            num_items: examples over the accumulation window (the normaliser of every term).

        Returns:
            name → :class:`~distil.losses.objective.WeightedTerm`.
        """
        out: dict[str, WeightedTerm] = {}
        for spec in self.specs:
            s_raw, t_raw = student_features[spec.student], teacher_features[spec.teacher].detach()
            projector = (
                None
                if spec.loss is FeatureLoss.ATTENTION
                else self.projectors[projector_key((spec.student, spec.teacher))]
            )
            s, t = align_features(s_raw.float(), t_raw.float(), projector)
            mask = student_features.get(ATTENTION_MASK)
            if (
                spec.loss is FeatureLoss.HINT
                and s.dim() == 3
                and mask is not None
                and mask.shape == s.shape[:2]
            ):
                value = masked_token_hint(s, t, mask, num_items)
                out[spec.name] = WeightedTerm(spec.weight, value)
            elif spec.loss is FeatureLoss.HINT:
                value = hint_loss(s, t, feature_dims=s.dim() - 1, num_items=num_items)
                out[spec.name] = WeightedTerm(spec.weight, value)
            elif spec.loss is FeatureLoss.CWD:
                # CWD averages over (example, channel) pairs: C pairs per example
                value = channel_wise_distillation(
                    s, t, kd_temperature=spec.kd_temperature, num_items=num_items * s.shape[1]
                )
                out[spec.name] = WeightedTerm(spec.weight, value, spec.kd_temperature)
            else:
                out[spec.name] = WeightedTerm(
                    spec.weight, attention_transfer(s, t, num_items=num_items)
                )
        return out


def feature_distiller(
    terms: Sequence[FeatureTerm],
    student: nn.Module,
    run_student: Callable[[], Any],
    teacher_shapes: Mapping[str, Sequence[int]],
) -> FeatureDistiller:
    """Probe the student once for its feature shapes and build the projectors the terms need.

    Args:
        terms: the feature terms.
        student: the student model.
        run_student: a no-argument forward of the student on a small batch.
        teacher_shapes: the teacher's feature shapes by module name (from one answer of the
            teacher, live or cached).

    Returns:
        A :class:`FeatureDistiller`; 4-D maps get 1×1 conv projectors, others linear ones.

    Raises:
        DistilError: If the teacher did not return a named feature, or a term needs 4-D maps.
    """
    missing = sorted({t.teacher for t in terms} - set(teacher_shapes))
    if missing:
        raise DistilError(f"the teacher returned no feature maps for {missing}; check kd.features")
    s_shapes = feature_shapes(student, [t.student for t in terms], run_student)
    t_shapes = {name: torch.Size(shape) for name, shape in teacher_shapes.items()}
    pairs = [(t.student, t.teacher) for t in terms if t.loss is not FeatureLoss.ATTENTION]
    for spec in terms:
        if (
            spec.loss in (FeatureLoss.CWD, FeatureLoss.ATTENTION)
            and len(s_shapes[spec.student]) != 4
        ):
            raise DistilError(
                f"{spec.loss.value} needs (B, C, H, W) maps; {spec.student} outputs {tuple(s_shapes[spec.student])}"
            )
    projectors = build_projectors(pairs, s_shapes, t_shapes)
    logger.info("feature KD: %s", ", ".join(f"{t.name} (weight {t.weight:g})" for t in terms))
    return FeatureDistiller(terms, projectors)
