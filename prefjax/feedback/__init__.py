"""Preference data from AI feedback: a safety (harm) classifier and its uses.

``safety``: objective, precision-targeted threshold, metrics with bootstrap CIs.
``safety_runtime``: scoring texts, the best-of-n filter's scorer, a label source,
a harmlessness objective. Import them by module name.
"""

from prefjax.feedback import safety
from prefjax.feedback import safety_runtime

__all__ = ["safety", "safety_runtime"]
