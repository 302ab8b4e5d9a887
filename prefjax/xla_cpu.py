"""XLA CPU settings the binaries, tests and benchmarks start with.

XLA's default CPU dot backend (XNNPACK with YNN fusions in the pinned jax)
ran this project's train steps slower than the classic one: on the HH reward-model
benchmark (``python -m benchmarks.run --cases=rm_step_hh``) turning both off took
the step from 105 to 143 GFLOP/s on a 2-core x86 machine (``benchmarks/RESULTS.md``).
Flags are read once, when JAX starts its CPU backend, so this must run before
the first JAX computation. It never overrides a flag already in ``XLA_FLAGS``;
``PREFJAX_XLA_CPU_DEFAULTS=0`` turns it off. Other backends ignore these flags.
"""

from __future__ import annotations

import os
from typing import MutableMapping

CPU_FLAGS = ("--xla_cpu_use_xnnpack=false", "--xla_cpu_experimental_ynn_fusion_type=")
DISABLE_ENV = "PREFJAX_XLA_CPU_DEFAULTS"


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
  """Appends each of ``CPU_FLAGS`` not already set to ``XLA_FLAGS``; returns the new value."""
  flags = environ.get("XLA_FLAGS", "")
  if environ.get(DISABLE_ENV, "1") == "0":
    return flags
  for flag in CPU_FLAGS:
    name = flag.split("=", 1)[0]
    if name + "=" not in flags:
      flags = f"{flags} {flag}".strip()
  environ["XLA_FLAGS"] = flags
  return flags
