"""Tests of prefjax.train's evaluators and of what a run records: held-out evals under
several processes, @best after a preempted eval, TensorBoard flushes, summary.json, and
the metrics a loss_fn may return."""

import json
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prefjax import experiment
from prefjax import files
from prefjax import train
from prefjax.train import checkpoint as checkpoint_lib
from prefjax.train import evaluators as evaluators_lib
from prefjax.train import summary as summary_lib
from tests.test_train_core import IN, MLP, _sigterm_at, make_batches, mse_loss


def test_a_preempted_eval_step_is_ranked_for_best_by_the_rerun(tmp_path):
  """With ``best_metric``, the step whose eval the rerun ran (saved without it) is saved
  again with its metrics: ``@best`` finds it as in an uninterrupted run."""
  batches = make_batches(6, 16)
  loop = train.LoopConfig(num_steps=6, log_every=1, eval_every=3, checkpoint_every=0,
                          best_metric="score", best_mode="min", keep_best=1,
                          keep_checkpoints=1, tensorboard=False)
  score_at = lambda step, model: {"score": 0.5 if step == 3 else 1.0}  # step 3 is best

  def run(workdir, hooks=()):
    return train.train_loop(
        workdir=str(workdir), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
        optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop, train_iter=iter(batches),
        evaluators=[score_at], hooks=hooks)

  best = lambda d: checkpoint_lib.saved_step(d, "best", best_metric="score", best_mode="min")
  reference = run(tmp_path / "reference")
  assert best(tmp_path / "reference") == reference.summary["best_checkpoint_step"] == 3
  assert run(tmp_path / "stopped", hooks=[_sigterm_at(3)]).preempted
  resumed = run(tmp_path / "stopped")
  assert best(tmp_path / "stopped") == resumed.summary["best_checkpoint_step"] == 3
  model = checkpoint_lib.load_params(str(tmp_path / "stopped"), MLP(nnx.Rngs(1)), step=3)
  want = checkpoint_lib.load_params(str(tmp_path / "reference"), MLP(nnx.Rngs(1)), step=3)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model), nnx.state(want))


def test_batch_evaluator_weights_by_tokens_when_asked():
  model = MLP(nnx.Rngs(0))
  data = [{"x": np.ones((2, IN), np.float32), "w": np.float32(1.0)},
          {"x": np.zeros((2, IN), np.float32), "w": np.float32(3.0)}]
  by_tokens = lambda m, b: {"v": jnp.mean(b["x"]), "num_tokens": b["w"]}
  assert train.BatchEvaluator(by_tokens, data)(0, model) == {"v": pytest.approx(0.25),
                                                             "num_tokens": 4.0}
  unweighted = lambda m, b: {"v": jnp.mean(b["x"])}
  assert train.BatchEvaluator(unweighted, data)(0, model) == {"v": 0.5, "num_batches": 2.0}
  both = lambda m, b: {"v": jnp.mean(b["x"]), "num_tokens": b["w"], "num_examples": b["w"]}
  with pytest.raises(ValueError, match="one weight per batch"):
    train.BatchEvaluator(both, data)(0, model)


def test_batch_evaluator_pads_processes_with_empty_batches_of_weight_zero():
  """Several processes: a process with fewer eval batches joins the last global steps
  with empty ones (masks zeroed); they add weight 0 and no 0/0 metric."""
  model = MLP(nnx.Rngs(0))
  batch = lambda v, n: {"x": np.full((2, IN), v, np.float32),
                        "pair_mask": np.asarray([1.0] * n + [0.0] * (2 - n), np.float32)}
  data = [batch(1.0, 2), batch(3.0, 1)]
  padded = evaluators_lib.padded_to(data, np.asarray([2, 4]))
  assert len(padded) == 4 and all(p["pair_mask"].sum() == 0 for p in padded[2:])
  np.testing.assert_array_equal(padded[2]["x"], data[0]["x"])
  assert evaluators_lib.padded_to(data, np.asarray([2, 2])) == data

  def masked_mean(m, b):
    n = jnp.sum(b["pair_mask"])
    return {"v": jnp.sum(b["x"][:, 0] * b["pair_mask"]) / n, "num_examples": n}  # 0/0: NaN
  got = train.BatchEvaluator(masked_mean, padded)(0, model)
  assert got == {"v": pytest.approx((1.0 + 1.0 + 3.0) / 3), "num_examples": 3.0}
  with pytest.raises(ValueError, match="pair_mask"):
    evaluators_lib.padded_to([{"x": data[0]["x"]}], np.asarray([1, 2]))
  for mine in ([], data):  # the process without batches and the others alike
    with pytest.raises(ValueError, match=r"a process has no eval batches .*\[0, 2\]"):
      evaluators_lib.padded_to(mine, np.asarray([0, 2]))
  with pytest.raises(ValueError, match="no real examples"):
    train.BatchEvaluator(masked_mean, padded[2:])(0, model)


