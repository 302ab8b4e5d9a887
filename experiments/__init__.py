"""The experiment binaries (``python -m experiments.NAME``)."""

import sys

from prefjax import xla_cpu

# Binaries whose time is train steps: huge pages for malloc and keeping freed blocks made
# the HH train steps faster; generation gained nothing or lost (prefjax/xla_cpu.py), so
# only these restart with them.
TRAIN_STEP_BINARIES = frozenset(
    f"experiments.{name}" for name in ("train_rm", "train_dpo", "train_sft", "train_safety"))

xla_cpu.apply_cpu_defaults()  # Before any binary imports JAX.

if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it locates the binary.
  from experiments import preemption
  preemption.exit_on_sigterm()  # Before the binary imports JAX (seconds of start-up).
  # Restarts once; a SIGTERM sent during the restart waits, blocked, for the handler above.
  xla_cpu.apply_malloc_defaults(TRAIN_STEP_BINARIES)
