"""The binaries' persistent compilation cache: which folder wins, and turning it off."""

import os
import subprocess
import sys

import jax

from prefjax import compilation_cache

_PROBE = ("import jax; from prefjax import compilation_cache as c; "
          "print(c.enable(), jax.config.jax_compilation_cache_dir)")


def _enable_in_fresh_process(**env):
  environ = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  proc = subprocess.run([sys.executable, "-c", _PROBE], env={**environ, **env},
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
