"""The rule table and the generic rule: every op family against torch.autograd, batched over (image, class) pairs.

Oracle for the pattern methods: autograd through the model itself, where each
affine module's backward is swapped for its pattern weight by a custom
autograd Function (written here, independent of the engine's reverse pass).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from untangle_ext import Attributor, SignalEstimator
from untangle_ext.attribution import ScaledAttributionWarning
from untangle_ext.rules import GENERIC, MODULE_RULES, supported_ops
from untangle_ext.trace import Program


class SqueezeExcite(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(s))))


class Zoo(nn.Module):
    """Every op family the generic rule must get right, in one small net."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)  # after a ReLU: not folded, an exact per-channel affine map
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se = SqueezeExcite(8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.mlp = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.bn(F.relu6(self.stem(x)))
        a, b = h.chunk(2, dim=1)
        h = torch.cat([F.hardswish(a), b * b], dim=1)  # a product of an activation with itself
        n, c, hh, ww = h.shape
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)  # channel shuffle
        h = self.se(F.gelu(self.dw(h))) + h
        t = h.flatten(2).permute(0, 2, 1)  # tokens (n, hw, c)
        t = torch.cat([self.token.expand(n, -1, -1), t], dim=1)
        q = self.norm(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + torch.tanh(self.mlp(t)) * 0.5
        return self.head(t[:, 0] + t[:, 1:].mean(1))


def _zoo() -> nn.Module:
    torch.manual_seed(0)
    model = Zoo().double().eval()
    model.bn.running_mean.uniform_(-0.3, 0.3)
    model.bn.running_var.uniform_(0.5, 2.0)
    with torch.no_grad():
        model.head.bias += 5.0  # every logit positive: no class's last-layer regime is empty
    return model


def test_rule_table_is_the_supported_list():
    text = supported_ops()
    for module_type in MODULE_RULES:
        assert module_type.__name__ in text
    program = Program(_zoo())
    ops = {step.op for step in program.steps}
    assert {"affine", "elementwise", "reshape", "add", "generic", "constant"} <= ops
    generic = {step.name for step in program.steps if step.rule is GENERIC}
    assert any("attn" in name for name in generic) and any("norm" in name for name in generic)


def test_gradient_method_equals_autograd_for_every_pair():
    model = _zoo()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 0, 2]])
    got = Attributor(model).explain(x, target=targets, method="gradient").attributions
    for b in range(3):
        for j in range(3):
            xb = x[b:b + 1].clone().requires_grad_(True)
            model(xb)[0, targets[b, j]].backward()
            err = ((got[b, j] - xb.grad[0]).norm() / xb.grad.norm()).item()
            assert err < 1e-12, (b, j, err)


class _SwapBackward(torch.autograd.Function):
    """Forward: the layer's output. Backward: the input gradient computed with another weight."""

    @staticmethod
    def forward(ctx, x, out, module, weight):
        ctx.module, ctx.weight, ctx.shape = module, weight, x.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        m, w = ctx.module, ctx.weight
        if isinstance(m, nn.Linear):
            return grad @ w, None, None, None
        return torch.nn.grad.conv2d_input(ctx.shape, w, grad, m.stride, m.padding, m.dilation, m.groups), None, None, None


def _oracle(model: nn.Module, weights: dict, x: torch.Tensor, target: int) -> torch.Tensor:
    """Autograd through a copy of ``model`` whose affine layers reverse with ``weights[name]``."""
    oracle = copy.deepcopy(model)
    for name, module in oracle.named_modules():
        if name in weights:
            module.register_forward_hook(lambda m, inp, out, w=weights[name]: _SwapBackward.apply(inp[0], out, m, w))
    xg = x.clone().requires_grad_(True)
    oracle(xg)[:, target].sum().backward()
    return xg.grad


