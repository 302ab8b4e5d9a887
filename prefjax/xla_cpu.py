"""CPU settings the binaries, tests and benchmarks start with: XLA flags and malloc.

XLA's default CPU dot backend (XNNPACK with YNN fusions in the pinned jax)
ran this project's train steps slower than the classic one: on the HH reward-model
benchmark (``python -m benchmarks.run --cases=rm_step_hh``) turning both off took
the step from 105 to 143 GFLOP/s on a 2-core x86 machine (``benchmarks/RESULTS.md``).
Flags are read once, when JAX starts its CPU backend, so this must run before
the first JAX computation. It never overrides a flag already in ``XLA_FLAGS``;
``PREFJAX_XLA_CPU_DEFAULTS=0`` turns it off. Other backends ignore these flags.

XLA allocates each step's temporaries afresh (838 MB for ``rm_step_hh``), so every
step faults its pages in again. With glibc's ``glibc.malloc.hugetlb=1`` malloc asks
for transparent huge pages on those blocks, which took that step's median from
1.16–1.29 to 0.97–1.04 s (the mean over 30 steps 7% lower) in alternating runs, and
made generation 6–14% slower (``benchmarks/RESULTS.md``); so only the binaries that
run train steps ask for it. The DPO binary also keeps the freed blocks: XLA's threads allocate
from glibc's per-thread arenas, which hand blocks this large to ``mmap`` (even with
``mmap_max=0``) and give them back with ``munmap`` after the step. On a VM with free
page reporting the host then takes those pages, and every other DPO step paid 1.7–1.9 s
to fault them in again. One arena (``arena_max=1``, which grows by ``brk``) with
``mmap`` and trimming off reuses them: 0 page faults per step, the DPO steps 15–40%
faster, peak RSS up to 0.7 GB higher. The RM step, which does not alternate, ran no
faster with it and compiled up to 2x slower (XLA's compiler threads share the one
arena), so only ``train_dpo`` asks for it (``keep_freed``; ``benchmarks/RESULTS.md``).
glibc reads ``GLIBC_TUNABLES`` only at start-up, so :func:`restart_with_malloc_defaults`
re-executes the process with it; ``PREFJAX_XLA_CPU_DEFAULTS=0`` turns that off as well.
"""

from __future__ import annotations

import os
import sys
from typing import Collection, MutableMapping, Sequence

CPU_FLAGS = ("--xla_cpu_use_xnnpack=false", "--xla_cpu_experimental_ynn_fusion_type=")
HUGE_PAGES = ("glibc.malloc.hugetlb=1",)
KEPT_ARENA = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
              "glibc.malloc.trim_threshold=4294967295")
DISABLE_ENV = "PREFJAX_XLA_CPU_DEFAULTS"


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
  """Appends each of ``CPU_FLAGS`` not already set to ``XLA_FLAGS``; returns the new value."""
  flags = environ.get("XLA_FLAGS", "")
  if not _defaults_on(environ):
    return flags
  for flag in CPU_FLAGS:
    name = flag.split("=", 1)[0]
    if name + "=" not in flags:
      flags = f"{flags} {flag}".strip()
  environ["XLA_FLAGS"] = flags
  return flags


def malloc_tunables(environ: MutableMapping[str, str] = os.environ,
                    keep_freed: bool = False) -> str | None:
  """``GLIBC_TUNABLES`` with each of ``HUGE_PAGES`` (and ``KEPT_ARENA`` if ``keep_freed``)
  the user did not set added, or None if there is nothing to add (the defaults are off,
  the C library is not glibc, or the user set every one of them)."""
  if not _defaults_on(environ) or not _is_glibc():
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  chosen = {item.split("=", 1)[0] for item in current.split(":") if item}
  wanted = HUGE_PAGES + (KEPT_ARENA if keep_freed else ())
  added = [t for t in wanted if t.split("=", 1)[0] not in chosen]
  if not added:
    return None
  return ":".join(([current] if current else []) + added)


def restart_with_malloc_defaults(modules: Collection[str],
                                 orig_argv: Sequence[str] | None = None,
                                 keep_freed: Collection[str] = ()) -> None:
  """Re-executes this process with :func:`malloc_tunables` if it is ``python -m M`` for
  one of ``modules`` (with ``keep_freed=True`` if ``M`` is in ``keep_freed``).

  Call it before importing JAX (the restart then costs an interpreter start-up). It
  does nothing in any other process (pytest, a notebook, a script importing the
  package), so a library import never restarts its caller.
  """
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  module = module_run_by(argv)
  if module not in modules:
    return
  tunables = malloc_tunables(keep_freed=module in keep_freed)
  if tunables is None or not sys.executable:  # an embedded interpreter cannot re-execute
    return
  os.environ["GLIBC_TUNABLES"] = tunables
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *argv[1:]])


def module_run_by(argv: Sequence[str]) -> str:
  """The module of ``python [options] -m module …`` (``sys.orig_argv``); "" for anything else."""
  args = iter(argv[1:])
  for arg in args:
    if arg == "-m":
      return next(args, "")
    if arg in ("-X", "-W"):  # options whose value is the next word
      next(args, None)
    elif arg == "-c" or not arg.startswith("-"):  # a command or a script: no -m
      return ""
  return ""


def _defaults_on(environ: MutableMapping[str, str]) -> bool:
  return environ.get(DISABLE_ENV, "1") != "0"


def _is_glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError, AttributeError):
    return False
