"""Tests of prefjax.train: schedules, the jitted step, accumulation, NaN guard, loop, sharding."""

import functools
import json
import logging as py_logging
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from prefjax import train
from prefjax.train import checkpoint as checkpoint_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib
from tests import comparisons

IN, HIDDEN = 4, 16


class MLP(nnx.Module):
  """Two-layer regression MLP with ``WIDTH`` hidden units."""
  WIDTH = HIDDEN

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN, self.WIDTH, rngs=rngs)
    self.out = nnx.Linear(self.WIDTH, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))[:, 0]


PARTITION_RULES = [(r"hidden/kernel", P("fsdp", "tensor")), (r"out/kernel", P("tensor", None))]


def mse_loss(model, batch, rng):
  del rng
  err = model(batch["x"]) - batch["y"]
  return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}


def eval_fn(model, batch):
  return {"mse": jnp.mean((model(batch["x"]) - batch["y"])**2), "num_examples": batch["y"].size}


def make_batches(n_batches, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  w = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
  out = []
  for _ in range(n_batches):
    x = rng.normal(size=(batch_size, IN)).astype(np.float32)
    out.append({"x": x, "y": np.sin(x @ w / 2).astype(np.float32)})
  return out


def grain_batches(num_examples=32, seed=1):
  """A grain iterator (its position is checkpointed) of shuffled, repeated batches of 8
  examples ``y = sin(sum(x))``, read without prefetch threads: grain's default 16 would
  read 500 batches ahead in Python, holding the GIL against a loop of a few steps."""
  x = np.random.default_rng(0).normal(size=(num_examples, IN)).astype(np.float32)
  y = np.sin(x.sum(-1))
  examples = [{"x": x[i], "y": y[i]} for i in range(num_examples)]
  dataset = grain.MapDataset.source(examples).shuffle(seed=seed).repeat().batch(8)
  return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0)))


# --- train step --------------------------------------------------------------------------------

def weighted_mse_loss(model, batch, rng):
  """Weighted mean (weights 0 = padding); ``loss_weight`` makes accumulation exact."""
  del rng
  w = batch["w"]
  loss = jnp.sum(w * (model(batch["x"]) - batch["y"])**2) / jnp.sum(w)
  return loss, {"loss_weight": jnp.sum(w), "num_real": jnp.sum(w > 0),
                "y_mean": jnp.sum(w * batch["y"]) / jnp.sum(w)}


def _one_step(loss, accum_steps, batch, presplit=False):
  # SGD: the update is linear in the gradient, so comparing parameters compares gradients.
  # (A first Adam step is ≈ lr·sign(g): ill-conditioned wherever a gradient is near zero.)
  tx = optax.sgd(1e-1)
  graphdef, state = train.create_train_state(MLP(nnx.Rngs(0)), tx, 0)
  fn = train.make_train_step(graphdef, loss, tx, accum_steps=accum_steps, presplit=presplit)
  return jax.jit(fn)(state, batch)


@pytest.mark.parametrize("loss", [mse_loss, weighted_mse_loss], ids=["mean", "weighted"])
def test_gradient_accumulation_equals_big_batch(loss):
  batch = make_batches(1, 32)[0]
  # Uneven real-example counts per microbatch (rows j, j+4, ...): 8, 6, 2, 1.
  batch["w"] = np.ones(32, np.float32)
  batch["w"][[5, 9, 6, 10, 14, 18, 22, 26, 7, 11, 15, 19, 23, 27, 31]] = 0.0
  big, m_big = _one_step(loss, 1, batch)
  micro = [{k: v[i::4] for k, v in batch.items()} for i in range(4)]
  presplit = jax.tree.map(lambda *xs: np.stack(xs), *micro)
  np.testing.assert_array_equal(presplit["w"].sum(1), [8, 6, 2, 1])
  if loss is mse_loss:
    acc, m_acc = _one_step(loss, 4, batch)
  else:  # Presplit batches take the same accumulation path.
    acc, m_acc = _one_step(loss, 4, presplit, presplit=True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
               big.params, acc.params)
  np.testing.assert_allclose(m_big["loss"], m_acc["loss"], rtol=1e-6)
  np.testing.assert_allclose(m_big["grad_norm"], m_acc["grad_norm"], rtol=1e-5)
  if loss is weighted_mse_loss:  # counts add up; means pool by loss_weight
    assert float(m_acc["num_real"]) == float(m_big["num_real"]) == 17.0
    np.testing.assert_allclose(m_acc["y_mean"], m_big["y_mean"], rtol=1e-6)
  # The step really moved the params (so equality above is not trivial).
  _, init = train.create_train_state(MLP(nnx.Rngs(0)), optax.sgd(1e-1), 0)
  assert np.abs(big.params["out"]["kernel"] - init.params["out"]["kernel"]).max() > 1e-3


