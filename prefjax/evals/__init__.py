"""Evaluation metrics for reward models and policies (NumPy, host side)."""

from prefjax.evals.preference import (
    PreferenceEval,
    ensemble_disagreement,
    evaluate_preferences,
    expected_calibration_error,
    length_bucket_accuracy,
    plot_reliability,
    reliability_diagram,
)

__all__ = [
    "PreferenceEval",
    "ensemble_disagreement",
    "evaluate_preferences",
    "expected_calibration_error",
    "length_bucket_accuracy",
    "plot_reliability",
    "reliability_diagram",
]
