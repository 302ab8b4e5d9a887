"""Overoptimization tools: best-of-n estimators (sampled and exact), the RL path.

* ``bon_kl(n)``: analytic best-of-n KL ``log n − (n−1)/n`` (an upper bound).
* ``unbiased_best_of_n`` / ``unbiased_bon_scores``: every n ≤ N from N samples.
* ``exact_best_of_n`` / ``exact_bon_scores``: exact BoN on finite candidate sets
  with exact KL; ``rl_path`` / ``rl_path_scores``: π_β ∝ π_ref·exp(β·r).
* ``select_best_of_n``: jit-safe selection; ties broken uniformly at random with a key, else the first maximum.
* ``Curve`` and ``bootstrap_mean_se``: prompt-averaged curves with bootstrap SEs.

The overoptimization study (``experiments/reproduce.py``) is built from the modules
``fits`` (Gao et al. functional forms), ``bandit`` and ``policy_net`` (the bandit world,
learned proxies and policies), ``curves``, ``criteria``, ``study`` (seed- and
world-averaged curves and the G/R/C criteria), ``direct_study`` and ``direct_criteria``
(DPO / IPO / SLiC), ``figures`` and ``report``, and ``study_config`` (checks a study
config's numbers before any work); ``bon_report`` writes ``experiments/best_of_n.py``'s
report. Import them by module name.
"""

from prefjax.overopt.bon import BonScores
from prefjax.overopt.bon import argmax_spread
from prefjax.overopt.bon import Curve
from prefjax.overopt.bon import bon_kl
from prefjax.overopt.bon import bootstrap_mean_se
from prefjax.overopt.bon import log_spaced_ns
from prefjax.overopt.bon import peak_drop
from prefjax.overopt.bon import select_best_of_n
from prefjax.overopt.bon import summarize
from prefjax.overopt.bon import tie_averaged_scores
from prefjax.overopt.bon import unbiased_best_of_n
from prefjax.overopt.bon import unbiased_bon_scores
from prefjax.overopt.bon import unbiased_bon_weights
from prefjax.overopt.exact import ExactScores
from prefjax.overopt.exact import exact_best_of_n
from prefjax.overopt.exact import exact_bon_log_probs
from prefjax.overopt.exact import exact_bon_scores
from prefjax.overopt.exact import log1mexp
from prefjax.overopt.exact import rl_path
from prefjax.overopt.exact import rl_path_log_probs
from prefjax.overopt.exact import rl_path_scores

__all__ = [
    "BonScores", "Curve", "ExactScores", "argmax_spread", "bon_kl", "bootstrap_mean_se",
    "exact_best_of_n", "exact_bon_log_probs", "exact_bon_scores", "log1mexp", "log_spaced_ns",
    "peak_drop", "rl_path", "rl_path_log_probs", "rl_path_scores", "select_best_of_n",
    "summarize", "tie_averaged_scores", "unbiased_best_of_n", "unbiased_bon_scores",
    "unbiased_bon_weights",
]
