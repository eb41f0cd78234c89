"""untangle_ext: PatternNet / PatternAttribution explanations for PyTorch image classifiers."""
from ._version import __version__
from .attribution import METHODS, Attributor, Explanation
from .compat import UntangleAI
from .estimator import SignalEstimator, estimate
from .ops import backend
from .store import ALL_CLASSES, SignalStore, StoreError, model_fingerprint
from .trace import Program, UnsupportedModelError

__all__ = [
    "__version__", "ALL_CLASSES", "METHODS", "Attributor", "Explanation", "Program", "SignalEstimator",
    "SignalStore", "StoreError", "UnsupportedModelError", "UntangleAI", "backend", "estimate", "model_fingerprint",
]
