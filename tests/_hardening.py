"""Shared fixtures of the store-safety, validation and fuzz tests: a tiny conv net and its class data."""
from __future__ import annotations

import torch
import torch.nn as nn

NUM_CLASSES = 3
IMAGE_SHAPE = (1, 6, 6)


def tiny_model(seed: int = 0, hidden: int = 2) -> nn.Module:
    """Conv -> ReLU -> MaxPool -> Flatten -> Linear: both pattern kinds, three classes, a few hundred weights."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, hidden, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(hidden * 4, NUM_CLASSES),
    ).eval()


def class_batches(c: int, batches: int = 3, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic images of class ``c`` (labels all ``c``)."""
    g = torch.Generator().manual_seed(100 + c)
    return [(torch.randn(batch_size, *IMAGE_SHAPE, generator=g) + c,
             torch.full((batch_size,), c, dtype=torch.long)) for _ in range(batches)]


def mixed_batches(batches: int = 3, batch_size: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic images of every class in each batch."""
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(batch_size) % NUM_CLASSES
    return [(torch.randn(batch_size, *IMAGE_SHAPE, generator=g) + labels.view(-1, 1, 1, 1), labels.clone())
            for _ in range(batches)]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the state_dict, to prove a call did not modify the model."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


class Branchy(nn.Module):
    """A block whose forward branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)
