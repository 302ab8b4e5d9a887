"""What the train loop logs about its own progress: step rates, ETAs, progress lines."""

import logging as py_logging

import numpy as np
from flax import nnx

from prefjax import train
from tests.test_train_core import IN, MLP, make_batches, mse_loss


def test_logged_step_rates_leave_out_eval_and_checkpoint_time(tmp_path, monkeypatch):
  """An eval's (and a save's) seconds went into the next record's steps/s, tokens/s and
  ETA, and into metrics.jsonl: 0.0102 steps/s for a DPO step whose window held a 98 s eval."""
  import time  # pylint: disable=import-outside-toplevel
  save = train.Checkpointer.save

  def slow_save(self, *args, **kwargs):
    time.sleep(1.5)
    return save(self, *args, **kwargs)

  def slow_evaluator(step, model):
    del model
    time.sleep(1.5)
    return {"step_seen": float(step)}

  monkeypatch.setattr(train.Checkpointer, "save", slow_save)
  loop = train.LoopConfig(num_steps=6, log_every=1, eval_every=3, checkpoint_every=3,
                          tensorboard=False)
  train.train_loop(workdir=str(tmp_path), model=MLP(nnx.Rngs(0)), loss_fn=mse_loss,
                   optimizer={"name": "sgd", "learning_rate": 0.1}, loop=loop,
                   train_iter=iter(make_batches(6, 16)), evaluators=[slow_evaluator],
                   tokens_in_batch=lambda b: b["x"].size)
  rates = {r["step"]: r for r in train.read_metrics(tmp_path) if "steps_per_sec" in r}
  # Steps 3 and 6 ran an eval and a save; the windows of 3, 4 and 6 held 1.5 s of each.
  for step in (2, 3, 4, 5, 6):
    assert rates[step]["steps_per_sec"] > 2.0, (step, rates[step])
    np.testing.assert_allclose(rates[step]["tokens_per_sec"] / rates[step]["steps_per_sec"],
                               16 * IN, rtol=1e-9)


def test_progress_lines_count_units_and_give_an_eta(caplog, monkeypatch):
  import types  # pylint: disable=import-outside-toplevel
  clock = iter([100.0, 130.0, 190.0])   # start, after 2 units, after 3 more
  monkeypatch.setattr(train.metrics, "time", types.SimpleNamespace(time=lambda: next(clock)))
  progress = train.metrics.Progress("best_of_n prompts", 8)
  with caplog.at_level(py_logging.INFO, logger="absl"):
    progress.step("first batch", units=2)
    progress.step("second batch", units=3)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[best_of_n")]
  # 30 s for 2 units: 6 left take 1:30; 90 s for 5: 3 left take 0:54.
  assert lines == ["[best_of_n prompts 2/8] first batch  (0:30 elapsed, ETA 1:30)",
                   "[best_of_n prompts 5/8] second batch  (1:30 elapsed, ETA 0:54)"]


def test_a_progress_bar_in_a_log_file_is_a_line_every_interval_and_one_at_the_end(
    caplog, monkeypatch):
  """tqdm wrote ``\r`` frames into redirected logs and nothing into the workdir's."""
  import io  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(train.metrics.sys, "stderr", io.StringIO())  # not a terminal
  clock = iter([0.0, 10.0, 40.0, 50.0, 60.0])  # start, 3 updates (the second logs), close
  monkeypatch.setattr(train.metrics, "time", types.SimpleNamespace(time=lambda: next(clock)))
  with caplog.at_level(py_logging.INFO, logger="absl"):
    with train.metrics.progress_bar(100, "reference log-probs", "pair", initial=20) as bar:
      for _ in range(3):
        bar.update(10)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reference")]
  # 20 resumed, 20 more in 40 s: 0.5 pairs/s, 60 left; at the end 30 in 60 s.
  assert lines == ["reference log-probs: 40/100 pairs (0:40 elapsed, 0.5 pairs/s, ETA 2:00)",
                   "reference log-probs: 50/100 pairs (1:00 elapsed, 0.5 pairs/s, ETA 1:40)"]
  assert [train.metrics._plural(u) for u in ("query", "key", "pair")] == [  # pylint: disable=protected-access
      "queries", "keys", "pairs"]  # the judge's bar read "128/128 querys"
