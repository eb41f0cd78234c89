"""Non-image nets: the Conv1d EEG classifier and the tabular MLP examples, checked by their numbers."""
from __future__ import annotations

import os
import sys

import pytest

from untangle_ext.zoo import GRADIENT_TOLERANCE, check_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import eeg_conv1d  # noqa: E402
import tabular_mlp  # noqa: E402

@pytest.fixture(scope="module")
def tabular():
    return tabular_mlp.run(epochs=20)


@pytest.fixture(scope="module")
def eeg():
    return eeg_conv1d.run(n_train=128, epochs=6)


def test_tabular_attribution_avoids_noise_features(tabular):
    """Half the inputs are noise: the pattern methods put less on them than the gradient does."""
    assert tabular["accuracy"] >= 0.9
    share = tabular["noise_share"]
    assert share["pattern_attribution"] < share["gradient"]
    assert share["patternnet"] < share["gradient"]
    assert share["patternnet"] < 0.3 and share["pattern_attribution"] < 0.35
    assert not any(name.startswith("noise") for name in tabular["top_features"])


def test_tabular_maps_finite_and_gradient_is_autograd(tabular):
    result = check_model(tabular["model"], (tabular["maps"]["gradient"].shape[1],))
    assert result["gradient_error"] <= GRADIENT_TOLERANCE


def test_eeg_attribution_on_informative_channels(eeg):
    """2 of 8 channels carry the class's oscillation: the pattern methods put most mass on them."""
    assert eeg["accuracy"] >= 0.8
    share = eeg["share"]
    assert share["pattern_attribution"] > 0.8 and share["pattern_attribution"] > share["gradient"] + 0.1
    assert share["patternnet"] > 2 * eeg["chance"]


def test_eeg_maps_finite_and_gradient_is_autograd(eeg):
    result = check_model(eeg["model"], tuple(eeg["maps"]["gradient"].shape[1:]))
    assert result["gradient_error"] <= GRADIENT_TOLERANCE
