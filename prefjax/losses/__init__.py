"""Pure loss functions (no model code, no flax).

``preference``: reward-model losses on scalar rewards (Bradley–Terry, Davidson
ties, Plackett–Luce; ``PREFERENCE_LOSSES`` registry). ``direct``: the DPO family
on per-sequence log-probs (``DIRECT_LOSSES`` registry, ``PairLogps``).
``unpaired``: KTO (also re-exported from ``direct``). ``registry``: the
registries and ``DirectLossSpec``, the facts a trainer reads about a loss.
``policy`` (PPO/RLOO/GAE) is imported on its own.
"""

from prefjax.losses import direct
from prefjax.losses import preference
from prefjax.losses import registry
from prefjax.losses import unpaired
from prefjax.losses.direct import DIRECT_LOSSES
from prefjax.losses.direct import PairLogps
from prefjax.losses.direct import get_direct_loss
from prefjax.losses.direct import implicit_rewards
from prefjax.losses.direct import register_direct_loss
from prefjax.losses.preference import PREFERENCE_LOSSES
from prefjax.losses.preference import bradley_terry
from prefjax.losses.preference import bradley_terry_ties
from prefjax.losses.preference import center_penalty
from prefjax.losses.preference import get_preference_loss
from prefjax.losses.preference import plackett_luce
from prefjax.losses.preference import preference_probability
from prefjax.losses.preference import register_preference_loss
from prefjax.losses.registry import DIRECT_LOSS_SPECS
from prefjax.losses.registry import DirectLossSpec
from prefjax.losses.registry import direct_loss_spec
from prefjax.losses.unpaired import UNPAIRED_LOSSES
from prefjax.losses.unpaired import kto