def test_tensorboard_holds_every_record_up_to_the_last_checkpoint(tmp_path):
  """A run killed after a checkpoint resumes there and purges TensorBoard's later steps:
  what came before must be on disk (tensorboardX flushes every 2 minutes)."""
  seen = []

  def read_events(step, state, metrics):
    del state, metrics
    if step == 3:  # dispatched after step 2's checkpoint, before step 3 is logged
      events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
      seen.append(b"".join(f.read_bytes() for f in events))

  loop = train.LoopConfig(num_steps=4, log_every=1, eval_every=0, checkpoint_every=2,
                          tensorboard=True)
  train.train_loop(workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
                   optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop,
                   train_iter=iter(make_batches(4, 8)), hooks=[read_events])
  assert len(seen) == 1 and b"grad_norm" in seen[0]


def test_the_tensorboard_writer_leaves_pytorch_unloaded(tmp_path):
  """tensorboardX imports torch when it is installed: 120 MB more, its threads, and RSS
  that grew by 8 KB a logged step in an RL run."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  probe = ("import sys\n"
           "from prefjax.train import metrics\n"
           "writer = metrics.MetricWriter(sys.argv[1], tensorboard=True)\n"
           "writer.write(1, {'loss': 0.5})\n"
           "writer.close()\n"
           "print('torch' in sys.modules)\n")
  done = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True,
                        text=True, timeout=300, check=True)
  assert done.stdout.strip().splitlines()[-1] == "False", done.stdout + done.stderr
  events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert len(events) == 1 and b"loss" in events[0].read_bytes()


def test_summary_json_stays_standard_json_with_non_finite_numbers(tmp_path):
  summary_lib.write_summary(str(tmp_path), {"final_eval": {"nll": float("nan"), "ok": 1.5},
                                          "final_perplexity": float("inf"),
                                          "curve": [np.float32("-inf"), 2.0]})
  text = (tmp_path / "summary.json").read_text()
  parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
  assert parsed == {"final_eval": {"nll": "nan", "ok": 1.5}, "final_perplexity": "inf",
                    "curve": ["-inf", 2.0]}


def _strict_json(text):
  return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))


def test_write_json_writes_non_finite_numbers_as_strings_and_read_json_restores_them(
    tmp_path):
  path = tmp_path / "nested" / "eval_3.json"
  summary_lib.write_json(path, {"acc": np.float32("nan"), "bins": np.array([np.inf, 0.5]),
                                "loss": jnp.float32(-np.inf), "rows": (1, float("nan"))})
  assert _strict_json(path.read_text()) == {"acc": "nan", "bins": ["inf", 0.5],
                                            "loss": "-inf", "rows": [1, "nan"]}
  back = files.read_json(path)
  assert np.isnan(back["acc"]) and back["bins"] == [np.inf, 0.5] and back["loss"] == -np.inf
  assert back["rows"][0] == 1 and np.isnan(back["rows"][1])


def test_dumps_refuses_a_non_finite_number_standard_json_cannot_see():
  with pytest.raises(ValueError, match="not JSON compliant"):
    files.dumps({"x": object()}, default=lambda o: float("nan"))


def test_metrics_jsonl_rewritten_on_resume_stays_standard_json(tmp_path):
  """An older metrics.jsonl with bare NaN lines is rewritten on resume as standard JSON;
  the trainer's own records round-trip to floats through from_standard_json."""
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.0}\n')
  writer = train.MetricWriter(tmp_path, resume_step=2, tensorboard=False)
  writer.log(3, {"loss": float("inf")})
  writer.close()
  lines = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in lines] == [(1, "nan"), (2, 1.0), (3, "inf")]
  losses = [files.from_standard_json(r)["loss"] for r in train.read_metrics(tmp_path)]
  assert np.isnan(losses[0]) and losses[1:] == [1.0, np.inf]


