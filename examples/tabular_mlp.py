"""An MLP on tabular data (the Wisconsin breast-cancer set that scikit-learn ships), explained.

The 30 standardised clinical features get 30 pure-noise features appended; an MLP is trained,
the signals of both classes (malignant, benign) are estimated on the training split, and the test
split is attributed to its true class. Printed: accuracy, the share of |attribution| each method
puts on the noise features (50 % of the inputs), and PatternAttribution's top features.

    python examples/tabular_mlp.py
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from untangle_ext import METHODS, Attributor, SignalEstimator
from untangle_ext.models import train_classifier


def load_data(noise_features: int = 30, seed: int = 0) -> dict:
    """Standardised features (real + appended noise), labels and names; a fixed 70/30 split."""
    from sklearn.datasets import load_breast_cancer  # bundled with scikit-learn: no download

    data = load_breast_cancer()
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(data.data, dtype=torch.float32)
    x = torch.cat([x, torch.randn((x.shape[0], noise_features), generator=g)], dim=1)
    order = torch.randperm(x.shape[0], generator=g)
    x, labels = x[order], torch.tensor(data.target, dtype=torch.long)[order]
    cut = int(0.7 * x.shape[0])
    mean, std = x[:cut].mean(0), x[:cut].std(0)
    x = (x - mean) / std
    names = list(data.feature_names) + [f"noise {i}" for i in range(noise_features)]
    return {"train": (x[:cut], labels[:cut]), "test": (x[cut:], labels[cut:]), "names": names,
            "real": data.data.shape[1]}


def mlp(features: int, hidden: int = 32) -> nn.Module:
    """Two ReLU hidden layers and a 2-way linear output."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(),
                         nn.Linear(hidden // 2, 2))


def run(epochs: int = 60, seed: int = 0) -> dict:
    """Train, estimate both classes, attribute the test split to its true class; the numbers."""
    data = load_data(seed=seed)
    (x, labels), (x_test, labels_test) = data["train"], data["test"]
    torch.manual_seed(seed)
    model = train_classifier(mlp(x.shape[1]), x, labels, epochs, lr=3e-3, weight_decay=1e-4, seed=seed)
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == labels_test).float().mean())
    stores = SignalEstimator(model, progress=False).fit([(x[i:i + 64], labels[i:i + 64]) for i in range(0, len(x), 64)])
    explainer = Attributor(model, stores)
    maps = {m: explainer.attribute(x_test, target=labels_test, method=m) for m in METHODS}
    mass = {m: a.abs().sum(0) for m, a in maps.items()}
    top = mass["pattern_attribution"].argsort(descending=True)[:5]
    return {"model": model, "accuracy": accuracy, "maps": maps, "real": data["real"],
            "noise_share": {m: float(v[data["real"]:].sum() / v.sum()) for m, v in mass.items()},
            "top_features": [str(data["names"][i]) for i in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    result = run(p.parse_args().epochs)
    print(f"held-out accuracy {result['accuracy']:.1%}")
    for method, share in result["noise_share"].items():
        print(f"{method:>20}: {share:.1%} of |attribution| on the 30 noise features (50 % of the inputs)")
    print("PatternAttribution's top features:", ", ".join(result["top_features"]))


if __name__ == "__main__":
    main()
