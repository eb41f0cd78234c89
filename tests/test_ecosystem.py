"""Captum and Quantus interop: our methods as Captum attributions and a Quantus explain_func, checked with numbers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from _hardening import IMAGE_SHAPE, NUM_CLASSES, assert_unchanged, mixed_batches, snapshot
from untangle_ext import Attributor, SignalEstimator

captum_attr = pytest.importorskip("captum.attr", reason="Captum is not installed (pip install 'untangle-ext[ecosystem]')")
captum_metrics = pytest.importorskip("captum.metrics")
from untangle_ext.captum import Gradient, PatternAttribution, PatternNet, quantus_explain  # noqa: E402

pytestmark = pytest.mark.ecosystem


@pytest.fixture(scope="module")
def linear():
    """A purely linear classifier: the gradient is its weight row, whatever the input."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(IMAGE_SHAPE)), NUM_CLASSES)).eval()
    return model, SignalEstimator(model, progress=False).fit(mixed_batches())


def _inputs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = mixed_batches(batches=1, batch_size=n)[0]
    return x, y


@pytest.mark.parametrize("cls, method", [(PatternAttribution, "pattern_attribution"), (PatternNet, "patternnet"),
                                         (Gradient, "gradient")])
def test_captum_classes_match_the_attributor(model, stores, cls, method):
    x, y = _inputs()
    before = snapshot(model)
    explainer = cls(model, stores)
    got = explainer.attribute(x, target=y)
    assert got.shape == x.shape and not explainer.has_convergence_delta()
    torch.testing.assert_close(got, Attributor(model, stores).attribute(x, target=y, method=method), rtol=0, atol=0)
    (as_tuple,) = explainer.attribute((x,), target=y.tolist())  # Captum's tuple inputs and list targets
    torch.testing.assert_close(as_tuple, got, rtol=0, atol=0)
    torch.testing.assert_close(explainer.attribute(x, target=2), explainer.attribute(x, target=torch.full((6,), 2)))
    assert_unchanged(model, before)


def test_gradient_equals_captum_saliency_and_input_x_gradient(model):
    x, y = _inputs()
    ours = Gradient(model).attribute(x, target=y)
    saliency = captum_attr.Saliency(model).attribute(x.clone().requires_grad_(), target=y, abs=False)
    torch.testing.assert_close(ours, saliency, rtol=1e-5, atol=1e-6)
    ixg = captum_attr.InputXGradient(model).attribute(x.clone().requires_grad_(), target=y)
    torch.testing.assert_close(x * ours, ixg, rtol=1e-5, atol=1e-6)
    assert ours.abs().sum() > 0


def test_target_none_explains_the_predicted_class(model, stores):
    x, _ = _inputs()
    predicted = model(x).argmax(1)
    pa = PatternAttribution(model, stores)
    torch.testing.assert_close(pa.attribute(x), pa.attribute(x, target=predicted), rtol=0, atol=0)


def test_bad_captum_target_names_the_problem(model, stores):
    x, _ = _inputs()
    with pytest.raises(ValueError, match="one class id per image"):
        PatternAttribution(model, stores).attribute(x, target=[0, 1])