def test_split_microbatches_is_strided_and_checks_divisibility():
  batch = {"tokens": np.arange(12).reshape(6, 2)}
  micro = step_lib.split_microbatches(batch, 3)
  np.testing.assert_array_equal(micro["tokens"][1], [[2, 3], [8, 9]])
  with pytest.raises(ValueError, match="'tokens'.*divisible by accum_steps=4"):
    step_lib.split_microbatches(batch, 4)
  packed = dict(batch, chosen_index=np.zeros((3, 2), np.int32))
  with pytest.raises(ValueError, match="chosen_index.*presplit"):
    step_lib.split_microbatches(packed, 3)
  # Presplit [M, rows, ...] batches (RL minibatches) split their rows over the devices.
  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  put = train.sharding.put_batch({"tokens": np.zeros((2, 16, 3)), "step": np.zeros(2)}, mesh,
                                 presplit=True)
  assert put["tokens"].sharding.spec == P(None, ("data", "fsdp"))
  with pytest.raises(ValueError, match=r"batch key \['tokens'\]: 12 rows per microbatch "
                                       r"\(shape \(2, 12, 3\)\) are not divisible by the 8"):
    train.sharding.put_batch({"tokens": np.zeros((2, 12, 3))}, mesh, presplit=True)


def test_accumulated_microbatches_that_do_not_split_over_the_devices_are_refused(tmp_path):
  """16 rows in 4 microbatches of 4 on 8 data-parallel devices: each microbatch ran whole on
  every device (replicated, no error; a helper's audit), where presplit batches were refused."""
  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  batches = make_batches(2, 16)

  def run(accum_steps):
    return train.train_loop(
        workdir=str(tmp_path / str(accum_steps)), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
        optimizer={"name": "sgd", "learning_rate": 0.1}, mesh=mesh, train_iter=iter(batches),
        loop=train.LoopConfig(num_steps=2, accum_steps=accum_steps, tensorboard=False))
  assert run(2).summary["final_step"] == 2  # 8 rows per microbatch split over 8 devices
  with pytest.raises(ValueError, match=r"batch key \['x'\]: 4 rows per microbatch \(shape "
                                       r"\(4, \d+\)\) are not divisible by the 8 data-parallel"):
    run(4)


def test_nonscalar_loss_is_a_clear_error():
  graphdef, state = train.create_train_state(MLP(nnx.Rngs(0)), optax.sgd(0.1), 0)
  per_example = lambda m, b, r: (m(b["x"]) - b["y"], {})  # noqa: E731
  fn = train.make_train_step(graphdef, per_example, optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"scalar loss; got shape \(8,\)"):
    fn(state, make_batches(1, 8)[0])


