"""Shared fixtures: one small LeNet trained on the bundled MNIST sample per test session."""
from __future__ import annotations

import pytest
import torch

from untangle_ext.models import LeNet, train_lenet


@pytest.fixture(scope="session")
def trained_lenet() -> tuple[LeNet, float]:
    """(LeNet in eval mode, held-out accuracy): 2 epochs on the bundled train split, deterministic."""
    torch.manual_seed(0)
    return train_lenet(epochs=2, progress=False)
