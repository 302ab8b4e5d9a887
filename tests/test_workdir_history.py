"""What a workdir keeps of its run's history across reruns: a finished run whose
checkpoints were deleted or moved stops the rerun instead of a silent fresh start over its
records; a changed config a rerun trained under stays on record; a run trained on past its
finish sets its summary aside; the newest checkpoint is checked like the older ones; a
metrics line or a save cut short by the crash does not block the resume."""

import json
import logging
import os
import shutil

import pytest
from flax import nnx

from prefjax import train
from prefjax.train import checkpoint
from prefjax.train import integrity
from prefjax.train import summary as summary_lib
from tests import test_train_core


def run(workdir, num_steps=6, config=None, hooks=(), start_hooks=(), optimizer="sgd", **loop):
  loop = {"checkpoint_every": 2, "async_checkpointing": False, **loop}
  return train.train_loop(
      workdir=str(workdir), model=test_train_core.MLP(nnx.Rngs(0)),
      loss_fn=test_train_core.mse_loss,
      optimizer={"name": optimizer, "learning_rate": 1e-2}, config=config, hooks=hooks,
      start_hooks=start_hooks, train_iter=test_train_core.grain_batches(),
      loop=train.LoopConfig(num_steps=num_steps, log_every=1, tensorboard=False, **loop))


