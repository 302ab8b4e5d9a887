"""`prefjax.files`: whole files (also with concurrent writers, or a full disk), JSON that
names a bad file, and the checks of a new workdir."""

import errno
import functools
import logging
import os
import threading

import numpy as np
import pytest

from prefjax import files


def test_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "table.npz"
  path.write_bytes(b"old")
  files.write_atomically(path, lambda f: np.savez(f, x=np.arange(3)))
  with np.load(path) as saved:
    np.testing.assert_array_equal(saved["x"], [0, 1, 2])
  files.write_atomically(tmp_path / "note.txt", lambda f: f.write("naïve\n"), mode="w")
  assert (tmp_path / "note.txt").read_bytes() == "naïve\n".encode("utf-8")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "table.npz"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text("{}", encoding="utf-8")

  def fail(f):
    f.write("{partial")
    raise RuntimeError("interrupted")
  with pytest.raises(RuntimeError, match="interrupted"):
    files.write_atomically(path, fail, mode="w")
  assert path.read_text(encoding="utf-8") == "{}"
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_rejects_other_modes(tmp_path):
  with pytest.raises(ValueError, match="mode"):
    files.write_atomically(tmp_path / "x", lambda f: None, mode="a")


def test_two_writers_of_one_path_each_leave_a_whole_file(tmp_path):
  """The first writer pauses halfway while a second writes the same path and finishes.

  With one temporary name for both, the second would truncate the first's file and
  rename it away, and the first's rename would then fail."""
  path = tmp_path / "cache.bin"
  first_half_written, second_done = threading.Event(), threading.Event()
  errors = []

  def slow(f):
    f.write(b"a" * 1000)
    first_half_written.set()
    second_done.wait(timeout=60)
    f.write(b"a" * 1000)

  def run(fill):
    try:
      files.write_atomically(path, fill)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  first = threading.Thread(target=run, args=(slow,))
  first.start()
  assert first_half_written.wait(timeout=60)
  run(lambda f: f.write(b"b" * 500))
  assert path.read_bytes() == b"b" * 500
  second_done.set()
  first.join(timeout=60)
  assert not errors
  assert path.read_bytes() == b"a" * 2000  # the last rename wins, whole
  assert [p.name for p in tmp_path.iterdir()] == ["cache.bin"]


def test_partial_arrays_resume_after_the_saved_chunks_of_the_same_job_only(tmp_path, caplog,
                                                                           monkeypatch):
  monkeypatch.setattr(files, "PARTIAL_SAVE_EVERY_S", 0.0)
  path = tmp_path / "partial.npz"
  job = files.PartialArrays(path, "job-a")
  assert job.done == 0
  job.add(2, score=np.array([1.0, 2.0]), length=np.array([[3], [4]]))
  job.add(3, score=np.array([5.0]), length=np.array([[6]]))
  resumed = files.PartialArrays(path, "job-a")
  assert resumed.done == 3
  np.testing.assert_array_equal(resumed.arrays()["score"], [1.0, 2.0, 5.0])
  np.testing.assert_array_equal(resumed.arrays()["length"], [[3], [4], [6]])
  with pytest.raises(ValueError, match=r"a chunk's arrays \['score'\] differ from the saved "
                                       r"ones \['length', 'score'\]"):
    resumed.add(4, score=np.array([7.0]))
  with caplog.at_level("WARNING"):
    other = files.PartialArrays(path, "job-b")
  assert other.done == 0 and other.arrays() == {}
  assert "written by another job" in caplog.text
  in_memory = files.PartialArrays(None, "")
  in_memory.add(1, score=np.array([1.0]))
  assert in_memory.done == 1 and not any(tmp_path.glob("*.tmp*"))


