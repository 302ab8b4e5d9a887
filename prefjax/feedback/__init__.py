"""Preference data from AI feedback.

* An AI labeller judging pairs against written principles (``labeller``,
  ``constitution``, ``templates``), agreement metrics (``agreement``), the
  self-critique loop (``critique``) and the JSONL writer (``dataset``).
* A safety (harm) classifier: loss, precision-targeted threshold and metrics
  with bootstrap CIs (``safety``); scoring texts, the best-of-n filter's scorer,
  a label source and a harmlessness objective (``safety_runtime``).
"""

from prefjax.feedback import agreement
from prefjax.feedback import constitution
from prefjax.feedback import critique
from prefjax.feedback import dataset
from prefjax.feedback import labeller
from prefjax.feedback import safety
from prefjax.feedback import safety_runtime
from prefjax.feedback import templates

__all__ = ["agreement", "constitution", "critique", "dataset", "labeller", "safety",
           "safety_runtime", "templates"]
