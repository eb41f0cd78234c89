"""The full pipeline on the bundled real MNIST sample: train, estimate, attribute."""
from __future__ import annotations

import copy

import torch

from untangle_ext import Attributor, SignalEstimator
from untangle_ext.data import load_mnist_sample, mnist_sample_loader
from untangle_ext.trace import Program


def test_mnist_pipeline(trained_lenet, tmp_path):
    model, accuracy = trained_lenet
    assert accuracy >= 0.9
    before = copy.deepcopy(model.state_dict())
    stores = SignalEstimator(model, progress=False).fit(mnist_sample_loader(128, split="train"))
    assert sorted(stores) == list(range(10))
    assert sum(s.num_samples for s in stores.values()) == 4000

    # every live neuron of every class satisfies w^T a+ = 1 (float32 storage)
    for layer in Program(model).layers:
        w = layer.weight.double().reshape(layer.out_features, -1)
        for store in stores.values():
            a = store.patterns[layer.name]["a_pos"].double().reshape(layer.out_features, -1)
            live = a.abs().sum(1) > 0
            assert live.any()
            torch.testing.assert_close((w * a).sum(1)[live], torch.ones(int(live.sum()), dtype=torch.float64),
                                       rtol=0, atol=1e-4)

    images, labels = load_mnist_sample("test")
    x = images[::50]
    attributor = Attributor(model, {c: s for c, s in stores.items()})
    exp = attributor.explain(x, topk=3)
    assert exp.attributions.shape == (len(x), 3, 1, 28, 28)
    assert torch.isfinite(exp.attributions).all()

    # PatternAttribution puts its evidence for the predicted class on the strokes, not the background:
    top = exp.attributions[:, 0, 0]
    ink = x[:, 0] > 0.2
    on_ink = (top.abs() * ink).sum((1, 2)) / top.abs().sum((1, 2))
    assert on_ink.median() > 0.6, on_ink
    # ... and the gradient does not (it spreads over the background), which is why patterns matter
    grad = attributor.explain(x, topk=1, method="gradient").attributions[:, 0, 0]
    grad_on_ink = (grad.abs() * ink).sum((1, 2)) / grad.abs().sum((1, 2))
    assert on_ink.median() > grad_on_ink.median() + 0.1

    # saving and loading round-trips the attribution exactly
    paths = {c: s.save(tmp_path / f"lenet_class_{c}.pkl") for c, s in stores.items()}
    from untangle_ext.store import SignalStore

    reloaded = Attributor(model, {c: SignalStore.load(p) for c, p in paths.items()}).explain(x, topk=3).attributions
    encoded = Attributor(model, {c: s.encoded() for c, s in stores.items()}).explain(x, topk=3).attributions
    assert torch.equal(reloaded, encoded)  # a file gives exactly what `encoded()` says it keeps
    # the default float16 files change the maps by < 1e-3 (normwise, per map)
    err = (reloaded - exp.attributions).flatten(2).norm(dim=2) / exp.attributions.flatten(2).norm(dim=2)
    assert float(err.max()) < 1e-3, float(err.max())

    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