def _steps(workdir):
  return [r["step"] for r in train.read_metrics(workdir)]


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_retrained(tmp_path):
  first = run(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints")
  metrics = (tmp_path / "metrics.jsonl").read_bytes()
  with pytest.raises(train.NoIntactCheckpointError,
                     match=r"holds no checkpoint, but the summary of a run that finished: was "
                           r".*checkpoints deleted or moved\? Put it back.*allow_restart=True"):
    run(tmp_path, num_steps=3)
  assert (tmp_path / "metrics.jsonl").read_bytes() == metrics
  assert summary_lib.read_summary(str(tmp_path))["final_step"] == 6
  again = run(tmp_path, allow_restart=True)  # what the message offers
  assert _steps(tmp_path) == list(range(1, 7))
  assert again.summary["params_sha256"] == first.summary["params_sha256"]
  discarded = json.loads((tmp_path / "summary.discarded.json").read_text())
  assert discarded["final_step"] == 6 and discarded["wall_time"] != again.summary["wall_time"]


def test_metrics_past_the_first_checkpoint_warn_and_start_again(tmp_path, caplog):
  """A run killed during its first save leaves what deleted checkpoints leave: the metrics
  say a save was due, none finished. It starts again; the warning says both."""
  run(tmp_path, num_steps=4, config={"loop": {"checkpoint_every": 2}})
  os.remove(tmp_path / "summary.json")  # as a run stopped at step 4 of 6 leaves it
  shutil.rmtree(tmp_path / "checkpoints")
  with caplog.at_level(logging.WARNING, logger="absl"):
    # checkpoint_every of the run that wrote the metrics (config.json), not this one's 5.
    run(tmp_path, checkpoint_every=5, config={"loop": {"checkpoint_every": 2}})
  assert [r.getMessage() for r in caplog.records if "holds no checkpoint" in r.getMessage()] == [
      f"{tmp_path} holds no checkpoint, but metrics.jsonl logged step 4 with checkpoint_every=2:"
      f" killed during its first save, or was {tmp_path}/checkpoints deleted or moved? This "
      "run starts from step 0 and replaces those metrics."]
  assert _steps(tmp_path) == list(range(1, 7))


def test_the_config_changes_a_run_trained_under_stay_on_record(tmp_path, caplog):
  run(tmp_path, num_steps=4, config={"loss": "dpo"})
  changed = run(tmp_path, config={"loss": "ipo"})  # trains steps 5 and 6 under ipo
  (change,) = changed.summary["config_changes"]
  assert change["from_step"] == 4
  assert '-  "loss": "dpo"' in change["config_diff"]
  assert '+  "loss": "ipo"' in change["config_diff"]
  run(tmp_path, config={"loss": "dpo"})  # already finished; its stale config.rerun.json goes
  assert not (tmp_path / "config.rerun.json").exists()
  assert summary_lib.config_changes(str(tmp_path)) == [change]
  assert summary_lib.read_summary(str(tmp_path))["config_changes"] == [change]
  with caplog.at_level(logging.WARNING, logger="absl"):
    run(tmp_path, config={"loss": "kto"})  # finished: trains nothing, adds nothing
  # ... and says so: the diff's warning had promised a record the finished run never makes.
  assert f"{tmp_path} already finished at step 6: nothing was trained under the changed " \
      "config above" in caplog.text
  assert not (tmp_path / "config.rerun.json").exists()
  run(tmp_path, num_steps=8, config={"loss": "ipo"})  # the same change again: one record
  back = run(tmp_path, num_steps=10, config={"loss": "dpo"})  # back to config.json
  assert back.summary["config_changes"] == [change, {"from_step": 8, "config_diff": ""}]
  # A fresh start (allow_restart) reports only its own changes.
  shutil.rmtree(tmp_path / "checkpoints")
  assert run(tmp_path, allow_restart=True, config={"loss": "dpo"}).summary[
      "config_changes"] == []


def test_a_change_whose_steps_were_discarded_leaves_no_record(tmp_path):
  """A changed rerun stopped before its first step trained nothing under its config; one
  whose steps after the checkpoint it resumed from were lost is replaced by the rerun that
  resumes there."""
  def stop(step, state):
    raise KeyboardInterrupt(f"stopped at {step}")

  run(tmp_path, num_steps=4, config={"loss": "dpo"})
  with pytest.raises(KeyboardInterrupt, match="stopped at 4"):
    run(tmp_path, config={"loss": "ipo"}, start_hooks=[stop])
  assert run(tmp_path, config={"loss": "dpo"}).summary["config_changes"] == []

  def lose_step_8(step, state, metrics):  # as a kill before the step-8 save would
    del state, metrics
    if step == 7:
      raise RuntimeError("killed")
  with pytest.raises(RuntimeError, match="killed"):
    run(tmp_path, num_steps=10, config={"loss": "ipo"}, hooks=[lose_step_8])
  result = run(tmp_path, num_steps=10, config={"loss": "kto"})  # resumes at 6
  (change,) = result.summary["config_changes"]
  assert change["from_step"] == 6 and '+  "loss": "kto"' in change["config_diff"]
  assert len(summary_lib.read_run_records(str(tmp_path))) > 2  # the records stay
  with pytest.raises(ValueError, match="does not match the model/optimizer"):
    run(tmp_path, num_steps=12, config={"loss": "ipo"}, optimizer="adam")
  assert not (tmp_path / "config.rerun.json").exists()  # that run trained nothing


def test_a_change_resumed_below_its_first_step_or_restarted_is_recorded_from_there(tmp_path):
  run(tmp_path, num_steps=4, config={"loss": "dpo"})

  def kill_at_5(step, state, metrics):
    del state, metrics
    if step == 5:
      raise RuntimeError("killed")
  with pytest.raises(RuntimeError, match="killed"):  # ipo from step 4
    run(tmp_path, config={"loss": "ipo"}, hooks=[kill_at_5])
  shutil.rmtree(tmp_path / "checkpoints" / "4")  # lost: the rerun resumes at 2
  (change,) = run(tmp_path, config={"loss": "ipo"}).summary["config_changes"]
  assert change["from_step"] == 2 and '+  "loss": "ipo"' in change["config_diff"]
  # Every checkpoint damaged, a fresh start (allow_restart) under another config: from 0.
  for step in os.listdir(tmp_path / "checkpoints"):
    os.truncate(tmp_path / "checkpoints" / step / "state" / "_METADATA", 10)
  (change,) = run(tmp_path, allow_restart=True, config={"loss": "kto"}).summary[
      "config_changes"]
  assert change["from_step"] == 0 and '+  "loss": "kto"' in change["config_diff"]


def test_a_cut_runs_jsonl_line_does_not_fail_the_finish(tmp_path, caplog):
  run(tmp_path, num_steps=2, config={"loss": "dpo"})
  with open(tmp_path / "runs.jsonl", "a", encoding="utf-8") as f:
    f.write('{"argv": ["train_rm"')  # a full disk cut it; the next record is glued on
  with caplog.at_level(logging.WARNING, logger="absl"):
    result = run(tmp_path, num_steps=4, config={"loss": "ipo"})
  assert result.summary["final_step"] == 4
  assert any(r.getMessage().startswith(f"{tmp_path}/runs.jsonl:1: not a JSON object")
             for r in caplog.records)
  with pytest.raises(ValueError, match=r"runs\.jsonl:1: not a JSON object"):
    summary_lib.read_run_records(str(tmp_path))


def test_a_cut_runs_jsonl_line_leaves_an_unknown_loss_error_as_it_was(tmp_path):
  """The --imports hint read runs.jsonl strictly: a cut last line replaced the user's
  "unknown loss" error with one about the file."""
  (tmp_path / "runs.jsonl").write_text(json.dumps({"argv": ["x"], "imports": ["my.losses"]})
                                       + '\n{"argv": ["x"], "imp')
  with pytest.raises(KeyError, match=r"unknown loss 'mine'.*--imports=my\.losses"):
    with summary_lib.naming_recorded_imports(str(tmp_path)):
      raise KeyError("unknown loss 'mine'")


def test_the_step_a_crash_resumes_from_has_its_manifest_before_the_next_save(tmp_path):
  seen = {}

  def look(step, state, metrics):
    del state, metrics
    if step == 5:  # the step-3 checkpoint is the newest; the next save is at 6
      seen["manifest"] = integrity.has_manifest(str(tmp_path / "checkpoints" / "3"))
  run(tmp_path, checkpoint_every=3, hooks=(look,))
  assert seen == {"manifest": True}


def test_an_async_save_is_recorded_once_it_finished(tmp_path):
  tx, _ = train.make_optimizer({"name": "sgd", "learning_rate": 0.1})
  _, state = train.create_train_state(test_train_core.MLP(nnx.Rngs(0)), tx, 0)
  ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=True)
  assert ckpt.save(state)
  ckpt._manager.wait_until_finished()  # pylint: disable=protected-access (orbax's own wait)
  assert not integrity.has_manifest(str(tmp_path / "checkpoints" / "0"))
  ckpt.record_finished_saves()
  assert integrity.has_manifest(str(tmp_path / "checkpoints" / "0"))
  ckpt.close()


