"""CPU settings the binaries, tests and benchmarks start with: XLA flags and malloc.

XLA's default CPU dot backend (XNNPACK with YNN fusions in the pinned jax)
ran this project's train steps slower than the classic one: on the HH reward-model
benchmark (``python -m benchmarks.run --cases=rm_step_hh``) turning both off took
the step from 105 to 143 GFLOP/s on a 2-core x86 machine (``benchmarks/RESULTS.md``).
Flags are read once, when JAX starts its CPU backend, so this must run before
the first JAX computation. It never overrides a flag already in ``XLA_FLAGS``;
``PREFJAX_XLA_CPU_DEFAULTS=0`` turns it off. Other backends ignore these flags.

XLA allocates each step's temporaries afresh (838 MB for ``rm_step_hh``, 895 MB for the
DPO steps). By default it runs each computation on a pool thread, whose glibc arena
hands blocks this large to ``mmap`` (even with ``mmap_max=0``) and unmaps them after
the step, so every step faults its pages in again; on a VM with free page reporting the
host takes them back in between, and every other DPO step paid 1.7–1.9 s for that. So
the binaries that run train steps start with ``MALLOC_TUNABLES``:

- ``glibc.malloc.hugetlb=1``: transparent huge pages for malloc's blocks, which took
  the RM step's median from 1.16–1.29 to 0.97–1.04 s in alternating runs;
- and they keep the freed blocks. A computation run on the calling thread
  (:func:`keep_freed_memory`) takes its temporaries from glibc's main arena, which grows
  by ``brk`` and, with ``mmap`` and trimming off, keeps them: 0 page faults per step,
  the HH train steps 16–35% faster. One arena for every thread (``arena_max=1``) also
  kept them, but slowed the steps and doubled the DPO compile times.

Generation gained nothing from these settings: huge pages made it 6–14% slower on one
CPU, and on another the tunables changed nothing alone and cost 20–24% beside PyTorch in one
process. So only the train-step binaries ask for them (numbers: ``benchmarks/RESULTS.md``).
glibc reads ``GLIBC_TUNABLES`` only at start-up, so :func:`apply_malloc_defaults`
re-executes the process with it; ``PREFJAX_XLA_CPU_DEFAULTS=0`` turns all of this off as
well.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Collection, MutableMapping, Sequence

CPU_FLAGS = ("--xla_cpu_use_xnnpack=false", "--xla_cpu_experimental_ynn_fusion_type=")
# Transparent huge pages for malloc's blocks; no mmap and no trimming, so freed blocks stay.
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.mmap_max=0",
                   "glibc.malloc.trim_threshold=4294967295")
DISABLE_ENV = "PREFJAX_XLA_CPU_DEFAULTS"
# Blocked across the restart's exec (the signal mask and pending signals survive it), so
# one sent meanwhile reaches the new image's handler instead of the default action.
HELD_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
_HELD_ENV = "PREFJAX_SIGNALS_HELD_FOR_RESTART"
# Values that turn a PREFJAX_* switch off (DISABLE_ENV, the cache, verbose errors).
OFF = ("0", "off", "false", "no", "none")


def apply_cpu_defaults(environ: MutableMapping[str, str] = os.environ) -> str:
  """Appends each of ``CPU_FLAGS`` not already set to ``XLA_FLAGS``; returns the new value."""
  flags = environ.get("XLA_FLAGS", "")
  if not _defaults_on(environ):
    return flags
  given = {f.split("=", 1)[0] for f in flags.split()}  # a bare --flag means =true
  for flag in CPU_FLAGS:
    if flag.split("=", 1)[0] not in given:
      flags = f"{flags} {flag}".strip()
  environ["XLA_FLAGS"] = flags
  return flags


def malloc_tunables(environ: MutableMapping[str, str] = os.environ) -> str | None:
  """``GLIBC_TUNABLES`` with each of ``MALLOC_TUNABLES`` the user did not set added, or
  None if there is nothing to add (the defaults are off, the C library is not glibc, or
  the user set every one of them)."""
  if not _malloc_defaults_on(environ):
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  chosen = {item.split("=", 1)[0] for item in current.split(":") if item}
  added = [t for t in MALLOC_TUNABLES if t.split("=", 1)[0] not in chosen]
  if not added:
    return None
  return ":".join(([current] if current else []) + added)


def apply_malloc_defaults(modules: Collection[str],
                          orig_argv: Sequence[str] | None = None) -> None:
  """If this process is ``python -m M`` for one of ``modules``: re-executes it with
  :func:`malloc_tunables`, then (in the process that goes on) :func:`keep_freed_memory`.

  Call it before importing JAX (the restart then costs an interpreter start-up; JAX is
  imported after it). It does nothing in any other process (pytest, a notebook, a script
  importing the package), so a library import never restarts its caller.

  ``HELD_SIGNALS`` sent during the restart wait, blocked, until the new image gets here:
  install their handlers before calling it (``experiments/__init__.py`` does for SIGTERM).
  Without that, a SIGTERM between ``execv`` and the new image's handler got the default
  action (exit -15 instead of the binaries' preempted code).
  """
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  if module_run_by(argv) not in modules:
    return
  held = os.environ.pop(_HELD_ENV, "")  # those the image before blocked
  if held:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {int(s) for s in held.split(",")})
  tunables = malloc_tunables()
  if tunables is not None and sys.executable:  # an embedded interpreter cannot re-execute
    os.environ["GLIBC_TUNABLES"] = tunables
    sys.stdout.flush()
    sys.stderr.flush()
    # CPython runs the handler of one that arrived just before the block, here.
    blocked_before = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    os.environ[_HELD_ENV] = ",".join(str(int(s)) for s in HELD_SIGNALS - blocked_before)
    os.execv(sys.executable, [sys.executable, *argv[1:]])
  keep_freed_memory()


def keep_freed_memory(environ: MutableMapping[str, str] = os.environ) -> bool:
  """Runs each single-device CPU computation on the calling thread, where XLA's
  temporaries come from glibc's main arena, which ``MALLOC_TUNABLES`` keep between steps.

  Call it before the first JAX computation of a process started with ``MALLOC_TUNABLES``
  (:func:`apply_malloc_defaults` does both). The Python thread then waits for each
  computation, so a loop's host work between steps no longer overlaps them (about 3 ms a
  step; README). Returns whether it changed anything: not with the defaults off or
  outside glibc.
  """
  if not _malloc_defaults_on(environ):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True


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
  return environ.get(DISABLE_ENV, "1").strip().lower() not in OFF


def _malloc_defaults_on(environ: MutableMapping[str, str]) -> bool:
  """The malloc defaults apply: the project's defaults are on and the C library is glibc."""
  return _defaults_on(environ) and _is_glibc()


def _is_glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError, AttributeError):
    return False
