"""RL rollouts and penalties: the KL penalty's gradient, cut-off responses, bad rewards,
token-weighted metrics (a helper's review of ``prefjax/rl``)."""

import importlib
import logging
import types

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefjax import rewards as reward_fns
from prefjax.losses import policy as policy_losses
from prefjax.models import decoder
from prefjax.rl import algorithms
from prefjax.rl import kl_control
from prefjax.rl import rewards as rl_rewards
from prefjax.rl import rollout as rollout_lib
from prefjax.rl import trainer
from prefjax.train import state as state_lib


@pytest.mark.parametrize("kind, exact", [("k1", True), ("k2", False), ("k3", False)])
def test_only_k1_in_the_reward_has_the_gradient_of_the_kl(kind, exact):
  """A stop-gradient penalty β·k(x) in the reward enters the policy gradient as
  E_π[k(x)·∇log π(x)]. For k1 = log π/π_ref that is ∇KL(π‖π_ref) exactly; k2 and k3 are
  unbiased for the KL's value, not its gradient (Tang & Munos 2025, arXiv:2506.09477).
  Exact expectation over a 5-token categorical."""
  theta = jnp.array([0.3, -0.2, 0.9, 0.0, -0.7])
  ref_logp = jax.nn.log_softmax(jnp.array([0.1, 0.4, -0.3, 0.2, 0.0]))
  tokens = jnp.arange(5)

  def kl(theta):
    logp = jax.nn.log_softmax(theta)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp))

  def penalty_gradient(theta):
    logp = jax.nn.log_softmax(theta)
    k = policy_losses.kl_estimate(logp[tokens][:, None], ref_logp[tokens][:, None],
                                  jnp.ones((5, 1)), kind)[:, 0]
    surrogate = lambda t: jnp.sum(  # noqa: E731
        jax.lax.stop_gradient(jnp.exp(logp) * k) * jax.nn.log_softmax(t)[tokens])
    return jax.grad(surrogate)(theta)

  true, got = jax.grad(kl)(theta), penalty_gradient(theta)
  if exact:
    np.testing.assert_allclose(got, true, atol=1e-6)
  else:
    assert np.linalg.norm(got - true) > 0.1 * np.linalg.norm(true)


def test_a_k3_penalty_in_the_reward_warns(caplog):
  with caplog.at_level(logging.WARNING):
    algorithms.HParams.from_config({"algorithm": "rloo", "kl_estimator": "k3",
                                    "kl_coef": 0.02})
  assert "is not the KL's (Tang & Munos 2025" in caplog.text
  caplog.clear()
  algorithms.HParams.from_config({"algorithm": "rloo", "kl_estimator": "k1", "kl_coef": 0.02})
  assert algorithms.HParams.from_config({"algorithm": "rloo"}).kl_estimator == "k1"  # default
  assert not caplog.records


def _pair_reward(fn, name="proxy"):
  return rl_rewards.PairReward(
      reward_fns.ProgrammaticReward(fn, inputs="texts", name=name), lambda p, r: p + r)


# Eleven ids, EOS among them: a random policy ends about 4 in 10 responses within 6 tokens.
LETTERS = types.SimpleNamespace(pad_id=0, bos_id=1, eos_id=2, vocab_size=11,
                                decode=lambda ids: "".join(chr(97 + int(i)) for i in ids))


def _iterator(proxy, *, penalty=0.0, num_prompts=8):
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=LETTERS.vocab_size, num_layers=1)
  bundle = rollout_lib.build_bundle(decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32),
                                    with_value=False, seed=1)
  graphdef, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
  texts = [f"p{i}" for i in range(num_prompts)]
  prompts = rollout_lib.encode_prompts(texts, [[1, 3 + i % 8, 4] for i in range(num_prompts)],
                                       pad_id=0, max_length=4, bos_id=1)
  it = trainer.RolloutIterator(
      graphdef, prompts=lambda step, count: prompts, proxy=proxy, gold=None,
      tokenizer=LETTERS, sampling={"max_new_tokens": 6},
      hp=algorithms.HParams(algorithm="rloo", whiten_advantages=False),
      kl_ctl=kl_control.FixedKLController(0.0), key=jax.random.key(0),
      prompts_per_step=num_prompts,
      group_size=2, epochs=1, num_minibatches=1, missing_eos_penalty=penalty)
  it.observe(0, types.SimpleNamespace(params=params, extra=extra))
  return it


