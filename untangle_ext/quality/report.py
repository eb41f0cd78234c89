"""The ``quality`` job: LeNet on the bundled MNIST sample → ρ(S) per layer + degradation curves → figures, JSON.

Splits (the paper's protocol, scaled to the 5k sample): the 4,000 training
images are shuffled (seeded) into halves A and B; the all-class store for ρ is
fitted on A, the regressions v on B, and ρ is reported on the 1,000 held-out
test images (C). The per-class stores used for the attributions are fitted on
all 4,000 training images; the degradation runs on held-out test images.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from .._io import atomic_write  # noqa: E402
from ..data import load_mnist_sample  # noqa: E402
from ..estimator import SignalEstimator  # noqa: E402
from ..heatmaps import write_figure  # noqa: E402
from ..models import load_or_train_lenet  # noqa: E402
from ..store import ALL_CLASSES  # noqa: E402
from ..trace import Program  # noqa: E402
from .degradation import Curve, check_patch, degradation_curve, patch_scores, score_maps  # noqa: E402
from .rho import ESTIMATORS, signal_quality  # noqa: E402

LABELS = {
    "pattern_attribution": "PatternAttribution (S_a±)",
    "pattern_attribution_linear": "PatternAttribution with S_a",
    "patternnet": "PatternNet (signal)",
    "gradient": "gradient (S_w)",
    "input_x_gradient": "input × gradient (S_x)",
    "random": "random order",
}


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 250) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def rho_figure(rho: dict, path: Path) -> Path:
    """Grouped bars: ρ(S) per layer (x) for each estimator."""
    layers = list(rho)
    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    width = 0.8 / len(ESTIMATORS)
    for i, est in enumerate(ESTIMATORS):
        vals = [rho[l][est]["rho"] for l in layers]
        errs = [rho[l][est]["std"] for l in layers]
        ax.bar([j + (i - (len(ESTIMATORS) - 1) / 2) * width for j in range(len(layers))], vals, width,
               yerr=errs, capsize=2, label=est)
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylabel("ρ(S)  (1 = no signal left in the distractor)")
    ax.set_title("Signal quality per layer, LeNet on MNIST (held-out split)")
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=8, ncols=4, loc="upper center")
    write_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def curves_figure(curves: dict[str, dict[str, Curve]], titles: dict[str, str], path: Path) -> Path:
    """One panel per experiment: mean probability of the predicted class vs fraction replaced."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 3.8), layout="constrained", squeeze=False)
    for ax, (exp, by_method) in zip(axes[0], curves.items()):
        for name, curve in by_method.items():
            ax.plot(curve.fractions, curve.mean, label=f"{LABELS[name]}  AUC {curve.auc:.3f}",
                    ls="--" if name == "random" else "-")
        ax.set_xlabel("fraction of the image replaced")
        ax.set_ylabel("p(originally predicted class)")
        ax.set_title(titles[exp], fontsize=10)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    write_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def _degradation(model, stores, images, fill, patch, deletion_points, progress) -> dict[str, dict[str, Curve]]:
    """Both experiments for every ranking: mean-filled patches, and pixels set to 0 (deletion)."""
    program = Program(model)
    maps = score_maps(model, stores, images)
    out: dict[str, dict[str, Curve]] = {"degradation": {}, "deletion": {}}
    for name, m in maps.items():
        out["degradation"][name] = degradation_curve(program, images, patch_scores(m, patch), patch, fill,
                                                     desc=f"degradation: {name}" if progress else None)
        out["deletion"][name] = degradation_curve(program, images, patch_scores(m, 1), 1, 0.0, points=deletion_points,
                                                  desc=f"deletion: {name}" if progress else None)
    return out


def run_quality(out: Path = Path("results/quality"), cache: Path = Path(".cache/lenet_mnist.pt"),
                images: int = 200, patch: int = 4, deletion_points: int = 25, max_neurons: int = 32,
                positions: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """Run both experiments and write ``rho.png``, ``degradation.png`` and ``quality.json`` under ``out``."""
    start = time.perf_counter()
    x_train, y_train = load_mnist_sample("train")
    x_test, _ = load_mnist_sample("test")
    check_patch(x_test.shape[2], x_test.shape[3], patch)  # fail before minutes of work, not after
    torch.manual_seed(seed)
    model, accuracy = load_or_train_lenet(cache, progress=progress)
    t_model = time.perf_counter() - start
    perm = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed))
    half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2:]

    all_class = SignalEstimator(model, per_class=False, progress=progress).fit(
        _loader(x_train[half_a], y_train[half_a]))[ALL_CLASSES]
    rho = signal_quality(model, all_class, x_train[half_b], x_test, max_neurons=max_neurons,
                         positions=positions, seed=seed, progress=progress)
    t_rho = time.perf_counter() - start - t_model

    stores = SignalEstimator(model, progress=progress).fit(_loader(x_train, y_train))
    pick = torch.randperm(x_test.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:images]
    fill = x_train.mean((0, 2, 3))
    curves = _degradation(model, stores, x_test[pick], fill, patch, deletion_points, progress)
    elapsed = time.perf_counter() - start

    titles = {"degradation": f"degradation: {patch}x{patch} patches → training-set mean ({fill[0]:.3f})",
              "deletion": "deletion: pixels → 0"}
    result = {
        "model": {"name": "LeNet (tutorial)", "held_out_accuracy": accuracy},
        "settings": {"seed": seed, "rho_splits": {"estimator_fit_A": len(half_a), "regression_fit_B": len(half_b),
                                                  "evaluated_C_test": int(x_test.shape[0])},
                     "max_neurons_per_layer": max_neurons, "patches_per_image_conv": positions,
                     "degradation_images": int(pick.numel()), "patch": patch, "fill": fill.tolist(),
                     "deletion_points": deletion_points},
        "rho": rho,
        "rho_ordering": {l: sorted(ESTIMATORS, key=lambda e: -v[e]["rho"]) for l, v in rho.items()},
        "auc": {exp: {n: c.auc for n, c in by.items()} for exp, by in curves.items()},
        "auc_ordering": {exp: sorted(by, key=lambda n: by[n].auc) for exp, by in curves.items()},
        "curves": {exp: {n: {"fractions": c.fractions.tolist(), "mean_probability": c.mean.tolist()}
                         for n, c in by.items()} for exp, by in curves.items()},
        "seconds": {"model": t_model, "rho": t_rho, "degradation": elapsed - t_model - t_rho, "total": elapsed},
    }
    out = Path(out)
    rho_figure(rho, out / "rho.png")
    curves_figure(curves, titles, out / "degradation.png")
    atomic_write(out / "quality.json", lambda f: f.write((json.dumps(result, indent=1) + "\n").encode()))
    return result
