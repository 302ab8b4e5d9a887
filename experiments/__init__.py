"""The experiment binaries (``python -m experiments.NAME``)."""

import sys

from prefjax import xla_cpu

# Binaries whose time is train steps: huge pages for malloc made the HH decoder steps
# faster, and generation slower (benchmarks/RESULTS.md), so only these restart with them.
TRAIN_STEP_BINARIES = frozenset(
    f"experiments.{name}" for name in ("train_rm", "train_dpo", "train_sft", "train_safety"))
# ... and keeping freed memory made the DPO steps 20-39% faster, the RM step no faster
# (prefjax/xla_cpu.py).
KEPT_ARENA_BINARIES = frozenset({"experiments.train_dpo"})

xla_cpu.apply_cpu_defaults()  # Before any binary imports JAX.

if sys.argv[:1] == ["-m"]:  # Python sets argv[0] to "-m" while it locates the binary.
  xla_cpu.restart_with_malloc_defaults(TRAIN_STEP_BINARIES, keep_freed=KEPT_ARENA_BINARIES)
  from experiments import preemption
  preemption.exit_on_sigterm()  # Before the binary imports JAX (seconds of start-up).
