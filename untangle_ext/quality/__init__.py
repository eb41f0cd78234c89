"""Explanation quality (SPEC §2): the paper's signal-quality measure ρ(S) and image-degradation curves."""
from .degradation import (RANKINGS, Curve, area_under_curve, attribution_maps, degradation_curve, patch_scores,
                          score_maps)
from .rho import ESTIMATORS, neuron_rho, signal_directions, signal_quality

__all__ = ["ESTIMATORS", "RANKINGS", "Curve", "area_under_curve", "attribution_maps", "degradation_curve",
           "neuron_rho", "patch_scores", "score_maps", "signal_directions", "signal_quality"]
