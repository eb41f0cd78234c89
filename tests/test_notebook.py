"""examples/signal_tutorial.ipynb runs top to bottom, offline, in a fresh kernel (nbclient), with the right numbers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat", reason="nbformat/nbclient are not installed (pip install 'untangle-ext[ecosystem]')")
nbclient = pytest.importorskip("nbclient", reason="nbformat/nbclient are not installed (pip install 'untangle-ext[ecosystem]')")
pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install 'untangle-ext[ecosystem]')")

pytestmark = pytest.mark.ecosystem
NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "signal_tutorial.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", []))


def test_tutorial_notebook_runs_offline_top_to_bottom(trained_lenet, tmp_path):
    model, _ = trained_lenet
    torch.save(model.state_dict(), tmp_path / "lenet.pt")  # the session's LeNet: the notebook does not train
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = (f"LENET = {str(tmp_path / 'lenet.pt')!r}\nWORKDIR = {str(tmp_path / 'work')!r}\n"
                        "EPOCHS = 1\nPER_CLASS = 20\nINDEX = 742")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            ).execute()
    outputs = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert "10 stores" in outputs
    assert re.search(r"true label 7; top-3 classes \[7, ", outputs)
    assert "joint scale: max |map| = 1.000; diff + invDiff = 0.0" in outputs
    assert "same maps as the tutorial API: True" in outputs
    work = tmp_path / "work"
    assert len(list(work.glob("lenet_signals_class_*.pkl"))) == 10
    assert len(list(work.glob("digit_742_*.JPEG"))) == 7
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the heatmap row and Captum's figure
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in nb.cells
               for o in c.get("outputs", []))  # the slider is a live widget
