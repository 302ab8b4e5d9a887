"""The experiment binaries (``python -m experiments.NAME``)."""

import sys

from prefjax import xla_cpu

xla_cpu.apply_cpu_defaults()  # Before any binary imports JAX.

if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it locates the binary.
  xla_cpu.restart_with_malloc_defaults("experiments")  # glibc reads its tunables at start-up.
  from experiments import preemption
  preemption.exit_on_sigterm()  # Before the binary imports JAX (seconds of start-up).
