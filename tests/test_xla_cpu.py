"""The binaries' XLA CPU defaults: added once, never overriding the user's flags."""

import os
import signal
import subprocess
import sys

import pytest

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
  for word in ("false", " No ", "off"):  # as PREFJAX_COMPILATION_CACHE reads them
    assert xla_cpu.apply_cpu_defaults({xla_cpu.DISABLE_ENV: word, "XLA_FLAGS": ""}) == ""
  # A bare boolean flag means true; the default appended after it reversed it (XLA takes
  # the last value given).
  assert xla_cpu.apply_cpu_defaults({"XLA_FLAGS": "--xla_cpu_use_xnnpack"}) == (
      "--xla_cpu_use_xnnpack --xla_cpu_experimental_ynn_fusion_type=")


def test_a_binary_starts_with_the_defaults_and_jax_accepts_them():
  code = ("import experiments, os, jax, jax.numpy as jnp; "
          "print(os.environ['XLA_FLAGS']); print(float(jnp.dot(jnp.ones(3), jnp.ones(3))))")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop(xla_cpu.DISABLE_ENV, None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split("\n")
  assert out[0] == " ".join(xla_cpu.CPU_FLAGS) and out[1] == "3.0"


def test_malloc_tunables_are_added_once_and_user_choices_win():
  every = ":".join(xla_cpu.MALLOC_TUNABLES)
  assert xla_cpu.malloc_tunables({}) == every
  assert every.startswith("glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:")
  assert xla_cpu.malloc_tunables({"GLIBC_TUNABLES": every}) is None
  mine = "glibc.malloc.mmap_max=5:glibc.malloc.hugetlb=0"
  added = xla_cpu.malloc_tunables({"GLIBC_TUNABLES": mine})
  assert added == mine + ":glibc.malloc.trim_threshold=4294967295"
  assert xla_cpu.malloc_tunables({xla_cpu.DISABLE_ENV: "0"}) is None


@pytest.mark.parametrize("defaults", ["1", "0"])
def test_keeping_freed_memory_runs_computations_on_the_calling_thread(defaults):
  """The call returns only once the result is ready (a 34-GFLOP program; dispatched to a
  pool thread it returns at once), and ``PREFJAX_XLA_CPU_DEFAULTS=0`` leaves JAX's default."""
  code = ("from prefjax import xla_cpu; changed = xla_cpu.keep_freed_memory(); "
          "import jax, jax.numpy as jnp; f = jax.jit(lambda x: jnp.tanh(x @ x) @ x); "
          "x = jnp.ones((2048, 2048)) / 2048; f(x).block_until_ready(); y = f(x); "
          "print(changed, y.is_ready(), jax.config.read('jax_cpu_enable_async_dispatch'))")
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{xla_cpu.DISABLE_ENV: defaults})
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split()
  if defaults == "0" or not xla_cpu._is_glibc():
    assert out[0] == "False" and out[2] == "True"
  else:
    assert out == ["True", "True", "False"]


def test_no_restart_outside_the_named_modules(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(xla_cpu.DISABLE_ENV, raising=False)
  exe = sys.executable
  assert (xla_cpu.module_run_by([exe, "-u", "-X", "dev", "-m", "experiments.a", "-m"])
          == "experiments.a")
  for argv in ([exe, "-m", "pytest", "tests"], [exe, "-m", "experiments.a.b"],
               [exe, "-m", "experiments.b"], [exe, "script.py", "-m", "experiments.a"],
               [exe, "-c", "pass", "-m", "experiments.a"], [exe, "-m"]):
    xla_cpu.apply_malloc_defaults({"experiments.a"}, orig_argv=argv)  # returns, no exec
  assert "GLIBC_TUNABLES" not in os.environ


def _module_env(**overrides):
  """This process's environment with the repo importable and no malloc settings of its own."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, **overrides)
  env.pop("GLIBC_TUNABLES", None)
  if xla_cpu.DISABLE_ENV not in overrides:
    env.pop(xla_cpu.DISABLE_ENV, None)
  return env


def _run_module(tmp_path, **env_overrides):
  """Runs ``python -m pkg.show`` from a package whose ``__init__`` restarts like experiments'."""
  pkg = tmp_path / "pkg"
  pkg.mkdir(exist_ok=True)
  (pkg / "__init__.py").write_text(
      "from prefjax import xla_cpu\nxla_cpu.apply_malloc_defaults({'pkg.show'})\n")
  (pkg / "show.py").write_text(
      "import os, sys\njax = sys.modules.get('jax')\n"  # imported only to keep freed memory
      "inline = jax is not None and not jax.config.read('jax_cpu_enable_async_dispatch')\n"
      "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), inline, sys.argv[1:])\n")
  proc = subprocess.Popen([sys.executable, "-m", "pkg.show", "--flag=1", "x"], cwd=tmp_path,
                          env=_module_env(**env_overrides), stdout=subprocess.PIPE, text=True)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0
  pid, tunables, inline, args = out.strip().split(" ", 3)
  return int(pid) == proc.pid, tunables, inline == "True", args


def test_a_binary_restarts_in_place_with_the_malloc_tunables(tmp_path):
  glibc = xla_cpu._is_glibc()
  same_pid, tunables, inline, args = _run_module(tmp_path)
  assert same_pid and args == "['--flag=1', 'x']" and inline == glibc
  assert tunables == (":".join(xla_cpu.MALLOC_TUNABLES) if glibc else "None")
  assert _run_module(tmp_path, **{xla_cpu.DISABLE_ENV: "0"})[1:3] == ("None", False)


@pytest.mark.parametrize("send", [True, False])
def test_a_sigterm_during_the_restart_reaches_the_new_images_handler(tmp_path, send):
  """A SIGTERM sent between the old image's last Python step and the new image's handler
  meets the default disposition (exec resets handlers), which used to kill the binary
  (exit -15). Blocked across the exec, it waits for the new image's handler. Without one
  sent, the program runs with nothing blocked."""
  pkg = tmp_path / "sig"
  pkg.mkdir()
  (pkg / "__init__.py").write_text(
      "import os, signal, sys\n"
      "restarted = 'GLIBC_TUNABLES' in os.environ\n"
      "def handle(signum, frame):\n"
      "  print('handled', signum, 'restarted' if restarted else 'first image', flush=True)\n"
      "  os._exit(75)\n"
      "signal.signal(signal.SIGTERM, handle)\n"
      "execv = os.execv\n"
      "def kill_then_execv(*args):\n"
      "  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as the exec will\n"
      f"  if {send}: os.kill(os.getpid(), signal.SIGTERM)\n"
      "  execv(*args)\n"
      "os.execv = kill_then_execv\n"
      "from prefjax import xla_cpu\nxla_cpu.apply_malloc_defaults({'sig.run'})\n")
  (pkg / "run.py").write_text(  # what the program runs with
      "import os, signal\n"
      "print(signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []), "
      f"'GLIBC_TUNABLES' in os.environ, {xla_cpu._HELD_ENV!r} in os.environ)\n")
  proc = subprocess.run([sys.executable, "-m", "sig.run"], cwd=tmp_path, env=_module_env(),
                        capture_output=True, text=True, timeout=60, check=False)
  glibc = xla_cpu._is_glibc()  # elsewhere no restart, so nothing is sent
  if send and glibc:
    assert (proc.returncode, proc.stdout) == (75, f"handled {int(signal.SIGTERM)} restarted\n"), (
        proc.stderr)
  else:
    assert (proc.returncode, proc.stdout) == (0, f"False {glibc} False\n"), proc.stderr
