"""Bad inputs to estimation and attribution: each a specific error naming the cause (SPEC §4)."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from _hardening import (IMAGE_SHAPE, NUM_CLASSES, Branchy, assert_unchanged, class_batches, mixed_batches, snapshot,
                        tiny_model)
from untangle_ext import Attributor, SignalEstimator, UnsupportedModelError
from untangle_ext.store import StoreError, class_store_path
from untangle_ext.validation import (DeviceMismatchError, EmptyClassWarning, InputDtypeError, InputError,
                                     InputShapeError, LabelError, NonFiniteInputError, TopKError)


@pytest.fixture
def attributor(model, stores):
    return Attributor(model, stores)


def _fit(model, batches, **kwargs):
    return SignalEstimator(model, progress=False, **kwargs).fit(batches)


def _with(batches, index, images=None, labels=None):
    """``batches`` with batch ``index``'s images or labels replaced."""
    out = list(batches)
    x, y = out[index]
    out[index] = (x if images is None else images, y if labels is None else labels)
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_images_name_the_batch(model, bad):
    x = mixed_batches()[2][0].clone()
    x[3, 0, 1, 1] = bad
    before = snapshot(model)
    with pytest.raises(NonFiniteInputError, match=r"batch 2: 1 NaN/Inf values \(first in image 3"):
        _fit(model, _with(mixed_batches(), 2, images=x))
    assert_unchanged(model, before)


def test_non_finite_class_batch_writes_no_file(model, tmp_path):
    def loader_fn(c):
        batches = class_batches(c)
        if c == 1:
            batches[1][0][0, 0, 0, 0] = float("nan")
        return batches

    with pytest.raises(NonFiniteInputError, match="class 1, batch 1"):
        SignalEstimator(model, progress=False).fit_to_files(tmp_path / "net", loader_fn)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net_class_0.pkl"]


def test_non_finite_inputs_to_explain(attributor):
    x = mixed_batches()[0][0].clone()
    x[1] = float("nan")
    with pytest.raises(NonFiniteInputError, match="inputs: 36 NaN/Inf values \\(first in image 1"):
        attributor.explain(x)


def test_non_finite_model_weights(model):
    broken = tiny_model()
    with torch.no_grad():
        broken[4].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="layer '4' has NaN/Inf weights"):
        SignalEstimator(broken, progress=False)


def test_wrong_shape_vs_expected_image_size(model):
    with pytest.raises(InputShapeError, match=r"batch 0: images have shape \(1, 6, 6\) .*expected \(1, 7, 7\)"):
        _fit(model, mixed_batches(), input_shape=(1, 7, 7))


def test_later_batch_of_another_shape(model):
    bigger = torch.randn(6, 1, 8, 8)
    with pytest.raises(InputShapeError, match=r"batch 1: images have shape \(1, 8, 8\).*expected \(1, 6, 6\)"):
        _fit(model, _with(mixed_batches(), 1, images=bigger))


def test_shape_the_model_cannot_take(model):
    with pytest.raises(InputShapeError, match=r"do not fit the model: its first layer '0' is a Conv2d taking \(B, 1, H, W\)"):
        _fit(model, [(torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.long))])
    # larger images pass the convolutions; the message names the Linear layer they do not fit
    with pytest.raises(InputShapeError, match=r"\(1, 8, 8\).*its Linear layer '4' takes 8 features but gets 18"):
        _fit(model, [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))])


def test_one_image_without_batch_and_channel_dims_is_named(attributor):
    with pytest.raises(InputShapeError, match=r"got a tensor of shape \(6, 6\); expected a batch of images "
                                              r"\(B, 1, 6, 6\).*x\[None, None\]"):
        attributor.explain(torch.randn(6, 6))


def test_empty_loader_is_an_error_in_fit(model):
    from untangle_ext.validation import EmptyLoaderError

    with pytest.raises(EmptyLoaderError, match="yielded no images"):
        _fit(model, [])


def test_attribution_checks_the_stores_image_size(attributor, model):
    with pytest.raises(InputShapeError, match=r"expected \(1, 6, 6\)"):
        attributor.explain(torch.randn(2, 1, 8, 8))
    with pytest.raises(InputShapeError, match="without its batch dimension: use x.unsqueeze"):
        attributor.explain(torch.randn(1, 6, 6))
    with pytest.raises(InputShapeError, match="channels-last"):
        attributor.explain(torch.randn(2, 6, 6, 1))
    with pytest.raises(InputShapeError, match="no batch dimension"):
        attributor.explain(torch.randn(6))


@pytest.mark.parametrize("images, cause", [
    (torch.randint(0, 255, (6, *IMAGE_SHAPE), dtype=torch.uint8), "dtype torch.uint8"),
    (torch.zeros(6, *IMAGE_SHAPE, dtype=torch.bool), "dtype torch.bool"),
    (np.zeros((6, *IMAGE_SHAPE), dtype=np.float32), "not ndarray"),
])
def test_wrong_image_dtype(model, images, cause):
    with pytest.raises(InputDtypeError, match=cause) as err:
        _fit(model, _with(mixed_batches(), 0, images=images))
    assert isinstance(err.value, TypeError)


def test_float_images_are_cast_to_the_models_dtype(model, stores):
    x = mixed_batches()[0][0]
    exp64 = Attributor(model, stores).explain(x.double())
    exp32 = Attributor(model, stores).explain(x)
    torch.testing.assert_close(exp64.attributions, exp32.attributions)


