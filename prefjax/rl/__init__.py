"""RL and best-of-n against reward models: rollouts, PPO/RLOO updates, KL control.

* ``rollout``: ``PolicyBundle`` (policy + frozen reference + value model),
  prompt encoding, KV-cache sampling, per-token log-probs/values/exact KL.
* ``algorithms``: PPO (GAE, clipped surrogate and value loss, minibatch epochs)
  and RLOO (k samples per prompt, leave-one-out baseline) with a KL penalty to
  the reference (k1/k2/k3 estimators); ``register_algorithm`` adds another method.
* ``trainer``: the on-policy ``RolloutIterator`` and loss that run RL through
  ``prefjax.train.train_loop`` (one loop step = one rollout + its minibatch epochs).
* ``kl_control``: fixed and adaptive (Ziegler et al. 2019) KL coefficients.
* ``rewards``: (prompt, response) -> score plumbing over ``prefjax.rewards``
  (tiny-world gold/proxy, reward models, ensembles with mean/wco/uwo).
* ``evaluation``: held-out proxy/gold/KL/entropy/length on the same samples.
* ``warm_start``: a short supervised warm start for tiny-world policies.
* ``setup``: policy, prompts and warm start from a binary's config.
"""
