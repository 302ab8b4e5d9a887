"""experiments/train_dpo.py end to end on the tiny world, plus the training loss's pieces.

Also holds the helpers the SFT and reference-cache tests share (tmp data dirs,
test-sized configs, metrics readers).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dpo import tiny as dpo_tiny
from configs.sft import tiny as sft_tiny
from experiments import train_dpo
from prefjax import experiment
from prefjax.data import tokenize
from prefjax.direct import evaluation
from prefjax.direct import loss as loss_lib
from prefjax.losses import DIRECT_LOSSES
from prefjax.losses import registry
from prefjax.models import decoder
from prefjax.models import hf_import
from tests import comparisons

REPO = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------- shared helpers


def isolated_env(tmp_path_factory) -> tuple[pathlib.Path, pytest.MonkeyPatch]:
  """Points the dataset/reference caches at a fresh tmp dir (XLA's compilation cache is
  the session's, see conftest.py: runs of the same program compile once)."""
  root = tmp_path_factory.mktemp("prefjax_env")
  patch = pytest.MonkeyPatch()
  patch.setenv("PREFJAX_CACHE_DIR", str(root / "cache"))
  patch.setenv("PREFJAX_SYNTHETIC_DIR", str(root / "synthetic"))
  return root, patch


def dpo_config(loss: str = "dpo", *, steps: int = 30, **loop):
  """The tiny DPO config, test sized: 1 layer, no mesh, no KL sampling, eval at the end."""
  config = dpo_tiny.get_config("quick")
  config.loss.name = loss
  config.model.overrides.num_layers = 1
  config.mesh.shape = ()
  config.eval.kl_max_new_tokens = 0
  config.loop.num_steps = steps
  config.loop.tensorboard = False
  config.loop.log_every = 1
  for key, value in loop.items():
    config.loop[key] = value
  return config


def sft_config(*, steps: int = 30):
  """The tiny SFT config, test sized (1 layer, no mesh, eval every 10 steps)."""
  config = sft_tiny.get_config("quick")
  config.model.overrides.num_layers = 1
  config.mesh.shape = ()
  config.loop.num_steps = steps
  config.optimizer.total_steps = steps
  config.loop.eval_every = 10
  config.loop.tensorboard = False
  config.loop.log_every = 1
  return config


def read_metrics(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def train_losses(workdir) -> list[float]:
  return [r["loss"] for r in read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
  root, patch = isolated_env(tmp_path_factory)
  yield root
  patch.undo()


# ---------------------------------------------------------------------------- every loss

# Held-out pairs: ~211; chance is 0.5 (its std is ~0.035 here), so 0.62 leaves > 3 sigma.
ACCURACY_THRESHOLD = 0.62
ALL_LOSSES = sorted(registry.DIRECT_LOSS_SPECS)
# APO-down pushes the chosen likelihood DOWN (by design) and widens the margin slowly at
# β = 0.1: 0.60 held-out accuracy after 30 steps, 0.72 at β = 0.3 (measured).
BETA = {"apo_down": 0.3}


@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_every_loss_raises_heldout_implicit_reward_accuracy(loss, tmp_path):
  config = dpo_config(loss)
  config.loss.beta = BETA.get(loss, config.loss.beta)
  if loss == "dpo":  # Also sample from the policy at eval and estimate the KL to the reference.
    config.eval.kl_max_new_tokens = 12
  result = train_dpo.run(config, str(tmp_path))
  final = result.summary["final_eval"]
  if loss == "dpo":
    # k1 and the exact per-position KL estimate the same sequence KL; k3 >= 0 per token.
    assert final["kl/exact"] > 0.05
    assert final["kl/k3"] > 0
    np.testing.assert_allclose(final["kl/k1"], final["kl/exact"], rtol=0.25)
    assert 0 < final["kl/response_tokens"] <= 12
  assert final["num_examples"] > 150
  assert final["rewards/accuracies"] > ACCURACY_THRESHOLD, final
  records = read_metrics(tmp_path)
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected"):
    assert name in records[0], name
  spec = registry.direct_loss_spec(loss)
  assert ("nll" in records[0]) == (spec.nll_alpha > 0)  # ORPO's NLL term is on by default.
  assert (f"{loss}/kl_ref" in records[0]) == spec.unpaired
  reference = json.loads((tmp_path / "reference.json").read_text())
  assert reference["mode"] == ("none" if spec.reference_free else "online")


def test_shared_prompt_packed_batches_learn_with_a_cached_reference(tmp_path):
  """``data.pipeline.share_prompt``: the reference log-probs are precomputed on the same
  shared-prompt batches (``ref_cache``) and the policy learns as on padded batches."""
  config = dpo_config()
  config.ref.mode = "cached"
  config.data.pipeline.update(mode="packed", share_prompt=True, pack_rows=2,
                              pack_length=2 * config.data.pipeline.max_length,
                              max_segments_per_row=3 * config.data.pipeline.batch_size)
  result = train_dpo.run(config, str(tmp_path))
  assert json.loads((tmp_path / "reference.json").read_text())["mode"] == "cached"
  final = result.summary["final_eval"]
  assert final["rewards/accuracies"] > ACCURACY_THRESHOLD, final
  records = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert len(records) == 30 and all(np.isfinite(r["loss"]) for r in records)


@pytest.fixture
def throwaway_loss():
  """A reference-free, length-normalised loss with an NLL term, registered for one test."""
  name = "_test_mean_logp_margin"

  @registry.register_direct_loss(name, reference_free=True, length_normalized=True,
                                 nll_alpha=0.5)
  def mean_logp_margin(x, *, beta, margin=0.0):
    """−logσ(β·(π_c/n_c − π_r/n_r) − margin)."""
    mean_c = x.policy_chosen / jnp.maximum(x.chosen_tokens, 1.0)
    mean_r = x.policy_rejected / jnp.maximum(x.rejected_tokens, 1.0)
    return -jax.nn.log_sigmoid(beta * (mean_c - mean_r) - margin)

  del mean_logp_margin
  yield name
  registry.unregister_direct_loss(name)


def test_registered_flags_reach_the_trainer(throwaway_loss, tmp_path, caplog):
  config = dpo_config(throwaway_loss)
  config.loss.beta, config.loss.kwargs = 2.0, "margin=0.5"
  config.ref.path = "/nowhere/ref"  # unread: said so, not loaded
  assert loss_lib.DirectLoss.from_config(config).kwargs == {"margin": 0.5}
  result = train_dpo.run(config, str(tmp_path))
  reference = json.loads((tmp_path / "reference.json").read_text())
  assert reference["mode"] == "none"  # reference_free: no reference model is built.
  assert "ref.path=/nowhere/ref is not read" in caplog.text
  first = read_metrics(tmp_path)[0]
  # nll_alpha = 0.5 is the default weight of the chosen-NLL term.
  assert first["loss"] == pytest.approx(first["preference_loss"] + 0.5 * first["nll"], rel=1e-5)
  # length_normalized: implicit rewards are β·π/n (responses have 3+ tokens), not β·π.
  ratio = first["rewards/chosen"] / (config.loss.beta * first["logps/chosen"])
  assert 0.0 < ratio < 0.34, ratio
  assert result.summary["final_eval"]["rewards/accuracies"] > ACCURACY_THRESHOLD


# ---------------------------------------------------------------------------- eval KL


def _tiny_models(seed_policy: int, seed_ref: int):
  config = decoder.DecoderConfig.tiny_llama(vocab_size=11, num_layers=1)
  return (decoder.Decoder(config, rngs=nnx.Rngs(seed_policy)),
          decoder.Decoder(config, rngs=nnx.Rngs(seed_ref)))


def test_kl_to_reference_is_zero_for_the_reference_itself_and_matches_numpy():
  policy, ref = _tiny_models(0, 1)
  policy_copy, _ = _tiny_models(0, 1)
  prompt = jnp.asarray([[0, 3, 4, 5], [0, 0, 6, 7]], jnp.int32)
  mask = (prompt > 0).astype(jnp.int32)
  cfg = evaluation.KLEvalConfig(max_new_tokens=5, exact=True, eos_id=None, pad_id=0)
  rng = jax.random.key(0)
  kl_fn = nnx.jit(functools.partial(evaluation.kl_to_reference, cfg=cfg))
  same = kl_fn(policy, policy_copy, prompt, mask, rng)
  for name in ("kl/k1", "kl/k3", "kl/exact"):
    np.testing.assert_array_equal(same[name], 0.0)
  out = kl_fn(policy, ref, prompt, mask, rng)

  @nnx.jit
  def log_softmax(model, tokens, attention):
    return jax.nn.log_softmax(model(tokens, attention_mask=attention))

  gen = evaluation.sampling.generate(policy, prompt, mask, rng=rng, max_new_tokens=5,
                                     eos_id=None, pad_id=0)
  tokens = jnp.concatenate([prompt, gen.tokens], 1)
  attention = jnp.concatenate([mask, gen.mask], 1)
  lp, lq = log_softmax(policy, tokens, attention), log_softmax(ref, tokens, attention)
  # The same samples (same key), scored in float64 NumPy.
  t, lp, lq = np.asarray(tokens), np.asarray(lp, np.float64), np.asarray(lq, np.float64)
  k1 = np.zeros(2)
  exact = np.zeros(2)
  for b in range(2):
    for pos in range(4, 9):  # generated tokens sit at 4..8, predicted from 3..7
      prev = pos - 1
      k1[b] += lp[b, prev, t[b, pos]] - lq[b, prev, t[b, pos]]
      exact[b] += np.sum(np.exp(lp[b, prev]) * (lp[b, prev] - lq[b, prev]))
  np.testing.assert_allclose(out["kl/k1"], k1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["kl/exact"], exact, rtol=1e-4, atol=1e-5)
  assert np.all(exact > 0) and np.all(np.asarray(out["kl/k3"]) > 0)


def test_left_padded_prompts_extracts_the_prompt_of_each_pair():
  tokens = np.array([[1, 2, 3, 9, 9, 0], [1, 4, 8, 8, 8, 0], [1, 2, 3, 7, 0, 0],
                     [1, 4, 6, 0, 0, 0]], np.int32)
  attention = (tokens > 0).astype(np.int32)
  loss = np.array([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0],
                   [0, 0, 1, 0, 0, 0]], np.int32)
  batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss,
           "pair_mask": np.ones(2, np.float32)}
  prompt, mask = evaluation.left_padded_prompts(batch)
  np.testing.assert_array_equal(np.asarray(prompt)[mask > 0], [1, 2, 3, 1, 4])
  np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1]])