def test_a_metrics_line_cut_short_by_the_crash_does_not_block_the_resume(tmp_path):
  uninterrupted = run(tmp_path / "whole").summary["params_sha256"]
  run(tmp_path, num_steps=4)
  os.remove(tmp_path / "summary.json")
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 5, "loss": 0.')  # the disk filled mid-line
  result = run(tmp_path)
  assert result.summary["params_sha256"] == uninterrupted
  assert _steps(tmp_path) == list(range(1, 7))
  # Anywhere else a corrupt line is an error that names it.
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  lines[2] = lines[2][:-5]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a JSON object"):
    train.read_metrics(tmp_path)
  assert json.loads(lines[1])["step"] == 2


def test_a_checkpoint_reference_expands_the_home_folder():
  assert checkpoint.split_ref("~/runs/rm@best") == (os.path.expanduser("~/runs/rm"), "best")
  assert checkpoint.split_ref("~/runs/rm") == (os.path.expanduser("~/runs/rm"), None)
  with pytest.raises(FileNotFoundError, match=f"no checkpoints directory in "
                                              f"{os.path.expanduser('~')}/no_such_run"):
    checkpoint.saved_step("~/no_such_run")


def test_a_save_cut_short_is_removed_when_the_run_starts_again(tmp_path, caplog):
  """A full disk left ``6.orbax-checkpoint-tmp`` behind, taking space for ever."""
  unfinished = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1733"
  (unfinished / "state").mkdir(parents=True)
  (unfinished / "state" / "data").write_bytes(b"x" * 1000)
  (tmp_path / "checkpoints" / "notes.orbax-checkpoint-tmp").mkdir()  # not a step: kept
  with caplog.at_level(logging.WARNING, logger="absl"):
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", async_save=False)
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
      "notes.orbax-checkpoint-tmp"]
  assert [r.getMessage() for r in caplog.records] == [
      f"removed {tmp_path}/checkpoints/6.orbax-checkpoint-tmp-1733, a save that did not finish"]


def test_a_finished_run_extended_then_stopped_is_not_reported_as_its_old_finish(tmp_path):
  """Finished at 4, extended to 8 and stopped at 6: a rerun with num_steps=4 used to say
  "already finished" while holding the step-6 parameters (and labelled their eval step 4)."""
  batches = test_train_core.make_batches(8, 16)

  def train_to(num_steps, hooks=()):
    loop = train.LoopConfig(num_steps=num_steps, log_every=1, tensorboard=False)
    return train.train_loop(
        workdir=str(tmp_path), model=test_train_core.MLP(nnx.Rngs(0)),
        loss_fn=test_train_core.mse_loss, optimizer={"name": "sgd", "learning_rate": 0.1},
        loop=loop, train_iter=iter(batches), hooks=hooks)

  finished = train_to(4)
  assert train_to(4).summary == finished.summary  # A plain rerun: already finished.
  stop_at_6 = test_train_core._sigterm_at(6)  # pylint: disable=protected-access
  assert train_to(8, hooks=[stop_at_6]).preempted
  # While a longer run trains on, no summary says the workdir finished.
  assert not (tmp_path / "summary.json").exists()
  assert train.read_summary(str(tmp_path), previous=True) == finished.summary
  with pytest.raises(ValueError, match=r"holds a checkpoint at step 6, past loop.num_steps=4 "
                                       r"\(it finished at step 4, then a longer run trained "
                                       r"on and stopped\): rerun with the num_steps"):
    train_to(4)
  assert train_to(6).summary["final_step"] == 6  # num_steps at the stopped step finishes it
  assert train.read_summary(str(tmp_path))["final_step"] == 6
