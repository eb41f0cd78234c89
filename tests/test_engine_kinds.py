"""Every affine kind (Linear on any rank, Conv1d, Conv2d, Conv3d) against the float64 brute-force oracle."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from oracle import conv_patches, layer_patterns
from untangle_ext import Attributor, SignalEstimator, SignalStore
from untangle_ext.layers import AFFINE_KINDS
from untangle_ext.trace import Program

ND_CASES = [  # (module, input size)
    (nn.Conv1d(3, 4, 5, stride=2, padding=2, dilation=1), (3, 17)),
    (nn.Conv1d(4, 6, 3, stride=1, padding=3, dilation=2, groups=2), (4, 11)),
    (nn.Conv1d(2, 2, 1, groups=2), (2, 1)),  # single position, depthwise
    (nn.Conv3d(2, 3, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1)), (2, 4, 5, 3)),
    (nn.Conv3d(4, 4, 3, stride=2, padding=1, dilation=(1, 2, 1), groups=4), (4, 5, 7, 5)),
]


def _estimate(model, x, labels, batch=4, **kw):
    loader = [(x[i:i + batch], labels[i:i + batch]) for i in range(0, len(x), batch)]
    return SignalEstimator(model, progress=False, store_dtype=torch.float64, **kw).fit(loader)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("case", range(len(ND_CASES)))
def test_conv_nd_patterns_match_oracle(case):
    module, size = ND_CASES[case]
    torch.manual_seed(case)
    conv = module.double()
    x = torch.randn(13, *size, dtype=torch.float64) + 0.3
    labels = torch.tensor([0, 1] * 6 + [0])
    stores = _estimate(conv, x, labels, classes=[0, 1])
    for c in (0, 1):
        xg = conv_patches(x[labels == c], conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        want = layer_patterns(xg, conv.weight.detach(), conv.bias.detach(), conv.groups)
        for key, expected in want.items():
            assert _relative_error(stores[c].patterns["0"][key], expected) < 1e-9, key


def test_linear_on_token_sequences_treats_every_token_as_a_sample():
    torch.manual_seed(3)
    lin = nn.Linear(5, 4).double()
    x = torch.randn(9, 7, 5, dtype=torch.float64) * 2 + 1  # 9 sequences of 7 tokens
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 1])
    model = nn.Sequential(lin, nn.Flatten(), nn.Linear(28, 2)).double()
    stores = _estimate(model, x, labels, batch=2)
    for c in (0, 1):
        tokens = x[labels == c].reshape(-1, 1, 5)
        want = layer_patterns(tokens, lin.weight.detach(), lin.bias.detach(), 1)
        for key, expected in want.items():
            assert _relative_error(stores[c].patterns["0"][key], expected) < 1e-9, key
        assert float(stores[c].patterns["0"]["n"]) == tokens.shape[0]


class _Signal1d(nn.Module):
    """An EEG-style 1-D classifier: every kind of layer in one net (conv1d → conv3d-free path → linear on tokens)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 5, padding=2)
        self.bn = nn.BatchNorm1d(6)
        self.tok = nn.Linear(6, 4)
        self.head = nn.Linear(4 * 8, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))  # (B, 6, 16)
        h = nn.functional.max_pool1d(h, 2).transpose(1, 2)  # (B, 8, 6): 8 tokens
        return self.head(torch.relu(self.tok(h)).flatten(1))


class _Volume(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3, 4)))


@pytest.mark.parametrize("make, size", [(_Signal1d, (3, 16)), (_Volume, (1, 4, 5, 6))])
def test_every_kind_end_to_end_gradient_is_exact_and_store_round_trips(make, size, tmp_path):
    torch.manual_seed(0)
    model = make().double().eval()
    if hasattr(model, "bn"):
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(6, *size, dtype=torch.float64)
    kinds = [layer.kind for layer in Program(model).layers]
    assert set(kinds) <= set(AFFINE_KINDS) and len(kinds) >= 2
    stores = _estimate(model, x, torch.tensor([0, 1, 2, 0, 1, 2]), batch=3)
    path = stores[1].save(tmp_path / "s_class_1.pkl")
    assert SignalStore.load(path).layers == stores[1].layers
    attributor = Attributor(model, stores)
    exp = attributor.explain(x[:2], topk=3)
    assert exp.attributions.shape == (2, 3, *size) and torch.isfinite(exp.attributions).all()
    xg = x[:2].clone().requires_grad_(True)
    model(xg)[:, 2].sum().backward()
    torch.testing.assert_close(attributor.attribute(x[:2], target=2, method="gradient"), xg.grad, rtol=1e-10,
                               atol=1e-12)
