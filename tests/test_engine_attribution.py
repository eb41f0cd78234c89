"""The reverse pass: gradient equivalence, batching over pairs, linearity, model safety, errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from _hardening import Branchy
from untangle_ext import ALL_CLASSES, Attributor, SignalEstimator, SignalStore, UnsupportedModelError
from untangle_ext.models import LeNet, residual_net, vgg_style_net
from untangle_ext.rules import Tape
from untangle_ext.trace import Program


def _randomise_batchnorm(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


class SmallVGG(nn.Module):
    """VGG-style features with functional ops and a BatchNorm1d after the first Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 3 * 3, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = self.pool(self.c2(x).relu())
        x = torch.flatten(x, 1)
        return self.out(self.drop(torch.relu(self.bn(self.fc(x)))))


MODELS = {
    "lenet": (LeNet, (1, 28, 28)),
    "vgg_style": (vgg_style_net, (3, 64, 64)),
    "residual_bn": (residual_net, (1, 28, 28)),
    "small_vgg_bn_dropout": (SmallVGG, (3, 12, 12)),
}


def _model(name: str, dtype=torch.float64) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().to(dtype)
    _randomise_batchnorm(model)
    return model.eval(), shape


def _autograd_input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d logit[b, targets[b]] / d x[b] for every image b (images are independent in eval mode)."""
    xr = x.clone().requires_grad_(True)
    model(xr).gather(1, targets.view(-1, 1)).sum().backward()
    return xr.grad


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_method_equals_autograd(name):
    """With P = W the batched reverse pass is the input gradient, for every (image, class) pair."""
    model, shape = _model(name)
    batch = 1 if name == "vgg_style" else 3  # the 64x64 VGG in float64 is slow on 2 cores
    x = torch.randn(batch, *shape, dtype=torch.float64)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3], [4, 0, 2]])[:batch]
    got = Attributor(model).explain(x, target=targets, method="gradient").attributions
    for j in range(3):
        want = _autograd_input_gradient(model, x, targets[:, j])
        torch.testing.assert_close(got[:, j], want, rtol=1e-10, atol=1e-12)


class Fork(nn.Module):
    """``relu(h) + h``: the addition hands one signal to both inputs, one of them a ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.relu(h) + h)