def test_partial_arrays_are_saved_at_most_every_interval(tmp_path, monkeypatch):
  """The file is rewritten whole: saving after every chunk of a long job wrote gigabytes."""
  monkeypatch.setattr(files, "PARTIAL_SAVE_EVERY_S", 3600.0)
  path = tmp_path / "partial.npz"
  job = files.PartialArrays(path, "job")
  job.add(1, score=np.array([1.0]))  # the first chunk is saved
  job.add(2, score=np.array([2.0]))  # within the interval: kept in memory only
  assert files.PartialArrays(path, "job").done == 1
  np.testing.assert_array_equal(job.arrays()["score"], [1.0, 2.0])


def test_a_write_cut_short_by_a_full_disk_names_the_file(tmp_path):
  path = tmp_path / "metrics.jsonl"

  def disk_full(f):
    raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises: no name
  with pytest.raises(OSError, match="No space left on device") as caught:
    files.write_atomically(path, disk_full, mode="w")
  assert caught.value.filename == str(path) and caught.value.errno == errno.ENOSPC
  assert list(tmp_path.iterdir()) == []

  def odd(f):
    raise OSError("a message of its own")  # no errno: kept as it is
  with pytest.raises(OSError, match=r"^a message of its own$"):
    files.write_atomically(path, odd, mode="w")


def test_read_json_names_a_file_that_is_not_json(tmp_path):
  (tmp_path / "summary.json").write_text('{"final_step": 6,', encoding="utf-8")
  with pytest.raises(ValueError, match=r"summary\.json: not valid JSON"):
    files.read_json(tmp_path / "summary.json")
  (tmp_path / "config.json").write_text('{"lr": "nan"}', encoding="utf-8")
  assert files.read_json(tmp_path / "config.json", standard=False) == {"lr": "nan"}
  assert np.isnan(files.read_json(tmp_path / "config.json")["lr"])


def test_make_workdir_refuses_a_url_a_file_and_an_unwritable_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="workdirs are local paths.*gcsfuse"):
    files.make_workdir("gs://bucket/run")
  assert list(tmp_path.iterdir()) == []  # no local 'gs:' folder made on the way
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="is a file, not a directory"):
    files.make_workdir(tmp_path / "a_file")
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "run" / "notes").mkdir()
  real_access = os.access
  def access(path, mode, written="run"):  # (root may write anywhere)
    return real_access(path, mode) and not str(path).endswith(written)
  monkeypatch.setattr(os, "access", access)
  with pytest.raises(PermissionError, match=r"run is not writable by this user"):
    files.make_workdir("run")
  monkeypatch.setattr(os, "access", functools.partial(access, written="checkpoints"))
  with pytest.raises(PermissionError, match=r"run/checkpoints is not writable by this user"):
    files.make_workdir("run")
  monkeypatch.setattr(os, "access", functools.partial(access, written="notes"))
  assert files.make_workdir("run") == str(tmp_path / "run")  # not a folder runs write


def test_make_workdir_warns_of_files_no_run_wrote(tmp_path, caplog):
  known = ("runs.jsonl", "logs")
  (tmp_path / "fresh").mkdir()
  (tmp_path / "fresh" / "logs").mkdir()  # what a run refused by the lock leaves
  with caplog.at_level(logging.WARNING):
    assert files.make_workdir(tmp_path / "fresh", known_entries=known) == str(tmp_path / "fresh")
    files.make_workdir(tmp_path / "new" / "run", known_entries=known)
  assert not caplog.records
  (tmp_path / "notes.txt").write_text("mine")
  with caplog.at_level(logging.WARNING):
    files.make_workdir(tmp_path, known_entries=known)
  assert [r.getMessage() for r in caplog.records] == [
      f"--workdir={tmp_path} already holds files no prefjax run wrote; this run's outputs "
      "go beside them"]
  caplog.clear()
  (tmp_path / "runs.jsonl").write_text("{}\n")  # an earlier run's workdir
  with caplog.at_level(logging.WARNING):
    files.make_workdir(tmp_path, known_entries=known)
  assert not caplog.records