def test_nan_batch_is_skipped_and_counted():
  tx = optax.adam(1e-2)
  graphdef, state = train.create_train_state(MLP(nnx.Rngs(0)), tx, 0)
  fn = jax.jit(train.make_train_step(graphdef, mse_loss, tx))
  good, bad = make_batches(2, 8)
  bad = dict(bad, x=bad["x"].copy())
  bad["x"][3, 1] = np.nan
  state, m1 = fn(state, good)
  before = jax.tree.map(np.array, state.params)
  opt_before = jax.tree.map(np.array, state.opt_state)
  state, m2 = fn(state, bad)
  assert float(m2["update_applied"]) == 0.0 and int(m2["skipped_steps"]) == 1
  assert int(state.step) == 2 and int(state.consecutive_skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, state.params))
  jax.tree.map(np.testing.assert_array_equal, opt_before, state.opt_state)
  state, m3 = fn(state, good)
  assert float(m3["update_applied"]) == 1.0 and int(state.consecutive_skipped) == 0
  assert int(state.skipped_steps) == 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


# --- the loop ------------------------------------------------------------------------------------

def test_train_loop_learns_and_writes_outputs(tmp_path):
  batches = make_batches(80, 16)
  evals = make_batches(2, 32, seed=1)
  opt = train.OptimizerConfig(name="adamw", learning_rate=3e-2, schedule="cosine",
                              warmup_steps=5, total_steps=80, grad_clip_norm=10.0)
  loop = train.LoopConfig(num_steps=80, log_every=5, eval_every=40, checkpoint_every=40)
  result = train.train_loop(
      workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss, optimizer=opt,
      loop=loop, train_iter=iter(batches), config={"opt": opt, "loop": loop},
      evaluators=[train.BatchEvaluator(eval_fn, evals)], tokens_in_batch=lambda b: b["x"].size)
  records = train.read_metrics(tmp_path)
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)) and steps[0] == 5 and steps[-1] == 80
  train_records = [r for r in records if "loss" in r]
  assert train_records[-1]["loss"] < 0.1 * train_records[0]["loss"]
  for r in train_records:
    np.testing.assert_allclose(r["learning_rate"], float(train.make_schedule(opt)(r["step"] - 1)),
                               rtol=1e-5)
    assert r["tokens_per_sec"] > 0 and r["steps_per_sec"] > 0 and r["grad_norm"] > 0
    # The tokens of exactly the steps the record's steps/s counts (the next batch's were
    # counted in, one step ahead).
    np.testing.assert_allclose(r["tokens_per_sec"] / r["steps_per_sec"], 16 * IN, rtol=1e-9)
  evals_logged = [r for r in records if "eval/mse" in r]
  assert [r["step"] for r in evals_logged] == [40, 80]
  assert evals_logged[1]["eval/mse"] < evals_logged[0]["eval/mse"]
  assert evals_logged[1]["eval/num_examples"] == 64
  # Eval mean is the per-example mean over both eval batches.
  model = result.model
  expected = np.mean([(np.asarray(model(b["x"])) - b["y"])**2 for b in evals])
  np.testing.assert_allclose(evals_logged[1]["eval/mse"], expected, rtol=1e-5)

  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["loop"]["num_steps"] == 80
  summary = train.read_summary(str(tmp_path))
  assert summary["final_step"] == 80 and summary["final_eval"]["mse"] == evals_logged[1]["eval/mse"]
  _, template = train.create_train_state(MLP(nnx.Rngs(1)), train.make_optimizer(opt)[0], 0)
  ckpt = train.Checkpointer(tmp_path / "checkpoints", read_only=True)
  restored, _, saved_config = ckpt.restore(template)
  ckpt.close()
  assert int(restored.step) == 80 and saved_config["loop"]["eval_every"] == 40
  assert train.params_sha256(restored.params) == summary["params_sha256"]
  assert train.params_sha256(template.params) != summary["params_sha256"]


