"""Kill-and-resume: interrupted runs rerun with the same workdir end bit-identical."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from prefjax import train
from tests import test_train_core

IN, HIDDEN, STEPS = test_train_core.IN, 16, 12


class DropoutMLP(nnx.Module):
  """MLP with dropout: its RNG stream counter lives in the non-param ``extra`` state."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.drop = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(jnp.tanh(self.hidden(x))))[:, 0]


def loss_fn(model, batch, rng):
  # The step RNG weights examples, so a wrong RNG on resume changes the params.
  weight = jax.random.uniform(rng, batch["y"].shape, minval=0.5, maxval=1.5)
  loss = jnp.mean(weight * (model(batch["x"]) - batch["y"])**2)
  return loss, {}


def eval_fn(model, batch):
  model.eval()
  mse = jnp.mean((model(batch["x"]) - batch["y"])**2)
  return {"mse": mse, "neg_mse": -mse}


EVAL_DATA = [{"x": np.ones((4, IN), np.float32), "y": np.zeros(4, np.float32)}]
LOOP = train.LoopConfig(num_steps=STEPS, log_every=1, eval_every=4, checkpoint_every=2,
                        keep_checkpoints=2, best_metric="neg_mse", best_mode="min",
                        accum_steps=2, tensorboard=False)
OPT = {"name": "adamw", "learning_rate": 3e-2, "schedule": "linear", "total_steps": STEPS,
       "warmup_steps": 2, "weight_decay": 0.01}


def run(workdir, hooks=(), train_iter=None):
  train_iter = test_train_core.grain_batches(40, seed=3) if train_iter is None else train_iter
  result = train.train_loop(workdir=str(workdir), model=DropoutMLP(nnx.Rngs(0)),
                            loss_fn=loss_fn, optimizer=OPT, loop=LOOP, train_iter=train_iter,
                            config={"opt": OPT, "loop": LOOP},
                            evaluators=[train.BatchEvaluator(eval_fn, EVAL_DATA)], hooks=hooks)
  return result, train_iter


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result, train_iter = run(workdir)
  return workdir, result, train_iter.get_state()


def _stop_at(step_to_stop, action):
  def hook(step, state, metrics):
    del state, metrics
    if step == step_to_stop:
      action()
  return hook


def _raise(exc):
  def action():
    raise exc
  return action


def assert_same_run(workdir, reference, train_iter):
  ref_dir, ref_result, ref_iter_state = reference
  summary = train.read_summary(str(workdir))
  assert summary["final_step"] == STEPS
  assert summary["params_sha256"] == ref_result.summary["params_sha256"]
  assert train_iter.get_state() == ref_iter_state
  ref_records = train.read_metrics(ref_dir)
  records = train.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  np.testing.assert_array_equal([r["loss"] for r in records], [r["loss"] for r in ref_records])
  np.testing.assert_array_equal([r.get("eval/mse", -1) for r in records],
                                [r.get("eval/mse", -1) for r in ref_records])
  # Best-checkpoint retention survives resumes (orbax metrics persisted on disk).
  assert _all_checkpoints(workdir) == _all_checkpoints(ref_dir)


def test_reference_run_keeps_last_and_best_checkpoints(reference):
  workdir, result, _ = reference
  evals = [r for r in train.read_metrics(workdir) if "eval/neg_mse" in r]
  assert [r["step"] for r in evals] == [4, 8, 12]
  best = min(evals, key=lambda r: r["eval/neg_mse"])["step"]
  assert best in (4, 8)  # So keeping it is visible beside the latest two.
  ckpt = train.Checkpointer(workdir / "checkpoints", read_only=True)
  assert sorted(ckpt.all_steps()) == [best, 10, 12]
  assert result.summary["best_checkpoint_step"] == best
  ckpt.close()
  losses = [r["loss"] for r in train.read_metrics(workdir)]
  assert losses[-1] < losses[0]
  assert result.summary["skipped_steps"] == 0


