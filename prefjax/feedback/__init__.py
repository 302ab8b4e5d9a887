"""Preference data from AI feedback: an AI labeller judging pairs against written principles
(``labeller``, ``constitution``, ``templates``), agreement metrics (``agreement``), the
self-critique loop (``critique``) and the JSONL writer (``dataset``)."""

from prefjax.feedback import agreement
from prefjax.feedback import constitution
from prefjax.feedback import critique
from prefjax.feedback import dataset
from prefjax.feedback import labeller
from prefjax.feedback import templates

__all__ = ["agreement", "constitution", "critique", "dataset", "labeller", "templates"]