def test_cut_off_responses_are_counted_and_can_be_penalised():
  """Responses cut at max_new_tokens got the full score with nothing in the logs.

  32 pairs: with 8, 2 of 200 sampling streams (another CPU's) had no pair with one
  response cut and one finished, so every advantage was 0."""
  proxy = _pair_reward(lambda texts: np.ones(len(texts), np.float32))
  plain = {k: v[0] for k, v in next(_iterator(proxy, num_prompts=32)).items()}  # one minibatch
  truncated, mask = plain["truncated"], plain["loss_mask"] > 0
  assert 0 < truncated.sum() < truncated.size, truncated
  has_eos = np.any((plain["tokens"] == LETTERS.eos_id) & mask, axis=1)
  np.testing.assert_array_equal(truncated, (~has_eos).astype(np.float32))
  penalised = {k: v[0] for k, v in next(_iterator(proxy, penalty=2.0, num_prompts=32)).items()}
  np.testing.assert_array_equal(penalised["truncated"], truncated)  # the same samples
  np.testing.assert_array_equal(penalised["scores"], plain["scores"])  # logged: raw proxy
  assert not np.any(plain["advantages"])  # every reward 1: nothing to learn
  # Leave-one-out over pairs: A = R_i - R_j with R = 1 - 2·[cut off].
  advantage = penalised["advantages"].sum(1) / mask.sum(1)
  assert set(np.round(advantage, 5)) <= {-2.0, 0.0, 2.0}
  assert np.all(advantage[truncated > 0] <= 0) and np.all(advantage[truncated == 0] >= 0)
  assert advantage.sum() == pytest.approx(0.0, abs=1e-5) and np.any(advantage)


def test_a_chat_turn_end_finishes_a_response_as_eos_does():
  """A tokenizer whose chat turn ends with another token than EOS (Gemma's): rows stop at
  either, count as finished, and neither is in the decoded response. 64 rows: with 16, 3
  of 200 sampling streams (another CPU's) had no row end at the turn end alone."""
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=LETTERS.vocab_size, num_layers=1)
  policy = decoder.Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  rows = 64
  prompts = rollout_lib.encode_prompts([f"p{i}" for i in range(rows)],
                                       [[1, 3 + i % 8, 4] for i in range(rows)],
                                       pad_id=0, max_length=4, bos_id=1)
  chat = types.SimpleNamespace(**vars(LETTERS), extra_stop_ids=lambda: (5,))
  args = dict(rng=jax.random.key(3), max_new_tokens=6)
  plain = rollout_lib.sample(policy, prompts, tokenizer=LETTERS, **args)
  out = rollout_lib.sample(policy, prompts, tokenizer=chat, **args)
  for row in range(rows):
    resp = plain.tokens[row, 4:][plain.loss_mask[row, 4:] > 0]
    stops = np.flatnonzero(np.isin(resp, [2, 5]))
    kept = resp[:stops[0] + 1] if stops.size else resp
    np.testing.assert_array_equal(out.tokens[row, 4:][out.loss_mask[row, 4:] > 0], kept)
    assert out.finished[row] == bool(stops.size)
    assert out.responses[row] == LETTERS.decode([t for t in kept if t not in (2, 5)])
  assert np.any(out.finished & ~plain.finished)  # some row ended at the turn end only


def test_a_non_finite_reward_names_the_sample():
  """One NaN score made the step's loss NaN, and the loop skipped it as a bad gradient.
  prefjax's own reward functions refuse NaN themselves; a reward of the user's own (any
  object with ``name`` and ``score``) reached the step."""
  own = types.SimpleNamespace(
      name="shaky", score=lambda texts: np.where(np.arange(len(texts)) == 3, np.nan, 1.0))
  proxy = rl_rewards.PairReward(own, lambda p, r: p + r)
  with pytest.raises(ValueError, match=r"reward 'shaky' gave 1 of 16 responses a non-finite "
                                       r"score at RL step 0 \(first: nan for prompt 'p1'"):
    next(_iterator(proxy))


