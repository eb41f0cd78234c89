"""Why is the model unsure? A static HTML report (plus JSON) explaining the most uncertain and the most confident
wrong predictions of a classifier on a labelled test set with PatternAttribution."""
from .analysis import UNCERTAINTY, confusion_pairs, entropy, margin, reliability, select, uncertainty
from .browser import find_browser, screenshot
from .build import Report, build, mnist_inputs

__all__ = ["UNCERTAINTY", "Report", "build", "confusion_pairs", "entropy", "find_browser", "margin", "mnist_inputs",
           "reliability", "screenshot", "select", "uncertainty"]
