"""The uncertainty report: its numbers (ranking, calibration, confusion pairs, deletion curves) against direct
computations, streaming = one-shot selection, safety (model untouched, errors before writing), CLI, and the page
rendered in a real headless Chromium (figures decoded with non-zero size, sorting works, no console output)."""
from __future__ import annotations

import html as html_lib
import json
import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from _hardening import IMAGE_SHAPE, NUM_CLASSES, assert_unchanged, snapshot
from untangle_ext import SignalEstimator, cli
from untangle_ext.data import load_mnist_sample
from untangle_ext.report import (build, confusion_pairs, entropy, find_browser, margin, reliability, screenshot,
                                 select, uncertainty)
from untangle_ext.report.browser import run_headless
from untangle_ext.store import class_store_path

N, TOPK, POINTS = 5, 3, 6


# ------------------------------------------------------------------------------------------ numbers

def test_margin_entropy_and_uncertainty_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0], [0.2, 0.2, 0.6]], dtype=torch.float64)
    assert torch.allclose(margin(p), torch.tensor([0.2, 1.0, 0.4], dtype=torch.float64))
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert torch.allclose(entropy(p), torch.tensor([h, 0.0, -(0.4 * math.log(0.2) + 0.6 * math.log(0.6))],
                                                   dtype=torch.float64))
    assert uncertainty(p, "margin").argmax() == 0 and uncertainty(p, "entropy").argmin() == 1
    with pytest.raises(ValueError, match="margin"):
        uncertainty(p, "variance")


def test_select_orders_and_breaks_ties_by_position():
    p = torch.tensor([[0.6, 0.4, 0.0],    # margin .2, right
                      [0.9, 0.1, 0.0],    # confident, wrong
                      [0.4, 0.6, 0.0],    # margin .2 (tie with row 0), wrong
                      [0.8, 0.2, 0.0],    # wrong
                      [0.34, 0.33, 0.33]])  # margin .01, right
    labels = torch.tensor([0, 2, 0, 1, 0])
    unsure, wrong = select(p, labels, 3)
    assert unsure.tolist() == [4, 0, 2]
    assert wrong.tolist() == [1, 3, 2]
    assert select(p, labels, 10)[1].tolist() == [1, 3, 2]  # only the wrong ones, however large n is
    assert select(p, labels, 1, by="entropy")[0].tolist() == [4]


def test_reliability_and_ece_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 0.5])
    ok = torch.tensor([True, False, True, True, False])
    r = reliability(conf, ok, bins=10)
    assert r["count"] == [0, 0, 0, 0, 1, 2, 0, 0, 0, 2]  # 0.5 lies in (0.4, 0.5]
    assert r["accuracy"][9] == 0.5 and r["accuracy"][5] == 1.0 and r["accuracy"][4] == 0.0
    assert r["accuracy"][0] is None and r["confidence"][0] is None
    assert r["ece"] == pytest.approx((2 * 0.45 + 2 * 0.45 + 1 * 0.5) / 5)
    perfect = reliability(torch.tensor([1.0, 1.0]), torch.tensor([True, True]), bins=4)
    assert perfect["ece"] == 0.0 and perfect["count"] == [0, 0, 0, 2]


def test_confusion_pairs_are_unordered_and_count_mistakes():
    p = torch.tensor([[0.5, 0.4, 0.1], [0.4, 0.5, 0.1], [0.1, 0.4, 0.5], [0.45, 0.1, 0.45]])
    labels = torch.tensor([0, 0, 2, 2])
    pairs = confusion_pairs(p, labels)
    assert pairs[0] == {"pair": [0, 1], "count": 2, "share": 0.5, "wrong": 1}
    assert [q["pair"] for q in pairs[1:]] == [[0, 2], [1, 2]]
    assert pairs[1]["wrong"] == 1  # row 3: top class 0 (tie broken by topk: first index), label 2


def test_quadratic_deletion_steps_are_squares_and_sample_the_linear_curve(model):
    from untangle_ext.quality import degradation_curve, patch_scores

    x = _tiny_loader(60).dataset.tensors[0][:5]  # 6x6: 36 pixels
    scores = patch_scores(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), 1)
    every = degradation_curve(model, x, scores, 1, 0.0)
    squares = degradation_curve(model, x, scores, 1, 0.0, points=7, spacing="quadratic")
    assert squares.counts.tolist() == [0, 1, 4, 9, 16, 25, 36]
    assert torch.equal(squares.probabilities, every.probabilities[squares.counts])
    with pytest.raises(ValueError, match="spacing must be"):
        degradation_curve(model, x, scores, 1, 0.0, spacing="log")