# ---------------------------------------------------------------------------- KTO pieces


def test_mismatched_rows_pair_each_prompt_with_the_next_rows_response():
  # 2 pairs -> 4 rows: (prompt, response) = (p0, c0), (p1, c1), (p0, r0), (p1, r1).
  rows = [([1, 2], [3, 4, 5]), ([1, 6, 7], [8]), ([1, 2], [9]), ([1, 6, 7], [10, 11])]
  length = 5  # row 3 = p1 + c0 is cut to 5 tokens
  tokens = np.zeros((4, length), np.int32)
  attention = np.zeros_like(tokens)
  loss = np.zeros_like(tokens)
  for i, (p, r) in enumerate(rows):
    tokens[i, :len(p) + len(r)] = p + r
    attention[i, :len(p) + len(r)] = 1
    loss[i, len(p):len(p) + len(r)] = 1
  batch = {"tokens": tokens, "attention_mask": attention, "loss_mask": loss,
           "pair_mask": np.array([1.0, 1.0], np.float32)}
  out = loss_lib.mismatched_rows(batch)
  for k in range(4):
    p, _ = rows[k]
    _, r = rows[(k + 1) % 4]
    expect = (p + r)[:length]
    n = len(expect)
    np.testing.assert_array_equal(np.asarray(out["tokens"])[k, :n], expect)
    np.testing.assert_array_equal(out["attention_mask"][k], [1] * n + [0] * (length - n))
    np.testing.assert_array_equal(out["loss_mask"][k, :len(p)], 0)
    np.testing.assert_array_equal(out["loss_mask"][k, len(p):n], 1)
  np.testing.assert_array_equal(out["valid"], [1.0, 1.0, 1.0, 1.0])
  # Pair 1 padding: rows 1, 3 are invalid and so are rows 0, 2 (their response comes from 1, 3).
  batch["pair_mask"] = np.array([1.0, 0.0], np.float32)
  np.testing.assert_array_equal(loss_lib.mismatched_rows(batch)["valid"], [0.0] * 4)


