"""Direct alignment (DPO family, KTO) training pieces used by ``experiments/train_dpo.py``.

``loss``: the loss_fn built from a config (one forward for chosen and
rejected, RPO/ORPO NLL term, ties, TRL-named metrics). ``ref_cache``: reference
log-probs on the fly, cached on disk keyed by a fingerprint, or none.
``evaluation``: the evaluator of held-out implicit-reward accuracy and KL to the
reference.

Names are imported on first use (``prefjax._lazy``), so importing one
submodule does not pull in the others' dependencies.
"""

from prefjax import _lazy

_EXPORTS = {
    "KLEvalConfig": "evaluation",
    "make_eval_fn": "evaluation",
    "make_evaluator": "evaluation",
    "DirectLoss": "loss",
    "make_loss_fn": "loss",
    "score_pairs": "loss",
    "ReferenceIterator": "ref_cache",
    "ReferenceScorer": "ref_cache",
    "ReferenceTable": "ref_cache",
}
_SUBMODULES = ("evaluation", "loss", "ref_cache")

__getattr__, __dir__, __all__ = _lazy.attach(__name__, _EXPORTS, _SUBMODULES)
