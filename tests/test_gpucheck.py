"""`make gpu-check` (benchmarks/gpucheck.py) without a GPU: it refuses loudly; its report renders the ratios."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpucheck  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_a_gpu(capsys, tmp_path):
    assert gpucheck.main(["--out-dir", str(tmp_path)]) == 1
    assert "cannot run" in capsys.readouterr().err and "CUDA" in gpucheck.preflight()
    assert not list(tmp_path.iterdir())


def test_report_ratios_and_target():
    rec = lambda r: {"forward": {"rate": 1.0}, "estimation": {"rate": r}, "attribution_k3": {"rate": 2 * r}}  # noqa
    results = {"vgg16": {"native": rec(30.0), "torch": rec(10.0)}, "lenet": {"native": {"error": "x\nboom"},
                                                                             "torch": rec(1.0)}}
    ratios = gpucheck._ratios(results)
    assert ratios == {"vgg16.estimation": 3.0, "vgg16.attribution_k3": 3.0,
                      "lenet.estimation": None, "lenet.attribution_k3": None}
    doc = {"gpu": "H200", "commit": "c", "machine": {"torch": "t"}, "cuda": "12", "results": results,
           "tests": {"passed": True, "summary": "3 passed"}, "native_over_torch": ratios}
    md = gpucheck.markdown(doc)
    assert "| native / torch, vgg16.estimation | 3.00× | ≥ 2× |" in md
    assert "| lenet | native | error: boom |" in md and "n/a" in md