@pytest.mark.parametrize("num_batches", [6, 9])  # 9: its last step is also an eval step
def test_a_run_whose_data_ends_early_logs_its_last_steps_train_metrics(tmp_path, num_batches):
  """The loop stops at the data's end; that last step's loss and rates were never logged
  when it was not a log_every step."""
  loop = train.LoopConfig(num_steps=20, log_every=4, eval_every=3, checkpoint_every=0,
                          async_checkpointing=False)
  train.train_loop(workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
                   optimizer=dict(name="sgd", learning_rate=1e-2), loop=loop,
                   train_iter=iter(make_batches(num_batches, 8)),
                   evaluators=[train.BatchEvaluator(eval_fn, make_batches(1, 8, seed=1))])
  records = {r["step"]: r for r in train.read_metrics(tmp_path)}
  assert train.read_summary(str(tmp_path))["final_step"] == num_batches
  last = records[num_batches]
  assert {"loss", "steps_per_sec", "eval/mse"} <= set(last), last
  assert [s for s, r in records.items() if "loss" in r] == [*range(4, num_batches, 4), num_batches]


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def test_evaluators_get_the_current_model_at_every_eval(tmp_path):
  """An evaluator ``fn(step, model) -> metrics`` (README "Adding an evaluator")."""
  evals, seen = make_batches(2, 32, seed=1), []

  def mse_evaluator(step, model):
    graphdef, state = nnx.split(model)
    preds = [np.asarray(_predict(graphdef, state, b["x"])) for b in evals]
    seen.append((step, train.params_sha256(nnx.to_pure_dict(nnx.state(model, nnx.Param)))))
    return {"mse_by_evaluator": np.mean([(p - b["y"])**2 for p, b in zip(preds, evals)])}

  loop = train.LoopConfig(num_steps=6, log_every=1, eval_every=3, tensorboard=False)
  result = train.train_loop(
      workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
      optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop,
      train_iter=iter(make_batches(6, 16)),
      evaluators=[train.BatchEvaluator(eval_fn, evals), mse_evaluator])
  logged = [r for r in train.read_metrics(tmp_path) if "eval/mse_by_evaluator" in r]
  assert [r["step"] for r in logged] == [s for s, _ in seen] == [3, 6]
  assert seen[0][1] != seen[1][1]  # The model of step 3, then that of step 6.
  assert seen[1][1] == result.summary["params_sha256"]
  # The hand evaluator and BatchEvaluator's jitted eval_fn agree; both reach summary.json.
  final = result.summary["final_eval"]
  np.testing.assert_allclose(final["mse_by_evaluator"], final["mse"], rtol=1e-5)
  assert logged[-1]["eval/mse_by_evaluator"] == final["mse_by_evaluator"]


def _sigterm_at(step_to_stop):
  # raise_signal, not os.kill(getpid): the kernel may hand a process-directed signal to
  # another thread, whose handler can then run after the loop has checked for a signal
  # (the run stopped at step 4, not 3, on a loaded CI machine). raise() signals this
  # thread and returns after the handler.
  def hook(step, state, metrics):
    del state, metrics
    if step == step_to_stop:
      signal.raise_signal(signal.SIGTERM)
  return hook


def test_a_preempted_eval_step_is_evaluated_by_the_rerun(tmp_path, caplog):
  """SIGTERM right after step 3's update saves step 3 without its eval; the rerun runs that
  eval before stepping on, so the curve equals an uninterrupted run's. A signal during
  the eval at step 0 saves nothing: the rerun starts afresh."""
  evals, batches = make_batches(2, 32, seed=1), make_batches(6, 16)
  loop = train.LoopConfig(num_steps=6, log_every=1, eval_every=3, checkpoint_every=0,
                          eval_at_start=True, tensorboard=False)

  def run(workdir, hooks=(), evaluators=()):
    return train.train_loop(
        workdir=str(workdir), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
        optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop, train_iter=iter(batches),
        evaluators=[train.BatchEvaluator(eval_fn, evals), *evaluators], hooks=hooks)

  def eval_curve(workdir):
    return [(r["step"], r["eval/mse"]) for r in train.read_metrics(workdir) if "eval/mse" in r]

  reference = run(tmp_path / "reference")
  assert [s for s, _ in eval_curve(tmp_path / "reference")] == [0, 3, 6]
  assert run(tmp_path / "stopped", hooks=[_sigterm_at(3)]).preempted
  assert [s for s, _ in eval_curve(tmp_path / "stopped")] == [0]
  resumed = run(tmp_path / "stopped")
  (steps, mse), (ref_steps, ref_mse) = (zip(*eval_curve(tmp_path / d))
                                        for d in ("stopped", "reference"))
  assert steps == ref_steps and mse == pytest.approx(ref_mse, rel=1e-6)
  assert resumed.summary["params_sha256"] == reference.summary["params_sha256"]

  def sigterm_during_first_eval(step, model):
    del model
    if step == 0:
      signal.raise_signal(signal.SIGTERM)
    return {}

  early = tmp_path / "early"
  assert run(early, evaluators=[sigterm_during_first_eval]).preempted and "nothing was " \
      "saved before step 1, and a rerun with the same workdir starts afresh" in caplog.text
  assert not list((early / "checkpoints").glob("[0-9]*"))


