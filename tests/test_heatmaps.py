"""Heatmap arithmetic (scales, differences), colours, overlay, figures, JSON and the threshold slider."""
import json
import os
import sys
import types

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from untangle_ext import heatmaps, slider


def _maps(seed=0, k=3, h=5, w=6):
    return torch.randn(k, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_channel_sum_and_normalise():
    a = torch.arange(24, dtype=torch.float64).view(2, 3, 2, 2) - 10
    torch.testing.assert_close(heatmaps.channel_sum(a), a[:, 0] + a[:, 1] + a[:, 2])
    n = heatmaps.normalise(a)
    assert n.abs().max() == 1 and torch.equal(torch.sign(n), torch.sign(a))
    assert torch.equal(heatmaps.normalise(torch.zeros(3, 3)), torch.zeros(3, 3))  # zeros stay zeros, no NaN


def test_joint_scale_is_shared_and_single_scale_is_per_map():
    maps = _maps() * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64).view(3, 1, 1)
    joint = heatmaps.scale_maps(maps, "joint")
    assert joint.abs().max() == 1.0
    torch.testing.assert_close(joint, maps / maps.abs().max(), rtol=0, atol=0)  # one common factor
    single = heatmaps.scale_maps(maps, "single")
    assert torch.equal(single.abs().flatten(1).amax(1), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="hm_diff must be one of"):
        heatmaps.scale_maps(maps, "both")


@pytest.mark.parametrize("mode", ["joint", "single"])
def test_difference_maps(mode):
    maps = heatmaps.scale_maps(_maps(1), mode)
    diff, inv = heatmaps.difference_maps(maps, mode)
    assert diff.shape == (2, 5, 6) and torch.equal(diff + inv, torch.zeros_like(diff))
    raw = maps[:1] - maps[1:]
    expected = raw / raw.abs().max() if mode == "joint" else raw / raw.abs().flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(diff, expected, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="at least 2"):
        heatmaps.difference_maps(maps[:1])


def test_explanation_maps_from_attributions():
    attr = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    m = heatmaps.explanation_maps(attr)
    assert set(m) == {"class", "diff", "invDiff"}
    torch.testing.assert_close(m["class"], heatmaps.normalise(attr.double().sum(1)))
    assert set(heatmaps.explanation_maps(attr[:1])) == {"class"}


