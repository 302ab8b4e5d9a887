r"""Ensemble of 4 tiny reward models on the tiny text world, trained in one jitted step.

Command (deep ensemble: 4 full decoders, seeds 0..3, Poisson(1) bootstrap weights):
  python -m experiments.train_rm --config=configs/rm/ensemble_tiny.py --workdir=/tmp/rm_ens

Variants: ``:quick`` (60 steps, no eval or checkpoint before the end, as
``configs/rm/tiny.py:quick``).

Shared trunk with 4 heads instead:
  python -m experiments.train_rm --config=configs/rm/ensemble_tiny.py \
      --config.model.ensemble=heads --workdir=/tmp/rm_ens_heads

Members sharded over an ``ensemble`` mesh axis (needs 4 devices, e.g.
XLA_FLAGS=--xla_force_host_platform_device_count=4 on CPU):
  ... --config.mesh.ensemble=4

Expected (this 2-core CPU, measured 2026-11-27, 300 steps of 32 pairs, validation =
211 tiny-world ``resplit_validation`` pairs; wall times measured while the two cores
were shared, load average ~15):
  deep   38 s CPU time, 3 min 35 s wall. Ensemble-mean reward: accuracy 0.900,
         BT log-loss 0.280 (0.28049), ECE 0.039; members 0.853 / 0.905 / 0.896 / 0.877;
         member sign disagreement 0.142 (margin std 0.86).
  heads  2 min wall. Accuracy 0.886, ECE 0.043; members 0.882 / 0.891 / 0.886 / 0.882;
         sign disagreement 0.033 (margin std 0.17): shared-trunk heads are far
         less diverse than deep members.
Single tiny RM (configs/rm/tiny.py) for comparison: accuracy 0.867; length-only
baseline 0.49.
"""

from __future__ import annotations

import ml_collections

from configs.rm import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None or ``quick``, as in ``configs/rm/tiny.py``."""
  config = tiny.get_config(arg)
  config.model.head = "reward_ensemble:4"
  config.model.ensemble = "deep"
  # "auto": members one after another in the step on CPU, one vmapped program when a
  # mesh shards them (--config.mesh.ensemble) or off CPU; "vmap" / "unrolled" force one.
  config.model.ensemble_forward = "auto"
  config.loss.bootstrap = True
  return config