def test_approx_kl_and_value_clip_fraction_weigh_tokens_like_the_losses():
  policy = decoder.Decoder(decoder.DecoderConfig.tiny_llama(vocab_size=11), rngs=nnx.Rngs(0),
                           dtype=jnp.float32)
  bundle = rollout_lib.build_bundle(policy, with_value=True, seed=1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 11, (4, 9)).astype(np.int32)
  attention = np.ones_like(tokens)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, 3:] = 1
  loss_mask[1, 4:] = attention[1, 4:] = 0  # one response of 1 token, three of 6
  graphdef, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
  hp = algorithms.HParams(algorithm="ppo", vf_clip_eps=1e-3)
  batch = algorithms.prepare(graphdef, params, extra, tokens, attention, loss_mask,
                             jnp.asarray([1.0, -1.0, 0.5, 0.0]), jnp.float32(0.0), hp=hp,
                             group_size=1)
  leaves = nnx.state(bundle.policy, nnx.Param)  # the update moved the policy
  nnx.update(bundle.policy, jax.tree.map(lambda x: x * 1.2, leaves))
  _, metrics = algorithms.loss_fn(bundle, batch, hp)
  stats = rollout_lib.token_stats(bundle, tokens, attention, loss_mask, with_reference=False)
  log_ratio = np.asarray(stats.logp, np.float64) - np.asarray(batch["old_logp"], np.float64)
  k3 = (np.expm1(log_ratio) - log_ratio) * loss_mask
  np.testing.assert_allclose(metrics["approx_kl"], k3.sum() / loss_mask.sum(), rtol=1e-4)
  per_sequence = k3.sum(1) / loss_mask.sum(1)
  assert abs(float(metrics["approx_kl"]) - per_sequence.mean()) > 1e-3  # the two differ here
  # The value clip fraction: each sequence's fraction, weighted by its response tokens.
  values = rollout_lib.token_stats(bundle, tokens, attention, loss_mask,
                                   with_reference=False).values
  clipped = policy_losses.value_loss(values, batch["old_values"], batch["returns"], loss_mask,
                                     clip_eps=hp.vf_clip_eps).clip_fraction
  tokens_per_sequence = loss_mask.sum(1)
  np.testing.assert_allclose(
      metrics["value_clip_fraction"],
      np.sum(np.asarray(clipped) * tokens_per_sequence) / tokens_per_sequence.sum(), rtol=1e-5)


def test_an_over_long_prompt_keeps_its_bos_and_the_cut_is_reported(caplog):
  prompts = rollout_lib.encode_prompts(["abcdef"], [[1, 5, 6, 7, 8, 9]], pad_id=0,
                                       max_length=4, bos_id=1)
  np.testing.assert_array_equal(prompts.tokens, [[1, 7, 8, 9]])  # BOS + the last three
  from prefjax.rl import setup  # pylint: disable=import-outside-toplevel
  config = {"max_length": 3, "style": "raw"}
  tokenizer = types.SimpleNamespace(pad_id=0, bos_id=None, eos_id=None, chat_template=None,
                                    encode=lambda text, **kw: [3] * len(text))
  setup._WARNED_LIMITS.discard(3)  # pylint: disable=protected-access
  with caplog.at_level(logging.INFO):
    for _ in range(3):  # a study's stages encode the same prompts each time
      setup._encode(["abcd", "ab"], tokenizer, types.SimpleNamespace(**config, get=config.get))
  said = [r for r in caplog.records if "prompts are longer than" in r.getMessage()]
  assert ("1 of 2 prompts are longer than prompts.max_length=3 tokens (first: 'abcd', 4 "
          "tokens)") in said[0].getMessage()
  assert [r.levelno for r in said] == [logging.WARNING, logging.INFO, logging.INFO]