def test_read_summary_gives_non_finite_numbers_back_as_floats(tmp_path):
  summary_lib.write_summary(str(tmp_path), {"final_eval": {"nll": float("nan")},
                                          "final_perplexity": float("inf")})
  summary = train.read_summary(str(tmp_path))
  assert np.isnan(summary["final_eval"]["nll"]) and summary["final_perplexity"] == np.inf


def test_loss_fn_metrics_that_the_step_would_overwrite_or_cannot_log_are_errors():
  model = MLP(nnx.Rngs(0))
  graphdef, state = train.create_train_state(model, optax.sgd(0.1), 0)
  batch = make_batches(1, 8)[0]

  def with_metrics(metrics):
    return lambda m, b, rng: (mse_loss(m, b, rng)[0], metrics)
  cases = {"'grad_norm'\\] are names the train step writes": {"grad_norm": 7.0},
           "metric 'nested' must be a scalar array or number; got dict": {"nested": {"a": 1}},
           "metric 'label' must be a scalar array or number; got str": {"label": "hello"}}
  for message, metrics in cases.items():
    step_fn = train.make_train_step(graphdef, with_metrics(metrics), optax.sgd(0.1))
    with pytest.raises((ValueError, TypeError), match=message):
      step_fn(state, batch)
  step_fn = train.make_train_step(graphdef, with_metrics({"flag": np.bool_(True)}),
                                  optax.sgd(0.1))
  assert float(step_fn(state, batch)[1]["flag"]) == 1.0


def test_the_first_progress_line_gives_no_eta_from_its_compiling_interval(tmp_path,
                                                                          monkeypatch):
  """The first interval's rate includes compilation: an ETA from it was off by as much as
  the compile time over the steps left (hours at log_every=1 for a long run)."""
  from absl import logging  # pylint: disable=import-outside-toplevel
  from prefjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  lines = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: lines.append(fmt % args))
  now = [0.0]
  monkeypatch.setattr(metrics_lib.time, "time", lambda: now[0])
  writer = metrics_lib.MetricWriter(tmp_path, total_steps=102, tensorboard=False)
  now[0] = 40.0  # step 2 after 40 s, compiling
  writer.log(2, {"loss": 1.0})
  now[0] = 41.0  # step 4 one second later
  writer.log(4, {"loss": 0.5})
  progress = [line for line in lines if line.startswith("step ")]
  assert "compilation included; ETA from the next line" in progress[0], progress
  assert "ETA 0:49" in progress[1], progress  # 98 steps left at 2 steps/s


def test_a_signal_during_the_final_eval_is_not_lost(tmp_path):
  """A SIGTERM that came during the last step's eval was dropped when the loop restored
  the signal handlers: the binary went on to its work after training and exited 0 (demo
  ran two more stages)."""
  import os
  import signal
  batches = make_batches(4, 16)
  loop = train.LoopConfig(num_steps=4, log_every=1, eval_every=4, checkpoint_every=0,
                          tensorboard=False)

  def terminated_at_the_end(step, model):
    del model
    if step == 4:
      signal.raise_signal(signal.SIGTERM)
    return {"score": 1.0}

  result = train.train_loop(
      workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
      optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop, train_iter=iter(batches),
      evaluators=[terminated_at_the_end])
  assert result.preempted
  assert result.summary["final_step"] == 4 and result.summary["final_eval"] == {"score": 1.0}
  assert summary_lib.read_summary(str(tmp_path))["final_step"] == 4  # finished and saved


def test_training_low_precision_parameters_or_a_low_precision_policy_is_warned_about(caplog):
  """bfloat16 parameters under Adam at lr 5e-7 changed 0.6% of their entries in 50 steps
  (float32: 98%); a bfloat16 policy's log-ratios carry rounding noise (README, Precision)."""
  with caplog.at_level(logging.WARNING, logger="absl"):
    train.create_train_state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), optax.adam(1e-3), 0)
    assert not caplog.records
    train.create_train_state(nnx.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                             optax.adam(1e-3), 0)
    experiment.warn_low_precision_policy(types.SimpleNamespace(dtype=jnp.float32), "train_dpo")
    experiment.warn_low_precision_policy(types.SimpleNamespace(dtype=jnp.float16), "train_rl")
  said = [r.getMessage() for r in caplog.records]
  assert len(said) == 2, said
  assert said[0].startswith("trainable parameters in bfloat16: an update below its resolution")
  assert said[1].startswith("train_rl: the policy computes in float16, so its log-ratios")
  assert said[1].endswith("float16 also runs without loss scaling here")
