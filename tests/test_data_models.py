"""Tests for the bundled MNIST sample (untangle_ext.data) and the reference models (untangle_ext.models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from untangle_ext.data import MNIST_SAMPLE_PATH, load_mnist_sample, mnist_sample_loader
from untangle_ext.models import LeNet, load_or_train_lenet, residual_net, vgg_style_net

TUTORIAL_LENET_KEYS = [
    "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
    "classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias",
]


def test_npz_raw_format():
    with np.load(MNIST_SAMPLE_PATH, allow_pickle=False) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (5000, 28, 28)
        assert f["labels"].dtype == np.uint8 and f["labels"].shape == (5000,)
        assert np.bincount(f["labels"], minlength=10).tolist() == [500] * 10


def test_load_all():
    x, y = load_mnist_sample()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [500] * 10
    assert float(x.mean()) > 0.05  # real digits, not blank


def test_splits_disjoint_and_sized():
    xtr, ytr = load_mnist_sample("train")
    xte, yte = load_mnist_sample("test")
    assert xtr.shape[0] == 4000 and xte.shape[0] == 1000
    assert torch.bincount(ytr, minlength=10).tolist() == [400] * 10
    assert torch.bincount(yte, minlength=10).tolist() == [100] * 10
    xall, _ = load_mnist_sample("all")
    # test = last 100 of each class; together the splits are exactly the whole file
    rows = lambda t: sorted(bytes(r) for r in t.flatten(1).numpy())  # noqa: E731
    assert rows(torch.cat([xtr, xte])) == rows(xall)
    # the test split really is the last 100 images of each class in file order
    _, yall = load_mnist_sample("all")
    last = torch.cat([torch.nonzero(yall == c).flatten()[-100:] for c in range(10)])
    assert torch.equal(xall[last], xte)


def test_class_filter():
    x, y = load_mnist_sample("test", classes=[3, 7])
    assert x.shape[0] == 200 and set(y.tolist()) == {3, 7}
    x, y = load_mnist_sample("all", classes=(0,))
    assert x.shape[0] == 500 and set(y.tolist()) == {0}


@pytest.mark.parametrize("bad", [[10], [-1], [1, 2, 42], ["x"], []])
def test_bad_class_raises(bad):
    with pytest.raises(ValueError, match="class"):
        load_mnist_sample(classes=bad)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        load_mnist_sample("validation")


def test_loader_deterministic_shuffle():
    a = next(iter(mnist_sample_loader(32, shuffle=True, seed=5)))[1]
    b = next(iter(mnist_sample_loader(32, shuffle=True, seed=5)))[1]
    c = next(iter(mnist_sample_loader(32, shuffle=False)))[1]
    assert torch.equal(a, b) and a.shape == (32,)
    assert c.tolist() == [0] * 32  # unshuffled file order is sorted by class
    xb, yb = next(iter(mnist_sample_loader(8, split="test", classes=[9])))
    assert xb.shape == (8, 1, 28, 28) and yb.tolist() == [9] * 8


def test_lenet_state_dict_matches_tutorial():
    m = LeNet()
    assert list(m.state_dict().keys()) == TUTORIAL_LENET_KEYS
    assert m(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_train_and_cache_round_trip(tmp_path):
    cache = tmp_path / "sub" / "lenet.pt"
    model, acc = load_or_train_lenet(cache, epochs=1, progress=False)
    assert acc >= 0.80, acc  # chance is 0.10
    assert not model.training
    assert cache.is_file() and [p.name for p in cache.parent.iterdir()] == ["lenet.pt"]  # no temp left
    model2, acc2 = load_or_train_lenet(cache, epochs=1, progress=False)
    assert acc2 == acc
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_corrupt_cache_raises(tmp_path):
    cache = tmp_path / "lenet.pt"
    cache.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="Delete the file"):
        load_or_train_lenet(cache, progress=False)
    assert cache.read_bytes() == b"not a checkpoint"  # nothing damaged


def test_vgg_style_net_shapes():
    net = vgg_style_net(num_classes=10, in_channels=3)
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_residual_net_shapes():
    net = residual_net(num_classes=10).eval()
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