@pytest.mark.parametrize("method", ["pattern_attribution", "patternnet"])
def test_pattern_methods_equal_the_swapped_backward_oracle(method):
    model = _zoo()
    x = torch.randn(40, 3, 6, 6, dtype=torch.float64)
    stores = SignalEstimator(model, progress=False, store_dtype=torch.float64).fit([(x, torch.arange(40) % 5)])
    attributor = Attributor(model, stores)
    exp = attributor.explain(x[:2], target=torch.tensor([[1, 3], [3, 0]]), method=method)
    for b, row in enumerate(exp.targets.tolist()):
        for j, c in enumerate(row):
            patterns = {name: p["a_pos"] for name, p in stores[c].patterns.items()}
            weights = {name: (a * dict(model.named_modules())[name].weight if method == "pattern_attribution" else a)
                       for name, a in patterns.items()}
            want = _oracle(model, weights, x[b:b + 1], c)[0]
            got = torch.ldexp(exp.attributions[b, j], exp.scale_exponent[b, j].double())
            assert ((got - want).norm() / want.norm()).item() < 1e-10


def test_constant_gates_hold_the_squeeze_excitation_factor():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), SqueezeExcite(4), nn.Flatten(), nn.Linear(16, 2)).double().eval()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    full = Attributor(model).attribute(x, target=1, method="gradient")
    gated = Attributor(model, constant_gates=True).attribute(x, target=1, method="gradient")
    xg = x.clone().requires_grad_(True)
    se = model[1]
    scale = torch.sigmoid(se.fc2(F.silu(se.fc1(F.adaptive_avg_pool2d(model[0](x), 1))))).detach()
    (model[3](model[2](model[0](xg) * scale)))[:, 1].sum().backward()  # the gate as a constant
    torch.testing.assert_close(gated, xg.grad, rtol=1e-10, atol=1e-12)
    assert (full - gated).abs().max() > 1e-6  # the two conventions differ on this net


class _Deep(nn.Module):
    """A deep stack of near-identity layers scaled by 0.1: the gradient shrinks ~10^-depth (underflows float32)
    while PatternNet's patterns (~ w / |w|^2) grow ~10^depth (overflows float32); the forward stays bounded."""

    def __init__(self, depth=60):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(depth))
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.copy_(torch.eye(16) * 0.1 + torch.randn(16, 16) * 0.003)
                layer.bias.fill_(1.0)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def test_deep_nets_stay_finite_and_exact_up_to_the_reported_scale(monkeypatch):
    # Deep layers' inputs are constant in float32 (variation ~10^-depth): exact (float64) products give them
    # zero covariance, i.e. dead patterns; the overflow this test needs came from float32 product rounding,
    # so keep float32 products here (issue 11 made small layers use float64 ones).
    monkeypatch.setattr("untangle_ext.moments.F64_MAX_PRODUCTS", 0)
    torch.manual_seed(0)
    model = _Deep().eval()
    x = torch.rand(64, 16)
    with pytest.warns(ScaledAttributionWarning, match="2\\*\\*Explanation.scale_exponent"):
        exp = Attributor(model).explain(x[:2], topk=2, method="gradient")
    assert torch.isfinite(exp.attributions).all() and (exp.scale_exponent < -150).all()
    xg = x[:1].double().requires_grad_(True)
    model.double()(xg)[0, exp.targets[0, 0]].backward()
    model.float()
    true = torch.ldexp(exp.attributions[0, 0].double(), exp.scale_exponent[0, 0].double())
    assert ((true - xg.grad[0]).norm() / xg.grad[0].norm()).item() < 1e-4  # float32 pass vs float64 autograd
    stores = SignalEstimator(model, progress=False).fit([(x, torch.arange(64) % 3)])
    with pytest.warns(ScaledAttributionWarning):
        net = Attributor(model, stores).explain(x[:2], topk=1, method="patternnet")
    assert torch.isfinite(net.attributions).all() and (net.scale_exponent > 128).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a representable map comes back exact, with no warning
        small = Attributor(_Deep(depth=2).eval()).explain(x[:2], topk=1, method="gradient")
    assert (small.scale_exponent == 0).all()


def test_train_mode_models_are_explained_in_eval_mode_and_left_untouched():
    model = _zoo().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    SignalEstimator(model, progress=False).fit([(x, torch.arange(4))])
    Attributor(model).attribute(x, target=0, method="gradient")
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
