"""A Conv1d signal classifier on EEG-like trials, explained with PatternAttribution.

Each trial is ``channels × samples`` (default 8 × 256, 2 s at 128 Hz) of smoothed noise; on the
informative channels (default 1 and 5) class 0 carries a 6 Hz and class 1 a 12 Hz oscillation of
random phase and amplitude. A small Conv1d net (band-pass-like filters, ReLU, temporal average) is
trained briefly, the signals of both classes are estimated, and held-out trials are attributed.
Printed: accuracy, and for every method the share of |attribution| on the informative channels
(2 of 8 channels = 25 % by chance).

    python examples/eeg_conv1d.py
"""
from __future__ import annotations

import argparse
import math
from typing import Sequence

import torch
from torch import nn

from untangle_ext import METHODS, Attributor, SignalEstimator
from untangle_ext.models import train_classifier

RATE = 128.0
FREQUENCIES = (6.0, 12.0)  # Hz, the oscillation of class 0 and class 1


def make_eeg(n: int, channels: int = 8, samples: int = 256, informative: Sequence[int] = (1, 5), seed: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` trials ``(n, channels, samples)`` with labels 0/1 alternating: noise plus the class's oscillation."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randn((n, channels, samples + 4), generator=g)
    x = (noise[..., :-4] + noise[..., 1:-3] + noise[..., 2:-2] + noise[..., 3:-1] + noise[..., 4:]) / math.sqrt(5)
    t = torch.arange(samples) / RATE
    freq = torch.tensor(FREQUENCIES)[labels].view(n, 1, 1)
    phase = 2 * math.pi * torch.rand((n, len(informative), 1), generator=g)
    amplitude = 0.8 + 0.4 * torch.rand((n, len(informative), 1), generator=g)
    x[:, list(informative)] += amplitude * torch.sin(2 * math.pi * freq * t + phase)
    return x, labels


def eeg_net(channels: int = 8, filters: int = 8) -> nn.Module:
    """Temporal filters over all channels, rectified and averaged over time: a band-power classifier."""
    return nn.Sequential(
        nn.Conv1d(channels, filters, kernel_size=33, padding=16), nn.ReLU(),
        nn.Conv1d(filters, filters, kernel_size=9, stride=2, padding=4), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(filters, 2),
    )


def channel_share(attributions: torch.Tensor, channels: Sequence[int]) -> float:
    """Share of the total |attribution| that lies on ``channels`` (dim 1 of ``(n, C, T)``)."""
    mass = attributions.abs().sum(dim=(0, 2))
    return float(mass[list(channels)].sum() / mass.sum())


def run(n_train: int = 256, n_test: int = 64, epochs: int = 40, informative: Sequence[int] = (1, 5),
        seed: int = 0) -> dict:
    """Train, estimate both classes, attribute the test trials to their true class; the numbers."""
    x, labels = make_eeg(n_train, informative=informative, seed=seed)
    x_test, labels_test = make_eeg(n_test, informative=informative, seed=seed + 1)
    torch.manual_seed(seed)
    model = train_classifier(eeg_net(x.shape[1]), x, labels, epochs, lr=1e-2, seed=seed)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == labels_test).float().mean())
    loader = [(x[i:i + 64], labels[i:i + 64]) for i in range(0, n_train, 64)]
    stores = SignalEstimator(model, progress=False).fit(loader)
    explainer = Attributor(model, stores)
    maps = {m: explainer.attribute(x_test, target=labels_test, method=m) for m in METHODS}
    return {"model": model, "accuracy": accuracy, "maps": maps,
            "share": {m: channel_share(a, informative) for m, a in maps.items()},
            "chance": len(informative) / x.shape[1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    result = run(epochs=p.parse_args().epochs)
    print(f"held-out accuracy {result['accuracy']:.1%}")
    for method, share in result["share"].items():
        print(f"{method:>20}: {share:.1%} of |attribution| on the informative channels "
              f"(chance {result['chance']:.0%})")


if __name__ == "__main__":
    main()
