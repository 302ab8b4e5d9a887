"""Benchmarks (``python -m benchmarks.NAME``): each prints a table and writes JSON."""

import sys

from prefjax import xla_cpu

# Scripts timing train steps in their own process, as the training binaries run them
# (``experiments/__init__.py``). ``run`` and ``profile_step`` set up their processes
# themselves (``run`` per case: generation without huge pages).
TRAIN_STEP_SCRIPTS = frozenset(f"benchmarks.{name}" for name in (
    "ensemble_step", "scale_rm_step", "remat_policies"))

if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it locates the script.
  if xla_cpu.module_run_by(sys.orig_argv) in TRAIN_STEP_SCRIPTS:
    xla_cpu.apply_cpu_defaults()  # Before the script imports JAX.
    xla_cpu.apply_malloc_defaults(TRAIN_STEP_SCRIPTS)  # glibc reads tunables at start.
