"""Direct alignment (DPO family, KTO) training pieces used by ``experiments/train_dpo.py``.

``loss``: the loss_fn built from a config (one forward for chosen and
rejected, RPO/ORPO NLL term, ties, TRL-named metrics). ``ref_cache``: reference
log-probs on the fly, cached on disk keyed by a fingerprint, or none.
``evaluation``: the evaluator of held-out implicit-reward accuracy and KL to the
reference.
"""

from prefjax.direct.evaluation import KLEvalConfig
from prefjax.direct.evaluation import make_eval_fn
from prefjax.direct.evaluation import make_evaluator
from prefjax.direct.loss import DirectLoss
from prefjax.direct.loss import make_loss_fn
from prefjax.direct.loss import score_pairs
from prefjax.direct.ref_cache import ReferenceIterator
from prefjax.direct.ref_cache import ReferenceScorer
from prefjax.direct.ref_cache import ReferenceTable

__all__ = ["DirectLoss", "KLEvalConfig", "ReferenceIterator", "ReferenceScorer",
           "ReferenceTable", "make_eval_fn", "make_evaluator", "make_loss_fn", "score_pairs"]