def test_rgb_seismic_zero_is_white_and_extremes_match_matplotlib():
    rgb = heatmaps.to_rgb(torch.tensor([[-1.0, 0.0, 1.0]]))
    assert rgb.shape == (1, 3, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0, 1], [1.0, 1.0, 1.0])
    seismic = matplotlib.colormaps["seismic"]
    np.testing.assert_allclose(rgb[0, 0], seismic(0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(rgb[0, 2], seismic(1.0)[:3], atol=1e-6)
    np.testing.assert_allclose(heatmaps.to_rgb(np.zeros((2, 2)), "bwr"), np.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="unknown colormap"):
        heatmaps.to_rgb(np.zeros((2, 2)), "no-such-map")


def test_heatmap_rgb_per_image_scale():
    a = np.zeros((2, 4, 4, 3), dtype=np.float32)
    a[0, 0, 0] = 5.0
    a[1, 1, 1] = -0.01
    rgb = heatmaps.heatmap_rgb(a)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(rgb[0, 0, 0], heatmaps.to_rgb(np.ones(1))[0])  # each image on its own scale
    np.testing.assert_allclose(rgb[1, 1, 1], heatmaps.to_rgb(-np.ones(1))[0])
    with pytest.raises(ValueError, match="N, H, W, C"):
        heatmaps.heatmap_rgb(np.zeros((4, 4, 3)))


@pytest.mark.parametrize("make", [
    lambda a: torch.from_numpy(a)[..., None],  # tensor H×W×1
    lambda a: a,  # ndarray H×W
    lambda a: torch.from_numpy(a)[None],  # tensor C×H×W
    lambda a: Image.fromarray((a * 255).round().astype(np.uint8)),  # PIL grayscale
    lambda a: np.repeat(a[..., None], 3, axis=-1) * 4 - 2,  # normalised RGB ndarray
])
def test_image_to_rgb_accepts_tutorial_inputs(make):
    a = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    rgb = heatmaps.image_to_rgb(make(a))
    assert rgb.shape == (4, 5, 3)
    np.testing.assert_allclose(rgb[..., 0], a, atol=1 / 255)


def test_overlay_blends_and_checks_size():
    heat = heatmaps.to_rgb(np.ones((4, 5)))
    out = heatmaps.overlay(heat, np.zeros((4, 5)), alpha=0.5)
    np.testing.assert_allclose(out, heat, atol=1e-7)  # a blank image leaves the heatmap's colours as they are
    with pytest.raises(ValueError, match="pass the image as the model sees it"):
        heatmaps.overlay(heat, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="H×W×C"):
        heatmaps.image_to_rgb(np.zeros((2, 3, 4, 5)))


def test_save_figure_upscales_small_images_and_writes_atomically(tmp_path):
    rgb = heatmaps.to_rgb(heatmaps.normalise(_maps(k=1, h=28, w=28)[0]))
    path = heatmaps.save_figure(tmp_path / "x_class_0.JPEG", [rgb], ["title"])
    with Image.open(path) as img:
        assert img.format == "JPEG" and min(img.size) >= 320  # 28×28 upscaled, plus colour bar
    assert os.listdir(tmp_path) == ["x_class_0.JPEG"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    heatmaps.save_json(target, {"x": 1})

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        heatmaps.atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"x": 1} and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(ValueError):
        heatmaps.save_json(target, {"x": float("nan")})


def test_keep_top_fraction():
    m = torch.tensor([[0.1, -0.9, 0.3], [0.5, -0.2, 0.0]])
    assert torch.equal(slider.keep_top_fraction(m, 1.0), m)
    assert torch.equal(slider.keep_top_fraction(m, 0.0), torch.zeros_like(m))
    top2 = slider.keep_top_fraction(m, 2 / 6)
    assert torch.equal(top2, torch.tensor([[0.0, -0.9, 0.0], [0.5, 0.0, 0.0]]))
    batched = slider.keep_top_fraction(torch.stack([m, -m * 2]), 1 / 6)  # per map, not over the batch
    assert (batched != 0).sum(dim=(1, 2)).tolist() == [1, 1]
    out = slider.keep_top_fraction(m.numpy(), 0.5)
    assert isinstance(out, np.ndarray) and (out != 0).sum() == 3
    with pytest.raises(ValueError, match="fraction"):
        slider.keep_top_fraction(m, 1.5)


def test_slider_without_ipywidgets_writes_sweep(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import fails
    attr = torch.randn(1, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    path = slider.slider(attr, image=torch.rand(12, 12, 1), path=tmp_path / "sweep.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]


def test_slider_with_ipywidgets_uses_interact(monkeypatch):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = []
    fake = types.ModuleType("ipywidgets")
    fake.interact = lambda fn, th: calls.append(th) or [fn(v) for v in (th[0], th[1])]
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    slider.slider(torch.randn(3, 8, 8))
    plt.close("all")
    assert calls == [(0.0, 0.99, 0.01)]


@pytest.mark.parametrize("dark_background", [True, False])
def test_overlay_zero_is_white_on_the_background_as_the_colour_bar_says(dark_background):
    digit = np.zeros((6, 6), dtype=np.float32)
    digit[2:4, 1:5] = 1.0  # a stroke
    image = digit if dark_background else 1.0 - digit  # white-on-black digit, or dark ink on paper
    heat = heatmaps.to_rgb(np.zeros((6, 6)))  # zero attribution everywhere: white
    out = heatmaps.overlay(heat, image, alpha=0.7)
    np.testing.assert_allclose(out[digit == 0], 1.0, atol=1e-6)  # background: exactly the colour bar's 0
    np.testing.assert_allclose(out[digit == 1], 0.7, atol=1e-6)  # stroke: darkened by 1 - alpha
    red = heatmaps.to_rgb(np.ones((6, 6)))
    np.testing.assert_allclose(heatmaps.overlay(red, image)[digit == 0], red[digit == 0], atol=1e-6)


def test_lookup_table_colours_equal_matplotlib_everywhere():
    values = np.linspace(-1.0, 1.0, 10001)
    expected = heatmaps.colormap("seismic")((values + 1.0) / 2.0)[..., :3]
    np.testing.assert_allclose(heatmaps.to_rgb(values), expected, atol=1e-6)
    np.testing.assert_array_equal(heatmaps.to_rgb(np.array([0.0]))[0], [1.0, 1.0, 1.0])


def test_save_panel_draws_panel_and_colour_bar_with_pil(tmp_path):
    m = np.zeros((28, 28))
    m[:, :14] = 1.0  # left half +1 (dark red), right half 0 (white)
    path = heatmaps.save_panel(tmp_path / "p_class_0.JPEG", heatmaps.to_rgb(m), "top-1: 7", label="attribution")
    with Image.open(path) as img:
        assert img.format == "JPEG" and min(img.size) >= 320
        a = np.asarray(img.convert("RGB")).astype(int)
    red, white = heatmaps.to_rgb(np.array([1.0, 0.0])) * 255
    assert np.abs(a[100, 60] - red).max() < 12 and np.abs(a[100, 300] - white).max() < 12  # nearest upscale ×12
    assert os.listdir(tmp_path) == ["p_class_0.JPEG"]