def test_a_registered_algorithm_runs_through_prepare_and_the_loss(caplog):
  """A method added with ``register_algorithm`` (here REINFORCE++-like: RLOO's rewards,
  the whitened advantage per sequence, PPO's token-mean surrogate, no value model) runs
  as its entry says; an unknown name is refused, not run as RLOO."""
  def reinforce_pp_targets(scores, stats, loss_mask, *, kl_coef, group_size, hp):
    del group_size
    kl = policy_losses.kl_estimate(stats.logp, stats.ref_logp, loss_mask, hp.kl_estimator)
    advantages = policy_losses.whiten(
        (scores - kl_coef * jnp.sum(kl, axis=-1))[:, None] * loss_mask, loss_mask)
    return {"advantages": advantages, "returns": jnp.zeros_like(kl), "kl": kl}

  name = "test_reinforce_pp"
  if name not in algorithms.algorithm_names():
    algorithms.register_algorithm(name, algorithms.Algorithm(
        reinforce_pp_targets, "token_mean", value_model=False, max_group_size=None,
        reads=("kl_estimator",)))
  with pytest.raises(ValueError, match="already registered"):
    algorithms.register_algorithm(name, algorithms.get_algorithm(name))
  assert algorithms.check_group_size(name, 1) == 1
  with caplog.at_level(logging.WARNING):
    hp = algorithms.HParams.from_config({"algorithm": name, "kl_estimator": "k1",
                                         "vf_coef": 0.5, "clip_eps": 0.1})
  assert f"rl.vf_coef=0.5: not read by {name}" in caplog.text
  policy = decoder.Decoder(decoder.DecoderConfig.tiny_llama(vocab_size=11), rngs=nnx.Rngs(0),
                           dtype=jnp.float32)
  bundle = rollout_lib.build_bundle(policy, with_value=False, seed=1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 11, (4, 9)).astype(np.int32)
  attention, loss_mask = np.ones_like(tokens), np.zeros_like(tokens)
  loss_mask[:, 3:] = 1
  loss_mask[2, 5:] = attention[2, 5:] = 0
  graphdef, params, extra = state_lib.split_model(bundle, rollout_lib.TRAINABLE)
  scores = jnp.asarray([1.0, -1.0, 0.5, 0.0])
  batch = algorithms.prepare(graphdef, params, extra, tokens, attention, loss_mask, scores,
                             jnp.float32(0.1), hp=hp, group_size=1)
  kl = np.asarray(batch["kl"], np.float64)
  reward = np.asarray(scores, np.float64) - 0.1 * kl.sum(-1)
  token_rewards = np.broadcast_to(reward[:, None], loss_mask.shape)[loss_mask == 1]
  want = (reward[:, None] - token_rewards.mean()) / token_rewards.std() * loss_mask
  np.testing.assert_allclose(batch["advantages"], want, rtol=1e-4, atol=1e-5)
  nnx.update(bundle.policy, jax.tree.map(lambda x: x * 1.1, nnx.state(bundle.policy,
                                                                      nnx.Param)))
  loss, metrics = algorithms.loss_fn(bundle, batch, hp)
  stats = rollout_lib.token_stats(bundle, tokens, attention, loss_mask, with_reference=False)
  clip = policy_losses.ppo_clip_loss(stats.logp, batch["old_logp"], batch["advantages"],
                                     loss_mask, clip_eps=0.1)
  want_loss = np.sum(np.asarray(clip.per_token, np.float64) * loss_mask) / loss_mask.sum()
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  assert "value_loss" not in metrics
  with pytest.raises(ValueError, match=r"rl.algorithm='grpo' is not one of \('ppo', 'rloo'"):
    algorithms.prepare(graphdef, params, extra, tokens, attention, loss_mask, scores,
                       jnp.float32(0.1), hp=hp._replace(algorithm="grpo"), group_size=1)


def test_minibatches_cut_each_epoch_permutation_and_name_a_field_not_per_sequence():
  batch = {"tokens": np.arange(12).reshape(6, 2), "scores": np.arange(6.0)}
  out = trainer.minibatches(batch, jax.random.key(0), epochs=2, num_minibatches=3)
  assert out["tokens"].shape == (6, 2, 2) and out["scores"].shape == (6, 2)
  for epoch in (out["scores"][:3], out["scores"][3:]):  # each epoch sees every row once
    assert sorted(epoch.ravel()) == list(range(6))
  np.testing.assert_array_equal(out["tokens"][..., 0], 2 * out["scores"])  # rows stay whole
  with pytest.raises(ValueError, match=r"rollout field 'kl_coef' has shape \(\): every field"):
    trainer.minibatches({**batch, "kl_coef": np.float32(0.1)}, jax.random.key(0), epochs=1,
                        num_minibatches=1)