# ------------------------------------------------------------------------------------- the tiny net

def _tiny_loader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % NUM_CLASSES
    x = torch.randn(60, *IMAGE_SHAPE, generator=g) * 2 + 0.3 * y.view(-1, 1, 1, 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _numbers(report) -> dict:
    return {k: v for k, v in json.loads(report.json.read_text()).items() if k != "seconds"}


@pytest.mark.parametrize("by", ["margin", "entropy"])
def test_streaming_selection_equals_one_pass_and_model_is_untouched(model, stores, tmp_path, by):
    before = snapshot(model)
    x0 = _tiny_loader(60).dataset.tensors[0][:4]
    out0 = model(x0)
    small = build(model, stores, _tiny_loader(7), tmp_path / "a.html", n=4, by=by, topk=2, points=4, progress=False)
    whole = build(model, stores, _tiny_loader(60), tmp_path / "b.html", n=4, by=by, topk=2, points=4, progress=False)
    a, b = _numbers(small), _numbers(whole)
    assert len(a["sections"]["confident_wrong"]) == 4 and len(a["sections"]["uncertain"]) == 4
    key = [c["margin"] if by == "margin" else -c["entropy"] for c in a["sections"]["uncertain"]]
    assert key == sorted(key)  # most uncertain first
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert_unchanged(model, before)
    assert torch.equal(model(x0), out0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n": 0}, ValueError, "n must be an int >= 1"),
    ({"by": "variance"}, ValueError, "uncertainty must be one of"),
    ({"topk": 1}, ValueError, "topk must be an int >= 2.*runner-ups"),
    ({"topk": 4}, ValueError, "topk=4 must lie in"),
    ({"points": 1}, ValueError, "points must be an int >= 2"),
    ({"bins": 0}, ValueError, "bins must be an int >= 1"),
    ({"fill": [0.0, 1.0]}, ValueError, "one per channel"),
    ({"out": "report.txt"}, ValueError, "ending in .html"),
    ({"class_names": ["a"]}, ValueError, "one name per class"),
    ({"loader": [torch.zeros(2, *IMAGE_SHAPE)]}, TypeError, "labelled loader"),
    ({"loader": [(torch.zeros(2, *IMAGE_SHAPE), torch.tensor([0, 7]))]}, ValueError, "labels must be class ids"),
    ({"loader": []}, ValueError, "yielded no images"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(model, stores, tmp_path, kwargs, error, match):
    out = tmp_path / kwargs.pop("out", "report.html")
    out.write_text("old")
    out.with_suffix(".json").write_text("old")
    loader = kwargs.pop("loader", _tiny_loader(20))
    with pytest.raises(error, match=match):
        build(model, stores, loader, out, progress=False, **{"topk": 2, **kwargs})
    assert out.read_text() == "old" and out.with_suffix(".json").read_text() == "old"


def test_a_model_without_mistakes_gets_an_empty_wrong_section(model, stores, tmp_path):
    x = _tiny_loader(60).dataset.tensors[0]
    with torch.no_grad():
        y = model(x).argmax(1)
    report = build(model, stores, DataLoader(TensorDataset(x, y), batch_size=16), tmp_path / "r.html", n=3, topk=2,
                   points=3, progress=False)
    assert report.data["accuracy"] == 1.0 and report.data["errors"] == 0
    assert report.data["sections"]["confident_wrong"] == [] and len(report.data["sections"]["uncertain"]) == 3
    assert "confident_wrong" not in report.data["deletion_mean"]
    assert "most confident wrong predictions (0)" in report.html.read_text()


# ------------------------------------------------------------------------------------ LeNet on MNIST

@pytest.fixture(scope="module")
def lenet_report(trained_lenet, tmp_path_factory):
    """(model, test images, labels, report) on every 2nd image of the bundled test split (n=5, top-3)."""
    model, _ = trained_lenet
    x_train, y_train = load_mnist_sample("train")
    stores = SignalEstimator(model, progress=False).fit(DataLoader(TensorDataset(x_train[::4], y_train[::4]),
                                                                   batch_size=500))
    x, y = load_mnist_sample("test")
    x, y = x[::2], y[::2]
    before = snapshot(model)
    report = build(model, stores, DataLoader(TensorDataset(x, y), batch_size=64),
                   tmp_path_factory.mktemp("report") / "report.html", n=N, topk=TOPK, points=POINTS, progress=False)
    assert_unchanged(model, before)
    return model, stores, x, y, report


def test_lenet_report_numbers_match_the_model(lenet_report):
    model, _, x, y, report = lenet_report
    data = json.loads(report.json.read_text())
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    pred = p.argmax(1)
    assert data["images"] == len(y) and data["accuracy"] == pytest.approx(float((pred == y).double().mean()))
    assert data["errors"] == int((pred != y).sum())
    top2 = p.topk(2, 1).values
    assert [c["index"] for c in data["sections"]["uncertain"]] == torch.argsort(top2[:, 0] - top2[:, 1])[:N].tolist()
    wrong = torch.nonzero(pred != y).flatten()
    expected_wrong = wrong[torch.argsort(p[wrong].max(1).values, descending=True)][:N]
    assert [c["index"] for c in data["sections"]["confident_wrong"]] == expected_wrong.tolist()
    assert all(not c["correct"] for c in data["sections"]["confident_wrong"])
    assert data["class_maps"]["count"] == torch.bincount(y, minlength=10).tolist()
    fractions = torch.tensor(data["deletion_fractions"])
    assert len(fractions) == POINTS and fractions[0] == 0 and fractions[-1] == 1
    for cards in data["sections"].values():
        for c in cards:
            i = c["index"]
            assert c["label"] == int(y[i]) and c["predicted"] == int(pred[i])
            assert [t["class"] for t in c["topk"]] == p[i].topk(TOPK).indices.tolist()
            assert [t["probability"] for t in c["topk"]] == pytest.approx(p[i].topk(TOPK).values.tolist(), abs=1e-5)
            assert c["margin"] == pytest.approx(float(top2[i, 0] - top2[i, 1]), abs=1e-5)
            for curve in c["deletion"].values():
                probs = torch.tensor(curve["probability"])
                assert probs[0] == pytest.approx(float(p[i, pred[i]]), abs=1e-5)  # nothing removed yet
                with torch.no_grad():  # everything removed: the all-zero image, whatever the ranking
                    end = torch.softmax(model(torch.zeros(1, 1, 28, 28)).double(), 1)[0, pred[i]]
                assert probs[-1] == pytest.approx(float(end), abs=1e-5)
                assert curve["auc"] == pytest.approx(float(torch.trapezoid(probs, fractions)))


def test_lenet_report_page_is_self_contained_and_complete(lenet_report):
    *_, report = lenet_report
    page = report.html.read_text()
    data = json.loads(report.json.read_text())
    cards = [c for cs in data["sections"].values() for c in cs]
    per_card = 1 + TOPK + 2 * (TOPK - 1)  # input, class maps, diff + invDiff per runner-up
    # 2 summary plots, 10 class maps, one colour bar per section
    assert page.count("<img ") == 2 + 10 + 2 + per_card * len(cards)
    assert page.count('<svg class="curve"') == len(cards)
    assert len(re.findall(r'src="data:image/png;base64,', page)) == page.count("<img ")
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing loaded from elsewhere
    assert f'{data["accuracy"]:.2%}' in page and f'{data["calibration"]["ece"]:.4f}' in page
    for c in cards:
        assert f'id="{"uncertain" if c in data["sections"]["uncertain"] else "confident_wrong"}-{c["index"]}"' in page


def test_cli_report_with_saved_model_and_stores(lenet_report, tmp_path, capsys):
    model, stores, *_ = lenet_report
    ckpt = tmp_path / "lenet.pt"
    torch.save(model.state_dict(), ckpt)
    for c, store in stores.items():
        store.save(class_store_path(tmp_path / "s", c))
    out = tmp_path / "r" / "report.html"
    assert cli.main(["report", "--n", "2", "--topk", "2", "--cache", str(ckpt), "--store-prefix",
                     str(tmp_path / "s"), "--out", str(out), "--batch-size", "500"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out.resolve()}" in printed and "scan" in printed
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["images"] == 1000 and data["settings"]["n"] == 2 and len(data["sections"]["uncertain"]) == 2
    with pytest.raises(SystemExit, match="ending in .html"):  # the prefix is cli._user_errors's
        cli.main(["report", "--cache", str(ckpt), "--store-prefix", str(tmp_path / "s"), "--out", "r.txt"])


# ------------------------------------------------------------------------------------------ browser

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on this machine "
                                                           "(apt-get install chromium); browser test skipped")

# Appended to a copy of the page: after load, measure every <img>, inline SVG curve and <figure>, and sort the
# table by its 'margin' column twice; the results go into the DOM as JSON, which --dump-dom returns.
PROBE = """<script>
window.addEventListener("load", function () {
  function box(el) { var r = el.getBoundingClientRect(); return [r.width, r.height]; }
  var out = {images: [], curves: [], figures: [], sorted: []};
  [].forEach.call(document.images, function (im) {
    out.images.push({ok: im.complete && im.naturalWidth > 0 && im.naturalHeight > 0, box: box(im)});
  });
  [].forEach.call(document.querySelectorAll("svg.curve"), function (s) {
    out.curves.push({lines: s.querySelectorAll("polyline").length, box: box(s)});
  });
  [].forEach.call(document.querySelectorAll("figure"), function (f) { out.figures.push(box(f)); });
  var table = document.getElementById("shown"), th = table ? table.tHead.rows[0].cells[6] : null;
  for (var k = 0; th && k < 2; k++) {
    th.click();
    out.sorted.push([].map.call(table.tBodies[0].rows, function (r) { return parseFloat(r.cells[6].dataset.v); }));
  }
  var pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def render_page(page: Path) -> tuple[dict, list[str]]:
    """Load a copy of ``page`` with the probe in headless Chromium: (probe results, console lines)."""
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / page.name
        probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
        result = run_headless(probed, ["--enable-logging=stderr", "--v=0", "--dump-dom"])
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the probe did not run (exit {result.returncode}): {result.stderr[-800:]}"
    console = [l for l in result.stderr.splitlines() if ":CONSOLE" in l or "Uncaught" in l]
    return json.loads(html_lib.unescape(found.group(1))), console


def check_rendered(probe: dict, console: list[str]) -> list[str]:
    """Everything wrong with a rendered page (empty list: it loaded cleanly)."""
    problems = [f"console: {line}" for line in console]
    problems += [f"image {i} not decoded or zero-sized: {im}" for i, im in enumerate(probe["images"])
                 if not im["ok"] or min(im["box"]) <= 0]
    problems += [f"curve {i}: {c}" for i, c in enumerate(probe["curves"]) if c["lines"] != 2 or min(c["box"]) <= 0]
    problems += [f"figure {i} has size {b}" for i, b in enumerate(probe["figures"]) if min(b) <= 0]
    return problems


@needs_browser
def test_report_renders_in_chromium(lenet_report):
    *_, report = lenet_report
    probe, console = render_page(report.html)
    data = json.loads(report.json.read_text())
    cards = sum(len(c) for c in data["sections"].values())
    assert len(probe["images"]) == report.html.read_text().count("<img ") and len(probe["curves"]) == cards
    assert check_rendered(probe, console) == []
    ascending, descending = probe["sorted"]
    assert len(ascending) == cards and ascending == sorted(ascending) and descending == sorted(ascending)[::-1]


@needs_browser
def test_browser_check_catches_a_broken_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><figure><img src="data:image/png;base64,AAAA"></figure>'
                   '<figure style="display:none"><svg class="curve"></svg></figure>'
                   "<script>undefinedFunction();</script></body></html>")
    problems = check_rendered(*render_page(bad))
    assert any("Uncaught ReferenceError" in p for p in problems)
    assert any(p.startswith("image 0") for p in problems)
    assert any(p.startswith("curve 0") for p in problems) and any(p.startswith("figure 1") for p in problems)


@needs_browser
def test_screenshot_is_a_small_nonblank_png(lenet_report, tmp_path):
    from PIL import Image

    *_, report = lenet_report
    png = screenshot(report.html, tmp_path / "shot.png", width=900, height=700)
    with Image.open(png) as img:
        assert img.size == (900, 700)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 20  # text, plots and heatmaps, not a blank page
    assert png.stat().st_size < 300_000


def test_missing_browser_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("UNTANGLE_EXT_BROWSER", raising=False)
    assert find_browser() is None
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        run_headless(tmp_path / "x.html", [])
