"""Pure loss functions (no model code, no flax).

``preference``: reward-model losses on scalar rewards (Bradley–Terry, Davidson
ties, Plackett–Luce). ``direct``: the DPO family on per-sequence log-probs
(``DIRECT_LOSSES`` registry, ``PairLogps``). ``unpaired``: KTO (also
re-exported from ``direct``). ``policy`` (PPO/RLOO/GAE) is imported on its own.
"""

from prefjax.losses import direct
from prefjax.losses import preference
from prefjax.losses import unpaired
from prefjax.losses.direct import DIRECT_LOSSES
from prefjax.losses.direct import PairLogps
from prefjax.losses.direct import get_direct_loss
from prefjax.losses.direct import implicit_rewards
from prefjax.losses.direct import register_direct_loss
from prefjax.losses.preference import bradley_terry
from prefjax.losses.preference import bradley_terry_ties
from prefjax.losses.preference import center_penalty
from prefjax.losses.preference import plackett_luce
from prefjax.losses.preference import preference_probability
from prefjax.losses.unpaired import UNPAIRED_LOSSES
from prefjax.losses.unpaired import kto