def test_soft_labels_for_ties_and_rpo_term_match_numpy():
  loss = loss_lib.DirectLoss(name="dpo", beta=0.5, ref_mode="online",
                             loss_kwargs=(("label_smoothing", 0.1),), nll_alpha=0.3)
  scores = loss_lib.SequenceScores(
      chosen=jnp.array([-3.0, -5.0, -2.0]), rejected=jnp.array([-4.0, -4.5, -7.0]),
      chosen_tokens=jnp.array([3.0, 5.0, 2.0]), rejected_tokens=jnp.array([4.0, 3.0, 7.0]))
  batch = {"ref_chosen": np.array([-3.5, -4.0, -2.5], np.float32),
           "ref_rejected": np.array([-4.2, -4.0, -6.0], np.float32),
           "weight": np.array([1.0, 2.0, 1.0], np.float32),
           "outcome": np.array([1.0, 0.5, 1.0], np.float32),
           "pair_mask": np.array([1.0, 1.0, 0.0], np.float32)}
  x = loss_lib.pair_logps(loss, scores, batch)
  tie_handling = loss_lib._tie_handling  # pylint: disable=protected-access
  kwargs, weights, dropped = tie_handling(loss, batch)
  losses = DIRECT_LOSSES["dpo"](x, beta=0.5, **kwargs)
  h = ((np.array([-3.0, -5.0]) - [-3.5, -4.0]) - (np.array([-4.0, -4.5]) - [-4.2, -4.0]))
  eps = np.array([0.1, 0.5])
  z = 0.5 * h
  expect = -(1 - eps) * np.log(1 / (1 + np.exp(-z))) - eps * np.log(1 / (1 + np.exp(z)))
  np.testing.assert_allclose(losses[:2], expect, rtol=1e-5)
  np.testing.assert_allclose(weights, [1.0, 2.0, 0.0])
  assert float(dropped) == 0.0
  nll = (3.0 / 3.0 * 1.0 + 5.0 / 5.0 * 2.0) / 3.0
  total = float(np.sum(expect * [1.0, 2.0]) / 3.0) + 0.3 * nll
  np.testing.assert_allclose(
      float(loss_lib.weighted_mean(losses, weights)
            + 0.3 * loss_lib.weighted_mean(-x.policy_chosen / x.chosen_tokens, weights)),
      total, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_the_kl_eval_refuses_samples_not_drawn_from_the_policy(temperature):
  """At temperature 0.5 two tiny decoders' k1 read 23.9 nats against an exact 16.8."""
  config = dpo_tiny.get_config("quick")
  config.eval.kl_temperature = temperature
  with pytest.raises(ValueError, match=rf"eval.kl_temperature={temperature}: the KL"):
    train_dpo.kl_config(config, tokenize.ByteTokenizer())


def test_a_kl_eval_past_a_learned_position_table_is_refused_at_the_start(tmp_path):
  """It failed at the first eval, mid-run: prompts as wide as the rows plus the samples."""
  config = dpo_config(steps=2)
  config.model.preset = "tiny_gpt2"
  config.model.overrides = dict(max_position_embeddings=40)
  config.eval.kl_max_new_tokens = 16
  with pytest.raises(ValueError, match=r"data.pipeline.max_length \+ eval.kl_max_new_tokens = "
                                       r"48: a sequence of 48 tokens exceeds this decoder's 40 "
                                       r"learned positions"):
    train_dpo.run(config, str(tmp_path / "dpo"))


def test_direct_loss_rejects_bad_settings():
  with pytest.raises(KeyError, match="unknown direct loss"):
    loss_lib.DirectLoss(name="nope")
  with pytest.raises(ValueError, match=r"config.loss.kwargs \['label_smoothing'\] are not "
                                       r"hyperparameters of 'ipo'"):  # the flag, by its name
    loss_lib.DirectLoss(name="ipo", loss_kwargs=(("label_smoothing", 0.1),))
  with pytest.raises(ValueError, match=r"label_smoothing='abc' for 'dpo': expected a number"):
    loss_lib.DirectLoss(name="dpo", loss_kwargs=loss_lib.parse_kwargs("label_smoothing=abc"))
  with pytest.raises(ValueError, match=r"label_smoothing=True for 'dpo': expected a number"):
    loss_lib.DirectLoss(name="dpo", loss_kwargs={"label_smoothing": True})
  # NaN passes every range check (comparisons are false) and trained on to NonFiniteError.
  with pytest.raises(ValueError, match=r"label_smoothing=nan for 'dpo': expected a number, "
                                       r"not NaN"):
    loss_lib.DirectLoss(name="dpo", loss_kwargs=loss_lib.parse_kwargs("label_smoothing=NaN"))
  with pytest.raises(KeyError, match=r"--imports=MODULE"):
    loss_lib.DirectLoss(name="rdpo_of_my_own")
  # Ranges are checked with the configured numbers, although a soft-label loss trains
  # with a per-pair ε (exo_pair with ε = 0 gave a NaN loss at every step).
  for name, eps in [("exo_pair", 0.0), ("exo_pair", 1.0), ("dpo", 2.0), ("simpo", -1.0)]:
    with pytest.raises(ValueError, match=rf"loss '{name}' with beta=0.1, config.loss.kwargs "
                                         rf"\{{'label_smoothing': {eps}\}}: label_smoothing"):
      loss_lib.DirectLoss(name=name, loss_kwargs={"label_smoothing": eps})
  # In range for a pair's soft label, but as one ε for every pair 0.5 leaves no preference
  # (held-out accuracy 0.49) and 1 teaches the rejected side (0.32).
  for eps in (0.5, 1.0):
    with pytest.raises(ValueError, match=rf"config.loss.kwargs label_smoothing={eps} must be "
                                         r"in \[0, 0.5\)"):
      loss_lib.DirectLoss(name="dpo", loss_kwargs={"label_smoothing": eps})
  with pytest.raises(ValueError, match=r"'simpo' is reference-free: ref.mode='cached'"):
    loss_lib.DirectLoss(name="simpo", ref_mode="cached")
  for beta in (-0.1, float("nan")):
    with pytest.raises(ValueError, match=rf"beta={beta} for 'dpo': must be a number >= 0"):
      loss_lib.DirectLoss(name="dpo", beta=beta)
  with pytest.raises(ValueError, match=r"loss 'ipo' with beta=0, .*beta=0.0 is outside"):
    loss_lib.DirectLoss(name="ipo", beta=0.0)
  assert loss_lib.DirectLoss(name="simpo", loss_kwargs={"gamma": None}).kwargs == {"gamma": None}
  assert loss_lib.DirectLoss(name="dpo", loss_kwargs={"label_smoothing": jnp.float32(0.1)})
  with pytest.raises(ValueError, match="kto needs ref_mode='online'"):
    loss_lib.DirectLoss(name="kto", ref_mode="cached")
  assert loss_lib.DirectLoss(name="simpo").ref_mode == "none"
  assert loss_lib.DirectLoss(name="orpo").alpha == 1.0
  assert loss_lib.parse_kwargs("label_smoothing=0.1,tau=2") == {"label_smoothing": 0.1,
                                                                      "tau": 2}
  # Python literals as the rest of the command line writes them ('.5' was "expected a number").
  assert loss_lib.parse_kwargs("gamma=.5,flip=True,cap=None,tag=abc") == {
      "gamma": 0.5, "flip": True, "cap": None, "tag": "abc"}
  config = dpo_config("ipo")
  config.loss.betta = 0.3
  with pytest.raises(ValueError, match=r"config.loss: unknown field\(s\) \['betta'\]"):
    loss_lib.DirectLoss.from_config(config)


# ---------------------------------------------------------------------------- resume, mesh, CLI


def test_resume_continues_and_matches_an_uninterrupted_run(tmp_path):
  full = train_dpo.run(dpo_config(steps=6, checkpoint_every=3), str(tmp_path / "full"))
  part = tmp_path / "part"
  first = train_dpo.run(dpo_config(steps=3, checkpoint_every=3), str(part))
  assert first.summary["final_step"] == 3
  resumed = train_dpo.run(dpo_config(steps=6, checkpoint_every=3), str(part))
  assert resumed.summary["final_step"] == 6
  assert resumed.summary["params_sha256"] == full.summary["params_sha256"]
  assert train_losses(part) == train_losses(tmp_path / "full")
  # The data report replaces data_counters.json; its iterator counters survive the resume.
  reports = [json.loads((d / "data_report.json").read_text()) for d in (part, tmp_path / "full")]
  assert reports[0] == reports[1] == resumed.summary["data"]
  assert reports[0]["train"]["iterator"]["batches"] == 6
  assert not (part / "data_counters.json").exists()


def test_a_refused_rerun_keeps_the_run_s_reference_record(tmp_path):
  """reference.json was written before the loop took the workdir: a rerun refused there
  (another run holds it, or a changed config) overwrote the live run's record."""
  from prefjax import files  # pylint: disable=import-outside-toplevel
  train_dpo.run(dpo_config(steps=1), str(tmp_path))
  recorded = (tmp_path / "reference.json").read_text()
  rerun = dpo_config(steps=2)
  rerun.ref.mode = "cached"
  with files.exclusive(tmp_path), pytest.raises(files.WorkdirBusyError):
    train_dpo.run(rerun, str(tmp_path))
  assert (tmp_path / "reference.json").read_text() == recorded


def test_mesh_2x2x2_matches_single_device(tmp_path):
  assert jax.device_count() >= 8
  single = train_dpo.run(dpo_config(steps=4), str(tmp_path / "single"))
  config = dpo_config(steps=4)
  config.mesh.shape = (2, 2, 2)
  config.export_hf = True
  sharded = train_dpo.run(config, str(tmp_path / "sharded"))
  leaves = jax.tree.leaves(sharded.state.params)
  assert any(len({str(s.index) for s in x.addressable_shards}) > 1 for x in leaves)
  exported = hf_import.from_pretrained(tmp_path / "sharded" / experiment.HF_EXPORT_DIR)
  tokens = np.array([[257, 97, 98, 99, 258]], np.int32)
  np.testing.assert_allclose(exported(tokens), sharded.model(tokens), rtol=1e-5, atol=1e-5)
  records = [[r for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("single", "sharded")]
  comparisons.assert_same_first_step(*records)
  comparisons.assert_losses_close(train_losses(tmp_path / "sharded"),
                                  train_losses(tmp_path / "single"))
  comparisons.assert_params_close_after_adam(
      single.state.params, sharded.state.params,
      learning_rate=config.optimizer["learning_rate"], steps=4)


def test_cli_smoke(tmp_path, env):
  workdir = tmp_path / "cli"
  cmd = [sys.executable, "-m", "experiments.train_dpo", "--config=configs/dpo/tiny.py:quick",
         f"--workdir={workdir}", "--config.loop.num_steps=2", "--config.mesh.shape=()",
         "--config.model.overrides.num_layers=1", "--config.eval.kl_max_new_tokens=0",
         "--config.loss.name=ipo", "--config.loop.tensorboard=False"]
  environ = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_step"] == 2
  assert json.loads((workdir / "config.json").read_text())["loss"]["name"] == "ipo"


def test_held_out_metrics_pool_over_the_pairs_the_loss_counts(monkeypatch):
  """Ties the loss drops are not in a batch's metrics, so they must not weight it: two
  batches, 4 decisive pairs (3 right) and 1 decisive pair (right) among 3 ties, give
  4/5, not the pair-count-weighted (3/4 + 1) / 2."""
  def fixed_scores(model, batch, num_segments=None):
    del model, num_segments
    ones = jnp.ones_like(batch["s_c"])
    return loss_lib.SequenceScores(batch["s_c"], batch["s_r"], ones, ones)
  monkeypatch.setattr(loss_lib, "score_pairs", fixed_scores)

  def batch(s_c, outcome):
    n = len(s_c)
    return {"s_c": np.asarray(s_c, np.float32), "s_r": np.zeros(n, np.float32),
            "ref_chosen": np.zeros(n, np.float32), "ref_rejected": np.zeros(n, np.float32),
            "outcome": np.asarray(outcome, np.float32), "weight": np.ones(n, np.float32),
            "pair_mask": np.ones(n, np.float32)}
  batches = [batch([1.0, 1.0, 1.0, -1.0], [1.0] * 4),
             batch([1.0, -1.0, -1.0, -1.0], [1.0, 0.5, 0.5, 0.5])]
  loss = loss_lib.DirectLoss(name="ipo", beta=1.0, ref_mode="online")  # drops ties

  class Nothing(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros(1))
  got = evaluation.make_evaluator(loss, lambda: iter(batches))(0, Nothing())
  assert got["num_examples"] == 5.0
  np.testing.assert_allclose(got["rewards/accuracies"], 4 / 5, rtol=1e-6)
  assert "pairs/num_dropped_ties" not in got


def test_a_pair_the_rejected_side_won_trains_turned_around(monkeypatch):
  """PandaLM stores response 2's wins as outcome 0: losses without soft labels dropped them
  as ties (472 of PandaLM's 894 decisive pairs), and rewards/accuracies counted response 1
  winning as right for every loss."""
  def fixed_scores(model, batch, num_segments=None):
    del model, num_segments
    ones = jnp.ones_like(batch["s_c"])
    return loss_lib.SequenceScores(batch["s_c"], batch["s_r"], ones, ones)
  monkeypatch.setattr(loss_lib, "score_pairs", fixed_scores)
  s_c, s_r = np.array([-1.0, -2.0, -1.5], np.float32), np.array([-2.0, -0.5, -1.0], np.float32)
  batch = {"s_c": s_c, "s_r": s_r, "ref_chosen": np.zeros(3, np.float32),
           "ref_rejected": np.zeros(3, np.float32),
           "outcome": np.array([1.0, 0.0, 0.5], np.float32), "weight": np.ones(3, np.float32),
           "pair_mask": np.ones(3, np.float32)}
  beta = 0.5
  margins = beta * np.array([s_c[0] - s_r[0], s_r[1] - s_c[1]], np.float64)  # preferred first
  ipo = loss_lib.make_loss_fn(loss_lib.DirectLoss(name="ipo", beta=beta, ref_mode="online"))
  loss, metrics = ipo(None, batch, jax.random.key(0))
  # IPO: (h − 1/(2β))² with h = the log-ratio margin (β-free); the tie is dropped.
  h = margins / beta
  np.testing.assert_allclose(float(loss), np.mean((h - 1 / (2 * beta)) ** 2), rtol=1e-6)
  assert float(metrics["pairs/num_dropped_ties"]) == 1.0
  assert float(metrics["rewards/accuracies"]) == 1.0  # both decisive pairs ranked right
  # DPO's soft label already read outcome 0 as ε = 1: turning the pair around is the same.
  dpo = loss_lib.make_loss_fn(loss_lib.DirectLoss(name="dpo", beta=beta, ref_mode="online"))
  decisive = {k: v[:2] for k, v in batch.items()}
  loss, _ = dpo(None, decisive, jax.random.key(0))
  np.testing.assert_allclose(float(loss), np.mean(np.logaddexp(0.0, -margins)), rtol=1e-6)


def test_a_soft_label_below_a_half_is_its_pair_turned_around_and_a_tie_has_no_side(
    monkeypatch):
  """o = 0.3 for (c, r) is o = 0.7 for (r, c); a tie counts ½ in the accuracy and adds no
  NLL (the audit found both credited to whichever response was listed first)."""
  def fixed_scores(model, batch, num_segments=None):
    del model, num_segments
    return loss_lib.SequenceScores(batch["s_c"], batch["s_r"], batch["n_c"], batch["n_r"])
  monkeypatch.setattr(loss_lib, "score_pairs", fixed_scores)
  s_c, s_r = np.array([-1.0, -2.0, -1.5], np.float32), np.array([-2.0, -0.5, -1.0], np.float32)
  n_c, n_r = np.array([2.0, 3.0, 4.0], np.float32), np.array([5.0, 1.0, 2.0], np.float32)
  zeros, ones = np.zeros(3, np.float32), np.ones(3, np.float32)
  batch = {"s_c": s_c, "s_r": s_r, "n_c": n_c, "n_r": n_r, "ref_chosen": zeros,
           "ref_rejected": zeros, "outcome": np.array([0.3, 0.8, 0.5], np.float32),
           "weight": ones, "pair_mask": ones}
  first = np.arange(3) == 0  # pair 0 listed the other way round, with o = 0.7
  swapped = {**batch, "s_c": np.where(first, s_r, s_c), "s_r": np.where(first, s_c, s_r),
             "n_c": np.where(first, n_r, n_c), "n_r": np.where(first, n_c, n_r),
             "outcome": np.array([0.7, 0.8, 0.5], np.float32)}
  dpo = loss_lib.make_loss_fn(loss_lib.DirectLoss(name="dpo", beta=0.5, ref_mode="online",
                                                  nll_alpha=1.0))
  (loss, metrics), (loss_s, metrics_s) = (dpo(None, b, jax.random.key(0))
                                          for b in (batch, swapped))
  np.testing.assert_allclose(float(loss), float(loss_s), rtol=1e-6)
  correct = [float(s_r[0] > s_c[0]), float(s_c[1] > s_r[1])]  # the preferred side higher?
  np.testing.assert_allclose(float(metrics["rewards/accuracies"]), (sum(correct) + 0.5) / 3)
  nll = (-s_r[0] / n_r[0] - s_c[1] / n_c[1]) / 3  # the tie adds nothing
  np.testing.assert_allclose(float(metrics["nll"]), nll, rtol=1e-6)
  assert float(metrics_s["rewards/accuracies"]) == float(metrics["rewards/accuracies"])
  # The side each pair's metrics read: pair 0 turned around, the tie (pair 2) as listed.
  preferred, other = [s_r[0], s_c[1], s_c[2]], [s_c[0], s_r[1], s_r[2]]
  for name, expected in (("rewards/chosen", 0.5 * np.mean(preferred)),
                         ("rewards/rejected", 0.5 * np.mean(other)),
                         ("rewards/margins", 0.5 * np.mean(np.subtract(preferred, other))),
                         ("logps/chosen", np.mean(preferred))):
    np.testing.assert_allclose(float(metrics[name]), expected, rtol=1e-6, err_msg=name)


def test_a_registered_loss_of_the_wrong_shape_or_nan_at_padding(monkeypatch):
  """``[B, 1]`` per-pair losses broadcast to ``[B, B]`` (a 16x loss at B = 16) and a scalar
  ignored the pair weights, silently; a NaN at a padding pair made the loss NaN."""
  def fixed_scores(model, batch, num_segments=None):
    del model, num_segments
    return loss_lib.SequenceScores(batch["s_c"], batch["s_r"], batch["n"], batch["n"])
  monkeypatch.setattr(loss_lib, "score_pairs", fixed_scores)
  batch = {"s_c": np.asarray([-1.0, -2.0, 0.0], np.float32),
           "s_r": np.asarray([-2.0, -1.0, 0.0], np.float32),
           "n": np.asarray([2.0, 4.0, 0.0], np.float32),  # the padding pair has no tokens
           "ref_chosen": np.zeros(3, np.float32), "ref_rejected": np.zeros(3, np.float32),
           "outcome": np.ones(3, np.float32), "weight": np.ones(3, np.float32),
           "pair_mask": np.asarray([1.0, 1.0, 0.0], np.float32)}

  def per_token_margin(x, *, beta):  # 0/0 at the padding pair
    return -(x.policy_chosen / x.chosen_tokens - x.policy_rejected / x.rejected_tokens) * beta
  shapes = {"_test_column": lambda x, *, beta: per_token_margin(x, beta=beta)[:, None],
            "_test_scalar": lambda x, *, beta: jnp.mean(per_token_margin(x, beta=beta)),
            "_test_per_token": per_token_margin}
  try:
    for name, fn in shapes.items():
      registry.register_direct_loss(name)(fn)
    for name in ("_test_column", "_test_scalar"):
      loss_fn = loss_lib.make_loss_fn(loss_lib.DirectLoss(name=name, beta=1.0,
                                                          ref_mode="online"))
      with pytest.raises(ValueError, match=rf"direct loss '{name}' returned shape "
                                           r"\(.*\); expected one value per example, \(3,\)"):
        loss_fn(None, batch, jax.random.key(0))
    loss_fn = loss_lib.make_loss_fn(loss_lib.DirectLoss(name="_test_per_token", beta=1.0,
                                                        ref_mode="online"))
    loss, _ = loss_fn(None, batch, jax.random.key(0))
    np.testing.assert_allclose(float(loss), (-(-0.5 + 1.0) - (-0.5 + 0.25)) / 2, rtol=1e-6)
    # Nor in its gradient (a mask on the loss alone gives 0 · NaN there).
    grad = jax.grad(lambda s_c: loss_fn(None, {**batch, "s_c": s_c}, jax.random.key(0))[0])(
        jnp.asarray(batch["s_c"]))
    np.testing.assert_allclose(grad, [-1 / 2 / 2, -1 / 4 / 2, 0.0], rtol=1e-6)
  finally:
    for name in shapes:
      registry.unregister_direct_loss(name)


def test_the_reference_cache_key_holds_the_switches_that_change_bfloat16_rounding():
  config = decoder.DecoderConfig.tiny_llama(vocab_size=11, num_layers=1)
  def describe(dtype, scan):
    return train_dpo.model_description(
        decoder.Decoder(config, rngs=nnx.Rngs(0), dtype=dtype, scan_layers=scan))
  assert describe(jnp.float32, False) == describe(jnp.float32, True)  # same values in f32
  assert describe(jnp.bfloat16, False) != describe(jnp.bfloat16, True)
  assert describe(jnp.bfloat16, True)["scan_layers"] is True
