r"""Ensemble of 4 tiny reward models on the tiny text world, trained in one jitted step.

Command (deep ensemble: 4 full decoders, seeds 0..3, Poisson(1) bootstrap weights):
  python -m experiments.train_rm --config=configs/rm/ensemble_tiny.py --workdir=/tmp/rm_ens

Shared trunk with 4 heads instead:
  python -m experiments.train_rm --config=configs/rm/ensemble_tiny.py \
      --config.model.ensemble=heads --workdir=/tmp/rm_ens_heads

Members sharded over an ``ensemble`` mesh axis (needs 4 devices, e.g.
XLA_FLAGS=--xla_force_host_platform_device_count=4 on CPU):
  ... --config.mesh.ensemble=4

Expected (this 2-core CPU): TBD.
"""

from __future__ import annotations

import ml_collections

from configs.rm import tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None or ``quick``, as in ``configs/rm/tiny.py``."""
  config = tiny.get_config(arg)
  config.model.head = "reward_ensemble:4"
  config.model.ensemble = "deep"
  config.loss.bootstrap = True
  return config