def test_a_stopped_run_is_not_finished_past_a_smaller_num_steps(tmp_path, monkeypatch):
  """Stopped at 5 with no summary yet: a rerun with num_steps=4 wrote final_step 5 as
  finished. And a relative workdir (the Python API) trains and saves: orbax refused it at
  the first save, after the steps."""
  batches = make_batches(8, 16)
  monkeypatch.chdir(tmp_path)

  def run(num_steps, hooks=()):
    loop = train.LoopConfig(num_steps=num_steps, log_every=1, tensorboard=False)
    return train.train_loop(
        workdir="relative", model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
        optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop,
        train_iter=iter(batches), hooks=hooks)

  assert run(8, hooks=[_sigterm_at(5)]).preempted
  assert (tmp_path / "relative" / "checkpoints" / "5").is_dir()
  with pytest.raises(ValueError, match=r"relative holds a checkpoint at step 5, past "
                                       r"loop.num_steps=4: rerun with the num_steps"):
    run(4)
  assert run(5).summary["final_step"] == 5


def test_a_second_run_on_a_busy_workdir_stops_at_once(tmp_path):
  """Two runs on one workdir (a requeued job beside the live one) interleaved checkpoints
  and metrics.jsonl lines; the second now stops before touching anything."""
  from prefjax import files  # pylint: disable=import-outside-toplevel

  def run():
    return train.train_loop(
        workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
        optimizer={"name": "sgd", "learning_rate": 0.1},
        loop=train.LoopConfig(num_steps=2, tensorboard=False),
        train_iter=iter(make_batches(2, 8)))

  with files.exclusive(tmp_path):  # the live run
    with pytest.raises(files.WorkdirBusyError, match=r"is in use by another run"):
      run()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
  assert run().summary["final_step"] == 2  # once it is gone
  with train.hold_workdir(tmp_path):  # a binary's hold: its loop nests inside it
    assert run().summary["final_step"] == 2
    with pytest.raises(files.WorkdirBusyError):  # still held for the binary's export
      with files.exclusive(tmp_path):
        pass
  with files.exclusive(tmp_path):  # released with the outer hold
    pass


def test_a_filesystem_without_flock_runs_without_the_lock(tmp_path, monkeypatch, caplog):
  import errno  # pylint: disable=import-outside-toplevel
  import fcntl  # pylint: disable=import-outside-toplevel
  from prefjax import files  # pylint: disable=import-outside-toplevel

  def no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  with caplog.at_level(py_logging.WARNING):
    with files.exclusive(tmp_path):
      pass
  assert "this filesystem has no flock" in caplog.text


def test_consecutive_nonfinite_steps_abort(tmp_path):
  batches = make_batches(10, 8)
  for b in batches[3:]:
    b["y"] = np.full_like(b["y"], np.inf)
  loop = train.LoopConfig(num_steps=10, log_every=1, max_consecutive_nonfinite=3,
                          tensorboard=False)
  with pytest.raises(train.NonFiniteError, match=r"3 consecutive non-finite steps \(up to "
                                                  r"step 6; its loss=inf, grad_norm=nan: a "
                                                  r"non-finite loss points at the loss"):
    train.train_loop(workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
                     optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop,
                     train_iter=iter(batches))
  records = train.read_metrics(tmp_path)
  assert [r["skipped_steps"] for r in records] == [0, 0, 0, 1, 2, 3]
  assert records[3]["loss"] == "inf"  # JSON has no inf: written as a string.