def _all_checkpoints(workdir):
  ckpt = train.Checkpointer(workdir / "checkpoints", read_only=True)
  steps = sorted(ckpt.all_steps())
  ckpt.close()
  return steps


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from tests import conftest  # noqa: F401  (8 CPU devices, as in the parent)
from tests import test_checkpoint_resume as t
t.run({workdir!r}, hooks=[t._stop_at(7, lambda: os.kill(os.getpid(), signal.SIGKILL))])
"""


def _latest_checkpoint(workdir):
  ckpt = train.Checkpointer(workdir / "checkpoints", read_only=True)
  latest = ckpt.latest_step()
  ckpt.close()
  return latest


def test_sigterm_sigkill_and_ctrl_c_then_rerun_is_bit_identical(tmp_path, reference):
  # 1. SIGTERM after step 3 (not a checkpoint step): graceful save at 3 and return.
  result, _ = run(tmp_path, hooks=[_stop_at(3, lambda: signal.raise_signal(signal.SIGTERM))])
  assert result.preempted and int(result.state.step) == 3
  assert _latest_checkpoint(tmp_path) == 3
  assert not os.path.exists(tmp_path / "summary.json")
  # 2. Resume at 3 in a subprocess that is SIGKILLed right after dispatching step 7
  #    (no cleanup at all; the async save of step 6 may still be in flight).
  proc = subprocess.run([sys.executable, "-c", _KILLED_RUN.format(repo=REPO,
                                                                  workdir=str(tmp_path))],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert _latest_checkpoint(tmp_path) in (4, 6)  # 6 unless its save was cut off.
  assert max(r["step"] for r in train.read_metrics(tmp_path)) >= 6
  # 3. Resume at 6, Ctrl-C (KeyboardInterrupt) after step 9: saved at 9, re-raised.
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path, hooks=[_stop_at(9, _raise(KeyboardInterrupt()))])
  assert _latest_checkpoint(tmp_path) == 9
  # 4. Resume at 9 and finish: identical params, metrics and data position.
  result, train_iter = run(tmp_path)
  assert not result.preempted
  assert_same_run(tmp_path, reference, train_iter)
  # 5. A rerun of a finished workdir trains nothing and reports the same summary.
  again, _ = run(tmp_path)
  assert again.summary == result.summary


def test_load_params_latest_and_best(reference):
  workdir, result, _ = reference
  with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
    train.load_params(workdir / "missing", DropoutMLP(nnx.Rngs(7)))
  model = train.load_params(workdir, DropoutMLP(nnx.Rngs(7)))
  assert train.params_sha256(train.split_model(model)[1]) == result.summary["params_sha256"]
  evals = [r for r in train.read_metrics(workdir) if "eval/neg_mse" in r]
  best = min(evals, key=lambda r: r["eval/neg_mse"])
  best_model = train.load_params(workdir, DropoutMLP(nnx.Rngs(7)), step="best",
                                 best_metric="neg_mse", best_mode="min")
  best_model.eval()
  x, y = EVAL_DATA[0]["x"], EVAL_DATA[0]["y"]
  np.testing.assert_allclose(float(jnp.mean((best_model(x) - y)**2)), best["eval/mse"],
                             rtol=1e-6)
  # "best" without a metric ranks as the run did (its config.json's loop.best_metric/mode),
  # and WORKDIR@best / @STEP name a checkpoint where configs take one path.
  ckpt = train.checkpoint
  assert ckpt.saved_step(workdir, "best") == best["step"] != ckpt.saved_step(workdir)
  as_run_ranked = train.load_params(workdir, DropoutMLP(nnx.Rngs(7)), step="best")
  assert (train.params_sha256(train.split_model(as_run_ranked)[1])
          == train.params_sha256(train.split_model(best_model)[1]))
  assert ckpt.split_ref(f"{workdir}@best") == (str(workdir), "best")
  assert ckpt.split_ref(f"{workdir}@{best['step']}") == (str(workdir), best["step"])
  assert ckpt.split_ref(workdir) == (str(workdir), None)
  assert ckpt.checkpoint_identity(f"{workdir}@best")["step"] == best["step"]
  with pytest.raises(ValueError, match=r"what follows the last '@' must be latest, best"):
    ckpt.split_ref("/runs/rm@v2")


def test_best_of_a_run_ranked_by_no_metric_says_so(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps({"loop": {"best_metric": None}}))
  with pytest.raises(ValueError, match="trained without loop.best_metric, so no checkpoint "
                                       "of it is ranked best; use @latest or @STEP"):
    train.load_params(tmp_path, DropoutMLP(nnx.Rngs(7)), step="best")


class HiddenOnly(nnx.Module):
  """DropoutMLP without its output layer: fewer parameters than the checkpoint holds."""

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(IN, HIDDEN, rngs=rngs)


def test_load_params_refuses_what_the_model_lacks_and_ranks_as_the_metric_says(reference):
  workdir, _, _ = reference
  steps = _all_checkpoints(workdir)
  with pytest.raises(FileNotFoundError,
                     match=re.escape(f"has no checkpoint step 5; its steps: {steps}")):
    train.load_params(workdir, DropoutMLP(nnx.Rngs(7)), step=5)
  # Arrays of the run that the model lacks (a model built with fewer layers) used to be
  # dropped without a word.
  with pytest.raises(ValueError, match=r"arrays only in the checkpoint \(2\): "
                                       r"params/out/bias; params/out/kernel"):
    train.load_params(workdir, HiddenOnly(nnx.Rngs(7)))
  # "best" ranks as the metric's name says unless best_mode is given (it used to be min).
  kept = {r["step"]: r["eval/mse"] for r in train.read_metrics(workdir)
          if "eval/mse" in r and r["step"] in steps}
  lowest, highest = min(kept, key=kept.get), max(kept, key=kept.get)
  assert lowest != highest
  saved_step = train.checkpoint.saved_step
  assert saved_step(workdir, "best", best_metric="mse") == lowest
  assert saved_step(workdir, "best", best_metric="neg_mse") == lowest
  assert saved_step(workdir, "best", best_metric="neg_mse", best_mode="min") == highest
  # A name that gives no direction needs best_mode for "best" only.
  assert saved_step(workdir, steps[-1], best_metric="score") == steps[-1]
  assert saved_step(workdir, str(steps[0])) == steps[0]  # a command line's step
  with pytest.raises(ValueError, match=r"step='last': expected a step number, 'latest' or"):
    saved_step(workdir, "last")
  with pytest.raises(ValueError, match=r"best_metric='score': pass best_mode='min' or 'max'"):
    saved_step(workdir, "best", best_metric="score")


def test_best_step_ignores_a_nan_metric(tmp_path):
  """NaN compared as neither better nor worse, so a NaN first in line won either way."""
  model = DropoutMLP(nnx.Rngs(0))
  for mode, values, best in (("max", [float("nan"), 0.2, 0.9], 3),
                             ("min", [float("nan"), 0.9, 0.1], 3)):
    ckpt = train.Checkpointer(tmp_path / mode, best_metric="acc", best_mode=mode,
                              keep_last=3, async_save=False)
    _, state = train.create_train_state(model, optax.sgd(0.1), 0)
    for step, value in enumerate(values, start=1):
      ckpt.save(state.replace(step=step), metrics={"acc": value})
    assert ckpt.best_step() == best
    ckpt.close()
    # Orbax's saved metrics are standard JSON ("nan"), and a reopened run ranks the same.
    nan_step = (tmp_path / mode / "1" / "metrics" / "metrics").read_text()
    assert json.loads(nan_step, parse_constant=pytest.fail) == {"acc": "nan"}
    reopened = train.Checkpointer(tmp_path / mode, best_metric="acc", best_mode=mode,
                                  read_only=True)
    assert reopened.best_step() == best
    reopened.close()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_tie_for_best_is_the_latest_step_whatever_is_kept(tmp_path, mode):
  """Orbax's BestN keeps the latest of tied steps; in min mode best_step named the earliest
  while it was still kept (keep_last=3: step 2) and the latest once it was not (1: step 3)."""
  values = [0.5, 0.3, 0.3, 0.6] if mode == "min" else [0.5, 0.7, 0.7, 0.4]
  _, state = train.create_train_state(DropoutMLP(nnx.Rngs(0)), optax.sgd(0.1), 0)
  for keep_last in (1, 3):
    ckpt = train.Checkpointer(tmp_path / f"{mode}{keep_last}", best_metric="loss",
                              best_mode=mode, keep_last=keep_last, keep_best=1, async_save=False)
    for step, value in enumerate(values, start=1):
      ckpt.save(state.replace(step=step), metrics={"loss": value})
    assert 3 in ckpt.all_steps() and ckpt.best_step() == 3, (keep_last, ckpt.all_steps())
    ckpt.close()


@pytest.mark.parametrize("mode,values", [("min", [0.3, float("nan"), 0.5]),
                                         ("min", [0.3, 0.5, float("nan"), 0.7]),
                                         ("max", [0.9, float("nan"), 0.5])])
def test_a_nan_metric_never_costs_the_best_checkpoint_its_place(tmp_path, mode, values):
  """Orbax's ``BestN`` sorts with ``sorted``, where a NaN breaks the order: with one best
  kept, step 1 (the best) was deleted and the last step kept as "best"."""
  ckpt = train.Checkpointer(tmp_path, best_metric="loss", best_mode=mode, keep_last=1,
                            keep_best=1, async_save=False)
  _, state = train.create_train_state(DropoutMLP(nnx.Rngs(0)), optax.sgd(0.1), 0)
  for step, value in enumerate(values, start=1):
    ckpt.save(state.replace(step=step), metrics={"loss": value})
  assert ckpt.all_steps() == [1, len(values)] and ckpt.best_step() == 1
  ckpt.close()


def test_a_rerun_that_ranks_by_another_metric_saves_beside_the_old_checkpoints(tmp_path):
  """Orbax ranks every kept step by the new best_metric: steps saved without it raised
  KeyError at each save, and the workdir could not be resumed."""
  _, state = train.create_train_state(DropoutMLP(nnx.Rngs(0)), optax.sgd(0.1), 0)
  ckpt = train.Checkpointer(tmp_path, best_metric="acc", best_mode="max", keep_last=1,
                            keep_best=1, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(state.replace(step=step), metrics={"acc": 0.1 * step})
  ckpt.close()
  ckpt = train.Checkpointer(tmp_path, best_metric="loss", best_mode="min", keep_last=1,
                            keep_best=1, async_save=False)
  ckpt.save(state.replace(step=4), metrics={"acc": 0.9, "loss": 0.25})
  ckpt.save(state.replace(step=5), metrics={"acc": 0.8, "loss": 0.5})
  assert ckpt.all_steps() == [4, 5] and ckpt.best_step() == 4
  ckpt.close()


def test_a_final_eval_after_the_data_ran_out_ranks_the_checkpoint_saved_before_it(tmp_path):
  """4 batches for 10 steps, eval every 3, checkpoint every 2: step 4 is saved in the loop
  without metrics, then evaluated when the data runs out; ``@best`` must know that eval."""
  batches = test_train_core.make_batches(4, 16, seed=0)
  evals = test_train_core.make_batches(1, 16, seed=1)
  result = train.train_loop(
      workdir=str(tmp_path), model=test_train_core.MLP(nnx.Rngs(0)),
      loss_fn=test_train_core.mse_loss, optimizer={"name": "sgd", "learning_rate": 0.05},
      train_iter=iter(batches),
      evaluators=[train.BatchEvaluator(test_train_core.eval_fn, evals)],
      loop=train.LoopConfig(num_steps=10, eval_every=3, checkpoint_every=2, keep_checkpoints=1,
                            best_metric="mse", keep_best=1, tensorboard=False,
                            async_checkpointing=False))
  curve = {r["step"]: r["eval/mse"] for r in train.read_metrics(str(tmp_path))
           if "eval/mse" in r}
  assert sorted(curve) == [3, 4] and result.summary["final_step"] == 4
  best = min(curve, key=curve.get)
  assert result.summary["best_checkpoint_step"] == best
  saved = json.loads((tmp_path / "checkpoints" / "4" / "metrics" / "metrics").read_text())
  assert saved["mse"] == pytest.approx(curve[4])


def test_metric_writer_truncates_on_resume_and_merges_same_step(tmp_path):
  writer = train.MetricWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3):
    writer.log(step, {"loss": float(step)})
  writer.close()
  # Resume from a checkpoint at step 2: step 3 will be recomputed, so it is dropped.
  writer = train.MetricWriter(tmp_path, resume_step=2, tensorboard=False)
  assert [r["step"] for r in train.read_metrics(tmp_path)] == [1, 2]
  writer.log(2, None, {"acc": 0.5})  # Same step as the last line: merged into it.
  writer.log(3, {"loss": 30.0})
  writer.log(3, None, {"acc": 0.75})
  writer.close()
  records = train.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[1]["loss"] == 2.0 and records[1]["eval/acc"] == 0.5
  assert records[2]["loss"] == 30.0 and records[2]["eval/acc"] == 0.75
  assert records[2]["wall_time"] >= records[0]["wall_time"]
  # Lines two runs once interleaved in the workdir (before its lock): one per step, sorted.
  path = tmp_path / train.metrics.METRICS_FILE
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0], lines[1], lines[0], lines[2], lines[1]]) + "\n")
  train.MetricWriter(tmp_path, resume_step=3, tensorboard=False).close()
  assert [r["step"] for r in train.read_metrics(tmp_path)] == [1, 2, 3]


def _tensorboard_events(logdir) -> list:
  """Every event in the TFRecord event files under ``logdir``."""
  from tensorboardX.proto import event_pb2
  events = []
  for path in glob.glob(os.path.join(logdir, "**", "events.*"), recursive=True):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # each record: u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[offset:offset + 8], "little")
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def _tensorboard_tags(logdir) -> set[str]:
  """Scalar tags in the TFRecord event files under ``logdir``."""
  return {value.tag for event in _tensorboard_events(logdir) for value in event.summary.value}


def _tensorboard_scalars_after_purges(logdir) -> dict[str, dict[int, float]]:
  """``tag -> {step: value}`` as TensorBoard shows it: a SessionLog START at step s drops
  the earlier points at steps >= s (events of every file, in wall-time order)."""
  scalars: dict[str, dict[int, float]] = {}
  for event in sorted(_tensorboard_events(logdir), key=lambda e: e.wall_time):
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      for points in scalars.values():
        for step in [s for s in points if s >= event.step]:
          del points[step]
    for value in event.summary.value:
      scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_a_fresh_rerun_replaces_an_earlier_attempts_tensorboard_points(tmp_path):
  """An attempt that saved no checkpoint starts over at step 1: its points were dropped from
  metrics.jsonl but stayed in TensorBoard beside the rerun's, with no purge marker."""
  first = train.MetricWriter(tmp_path)
  for step in (1, 2, 3):
    first.log(step, {"loss": 10.0 + step})
  first.close()
  time.sleep(1.1)  # a new event file name (it holds the second)
  rerun = train.MetricWriter(tmp_path, resume_step=0)
  for step in (1, 2):
    rerun.log(step, {"loss": float(step)})
  rerun.close()
  assert [r["loss"] for r in train.read_metrics(tmp_path)] == [1.0, 2.0]
  shown = _tensorboard_scalars_after_purges(tmp_path / train.metrics.TENSORBOARD_DIR)
  assert shown["loss"] == {1: 1.0, 2: 2.0}


def test_metric_writer_uses_tensorboards_names_in_both_sinks(tmp_path):
  assert train.metrics.tensorboard_name("eval/acc (len<64)") == "eval/acc__len_64_"
  writer = train.MetricWriter(tmp_path)
  writer.log(1, {"loss": 1.0}, {"accuracy/subset/a b": 0.5, "accuracy/len64-128": 0.25})
  writer.close()
  names = set(train.read_metrics(tmp_path)[0]) - {"step", "time", "wall_time"}
  assert names == {"loss", "steps_per_sec", "eval/accuracy/subset/a_b", "eval/accuracy/len64-128"}
  assert _tensorboard_tags(tmp_path / train.metrics.TENSORBOARD_DIR) == names
  writer = train.MetricWriter(tmp_path, resume_step=1, tensorboard=False)
  with pytest.raises(ValueError, match="'x y' and 'x_y' are both named 'x_y'"):
    writer.log(2, {"x y": 1.0, "x_y": 2.0})
