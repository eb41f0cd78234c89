"""A newcomer's rough edges (issue 12): CLI messages and options, progress switch, reprs, demo verdicts, docs safety."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _hardening import mixed_batches
from untangle_ext import SignalEstimator, __version__, cli
from untangle_ext.attribution import Explanation
from untangle_ext.demo import verdict

ROOT = Path(__file__).resolve().parents[1]
LENET = ["--model", "untangle_ext.models:LeNet"]


def _fails(argv, capsys) -> str:
    """The one error line a CLI call exits with (argparse's own errors go to stderr)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    message = exc.value.code if isinstance(exc.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"untangle-ext {argv[0]}: error: "), message
    return message


def test_cli_needs_a_checkpoint_or_random_weights(tmp_path, capsys):
    message = _fails(["estimate", *LENET, "--store-prefix", str(tmp_path / "s")], capsys)
    assert "one of the arguments --checkpoint --random-weights is required" in message
    assert not list(tmp_path.iterdir())


def test_cli_errors_name_the_option_as_typed(tmp_path, capsys):
    prefix = ["--store-prefix", str(tmp_path / "s")]
    assert "--topk 11 must lie in [1, 10]" in _fails(["attribute", *LENET, "--random-weights", "--topk", "11", *prefix],
                                                     capsys)
    message = _fails(["attribute", *LENET, "--checkpoint", str(ROOT / "README.md"), *prefix], capsys)
    assert "not a state_dict file of plain tensors" in message and "weights_only=False" not in message
    message = _fails(["estimate", *LENET, "--random-weights", "--data-dir", str(tmp_path / "mnsit"), *prefix], capsys)
    assert f"--data-dir {tmp_path / 'mnsit'}: no such folder" in message and "--download" in message
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    assert "does not fit --model untangle_ext.models:LeNet" in _fails(
        ["attribute", *LENET, "--checkpoint", str(tmp_path / "other.pt"), *prefix], capsys)
    assert "--model must look like 'package.module:factory'" in _fails(
        ["estimate", "--model", "LeNet", "--random-weights", *prefix], capsys)
    assert "--mnist-index 5000 must lie in [0, 1000)" in _fails(
        ["attribute", *LENET, "--random-weights", "--mnist-index", "5000", *prefix], capsys)


def test_cli_help_and_version(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"untangle-ext {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    assert "PatternNet / PatternAttribution explanations" in top and "Each subcommand" not in top
    with pytest.raises(SystemExit):
        cli.main(["attribute", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("explain the k most probable classes (default: 3)", "(default: seismic)", "700-799 are 7s",
                  "--random-weights"):
        assert shown in text
    assert "(default: None)" not in text


def test_cli_attribute_names_the_digit_it_explains(tmp_path, capsys):
    stores = SignalEstimator(_lenet(), progress=False).fit([(torch.rand(20, 1, 28, 28), torch.arange(20) % 10)])
    for c, s in stores.items():
        s.save(tmp_path / f"s_class_{c}.pkl")
    torch.save(_lenet().state_dict(), tmp_path / "w.pt")
    assert cli.main(["attribute", *LENET, "--checkpoint", str(tmp_path / "w.pt"), "--store-prefix",
                     str(tmp_path / "s"), "--mnist-index", "742", "--topk", "2", "--json",
                     "--out-prefix", str(tmp_path / "o")]) == 0
    assert "image 742 of the bundled MNIST test split (label 7)" in capsys.readouterr().out
    payload = json.loads((tmp_path / "o.json").read_text())
    assert len(payload["probabilities"]) == len(payload["logits"]) == 2  # top-k only (README says so)
    assert [c["probability"] for c in payload["classes"]] == payload["probabilities"]


def _lenet():
    from untangle_ext.models import LeNet

    torch.manual_seed(0)
    return LeNet().eval()


@pytest.mark.parametrize("env, shown", [(None, True), ("1", False), ("0", True)])
def test_tqdm_disable_switches_bars_off(env, shown):
    code = ("import torch, sys; sys.path.insert(0, 'tests'); from _hardening import tiny_model, mixed_batches; "
            "from untangle_ext import SignalEstimator; SignalEstimator(tiny_model()).fit(mixed_batches())")
    environ = {k: v for k, v in __import__("os").environ.items() if k != "TQDM_DISABLE"}
    if env is not None:
        environ["TQDM_DISABLE"] = env
    err = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                         check=True).stderr
    assert ("estimating signals" in err) is shown


def test_reprs_are_short(model, stores):
    store = stores[0]
    text = repr(store)
    assert len(text) < 200 and text.startswith("SignalStore(class_id=0, layers=2, num_samples=6")
    assert str(store) == text
    exp = Explanation(torch.zeros(2, 3, 1, 28, 28), torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.zeros(2, 10))
    assert repr(exp) == ("Explanation(attributions=(2, 3, 1, 28, 28) float32, targets=[[1, 2, 3], [4, 5, 6]], "
                         "logits=(2, 10))")


def test_demo_verdict_marks_misclassification():
    assert verdict(7, 7) == ("true label 7, predicted 7", "black")
    assert verdict(9, 4) == ("MISCLASSIFIED: true label 9, predicted 4", "red")


def test_docs_are_written_only_when_asked():
    makefile = (ROOT / "Makefile").read_text()
    quality = makefile.split("\nquality: venv\n")[1].split("\n\n")[0]
    assert "docs/" not in quality and "--out results/quality" in quality
    docs_fig = (ROOT / "examples" / "make_docs_figure.py").read_text()
    assert 'os.path.join(HERE, "output"' in docs_fig


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout (e.g. an sdist)")
def test_gitignore_covers_outputs_and_no_tracked_file():
    ignored = subprocess.run(["git", "ls-files", "-c", "-i", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    assert ignored == []
    probe = subprocess.run(["git", "check-ignore", "stores/x_class_0.pkl", "examples/output/a.JPEG"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()
    assert probe == ["stores/x_class_0.pkl", "examples/output/a.JPEG"]