def _noise(inputs: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(inputs.shape, generator=g)
    return noise, inputs - noise


def test_infidelity_is_zero_for_the_gradient_of_a_linear_model(linear):
    model, stores = linear
    x, y = _inputs()
    grad = Gradient(model).attribute(x, target=y)
    infid = captum_metrics.infidelity(model, _noise, x, grad, target=y, n_perturb_samples=4)
    assert infid.shape == (x.shape[0],) and float(infid.abs().max()) < 1e-9
    pa = PatternAttribution(model, stores).attribute(x, target=y)  # not the weights: its infidelity is positive
    assert float(captum_metrics.infidelity(model, _noise, x, pa, target=y, n_perturb_samples=4).min()) > 1e-6


def test_sensitivity_max_of_input_independent_attributions_is_zero(linear, model, stores):
    lin_model, lin_stores = linear
    x, y = _inputs()
    for cls in (PatternAttribution, PatternNet, Gradient):  # linear model: every map is a constant row
        sens = captum_metrics.sensitivity_max(cls(lin_model, lin_stores).attribute, x, target=y, n_perturb_samples=3)
        assert sens.shape == (x.shape[0],) and float(sens.max()) == 0.0
    sens = captum_metrics.sensitivity_max(PatternAttribution(model, stores).attribute, x, target=y,
                                          perturb_radius=0.5, n_perturb_samples=5)
    assert float(sens.max()) > 0  # ReLU gates switch: the attribution moves


def test_captum_visualisation_draws_our_attribution(model, stores):
    import matplotlib

    matplotlib.use("Agg")
    from captum.attr import visualization as viz

    x, y = _inputs()
    attr = PatternAttribution(model, stores).attribute(x, target=y)
    heat = attr[0].permute(1, 2, 0).numpy()
    fig, ax = viz.visualize_image_attr(heat, x[0].permute(1, 2, 0).numpy(), method="blended_heat_map", sign="all",
                                       use_pyplot=False, outlier_perc=0)
    shown = np.asarray(ax.images[-1].get_array())
    expected = heat.sum(-1) / np.abs(heat.sum(-1)).max()
    np.testing.assert_allclose(shown, expected, rtol=1e-5, atol=1e-6)


def test_quantus_explain_func_is_numpy_in_numpy_out(model, stores):
    x, y = _inputs()
    out = quantus_explain(model, x.numpy(), y.numpy(), stores=stores, method="patternnet", device="cpu")
    assert isinstance(out, np.ndarray) and out.shape == x.shape
    np.testing.assert_array_equal(out, Attributor(model, stores).attribute(x, target=y, method="patternnet").numpy())


def test_quantus_metric_runs_on_our_attributions(linear, model, stores):
    quantus = pytest.importorskip("quantus", reason="Quantus is not installed (pip install 'untangle-ext[ecosystem]')")
    lin_model, _ = linear
    x, y = _inputs()
    metric = quantus.MaxSensitivity(nr_samples=3, lower_bound=0.1, disable_warnings=True, display_progressbar=False,
                                    return_aggregate=False)
    kw = dict(x_batch=x.numpy(), y_batch=y.numpy(), device="cpu", explain_func=quantus_explain)
    flat = metric(model=lin_model, explain_func_kwargs={"method": "gradient"}, **kw)
    assert np.allclose(flat, 0.0)  # a linear model's gradient does not depend on the input
    np.random.seed(0)  # Quantus draws its perturbations from numpy's global RNG: small ones may flip no gate,
    torch.manual_seed(0)  # and a map with fixed gates does not move (sensitivity 0): seeded, not flaky
    moving = np.asarray(metric(model=model, explain_func_kwargs={"stores": stores}, **kw))
    blank = np.abs(quantus_explain(model, x.numpy(), y.numpy(), stores=stores)).reshape(len(x), -1).max(1) == 0
    assert moving.shape == (len(x),) and np.isnan(moving[blank]).all()  # Quantus divides by |a| (dead tiny net)
    assert np.isfinite(moving[~blank]).all() and moving[~blank].max() > 0 and (~blank).sum() >= 3


def test_quantus_table_script(trained_lenet, tmp_path, monkeypatch):
    """examples/quantus_table.py (the README's table) on 10 images, with the session's LeNet."""
    pytest.importorskip("quantus", reason="Quantus is not installed (pip install 'untangle-ext[ecosystem]')")
    import runpy
    from pathlib import Path

    torch.save(trained_lenet[0].state_dict(), tmp_path / "lenet.pt")
    script = Path(__file__).resolve().parents[1] / "examples" / "quantus_table.py"
    main = runpy.run_path(str(script))["main"]
    table = main(["--per-class", "1", "--train-per-class", "30", "--runs", "10", "--cache", str(tmp_path / "lenet.pt"),
                  "--out", str(tmp_path / "t.md")])
    assert list(table) == ["PatternAttribution", "gradient", "IntegratedGradients (Captum)"]
    for scores in table.values():
        assert list(scores) == ["FaithfulnessCorrelation", "RandomLogit", "MaxSensitivity"]
        assert -1 <= scores["FaithfulnessCorrelation"] <= 1 and -1 <= scores["RandomLogit"] <= 1
        assert 0 <= scores["MaxSensitivity"] < 10
    text = (tmp_path / "t.md").read_text()
    assert text.count("\n") == 5 and "| PatternAttribution | " in text


def test_quantus_explain_on_randomised_weights_needs_consent(model, stores):
    from _hardening import tiny_model
    from untangle_ext import StoreError

    x, y = _inputs()
    randomised = tiny_model(seed=5)  # same architecture, other weights (what Quantus' randomisation metrics pass)
    with pytest.raises(StoreError, match="different model weights"):
        quantus_explain(randomised, x.numpy(), y.numpy(), stores=stores)
    out = quantus_explain(randomised, x.numpy(), y.numpy(), stores=stores, check_fingerprint=False)
    expected = Attributor(randomised, stores, check_fingerprint=False).attribute(x, target=y).numpy()
    np.testing.assert_array_equal(out, expected)
    assert not np.allclose(out, quantus_explain(model, x.numpy(), y.numpy(), stores=stores))