@pytest.mark.parametrize("labels, err, cause", [
    (torch.full((6,), NUM_CLASSES), LabelError, r"labels must lie in \[0, 3\).*max 3"),
    (torch.full((6,), -1), LabelError, "min -1"),
    (torch.zeros(5, dtype=torch.long), LabelError, "5 labels for 6 images"),
    (torch.zeros(6, NUM_CLASSES, dtype=torch.long), LabelError, "one-hot"),
    (torch.zeros(6), InputDtypeError, "labels have dtype torch.float32"),
])
def test_bad_labels(model, labels, err, cause):
    with pytest.raises(err, match=cause) as info:
        _fit(model, _with(mixed_batches(), 1, labels=labels))
    assert "batch 1" in str(info.value)


def test_inputs_on_another_device(model, attributor):
    meta = torch.empty(2, *IMAGE_SHAPE, device="meta")
    with pytest.raises(DeviceMismatchError, match="images are on meta but the model is on cpu"):
        attributor.explain(meta)
    with pytest.raises(DeviceMismatchError, match="batch 0"):
        _fit(model, [(meta, torch.zeros(2, dtype=torch.long))])


def test_model_split_over_devices():
    split = tiny_model()
    split[4].to("meta")
    with pytest.raises(DeviceMismatchError, match="several devices"):
        SignalEstimator(split, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_batches_follow_a_cuda_model(stores):
    gpu = tiny_model().cuda()
    x = mixed_batches()[0][0]
    got = Attributor(gpu, {c: s for c, s in stores.items()}).explain(x).attributions
    want = Attributor(tiny_model(), stores).explain(x).attributions
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(DeviceMismatchError, match="images are on cuda"):
        Attributor(tiny_model(), stores).explain(x.cuda())


def test_empty_class_loader_warns_and_writes_nothing(model, tmp_path):
    loaders = {0: class_batches(0), 1: [], 2: class_batches(2)}
    with pytest.warns(EmptyClassWarning, match=r"no images for class\(es\) \[1\].*no signal store was written"):
        written = SignalEstimator(model, progress=False).fit_to_files(tmp_path / "net", loaders.__getitem__)
    assert sorted(written) == [0, 2]
    assert not class_store_path(tmp_path / "net", 1).exists()


def test_class_missing_from_one_pass_loader_warns(model):
    only_0_and_1 = [(x[y < 2], y[y < 2]) for x, y in mixed_batches()]
    with pytest.warns(EmptyClassWarning, match=r"\[2\]"):
        stores = _fit(model, only_0_and_1)
    assert sorted(stores) == [0, 1]


@pytest.mark.parametrize("topk, cause", [(NUM_CLASSES + 1, "topk=4 must lie in \\[1, 3\\]: it is larger than the number of classes"), (0, "topk=0"),
                                         (1.5, "must be an int"), (True, "must be an int")])
def test_topk(attributor, topk, cause):
    with pytest.raises(TopKError, match=cause):
        attributor.explain(mixed_batches()[0][0], topk=topk)


def test_topk_equal_to_classes_works(attributor):
    exp = attributor.explain(mixed_batches()[0][0], topk=NUM_CLASSES)
    assert exp.attributions.shape == (6, NUM_CLASSES, *IMAGE_SHAPE)


class _Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("bad, cause", [
    (Branchy(), "could not trace the forward of Branchy.*control flow.*leaf_modules"),
    (nn.Sequential(nn.ReLU()), "no Linear or Conv"),
])
def test_unsupported_models(bad, cause):
    with pytest.raises(UnsupportedModelError, match=cause):
        SignalEstimator(bad, progress=False)
    with pytest.raises(UnsupportedModelError, match=cause):
        Attributor(bad)


def test_a_model_returning_a_tuple_is_refused_at_first_use():
    attributor = Attributor(nn.Sequential(nn.Linear(4, 3), nn.LSTM(3, 3)))
    with pytest.raises(UnsupportedModelError, match="returns a tuple.*one tensor of logits"):
        attributor.attribute(torch.randn(2, 4), target=0, method="gradient")


def test_smooth_activations_are_supported():
    """Formerly refused (Tanh, Sigmoid): now reversed with their gradient, so the gradient method is exact."""
    model = _Tanh().double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    model(x)[:, 1].sum().backward()
    torch.testing.assert_close(Attributor(model).attribute(x.detach(), target=1, method="gradient"), x.grad)


def test_loader_that_is_not_a_loader(model):
    with pytest.raises(InputError, match="loader_fn|not an iterable"):
        SignalEstimator(model, progress=False).fit_per_class(lambda c: None)
    with pytest.raises(InputError, match=r"batch 0 is a Tensor.*\(images, labels\) pairs"):
        _fit(model, [torch.randn(2, *IMAGE_SHAPE)])


def test_errors_are_value_errors_and_leave_the_model_alone(model, attributor):
    before = snapshot(model)
    for call in (lambda: attributor.explain(torch.randn(2, 1, 8, 8)), lambda: attributor.explain(
            mixed_batches()[0][0], topk=9), lambda: _fit(model, _with(mixed_batches(), 0, labels=torch.full((6,), 9)))):
        with pytest.raises(ValueError):
            call()
    assert_unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(model, mixed_batches())  # valid input: no warning at all


def test_stores_of_different_image_sizes_are_refused(model, stores):
    other = dataclasses.replace(stores[1], input_shape=[1, 7, 7])
    with pytest.raises(StoreError, match="different shapes"):
        Attributor(model, {0: stores[0], 1: other})
