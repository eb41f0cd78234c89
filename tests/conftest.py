"""Shared fixtures: a LeNet trained on the bundled MNIST sample, and a tiny net with its stores."""
from __future__ import annotations

import pytest
import torch

from _hardening import mixed_batches, tiny_model
from untangle_ext import SignalEstimator
from untangle_ext.models import LeNet, train_lenet


@pytest.fixture(scope="session")
def trained_lenet() -> tuple[LeNet, float]:
    """(LeNet in eval mode, held-out accuracy): 2 epochs on the bundled train split, deterministic."""
    torch.manual_seed(0)
    return train_lenet(epochs=2, progress=False)


@pytest.fixture(scope="module")
def model():
    """A tiny conv net (see ``_hardening.tiny_model``) for the store-safety and validation tests."""
    return tiny_model()


@pytest.fixture(scope="module")
def stores(model):
    """Per-class stores of ``model`` from mixed-label batches."""
    return SignalEstimator(model, progress=False).fit(mixed_batches())