def test_a_rerun_after_an_attempt_that_saved_nothing_records_its_own_config(tmp_path):
  """The first attempt dies before its first checkpoint; the fixed rerun starts fresh, so
  config.json must describe the rerun (eval_rm rebuilds the model from it)."""
  bad = make_batches(4, 8)
  for b in bad:
    b["y"] = np.full_like(b["y"], np.inf)
  loop = train.LoopConfig(num_steps=4, log_every=1, max_consecutive_nonfinite=2,
                          tensorboard=False)
  kw = dict(workdir=str(tmp_path), loss_fn=mse_loss, loop=loop,
            optimizer={"name": "sgd", "learning_rate": 0.1})
  with pytest.raises(train.NonFiniteError):
    train.train_loop(model=MLP(nnx.Rngs(0)), train_iter=iter(bad), config={"attempt": 1}, **kw)
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"attempt": 1}
  train.train_loop(model=MLP(nnx.Rngs(0)), train_iter=iter(make_batches(4, 8)),
                   config={"attempt": 2}, **kw)
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"attempt": 2}
  assert not (tmp_path / "config.rerun.json").exists()
  # Once a checkpoint exists, the run's config stays and a changed rerun goes beside it ...
  train.write_or_check_config(str(tmp_path), {"attempt": 3})
  with open(tmp_path / "config.json") as f:
    assert json.load(f) == {"attempt": 2}
  with open(tmp_path / "config.rerun.json") as f:
    assert json.load(f) == {"attempt": 3}
  # ... unless the run had finished: nothing trains under it, so it does not stay.
  train.train_loop(model=MLP(nnx.Rngs(0)), train_iter=iter(make_batches(4, 8)),
                   config={"attempt": 3}, **kw)
  assert not (tmp_path / "config.rerun.json").exists()
  train.write_or_check_config(str(tmp_path), {"attempt": 3})
  # A later rerun as the run started leaves no stale diff behind.
  train.write_or_check_config(str(tmp_path), {"attempt": 2})
  assert not (tmp_path / "config.rerun.json").exists()
  # allow_restart, which the error message suggests, is a rerun policy: no difference.
  policy = tmp_path / "policy"
  policy.mkdir()
  train.write_or_check_config(str(policy), {"loop": {"allow_restart": False, "lr": 1}})
  train.write_or_check_config(str(policy), {"loop": {"allow_restart": True, "lr": 1}},
                              on_mismatch="error")
  assert not (policy / "config.rerun.json").exists()


def test_a_strict_rerun_of_a_workdir_that_saved_nothing_says_how_to_start_over(tmp_path):
  train.write_or_check_config(str(tmp_path), {"lr": 1e30})
  with pytest.raises(train.ConfigMismatchError, match="no checkpoint was saved: delete"):
    train.write_or_check_config(str(tmp_path), {"lr": 0.1}, on_mismatch="error",
                                saved_nothing=True)


def test_config_mismatch_warns_with_diff_or_raises(tmp_path, caplog):
  train.write_or_check_config(str(tmp_path), {"lr": 0.1, "seed": 0})
  with caplog.at_level(py_logging.WARNING):
    train.write_or_check_config(str(tmp_path), {"lr": 0.2, "seed": 0})
  assert '-  "lr": 0.1' in caplog.text and '+  "lr": 0.2' in caplog.text
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["lr"] == 0.1
  with pytest.raises(train.ConfigMismatchError, match=r'\+  "seed": 1'):
    train.write_or_check_config(str(tmp_path), {"lr": 0.1, "seed": 1}, on_mismatch="error")


