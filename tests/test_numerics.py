"""Float32 precision (issue 11): default settings against the paper's formulas evaluated independently in float64.

The reference (tests/oracle.py) is two-pass, unshifted, per neuron in explicit loops, on
float64 copies of the same float32 data; the library runs at its defaults (float32 model and
data, float32 store). Tolerances are the measured errors (README, "Numerics") with headroom.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from oracle import conv_patches, layer_patterns
from untangle_ext import ALL_CLASSES, SignalEstimator, _reference, ops
from untangle_ext.data import load_mnist_sample

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.precision import measure  # noqa: E402

KINDS = {  # name: (layer, input shape of one sample, tolerance of a_lin and a⁺)
    # few products per sample: float64 products (moments.wide_products); what remains is the float32 store
    "linear": (lambda: nn.Linear(40, 6), (40,), 1e-7),
    "conv1d": (lambda: nn.Conv1d(3, 4, 5, stride=2, padding=2), (3, 30), 1e-7),
    "conv2d": (lambda: nn.Conv2d(2, 5, 3, padding=1), (2, 12, 12), 1e-7),
    "conv3d": (lambda: nn.Conv3d(2, 3, (2, 3, 3), padding=(0, 1, 1)), (2, 4, 6, 6), 1e-7),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding=2), (4, 10, 10), 1e-7),
    # float32 products (more than 2^15 per sample)
    "linear-wide": (lambda: nn.Linear(300, 40), (300,), 1e-6),
    "conv2d-wide": (lambda: nn.Conv2d(16, 80, 3), (16, 7, 7), 1e-6),
}


def normwise(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max over live neurons of |a_k - ref_k| / |ref_k|."""
    a, ref = a.reshape(ref.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
    live = ref.norm(dim=1) > 0
    return float(((a - ref).norm(dim=1)[live] / ref.norm(dim=1)[live]).max())


def _sparse_images(n: int, shape, seed: int) -> torch.Tensor:
    """Non-negative data, ~60% exact zeros, like images and ReLU outputs."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, *shape, generator=g) - 0.25)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("batch", [16, 256])
def test_float32_defaults_match_float64_formula(kind, batch):
    make, shape, tol = KINDS[kind]
    torch.manual_seed(3)
    layer = make()
    model = layer if kind.startswith("linear") else nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3))
    x = _sparse_images(320, shape, seed=4)
    model(x[:1])  # materialise the lazy head
    model.eval()
    loader = [(x[i:i + batch], torch.zeros(len(x[i:i + batch]), dtype=torch.long)) for i in range(0, len(x), batch)]
    got = SignalEstimator(model, per_class=False, progress=False).fit(loader)[ALL_CLASSES].patterns
    got = next(iter(got.values()))
    w, b = layer.weight.detach(), layer.bias.detach()
    if kind.startswith("linear"):
        xg = x.double().unsqueeze(1)
    else:
        xg = conv_patches(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
    ref = layer_patterns(xg, w, b, getattr(layer, "groups", 1))
    errors = {key: normwise(got[key], ref[key]) for key in ("a_lin", "a_pos", "a_neg")}
    assert errors["a_lin"] <= tol and errors["a_pos"] <= tol and errors["a_neg"] <= 10 * tol, errors


@pytest.mark.parametrize("batch", [16, 256])
def test_lenet_mnist_precision(batch, trained_lenet):
    """Trained LeNet on the bundled MNIST: a_lin and a⁺ (with the estimator's own float32 gates) against the
    same formula in float64. First conv and last layer use float64 products (float32: 1e-3 for the first
    conv's a⁺); the second conv keeps float32 products in chunks of 512 samples (one product per batch:
    8.4e-6 at batch 256), the first Linear float64 products (float32: 1.5e-6 at batch 16)."""
    model, _ = trained_lenet
    images = load_mnist_sample("test")[0][:256]
    tolerance = {"features.0": 1e-9, "features.3": 1e-6, "classifier.0": 1e-6, "classifier.2": 1e-9}
    for layer, err in measure(model, images, batch, "after").items():
        assert err["a_lin"] <= tolerance[layer] and err["a+"] <= tolerance[layer], (layer, err)


@pytest.mark.skipif(ops.backend().name != "native", reason="needs the native extension")
def test_chunked_conv_products_agree_across_backends():
    """Both backends sum float32 conv products of one class over the same chunks of CHUNK_SAMPLES samples, so
    they agree to float64 rounding (one unchunked product of these 2,400 samples differs by ~1e-7)."""
    g = torch.Generator().manual_seed(5)
    x = _sparse_images(24, (8, 12, 12), seed=6)
    w = torch.randn(30, 8, 3, 3, generator=g)
    shift, offset = x.mean([0, 2, 3]), torch.randn(30, generator=g, dtype=torch.float64)
    labels, slots = torch.zeros(24, dtype=torch.long), 1
    got = {}
    for name, op in (("native", torch.ops.untangle_ext.accumulate_conv), ("torch", _reference.accumulate_conv)):
        mat = torch.zeros(slots, 1, 91, 72, dtype=torch.float64)
        vec = torch.zeros(slots, 91, dtype=torch.float64)
        op(x, w, shift, offset, labels, mat, vec, [1, 1], [0, 0], [1, 1], 1)
        got[name] = mat
    scale = got["torch"].abs().max()
    assert (got["native"] - got["torch"]).abs().max() <= 1e-12 * scale