@pytest.mark.parametrize("config", ["tiny_ppo", "tiny_rloo", "smollm2_rloo"])
def test_shipped_rl_configs_set_no_field_their_method_ignores(config, caplog):
  module = importlib.import_module(f"configs.rl.{config}")
  with caplog.at_level(logging.WARNING):
    algorithms.HParams.from_config(module.get_config().rl)
  assert "not read by" not in caplog.text


def test_a_policy_with_too_few_learned_positions_for_prompt_plus_response_is_refused():
  """Sampling feeds back all but the last token (P + N − 1 positions), the train step
  scores whole rows (P + N): one token over used to pass sampling and fail the first step,
  after the warm start and the rewards had loaded."""
  from configs.rl import tiny_ppo  # pylint: disable=import-outside-toplevel
  from prefjax.data import tokenize  # pylint: disable=import-outside-toplevel
  from prefjax.rl import setup  # pylint: disable=import-outside-toplevel
  config = tiny_ppo.get_config()
  config.model.preset = "tiny_gpt2"
  config.model.overrides = dict(max_position_embeddings=24)
  config.prompts.max_length, config.sampling.max_new_tokens = 10, 14
  assert setup.make_policy(config, tokenize.ByteTokenizer()).config.position == "learned"
  config.sampling.max_new_tokens = 15
  with pytest.raises(ValueError, match=r"prompts.max_length \+ sampling.max_new_tokens = 25: "
                                       "a sequence of 25 tokens exceeds this decoder's 24"):
    setup.make_policy(config, tokenize.ByteTokenizer())


@pytest.mark.parametrize("add_bos", [True, False])
def test_rollout_prompts_start_with_bos_as_the_policy_trained(add_bos):
  """prompts.add_bos: a policy trained with data.pipeline.add_bos=False (SmolLM2 raw style)
  was sampled from prompts that always began with BOS (<|im_start|> there)."""
  from prefjax.data import tokenize  # pylint: disable=import-outside-toplevel
  from prefjax.rl import setup  # pylint: disable=import-outside-toplevel
  tok = tokenize.ByteTokenizer()
  cfg = ml_collections.ConfigDict({"style": "raw", "max_length": 4, "add_bos": add_bos})
  prompts = setup._encode(["ab", "a long prompt"], tok, cfg)  # pylint: disable=protected-access
  rows = [t[m > 0].tolist() for t, m in zip(prompts.tokens, prompts.mask)]
  bos = [tok.bos_id] if add_bos else []
  assert rows[0] == bos + [ord("a"), ord("b")]
  assert rows[1] == bos + [ord(c) for c in ("mpt" if add_bos else "ompt")]  # the last 4
  assert setup.prompt_pipeline_config(cfg).add_bos is add_bos


@pytest.mark.parametrize("add_bos", [True, False])
def test_the_warm_start_trains_on_prompts_as_the_rollouts_read_them(add_bos, monkeypatch):
  from prefjax.data import tiny_world  # pylint: disable=import-outside-toplevel
  from prefjax.data import tokenize  # pylint: disable=import-outside-toplevel
  from prefjax.rl import setup  # pylint: disable=import-outside-toplevel
  seen = []
  monkeypatch.setattr(setup.warm_start_lib, "warm_start", lambda policy, examples, **kw: (
      seen.extend(examples(np.random.default_rng(0), 3)) or []))
  config = ml_collections.ConfigDict(dict(
      warm_start=dict(steps=1, batch_size=3, learning_rate=0.1), model=dict(path=""), seed=0,
      prompts=dict(style="raw", add_bos=add_bos)))
  tok = tokenize.ByteTokenizer()
  setup.maybe_warm_start(None, config, tok, tiny_world.TinyWorld())
  assert len(seen) == 3 and all((p[0] == tok.bos_id) is add_bos for p, _ in seen)