def test_sharded_steps_equal_single_device(tmp_path):
  assert jax.device_count() >= 8
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  batches = make_batches(3, 16)
  loop = train.LoopConfig(num_steps=3, log_every=1, accum_steps=2, tensorboard=False,
                          async_checkpointing=False)
  opt = {"name": "adamw", "learning_rate": 1e-2, "weight_decay": 0.01, "grad_clip_norm": 1.0}
  single = train.train_loop(workdir=str(tmp_path / "single"), model=MLP(nnx.Rngs(0)),
                            loss_fn=mse_loss, optimizer=opt, loop=loop, train_iter=iter(batches))
  with jax.set_mesh(mesh):
    sharded = train.train_loop(workdir=str(tmp_path / "sharded"), model=MLP(nnx.Rngs(0)),
                               loss_fn=mse_loss, optimizer=opt, loop=loop,
                               train_iter=iter(batches), mesh=mesh,
                               partition_rules=PARTITION_RULES)
  kernel = sharded.state.params["hidden"]["kernel"]
  assert kernel.sharding.spec == P("fsdp", "tensor")
  assert len({str(s.index) for s in kernel.addressable_shards}) == 4
  mu = sharded.state.opt_state[1][0].mu["hidden"]["kernel"]  # clip, then adamw's moments
  assert mu.sharding.spec == P("fsdp", "tensor")
  a = [r for r in train.read_metrics(tmp_path / "single") if "loss" in r]
  b = [r for r in train.read_metrics(tmp_path / "sharded") if "loss" in r]
  comparisons.assert_same_first_step(a, b)
  comparisons.assert_losses_close([r["loss"] for r in a], [r["loss"] for r in b])
  comparisons.assert_params_close_after_adam(single.state.params, sharded.state.params,
                                             learning_rate=opt["learning_rate"], steps=3)


def test_checkpoint_restore_rejects_other_model(tmp_path):
  tx = optax.sgd(0.1)
  _, state = train.create_train_state(MLP(nnx.Rngs(0)), tx, 0)
  ckpt = train.Checkpointer(tmp_path, async_save=False)
  ckpt.save(state, data_state={"next_index": 0})

  class Wider(MLP):
    WIDTH = HIDDEN + 1

  _, other = train.create_train_state(Wider(nnx.Rngs(0)), tx, 0)
  with pytest.raises(ValueError, match=r"does not match the model/optimizer being trained "
                                       r"\(changed architecture or optimizer\?\)") as error:
    ckpt.restore(other)
  # A workdir a binary started names it (e.g. a train_dpo rerun into a train_rm workdir).
  workdir = tmp_path / "run"
  shutil.copytree(tmp_path, workdir / "checkpoints",
                  ignore=lambda folder, names: ["run"] if folder == str(tmp_path) else [])
  train.summary.append_run_record(str(workdir), {"argv": ["/x/experiments/train_rm.py"]})
  named = train.Checkpointer(workdir / "checkpoints", async_save=False)
  with pytest.raises(ValueError, match=r"\(changed architecture or optimizer\? this workdir was "
                                       r"started by experiments\.train_rm\)"):
    named.restore(other)
  named.close()
  assert str(error.value).endswith("; to train this model and optimizer, use a new --workdir")
  # Named from the checkpoint's metadata before any read: the parameters first.
  assert (f"arrays differing in shape (3): params/hidden/bias: checkpoint ({HIDDEN},), model "
          f"({HIDDEN + 1},); params/hidden/kernel: checkpoint ({IN}, {HIDDEN}), model "
          f"({IN}, {HIDDEN + 1}); params/out/kernel") in str(error.value)
  with pytest.raises(ValueError, match=r"params do not match the model: arrays differing in "
                                       r"shape \(3\)"):
    ckpt.restore_params(state_lib.split_model(Wider(nnx.Rngs(0)), nnx.Param)[1])
  ckpt.close()


