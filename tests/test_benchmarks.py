"""Smoke test of the benchmark suite's quick path on tiny sizes: schema and finite ratios only
(no timing assertions: the machine is shared and timings are noise)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from benchmarks.report import markdown  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[dict, Path]:
    """One tiny run of the whole suite (torch backend plus native, which may be n/a)."""
    out = tmp_path_factory.mktemp("bench")
    assert suite.main(["--quick", "--tiny", "--repeats", "1", "--threads", "1", "--out-dir", str(out),
                       "--tag", "smoke"]) == 0
    return json.loads((out / "smoke.json").read_text()), out


def test_schema_and_files(tiny_run):
    doc, out = tiny_run
    assert (out / "smoke.md").read_text() == markdown(doc)
    assert doc["schema"] == "untangle_ext-bench/1" and doc["quick"] is True
    for key in ("machine", "backends", "measurements", "ratios", "targets", "memory", "config", "wall_s"):
        assert key in doc, key
    for key in ("cpu", "cores", "torch", "threads", "backend", "backend_reason"):
        assert key in doc["machine"], key
    assert doc["backends"]["torch"]["available"] is True
    errors = {w: {t: r["error"] for t, r in recs.items() if "error" in r} for w, recs in doc["measurements"].items()}
    assert not any(errors.values()), errors
    torch_tasks = doc["measurements"]["torch"]
    for est in doc["config"]["estimation"]:
        rec = torch_tasks[f"est:{est['key']}"]
        assert rec["units"] == est["images"] and rec["min_s"] <= rec["median_s"] <= rec["max_s"]
    assert {"peak_rss", "accumulator_bytes", "activation_bytes_per_batch"} <= set(doc["memory"]["torch"])


def test_ratios_are_finite(tiny_run):
    doc, _ = tiny_run
    captum = "skipped" not in doc["measurements"]["baselines"]["captum:lenet"]
    checked = 0
    for row in doc["ratios"]:
        if row["backend"] == "torch" and (captum or "captum" not in row["name"]):
            assert row["value"] is not None and math.isfinite(row["value"]) and row["value"] > 0, row
            checked += 1
        elif not doc["backends"].get(row["backend"], {}).get("available"):
            assert row["value"] is None, row
    assert checked >= 12
    verdicts = {t["verdict"].split(" (")[0] for t in doc["targets"]}
    assert verdicts <= {"met", "not met", "n/a"}


def test_baselines_agree_with_the_library(tiny_run):
    """The naive and seed-style baselines compute the same patterns/attributions (so timings compare)."""
    agree = tiny_run[0]["measurements"]["baselines"]["agreement"]
    assert agree["naive_patterns"] < 1e-6  # float64 sums vs float32-stored patterns
    assert agree["seed_style_patterns"] < 1e-6
    assert agree["seed_style_attribution"] < 1e-4
    if "captum_saliency_vs_gradient" in agree:
        assert agree["captum_saliency_vs_gradient"] < 1e-4


def test_native_forced_reports_reason(tiny_run):
    native = tiny_run[0]["backends"]["native"]
    assert native["available"] or native["reason"]


def test_bad_options_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--backends", "cuda"])
    assert "--backends must list some of" in capsys.readouterr().err
