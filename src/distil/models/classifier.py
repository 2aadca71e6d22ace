"""Classifier models: a built-in zoo (MLP, small CNN, small ResNet), Hugging Face folders, and any
``module:factory`` callable, each paired with the input encoder that turns raw examples into
the tensors it reads.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distil.config.sources import FactoryModel, HFModel, ModelSource, ZooModel, describe_model
from distil.data.classification import ClassificationData, Split
from distil.errors import DistilError

logger = logging.getLogger(__name__)

Inputs = dict[str, torch.Tensor]


class MLP(nn.Module):
    """(AvgPool) → Flatten → [Linear → ReLU → Dropout]* → Linear.

    ``input_pool`` > 1 average-pools image inputs by that factor first (28×28 → 14×14 at 2),
    which makes a much smaller student for image tasks at a modest cost in accuracy.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        input_pool: int = 1,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        if input_pool > 1:
            if image_shape is None or len(image_shape) != 3:
                raise ValueError("input_pool needs image inputs (C, H, W)")
            c, h, w = image_shape
            layers.append(nn.AvgPool2d(input_pool, ceil_mode=True))
            width = c * (-(-h // input_pool)) * (-(-w // input_pool))
        layers.append(nn.Flatten())
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """[Conv3x3 → BN → ReLU → (MaxPool)]* → global average pool → Linear.

    Stages are ``stage0..stageN`` so feature-distillation layer maps can name them.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        pool_every: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        width = in_channels
        for i, c in enumerate(channels):
            block: list[nn.Module] = [
                nn.Conv2d(width, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            ]
            if pool_every and (i + 1) % pool_every == 0:
                block.append(nn.MaxPool2d(2, ceil_mode=True))
            stages.append(nn.Sequential(*block))
            width = c
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.stages(x)).flatten(1)  # (B, C_last)
        return self.head(self.dropout(h))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with a projected shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for small images: stem, stages of basic blocks, pool, head."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        width = widths[0]
        for i, w in enumerate(widths):
            blocks = [
                BasicBlock(width if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1)
                for j in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            width = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))).flatten(1))


ZOO: dict[str, str] = {
    "mlp": "multi-layer perceptron on flattened inputs (kwargs: hidden, dropout)",
    "cnn": "small CNN: conv-BN-ReLU-pool stages (kwargs: channels, pool_every, dropout)",
    "resnet": "small CIFAR-style ResNet (kwargs: widths, blocks_per_stage)",
}


class InputEncoder:
    """Turns raw examples of a split into the keyword tensors a model's forward reads."""

    def __init__(self, fn: Callable[[Split], Inputs], description: str) -> None:
        self._fn = fn
        self.description = description

    def __call__(self, split: Split) -> Inputs:
        return self._fn(split)


def _hashed_text_features(n_features: int) -> Callable[[Split], Inputs]:
    def encode(split: Split) -> Inputs:
        from sklearn.feature_extraction.text import HashingVectorizer

        if split.texts is None:
            raise DistilError("this model reads text features but the dataset has images")
        vec = HashingVectorizer(
            n_features=n_features, ngram_range=(1, 2), alternate_sign=False, norm="l2"
        )
        x = vec.transform(split.texts).astype(np.float32).toarray()  # (N, n_features)
        return {"x": torch.from_numpy(x)}

    return encode


def _image_tensor(split: Split) -> Inputs:
    if split.images is None:
        raise DistilError("this model reads images but the dataset has texts")
    # A fresh copy with canonical strides: numpy gives a size-1 channel axis stride 0 or 1 depending
    # on how the array was made (a subset, a new axis), and a (784, 1, 28, 1) stride reads as
    # channels-last to PyTorch, whose convolutions then take another kernel (other rounding).
    return {
        "x": torch.from_numpy(np.ascontiguousarray(split.images)).clone(
            memory_format=torch.contiguous_format
        )
    }


@dataclass
class BuiltModel:
    """A model, the encoder for its inputs, and how to save it."""

    module: nn.Module
    encoder: InputEncoder
    source: str  # "zoo:cnn", "hf:/path", "factory:pkg.mod:fn"
    hf: bool = False


def _zoo_model(name: str, data: ClassificationData, kwargs: dict[str, Any]) -> BuiltModel:
    kwargs = dict(kwargs)
    text_features = int(kwargs.pop("text_features", 4096))
    if data.modality == "text":
        if name != "mlp":
            raise DistilError(
                f"zoo model {name!r} needs images; for text datasets use zoo: mlp (hashed n-gram features)"
            )
        encoder = InputEncoder(
            _hashed_text_features(text_features), f"hashed 1-2-gram features ({text_features})"
        )
        in_features = text_features
        in_channels = 0
    else:
        shape = data.image_shape
        assert shape is not None
        encoder = InputEncoder(_image_tensor, f"image tensor {shape}")
        in_features = int(np.prod(shape))
        in_channels = shape[0]
    try:
        module: nn.Module
        if name == "mlp":
            module = MLP(in_features, data.num_classes, image_shape=data.image_shape, **kwargs)
        elif name == "cnn":
            module = SmallCNN(in_channels, data.num_classes, **kwargs)
        elif name == "resnet":
            module = SmallResNet(in_channels, data.num_classes, **kwargs)
        else:
            raise DistilError(f"unknown zoo model {name!r}; choose one of {sorted(ZOO)}")
    except TypeError as exc:
        raise DistilError(f"zoo model {name!r}: bad kwargs {kwargs}: {exc}") from exc
    return BuiltModel(module, encoder, f"zoo:{name}")


HF_TEXT_MAX_LENGTH = 128
"""Default token length of a Hugging Face text model's inputs (``model.kwargs.max_length``)."""


def _hf_text_max_length(folder: Path, kwargs: dict[str, Any], modality: str) -> int:
    """``max_length`` from the kwargs of an ``hf:`` model (text models only), validated.

    Other keys are ignored with a warning: a spec switched from ``zoo`` to ``hf`` on the command
    line keeps the zoo default's kwargs (``hidden``, ``channels``), which used to be ignored silently.
    """
    unknown = sorted(set(kwargs) - {"max_length"})
    if unknown:
        logger.warning(
            "hf model %s: ignoring kwargs %s (Hugging Face models read only max_length, for text)",
            folder,
            unknown,
        )
    if "max_length" not in kwargs:
        return HF_TEXT_MAX_LENGTH
    if modality != "text":
        raise DistilError(
            f"hf model {folder}: max_length applies to text models only; this dataset has images"
        )
    value = kwargs["max_length"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise DistilError(
            f"hf model {folder}: max_length must be an integer >= 2 (CLS + SEP), got {value!r}"
        )
    return value


def _hf_model(
    path: str, data: ClassificationData, kwargs: dict[str, Any] | None = None
) -> BuiltModel:
    """A Hugging Face folder with a classification head (``AutoModelFor*Classification``).

    Text models tokenise every example to exactly ``kwargs["max_length"]`` tokens (default
    :data:`HF_TEXT_MAX_LENGTH`; longer texts are truncated, shorter ones padded with an attention
    mask). Short texts train much faster with a length near their real token count.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DistilError(
            f"Hugging Face model folder {folder} has no config.json (is the path right?)"
        )
    max_length = _hf_text_max_length(folder, dict(kwargs or {}), data.modality)
    import transformers

    if data.modality == "text":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise DistilError(
                f"{folder}: no tokenizer files found ({exc}); save the tokenizer next to the model"
            ) from exc
        module = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
        positions = getattr(module.config, "max_position_embeddings", None)
        if isinstance(positions, int) and max_length > positions:
            raise DistilError(
                f"hf model {folder}: max_length {max_length} is longer than the model's {positions} positions; "
                f"set model.kwargs.max_length <= {positions}"
            )

        def encode_text(split: Split) -> Inputs:
            assert split.texts is not None
            enc = tokenizer(
                split.texts,
                padding="max_length",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        encoder = InputEncoder(encode_text, f"tokenizer of {folder.name}, {max_length} tokens")
    else:
        module = transformers.AutoModelForImageClassification.from_pretrained(str(folder))
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
        except (OSError, ValueError):
            processor = None

        def encode_image(split: Split) -> Inputs:
            assert split.images is not None
            if processor is None:
                return {"pixel_values": torch.from_numpy(np.ascontiguousarray(split.images))}
            imgs = [np.repeat(im, 3, axis=0) if im.shape[0] == 1 else im for im in split.images]
            out = processor(
                images=imgs,
                return_tensors="pt",
                do_rescale=False,
                input_data_format="channels_first",
            )
            return {"pixel_values": out["pixel_values"]}

        encoder = InputEncoder(encode_image, f"image processor of {folder.name}")
    n = int(module.config.num_labels)
    if n != data.num_classes:
        raise DistilError(
            f"{folder}: the model has {n} output classes but the dataset {data.name!r} has {data.num_classes}; "
            "use a model with a matching head"
        )
    return BuiltModel(module, encoder, f"hf:{folder}", hf=True)


def _factory_model(spec: str, data: ClassificationData, kwargs: dict[str, Any]) -> BuiltModel:
    if ":" not in spec:
        raise DistilError(f"factory {spec!r} must look like 'package.module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise DistilError(f"cannot import factory {spec!r}: {exc}") from exc
    module = fn(num_classes=data.num_classes, input_shape=data.image_shape, **kwargs)
    if not isinstance(module, nn.Module):
        raise DistilError(
            f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    return BuiltModel(module, InputEncoder(_image_tensor, "image tensor"), f"factory:{spec}")


def build_classifier(source: ModelSource, data: ClassificationData) -> BuiltModel:
    """Build the model a source names, sized for ``data``; load its ``weights`` when given.

    Raises:
        DistilError: For a kind a classifier cannot be built from.
    """
    if isinstance(source, ZooModel):
        built = _zoo_model(source.zoo, data, source.kwargs)
    elif isinstance(source, HFModel):
        built = _hf_model(source.hf, data, source.kwargs)
    elif isinstance(source, FactoryModel):
        built = _factory_model(source.factory, data, source.kwargs)
    else:
        raise DistilError(
            f"a classifier is built from zoo, hf or factory, not {describe_model(source)}"
        )
    weights = getattr(source, "weights", None)
    if weights is not None:
        load_weights(built.module, Path(weights))
    return built


def logits_of(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Class logits (B, C) from a zoo model (returns a tensor) or an HF model (``.logits``)."""
    out = (
        module(inputs["x"]) if inputs.keys() == {"x"} else module(**inputs)
    )  # plain modules take x positionally
    return out if isinstance(out, torch.Tensor) else out.logits


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_model(built: BuiltModel, folder: Path) -> int:
    """Save weights (safetensors) to ``folder``; return the bytes written on disk."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if built.hf:
        built.module.save_pretrained(str(folder))  # type: ignore[operator]
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in built.module.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"source": built.source})
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def load_weights(module: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into ``module``; shape or key mismatches are named."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise DistilError(f"checkpoint not found: {path}")
    state = load_file(str(path))
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise DistilError(
            f"{path} does not fit the model: {'; '.join(parts)}. Was it saved from the same model spec?"
        )
    module.load_state_dict(state)
