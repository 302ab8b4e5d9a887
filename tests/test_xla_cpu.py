"""The binaries' XLA CPU defaults: added once, never overriding the user's flags."""

import os
import subprocess
import sys

from prefjax import xla_cpu


def test_flags_are_appended_once_and_user_values_win():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_use_xnnpack=true"}
  flags = xla_cpu.apply_cpu_defaults(env)
  assert flags == ("--xla_force_host_platform_device_count=8 --xla_cpu_use_xnnpack=true "
                   "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_cpu.apply_cpu_defaults(env) == flags
  assert xla_cpu.apply_cpu_defaults({}) == " ".join(xla_cpu.CPU_FLAGS)
  off = {xla_cpu.DISABLE_ENV: "0", "XLA_FLAGS": "--a=1"}
  assert xla_cpu.apply_cpu_defaults(off) == "--a=1" and off["XLA_FLAGS"] == "--a=1"


def test_a_binary_starts_with_the_defaults_and_jax_accepts_them():
  code = ("import experiments, os, jax, jax.numpy as jnp; "
          "print(os.environ['XLA_FLAGS']); print(float(jnp.dot(jnp.ones(3), jnp.ones(3))))")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop(xla_cpu.DISABLE_ENV, None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split("\n")
  assert out[0] == " ".join(xla_cpu.CPU_FLAGS) and out[1] == "3.0"


def test_malloc_tunables_are_added_once_and_user_choices_win():
  assert xla_cpu.malloc_tunables({}) == "glibc.malloc.hugetlb=1"
  every = ":".join(xla_cpu.HUGE_PAGES + xla_cpu.KEPT_ARENA)
  assert xla_cpu.malloc_tunables({}, keep_freed=True) == every
  assert xla_cpu.malloc_tunables({"GLIBC_TUNABLES": every}, keep_freed=True) is None
  assert xla_cpu.malloc_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  mine = "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"
  added = xla_cpu.malloc_tunables({"GLIBC_TUNABLES": mine}, keep_freed=True)
  assert added == mine + ":glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295"
  assert xla_cpu.malloc_tunables({xla_cpu.DISABLE_ENV: "0"}, keep_freed=True) is None


def test_no_restart_outside_the_named_modules(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(xla_cpu.DISABLE_ENV, raising=False)
  exe = sys.executable
  assert (xla_cpu.module_run_by([exe, "-u", "-X", "dev", "-m", "experiments.a", "-m"])
          == "experiments.a")
  for argv in ([exe, "-m", "pytest", "tests"], [exe, "-m", "experiments.a.b"],
               [exe, "-m", "experiments.b"], [exe, "script.py", "-m", "experiments.a"],
               [exe, "-c", "pass", "-m", "experiments.a"], [exe, "-m"]):
    xla_cpu.restart_with_malloc_defaults({"experiments.a"}, orig_argv=argv)  # returns, no exec
  assert "GLIBC_TUNABLES" not in os.environ


def _run_module(tmp_path, keep_freed=False, **env_overrides):
  """Runs ``python -m pkg.show`` from a package whose ``__init__`` restarts like experiments'."""
  pkg = tmp_path / "pkg"
  pkg.mkdir(exist_ok=True)
  (pkg / "__init__.py").write_text(
      "from prefjax import xla_cpu\nxla_cpu.restart_with_malloc_defaults("
      f"{{'pkg.show'}}, keep_freed={{'pkg.show'}} if {keep_freed} else ())\n")
  (pkg / "show.py").write_text(
      "import os, sys\nprint(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, **env_overrides)
  env.pop("GLIBC_TUNABLES", None)
  if xla_cpu.DISABLE_ENV not in env_overrides:
    env.pop(xla_cpu.DISABLE_ENV, None)
  proc = subprocess.Popen([sys.executable, "-m", "pkg.show", "--flag=1", "x"], cwd=tmp_path,
                          env=env, stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0
  pid, tunables, args = out.strip().split(" ", 2)
  return int(pid) == proc.pid, tunables, args


def test_a_binary_restarts_in_place_with_the_malloc_tunable(tmp_path):
  same_pid, tunables, args = _run_module(tmp_path)
  assert same_pid and args == "['--flag=1', 'x']"
  assert tunables == (":".join(xla_cpu.HUGE_PAGES) if xla_cpu._is_glibc() else "None")
  kept = _run_module(tmp_path, keep_freed=True)[1]
  assert kept == (":".join(xla_cpu.HUGE_PAGES + xla_cpu.KEPT_ARENA) if xla_cpu._is_glibc()
                  else "None")
  assert _run_module(tmp_path, **{xla_cpu.DISABLE_ENV: "0"})[1] == "None"
