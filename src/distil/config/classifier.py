"""Config sections of ``classifier_kd``: where the labelled data comes from, and which KD losses
a classifier can take."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, model_validator

from distil.config.base import StrictModel
from distil.config.sources import BuiltinData, DataSource, FileData, require_builtin
from distil.losses.classifier import ClassifierLoss
from distil.losses.divergences import Divergence

# The built-in labelled data sets (distil.data.classification.BUILTIN_DATASETS has the loaders).
BUILTIN_DATASETS = ["digits", "fashion-mnist", "mnist5k", "rotten-tomatoes"]
# The zoo architectures (distil.models.classifier.ZOO describes them).
ZOO_MODELS = ["cnn", "mlp", "resnet"]


class ClassifierDivergence(str, Enum):
    """The soft term of a classifier's KD loss: any divergence of ``distil.losses`` or a
    classifier-specific loss (Hinton's soft CE, DKD, standardized-logit KD). A test keeps this
    list equal to the two enums it joins."""

    FORWARD_KL = Divergence.FORWARD_KL.value
    REVERSE_KL = Divergence.REVERSE_KL.value
    SYMMETRIC_KL = Divergence.SYMMETRIC_KL.value
    GENERALIZED_JSD = Divergence.GENERALIZED_JSD.value
    SKEW_KL = Divergence.SKEW_KL.value
    SKEW_REVERSE_KL = Divergence.SKEW_REVERSE_KL.value
    TOTAL_VARIATION = Divergence.TOTAL_VARIATION.value
    TVD_PLUS_PLUS = Divergence.TVD_PLUS_PLUS.value
    HINTON_KD = ClassifierLoss.HINTON_KD.value
    DKD = ClassifierLoss.DKD.value
    STANDARDIZED_KD = ClassifierLoss.STANDARDIZED_KD.value


class ClassifierDataSection(StrictModel):
    """A built-in labelled data set, or local files (CSV/JSONL/Parquet) with named columns."""

    source: DataSource = Field(
        default_factory=lambda: BuiltinData(builtin="digits"),
        description=f"{{builtin: NAME}} ({', '.join(BUILTIN_DATASETS)}) or {{train: [FILE], eval: [FILE]}}",
    )
    text_column: str | None = None
    image_column: str | None = None
    label_column: str = "label"
    test_fraction: float = Field(
        default=0.25, gt=0, lt=1, description="held out for testing when no eval file is given"
    )
    split_seed: int = Field(
        default=0,
        description="seed of the train/test/validation splits, kept apart from `seed` so runs share them",
    )
    validation_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="carve this share of the training split out as a validation split (model "
        "selection, searches); the test split is then only read for the final report",
    )
    train_limit: int | None = Field(
        default=None, ge=1, description="use only this many training examples"
    )
    student_labels: int | None = Field(
        default=None,
        ge=1,
        description="the student and the baseline see the labels of only this many training "
        "examples (a random subset drawn with split_seed); the KD student also learns the "
        "teacher's soft labels on the rest (a transfer set of unlabelled inputs), the baseline "
        "trains on the labelled ones alone; the teacher trains on every label",
    )

    @model_validator(mode="after")
    def _source(self) -> ClassifierDataSection:
        require_builtin(self.source, BUILTIN_DATASETS)
        if isinstance(self.source, FileData):
            if len(self.source.train) != 1 or (self.source.eval and len(self.source.eval) != 1):
                raise ValueError(
                    "data.source: a classifier reads one train file and at most one eval file"
                )
            if (self.text_column is None) == (self.image_column is None):
                raise ValueError(
                    "data.text_column / data.image_column: local files need exactly one of them"
                )
        return self
