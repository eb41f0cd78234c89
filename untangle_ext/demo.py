"""The main job: LeNet on the bundled MNIST sample → per-class signals → heatmap figures."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .attribution import Attributor, Explanation  # noqa: E402
from .data import load_mnist_sample, mnist_sample_loader  # noqa: E402
from .estimator import SignalEstimator  # noqa: E402
from .heatmaps import channel_sum, normalise, write_figure  # noqa: E402
from .models import load_or_train_lenet  # noqa: E402
from .report import build as build_report  # noqa: E402

DEMO_METHODS = (("pattern_attribution", "PatternAttribution"), ("patternnet", "PatternNet"), ("gradient", "gradient"))


def verdict(label: int, predicted: int) -> tuple[str, str]:
    """(title, colour) naming the true label and whether the model got it right."""
    if label == predicted:
        return f"true label {label}, predicted {predicted}", "black"
    return f"MISCLASSIFIED: true label {label}, predicted {predicted}", "red"


def method_figure(image: torch.Tensor, explanations: Sequence[Explanation], index: int, path: Path,
                  label: int) -> Path:
    """One row per top-k class: input | one heatmap per method (each on its own symmetric scale);
    the title gives the true ``label`` and marks a misclassification in red."""
    exp0 = explanations[0]
    k = exp0.targets.shape[1]
    probs = exp0.probabilities[index]
    fig, axes = plt.subplots(k, 1 + len(explanations), figsize=(2.2 * (1 + len(explanations)) + 0.8, 2.3 * k + 0.3),
                             squeeze=False, layout="constrained")
    title, colour = verdict(label, int(exp0.targets[index, 0]))
    fig.suptitle(title, color=colour, fontsize=11, fontweight="bold" if colour == "red" else "normal")
    for row in range(k):
        c = int(exp0.targets[index, row])
        axes[row, 0].imshow(image.squeeze(0).cpu(), cmap="gray")
        axes[row, 0].set_title(f"class {c}  p={probs[c]:.3f}", fontsize=9)
        for col, (exp, (_, label)) in enumerate(zip(explanations, DEMO_METHODS), start=1):
            hm = normalise(channel_sum(exp.attributions[index, row].float()))
            im = axes[row, col].imshow(hm.cpu(), cmap="seismic", vmin=-1, vmax=1)
            axes[row, col].set_title(label, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    write_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def run_demo(results: Path = Path("results"), cache: Path = Path(".cache/lenet_mnist.pt"),
             digits: int = 4, topk: int = 3, batch_size: int = 64) -> list[Path]:
    """Train or reuse LeNet, estimate every class in one pass, write one figure per held-out digit."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model, accuracy = load_or_train_lenet(cache)
    print(f"LeNet held-out accuracy on the bundled MNIST sample: {accuracy:.2%}")
    if accuracy < 0.95:
        raise RuntimeError(f"LeNet accuracy {accuracy:.2%} is below 95%; delete {cache} and run again")
    stores = SignalEstimator(model).fit(mnist_sample_loader(batch_size, split="train"))
    attributor = Attributor(model, stores)
    images, labels = load_mnist_sample("test")
    picks = torch.arange(digits) * (len(images) // digits)
    x = images[picks]
    explanations = [attributor.explain(x, topk=topk, method=m) for m, _ in DEMO_METHODS]
    paths = [
        method_figure(x[i], explanations, i, results / f"digit_{int(picks[i])}_label_{int(labels[picks[i]])}.png",
                      int(labels[picks[i]]))
        for i in range(len(x))
    ]
    print(f"wrote {len(paths)} figures to {results.resolve()}/ in {time.perf_counter() - start:.1f} s:")
    for p in paths:
        print(f"  {p}")
    report = build_report(model, stores, mnist_sample_loader(batch_size, split="test"), results / "report.html", n=20)
    print(f"report on the 20 most uncertain and 20 most confident wrong test digits: {report.html}")
    return paths
