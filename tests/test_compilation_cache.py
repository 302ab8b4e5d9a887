"""The binaries' persistent compilation cache: which folder wins, and turning it off."""

import os
import subprocess
import sys

import jax

from prefjax import compilation_cache

_PROBE = ("import jax; from prefjax import compilation_cache as c; "
          "print(c.enable(), jax.config.jax_compilation_cache_dir)")


def _enable_in_fresh_process(cwd=None, **env):
  environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run([sys.executable, "-c", _PROBE], env={**environ, **env}, cwd=cwd,
                        capture_output=True, text=True, timeout=120, check=True)
  return proc.stdout.split()


def test_jax_setting_wins_then_the_prefjax_folder_then_off(tmp_path):
  # The suite sets JAX_COMPILATION_CACHE_DIR (conftest): JAX's own setting is kept.
  assert jax.config.jax_compilation_cache_dir
  assert compilation_cache.enable({"PREFJAX_COMPILATION_CACHE": str(tmp_path)}) == (
      jax.config.jax_compilation_cache_dir)
  folder = str(tmp_path / "cache")
  assert _enable_in_fresh_process(PREFJAX_COMPILATION_CACHE=folder) == [folder, folder]
  assert os.path.isdir(folder)
  assert _enable_in_fresh_process(PREFJAX_COMPILATION_CACHE="0") == ["None", "None"]
  # JAX's switch off: reported off (it said on, and JAX wrote nothing there).
  assert _enable_in_fresh_process(PREFJAX_COMPILATION_CACHE=folder,
                                  JAX_ENABLE_COMPILATION_CACHE="false")[0] == "None"


def test_an_uncreatable_folder_leaves_the_cache_off_and_any_off_word_turns_it_off(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  uncreatable = str(blocker / "cache")  # a folder inside a file
  assert _enable_in_fresh_process(PREFJAX_COMPILATION_CACHE=uncreatable) == ["None", "None"]
  for word in ("off", "False", " no ", "none"):
    assert _enable_in_fresh_process(tmp_path, PREFJAX_COMPILATION_CACHE=word) == [
        "None", "None"], word  # not a folder named "off" in the working directory
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_folder_this_user_cannot_read_leaves_the_cache_off(tmp_path):
  """A shared cache folder made by another user with mode 0700: scanning it raised
  PermissionError, which stopped the run after its workdir records were written."""
  folder = tmp_path / "theirs"
  folder.mkdir()
  refuse = ("import os; os.scandir = lambda path: (_ for _ in ()).throw(PermissionError("
            "13, 'Permission denied', path)); ")
  environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run([sys.executable, "-c", refuse + _PROBE], capture_output=True,
                        text=True, timeout=120, check=True,
                        env={**environ, "PREFJAX_COMPILATION_CACHE": str(folder)})
  assert proc.stdout.split() == ["None", "None"]
  assert "compilation cache off: cannot read" in proc.stderr


def test_empty_entries_a_full_disk_left_are_deleted_and_others_kept(tmp_path):
  folder = tmp_path / "cache"
  folder.mkdir()
  (folder / "jit_f-0123-cache").write_bytes(b"")
  (folder / "jit_g-4567-cache").write_bytes(b"compiled")
  (folder / "notes.txt").write_bytes(b"")
  assert _enable_in_fresh_process(PREFJAX_COMPILATION_CACHE=str(folder)) == [str(folder)] * 2
  assert sorted(p.name for p in folder.iterdir()) == ["jit_g-4567-cache", "notes.txt"]