class SumPool(nn.Module):
    """A ReLU read by a sum: its reverse gets the sum's VJP, an expanded view that must not be written in place."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(3, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).sum((2, 3)))


@pytest.mark.parametrize("factory, shape", [(Fork, (4,)), (SumPool, (2, 5, 5))])
def test_gates_applied_in_place_never_touch_a_signal_another_branch_still_needs(factory, shape):
    torch.manual_seed(0)
    model = factory().double().eval()
    x = torch.randn(5, *shape, dtype=torch.float64)
    targets = torch.tensor([[0, 1, 2]]).expand(5, 3)
    got = Attributor(model).explain(x, target=targets, method="gradient").attributions
    for j in range(3):
        torch.testing.assert_close(got[:, j], _autograd_input_gradient(model, x, targets[:, j]), rtol=1e-12, atol=0)


def _random_stores(model: nn.Module, classes, seed=0) -> dict[int, SignalStore]:
    """Stores with random patterns (the reverse pass must not care where they come from)."""
    program = Program(model)
    g = torch.Generator().manual_seed(seed)
    from untangle_ext.store import layer_signature, model_fingerprint

    stores = {}
    for c in classes:
        patterns = {l.name: {k: torch.randn(l.weight.shape, generator=g, dtype=l.weight.dtype)
                             for k in ("a_lin", "a_pos", "a_neg")} for l in program.layers}
        for l in program.layers:  # sample counts: a store file must carry them
            patterns[l.name].update(n_pos=torch.ones(l.out_features, dtype=torch.float64),
                                    n=torch.tensor(1.0, dtype=torch.float64))
        stores[c] = SignalStore(c, patterns, layer_signature(program), model_fingerprint(model), 1)
    return stores


@pytest.mark.parametrize("method", ["pattern_attribution", "patternnet"])
def test_batched_pairs_equal_one_pair_at_a_time(method):
    model, shape = _model("small_vgg_bn_dropout")
    stores = _random_stores(model, range(5))
    attributor = Attributor(model, stores)
    x = torch.randn(4, *shape, dtype=torch.float64)
    exp = attributor.explain(x, topk=3, method=method)
    assert exp.attributions.shape == (4, 3, *shape)
    assert torch.equal(exp.targets, exp.logits.topk(3, dim=1).indices)
    for b in range(4):
        for j in range(3):
            single = attributor.attribute(x[b:b + 1], target=int(exp.targets[b, j]), method=method)
            assert single.shape == (1, *shape)
            torch.testing.assert_close(exp.attributions[b, j], single[0], rtol=1e-10, atol=1e-12)


def test_reverse_pass_is_linear_in_the_seed():
    model, shape = _model("residual_bn")
    program = Program(model)
    g = torch.Generator().manual_seed(1)
    weights = {l.name: torch.randn((2, *l.weight.shape), generator=g, dtype=torch.float64) for l in program.layers}
    x = torch.randn(3, *shape, dtype=torch.float64)
    tape = Tape()
    logits = program.forward(x, tape=tape)
    k = 2
    slots = torch.tensor([0, 1, 1, 0, 0, 1])

    def reverse(layer, grad, input_shape):
        return layer.reverse(grad, weights[layer.name], slots, input_shape)

    def run(seed):
        values, exponent = program.backward(tape, seed, k, reverse)
        return torch.ldexp(values, exponent.view(-1, 1, 1, 1).double())

    s1 = torch.randn(3 * k, logits.shape[1], dtype=torch.float64, generator=g)
    s2 = torch.randn(3 * k, logits.shape[1], dtype=torch.float64, generator=g)
    r1, r2 = run(s1), run(s2)
    r12 = run(2.5 * s1 - 0.75 * s2)
    torch.testing.assert_close(r12, 2.5 * r1 - 0.75 * r2, rtol=1e-10, atol=1e-12)
    assert r1.abs().max() > 0


def test_all_class_store_serves_every_target():
    model, shape = _model("lenet")
    store = _random_stores(model, [0])[0]
    store.class_id = ALL_CLASSES
    attributor = Attributor(model, store)
    x = torch.randn(2, *shape, dtype=torch.float64)
    a3 = attributor.attribute(x, target=3)
    as_class3 = Attributor(model, {3: _random_stores(model, [3])[3]})
    # same patterns under another class id give the same maps
    as_class3.stores[3].patterns = store.patterns
    torch.testing.assert_close(a3, as_class3.attribute(x, target=3))


def test_public_calls_leave_the_model_bit_identical():
    torch.manual_seed(0)
    model = SmallVGG().train()  # training mode on purpose: BatchNorm/Dropout must not update anything
    _randomise_batchnorm(model)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(20, 3, 12, 12)
    labels = torch.randint(0, 5, (20,))
    stores = SignalEstimator(model, progress=False).fit([(x[:10], labels[:10]), (x[10:], labels[10:])])
    Attributor(model, stores).explain(x[:3], topk=2)
    Attributor(model).attribute(x[:3], target=1, method="gradient")
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed"
    model.eval()
    reference = copy.deepcopy(model)
    reference.load_state_dict(before)
    assert torch.equal(model(x), reference.eval()(x))


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x, y):
        return self.fc(x + y)


class _MutatesSilently(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        y.add_(1.0)  # the result is dropped: only the mutation of y carries the op
        return torch.relu(y)


class _InplaceThenReads(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.fc(x)
        z = self.act(y)
        return z + y  # eager: y was rectified in place, so this is 2 relu(y)


class _InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.fc(x)
        out += x  # the ResNet idiom: exact out of place
        return self.act(out)


class _Assigns(nn.Module):
    def forward(self, x):
        x = x.clone()
        x[:, 0] = 0
        return x


def test_untraceable_constructs_are_named_with_a_workaround():
    model = nn.Sequential(nn.Linear(4, 4), Branchy(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(Branchy\).*leaf_modules"):
        Program(model)
    program = Program(model, leaf_modules=[Branchy])  # the workaround: one op, reversed with its gradient
    assert [layer.name for layer in program.layers] == ["0", "2"]
    x = torch.randn(3, 4)
    torch.testing.assert_close(program.forward(x), model(x))
    with pytest.raises(UnsupportedModelError, match=r"module '1' \(_Assigns\).*in-place ops on views"):
        Program(nn.Sequential(nn.Linear(4, 4), _Assigns(), nn.Linear(4, 2)))
    with pytest.raises(UnsupportedModelError, match="more than one input"):
        Program(_TwoInputs())
    for silent in (_MutatesSilently(), _InplaceThenReads()):
        with pytest.raises(UnsupportedModelError, match="in-place.*seen through another reference.*out-of-place"):
            Program(nn.Sequential(silent, nn.Linear(4, 2)))
    model = nn.Sequential(_InplaceResidual(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    model(x)[:, 1].sum().backward()
    torch.testing.assert_close(Attributor(model).attribute(x.detach(), target=1, method="gradient"), x.grad)


def test_bad_targets_and_missing_stores():
    model, shape = _model("lenet")
    x = torch.randn(2, *shape, dtype=torch.float64)
    attributor = Attributor(model, _random_stores(model, [0, 1]))
    with pytest.raises(ValueError, match="topk=11"):
        attributor.explain(x, topk=11)
    with pytest.raises(KeyError, match=r"no signal store for classes \[7\]"):
        attributor.attribute(x, target=7)
    with pytest.raises(ValueError, match="must lie in"):
        attributor.attribute(x, target=10)
    with pytest.raises(ValueError, match="needs signal stores"):
        Attributor(model).attribute(x, target=1)


def test_store_round_trip_and_mismatch(tmp_path):
    model, shape = _model("lenet")
    store = _random_stores(model, [2])[2]
    path = store.save(tmp_path / "s_class_2.pkl")
    loaded = SignalStore.load(path)
    assert loaded.class_id == 2 and loaded.fingerprint == store.fingerprint
    written = store.encoded()  # what the default save keeps (a_pos in float16 with per-neuron exponents)
    for name in store.patterns:
        assert torch.equal(loaded.patterns[name]["a_pos"], written.patterns[name]["a_pos"])
    other, _ = _model("lenet")
    with torch.no_grad():
        other.classifier[2].weight[0, 0] += 1
    from untangle_ext import StoreError

    with pytest.raises(StoreError, match="different model weights"):
        Attributor(other, {2: loaded})
