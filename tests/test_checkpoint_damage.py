"""Damaged checkpoints: the rerun names the step and the file and resumes from the
newest intact step; with none intact it stops with one line (or, with
``allow_restart``, starts from scratch and says so)."""

import asyncio
import gc
import json
import logging
import os
import re
import shutil
import sys
import traceback
import types

import numpy as np
import pytest
from flax import nnx

from prefjax import train
from prefjax.train import checkpoint
from prefjax.train import integrity
from prefjax.train import orbax_quirks
from tests import test_train_core

STEPS, SAVED = 6, 4  # The damaged run saved steps 2 and 4 of 6.
DATA_FILE = "<largest file under state/ocdbt.process_0/d/>"


class Net(test_train_core.MLP):
  """Wide enough (a 4x256 kernel) that its arrays are stored in OCDBT data files,
  not inlined in the b-tree."""
  WIDTH = 256


def run(workdir, num_steps=STEPS, **loop):
  loop_config = train.LoopConfig(num_steps=num_steps, log_every=1, checkpoint_every=2,
                                 keep_checkpoints=2, async_checkpointing=False,
                                 tensorboard=False, **loop)
  return train.train_loop(workdir=str(workdir), model=Net(nnx.Rngs(0)),
                          loss_fn=test_train_core.mse_loss,
                          optimizer={"name": "sgd", "learning_rate": 1e-2},
                          loop=loop_config, train_iter=test_train_core.grain_batches())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return run(tmp_path_factory.mktemp("uninterrupted")).summary["params_sha256"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir whose run stopped after saving steps 2 and 4 (the config says 6
  steps: what a preempted run leaves)."""
  workdir = tmp_path_factory.mktemp("saved")
  run(workdir, num_steps=SAVED)
  os.remove(workdir / "summary.json")
  return workdir


def _copy(saved, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(saved, workdir)
  return workdir


def _resolve(step_dir, name):
  if name != DATA_FILE:
    return name
  data_dir = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  largest = max(os.listdir(data_dir), key=lambda f: os.path.getsize(os.path.join(data_dir, f)))
  return os.path.join("state", "ocdbt.process_0", "d", largest)


def damage(workdir, step, name, how):
  """Truncates (to half), deletes or flips a bit of ``name`` of a step; returns its
  relative path."""
  step_dir = workdir / "checkpoints" / str(step)
  name = _resolve(step_dir, name)
  _damage_file(step_dir / name, how)
  return name


def _damage_file(path, how):
  if how == "delete":
    os.remove(path)
  elif how == "flip":  # One bit in the middle: same size, different contents.
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      byte = f.read(1)[0]
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte ^ 0x10]))
  else:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _assert_resumed_from_two(workdir, result, uninterrupted, caplog, name):
  warned = [m for m in _warnings(caplog) if m.startswith(f"checkpoint step {SAVED} in ")]
  assert len(warned) == 1 and name in warned[0] and "damaged" in warned[0], _warnings(caplog)
  assert "resuming from step 2, the newest intact checkpoint" in _warnings(caplog)
  assert result.summary["final_step"] == STEPS
  # Resumed at 2 (steps 3 and 4 retrained), so the params equal an uninterrupted run's.
  assert result.summary["params_sha256"] == uninterrupted
  assert [r["step"] for r in train.read_metrics(workdir)] == list(range(1, STEPS + 1))
  assert os.path.isdir(workdir / "checkpoints.damaged" / str(SAVED))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_every_file_of_a_step_is_checked(saved, tmp_path, how):
  step_dir = saved / "checkpoints" / str(SAVED)
  assert integrity.find_damage(str(step_dir)) is None
  names = sorted(integrity._files(str(step_dir)))  # pylint: disable=protected-access
  assert DATA_FILE not in names and _resolve(step_dir, DATA_FILE) in names
  for name in names + [integrity.MANIFEST]:
    copy = tmp_path / name.replace("/", "_")
    shutil.copytree(step_dir, copy)
    size = os.path.getsize(copy / name)
    _damage_file(copy / name, how)
    problem = integrity.find_damage(str(copy))
    if name == integrity.MANIFEST and how == "delete":
      assert problem is None  # As for a step whose run was killed before recording it.
    elif name == integrity.MANIFEST:
      assert problem.startswith(f"{name}: unreadable"), problem
    elif how == "flip":
      assert problem.startswith(f"{name}: contents changed since saved (sha256 "), problem
    else:
      detail = "missing" if how == "delete" else f"{size // 2} bytes, {size} when saved"
      assert problem == f"{name}: {detail}"


def test_a_killed_manifest_write_is_neither_listed_nor_kept(saved, tmp_path):
  step_dir = _copy(saved, tmp_path) / "checkpoints" / str(SAVED)
  os.remove(step_dir / integrity.MANIFEST)
  stale = step_dir / f".{integrity.MANIFEST}.tmp123-456"
  stale.write_text('{"files": {')  # What a process killed mid-write leaves.
  assert integrity.find_damage(str(step_dir)) is None
  integrity.write_manifest(str(step_dir))
  assert not stale.exists()
  listed = json.loads((step_dir / integrity.MANIFEST).read_text())["files"]
  assert listed and not any(name.startswith(".") for name in listed)
  assert integrity.find_damage(str(step_dir)) is None


def test_any_flipped_bit_of_the_manifest_is_damage_to_the_manifest(saved, tmp_path):
  """The manifest carries its own digest, so a changed byte in it is not blamed on the
  file whose entry it altered."""
  step_dir = tmp_path / "step"
  shutil.copytree(saved / "checkpoints" / str(SAVED), step_dir)
  manifest = (step_dir / integrity.MANIFEST).read_bytes()
  for position in range(len(manifest)):
    for bit in (0x01, 0x10):
      damaged = bytearray(manifest)
      damaged[position] ^= bit
      (step_dir / integrity.MANIFEST).write_bytes(bytes(damaged))
      problem = integrity.find_damage(str(step_dir))
      assert problem.startswith(f"{integrity.MANIFEST}: unreadable ("), (position, bit, problem)
  (step_dir / integrity.MANIFEST).write_bytes(manifest)
  assert integrity.find_damage(str(step_dir)) is None


def test_a_manifest_of_sizes_only_is_checked_for_sizes(saved, tmp_path):
  """Manifests written before digests were recorded hold ``{file: size}``."""
  step_dir = tmp_path / "step"
  shutil.copytree(saved / "checkpoints" / str(SAVED), step_dir)
  with open(step_dir / integrity.MANIFEST) as f:
    entries = json.load(f)["files"]
  assert all(set(e) == {"size", "sha256"} for e in entries.values())
  with open(step_dir / integrity.MANIFEST, "w") as f:
    json.dump({name: e["size"] for name, e in entries.items()}, f)
  name = _resolve(step_dir, DATA_FILE)
  _damage_file(step_dir / name, "flip")
  assert integrity.find_damage(str(step_dir)) is None  # Sizes cannot see it.
  _damage_file(step_dir / name, "truncate")
  assert integrity.find_damage(str(step_dir)).startswith(f"{name}: ")
  with open(step_dir / integrity.MANIFEST, "w") as f:
    json.dump({name: {"size": 3}}, f)
  assert integrity.find_damage(str(step_dir)).startswith(
      f"{integrity.MANIFEST}: unreadable (entry {name!r} is {{'size': 3}}")
  # An empty manifest vouches for no file: Orbax's own metadata is still checked (a
  # review's script: it passed a step without state/manifest.ocdbt).
  with open(step_dir / integrity.MANIFEST, "w") as f:
    json.dump({}, f)
  os.remove(step_dir / "state/manifest.ocdbt")
  assert integrity.find_damage(str(step_dir)) == "state/manifest.ocdbt: missing"


# The three damages the issue reported: a TensorStore traceback, a wrong
# diagnosis ("changed architecture?"), a bare FileNotFoundError; and a flipped bit,
# which restored silently while manifests held sizes only.
@pytest.mark.parametrize("name,how", [(DATA_FILE, "truncate"), ("state/_METADATA", "delete"),
                                      ("config/metadata", "delete"), (DATA_FILE, "flip")],
                         ids=["data_file-truncate", "_METADATA-delete", "config-delete",
                              "data_file-flip"])
def test_damaged_latest_step_falls_back_to_the_previous_one(saved, uninterrupted, tmp_path,
                                                            caplog, name, how):
  workdir = _copy(saved, tmp_path)
  name = damage(workdir, SAVED, name, how)
  with caplog.at_level(logging.WARNING):
    result = run(workdir)
  _assert_resumed_from_two(workdir, result, uninterrupted, caplog, name)
  expected = {"delete": "missing", "truncate": "when saved", "flip": "contents changed"}[how]
  assert expected in next(m for m in _warnings(caplog) if name in m)


def test_damage_another_process_saw_sends_every_process_to_the_step_before(
    saved, uninterrupted, tmp_path, caplog, monkeypatch):
  """Under several processes the damage one process's reads found decides for all: one
  process alone falling back restored another step than the others, or waited."""
  workdir = _copy(saved, tmp_path)
  views = iter([True])  # the other process's view of the latest step's check; then intact
  monkeypatch.setattr(checkpoint.distributed, "in_any_process",
                      lambda flag: flag or next(views, False))
  with caplog.at_level(logging.WARNING):
    result = run(workdir)
  _assert_resumed_from_two(workdir, result, uninterrupted, caplog,
                           "damaged as another process reads it")


def test_damage_is_found_without_a_file_manifest(saved, uninterrupted, tmp_path, caplog,
                                                 monkeypatch):
  # A run killed right after a save leaves that step without prefjax_files.json;
  # then TensorStore's read errors are what find a damaged data file.
  workdir = _copy(saved, tmp_path)
  os.remove(workdir / "checkpoints" / str(SAVED) / integrity.MANIFEST)
  damage(workdir, SAVED, DATA_FILE, "truncate")
  gc.collect()  # earlier tests' garbage
  later = []  # what Python would print as "Exception ignored in ..." after the run
  monkeypatch.setattr(sys, "unraisablehook", later.append)
  with caplog.at_level(logging.WARNING):
    result = run(workdir)
  gc.collect()
  # TensorStore names the array and the step's state/ directory, not the data file.
  _assert_resumed_from_two(workdir, result, uninterrupted, caplog,
                           f"{workdir}/checkpoints/{SAVED}/state/")
  # The failed restore's abandoned reads were finalised quietly during the resume.
  assert not later, [str(u.object) for u in later]


def test_only_orbax_reads_are_discarded_quietly(monkeypatch):
  source = ("class Suspend:\n  def __await__(self):\n    yield\n"
            "async def read():\n  try:\n    await Suspend()\n"
            "  finally:\n    raise OSError('abandoned')\n")
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
  gc.collect()  # earlier tests' garbage
  gc.disable()  # so that only the call below finalises what this test drops
  try:
    for filename in ("/site-packages/orbax/checkpoint/fake.py", "/elsewhere/other.py"):
      namespace = {}
      exec(compile(source, filename, "exec"), namespace)
      pending = namespace["read"]()
      pending.send(None)  # suspended at its await, as orbax's reads are
      holder = [pending]
      holder.append(holder)  # a cycle: only the garbage collector can finalise it
      del pending, holder, namespace
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    assert orbax_quirks.discard_abandoned_reads() == 1  # pylint: disable=protected-access
  finally:
    gc.enable()
  assert [u.object.cr_code.co_filename for u in seen] == ["/elsewhere/other.py"]


def test_a_read_completing_after_orbax_closed_its_loop_is_discarded_quietly(monkeypatch):
  # An abandoned TensorStore read that completes later reports to orbax's closed event loop
  # from TensorStore's thread; Python hands that to sys.unraisablehook with no object.
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  orbax_quirks.discard_abandoned_reads()
  loop = asyncio.new_event_loop()
  loop.close()

  def report(call):
    try:
      call()
    except RuntimeError as e:
      sys.unraisablehook(types.SimpleNamespace(exc_type=type(e), exc_value=e, err_msg=None,
                                               exc_traceback=e.__traceback__, object=None))
  report(lambda: loop.call_soon_threadsafe(print))  # a late read: discarded
  report(lambda: loop.call_soon(print))  # anything else: the previous hook
  assert [u.exc_value.args for u in seen] == [("Event loop is closed",)]
  assert "call_soon_threadsafe" not in "".join(traceback.format_tb(seen[0].exc_traceback))


@pytest.mark.parametrize("name", ["state/_METADATA", "state/manifest.ocdbt", "data/metadata",
                                  "config/metadata"])
def test_orbax_metadata_is_checked_without_a_file_manifest(saved, tmp_path, name):
  step_dir = tmp_path / "step"
  shutil.copytree(saved / "checkpoints" / str(SAVED), step_dir)
  os.remove(step_dir / integrity.MANIFEST)
  assert integrity.find_damage(str(step_dir)) is None
  truncated = tmp_path / "truncated"
  shutil.copytree(step_dir, truncated)
  _damage_file(truncated / name, "truncate")
  if name != "state/manifest.ocdbt":  # Binary: TensorStore checks it when reading.
    assert integrity.find_damage(str(truncated)).startswith(f"{name}: unreadable (")
  _damage_file(step_dir / name, "delete")
  assert integrity.find_damage(str(step_dir)) == f"{name}: missing"


def test_no_intact_step_stops_with_one_line_and_allow_restart_starts_afresh(
    saved, uninterrupted, tmp_path, caplog):
  workdir = _copy(saved, tmp_path)
  for step in (2, SAVED):
    damage(workdir, step, DATA_FILE, "truncate")
  with pytest.raises(train.NoIntactCheckpointError) as error:
    run(workdir)
  message = str(error.value)
  assert "\n" not in message
  assert "--config.loop.allow_restart=True" in message and "damaged steps: 4, 2" in message
  # Stopping leaves the damaged steps where they were.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  with caplog.at_level(logging.WARNING):
    result = run(workdir, allow_restart=True)
  assert any("starting from scratch (loop.allow_restart=True)" in m for m in _warnings(caplog))
  assert result.summary["params_sha256"] == uninterrupted  # Trained from step 0.
  assert sorted(os.listdir(workdir / "checkpoints.damaged")) == ["2", "4"]


class Narrower(Net):
  WIDTH = 128


class OneMoreLayer(Net):
  def __init__(self, rngs):
    super().__init__(rngs)
    self.extra = nnx.Linear(4, 4, rngs=rngs)


@pytest.mark.parametrize("model_cls, named", [
    (Narrower, r"arrays differing in shape \(3\): params/hidden/bias: checkpoint \(256,\), "
               r"model \(128,\); params/hidden/kernel: checkpoint \(4, 256\), model \(4, 128\)"),
    (OneMoreLayer, r": arrays only in the model \(2\): params/extra/bias; params/extra/kernel; "
                   r"to train this model and optimizer, use a new --workdir$"),
])
def test_a_changed_model_is_still_a_mismatch_not_damage(saved, tmp_path, model_cls, named):
  workdir = _copy(saved, tmp_path)
  loop = train.LoopConfig(num_steps=STEPS, checkpoint_every=2, async_checkpointing=False,
                          tensorboard=False)
  with pytest.raises(ValueError, match="does not match the model/optimizer") as error:
    train.train_loop(workdir=str(workdir), model=model_cls(nnx.Rngs(0)),
                     loss_fn=test_train_core.mse_loss,
                     optimizer={"name": "sgd", "learning_rate": 1e-2}, loop=loop,
                     train_iter=iter([]))
  assert not isinstance(error.value, train.DamagedCheckpointError)
  assert re.search(named, str(error.value)), str(error.value)  # The arrays, from the metadata.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]


def test_load_params_names_the_damaged_file(saved, tmp_path):
  workdir = _copy(saved, tmp_path)
  name = damage(workdir, SAVED, DATA_FILE, "truncate")
  with pytest.raises(train.DamagedCheckpointError, match=f"step {SAVED} .* damaged: {name}: "):
    train.load_params(workdir, Net(nnx.Rngs(1)))
  model = train.load_params(workdir, Net(nnx.Rngs(1)), step=2)  # An intact step still loads.
  assert not np.allclose(model.hidden.kernel[...], Net(nnx.Rngs(1)).hidden.kernel[...])
