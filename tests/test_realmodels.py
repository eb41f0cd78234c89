"""Real-model benchmark (benchmarks/realmodels.py): architectures, byte accounting, history and plot.

Only the --quick path runs here; no timing is asserted (the machine is shared and timings are noise)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import realmodels  # noqa: E402


@pytest.mark.parametrize("name, params", [("vgg16", 138_357_544), ("resnet50", 25_557_032)])
def test_architectures_match_torchvision_parameter_counts(name, params):
    with torch.device("meta"):
        model = realmodels.MODELS[name]()
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("realmodels")
    assert realmodels.main(["--quick", "--models", "vgg16", "--out-dir", str(out)]) == 0
    return out


def test_quick_run_records_what_it_measured(quick_run):
    doc = json.loads((quick_run / "realmodels-quick.json").read_text())
    assert doc["quick"] is True and set(doc["models"]) == {"vgg16"}
    rec = doc["models"]["vgg16"]
    with torch.device("meta"):
        model = realmodels.vgg16(doc["config"]["width_div"])
    affine = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    assert sum(rec["estimation"]["weights_by_layer"].values()) == affine  # every affine layer's patterns timed
    assert rec["pattern_bytes"] == 32 * affine  # fit_to_files writes only the kept a_pos
    assert rec["estimation"]["images"] == doc["config"]["images"]
    assert rec["largest_layer"]["name"] == "3"  # fc6
    for key in ("gemm_fraction", "patterns_bandwidth_fraction", "rss_over_budget"):
        assert math.isfinite(rec[key]) and rec[key] > 0, key
    phases = rec["estimation"]["phases_s"]
    assert {"statistics", "patterns", "fingerprint", "save"} <= set(phases)
    assert sum(phases.values()) <= rec["estimation"]["to_saved_store_s"]
    for k in ("k3", "k10"):
        a = rec["attribution"][k]
        assert a["ours"]["units"] == doc["config"]["attr_batch"] * int(k[1:])
        if "over_saliency" in a:
            assert a["of_bound"] == pytest.approx(a["over_saliency"] / (2 * int(k[1:]) / (int(k[1:]) + 1)))
    assert (quick_run / "realmodels-quick.md").read_text() == realmodels.markdown(doc)


def test_history_line_and_trend_plot(quick_run):
    lines = (quick_run / realmodels.HISTORY).read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["commit"] and entry["cpu"] and entry["quick"] is True
    assert "vgg16.gemm_fraction" in entry["ratios"] and "vgg16.patterns_bandwidth" in entry["ratios"]
    assert (quick_run / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    realmodels.append_history(quick_run / realmodels.HISTORY, {**json.loads(
        (quick_run / "realmodels-quick.json").read_text()), "commit": "second"})
    assert [json.loads(l)["commit"] for l in (quick_run / realmodels.HISTORY).read_text().splitlines()][1] == "second"