def test_checkpoint_metadata_names_every_array_as_the_state_does(tmp_path):
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  _, state = train.create_train_state(MLP(nnx.Rngs(0)), tx, 0)
  ckpt = train.Checkpointer(tmp_path, async_save=False)
  ckpt.save(state, data_state={"next_index": 0})
  wanted = checkpoint_lib.array_shapes(checkpoint_lib.to_savable(state))
  assert "opt_state/1/0/mu/hidden/kernel" in wanted and "params/out/bias" in wanted
  assert ckpt.saved_shapes(0) == wanted  # Else a sound restore would be refused.
  ckpt.close()


def test_shape_mismatches_lists_each_kind_up_to_the_limit():
  saved = {"params/a": (2,), "params/b": (3,), "opt/c": (1,), "params/old": (4,)}
  wanted = {"params/a": (2,), "params/b": (5,), "opt/c": (2,), "params/new": (1,)}
  assert checkpoint_lib.shape_mismatches(saved, saved) is None
  assert checkpoint_lib.shape_mismatches(saved, wanted) == (
      "arrays differing in shape (2): params/b: checkpoint (3,), model (5,); "
      "opt/c: checkpoint (1,), model (2,). arrays only in the model (1): params/new. "
      "arrays only in the checkpoint (1): params/old")
  assert checkpoint_lib.shape_mismatches(saved, wanted, subtree="opt/", limit=1) == (
      "arrays differing in shape (2): params/b: checkpoint (3,), model (5,); … 1 more. "
      "arrays only in the model (1): params/new")
  # A restore of the params alone: the optimizer's arrays are not extra, its params are.
  params = {k: v for k, v in saved.items() if k.startswith("params/")}
  assert checkpoint_lib.shape_mismatches(saved, params, subtree="params/") is None
  del params["params/old"]  # e.g. a model built with fewer layers than the run's
  assert checkpoint_lib.shape_mismatches(saved, params, subtree="params/") == (
      "arrays only in the checkpoint (1): params/old")


def test_key_data_roundtrip():
  tree = {"k": jax.random.key(3), "x": jnp.ones(2)}
  saved = checkpoint_lib.to_savable(tree)
  assert saved["k"].dtype == jnp.uint32
  back = checkpoint_lib.from_savable(saved, tree)
  np.testing.assert_array_equal(jax.random.key_data(back["k"]), jax.random.key_data(tree["k"]))


class PolicyWithReference(nnx.Module):
  """A trained policy beside a frozen copy (as a DPO reference model)."""

  def __init__(self, rngs: nnx.Rngs):
    self.policy = MLP(rngs)
    self.reference = MLP(rngs)


def test_trainable_filter_freezes_reference_model():
  tx = optax.sgd(0.1)
  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("reference")))
  graphdef, state = train.create_train_state(PolicyWithReference(nnx.Rngs(0)), tx, 0,
                                             trainable=trainable)
  assert set(state.params) == {"policy"} and set(state.extra) == {"reference"}
  ref_before = jax.tree.map(np.array, state.extra["reference"])
  policy_before = jax.tree.map(np.array, state.params["policy"])

  def margin_loss(model, batch, rng):
    del rng
    margin = model.policy(batch["x"]) - model.reference(batch["x"]) - batch["y"]
    return jnp.mean(margin**2), {}

  fn = jax.jit(train.make_train_step(graphdef, margin_loss, tx, trainable=trainable))
  state, _ = fn(state, make_batches(1, 8)[0])
  jax.tree.map(np.testing.assert_array_equal, ref_before, state.extra["reference"])
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), policy_before, state.params["policy"])
  assert min(jax.tree.leaves(moved)) > 0
  # The frozen weights are sharded by the same partition rules as the trained ones.
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  shardings = train.state_shardings(state, mesh, PARTITION_RULES)
  assert shardings.extra["reference"]["hidden"]["kernel"].spec == P("fsdp", "tensor")
  assert shardings.params["policy"]["hidden"]["kernel"].spec == P("fsdp", "tensor")
