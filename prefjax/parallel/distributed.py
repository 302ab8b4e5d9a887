"""Multi-host initialisation: absl flags and ``jax.distributed.initialize``.

Call :func:`initialize_distributed` first thing in ``main`` (before any JAX
computation). It initialises the distributed runtime when

  1. a coordinator address is given (argument, ``--coordinator_address``, or
     the ``JAX_COORDINATOR_ADDRESS`` environment variable), or
  2. a multi-process cluster is detected (SLURM with more than one task, Open
     MPI with more than one rank, Cloud TPU with more than one worker or a
     Megascale multislice job), in which case JAX infers the rest itself,

and is a no-op on a single host. The flags are defined when this module is
first imported; importing or reloading it again does not redefine them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

_FLAG_SPECS = (
    ("coordinator_address", None,
     "host:port of process 0 for jax.distributed.initialize (multi-host only)."),
    ("num_processes", None, "Total number of processes (multi-host only)."),
    ("process_id", None, "Index of this process, 0..num_processes-1 (multi-host only)."),
)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines ``--coordinator_address``, ``--num_processes``, ``--process_id`` once."""
  name, default, help_ = _FLAG_SPECS[0]
  if name not in flag_values:
    flags.DEFINE_string(name, default, help_, flag_values=flag_values)
  for name, default, help_ in _FLAG_SPECS[1:]:
    if name not in flag_values:
      flags.DEFINE_integer(name, default, help_, flag_values=flag_values)


define_flags()


class ProcessInfo(NamedTuple):
  """Where this process sits in the (possibly multi-host) job."""
  process_index: int
  process_count: int
  local_device_count: int
  device_count: int
  platform: str

  @property
  def is_coordinator(self) -> bool:
    return self.process_index == 0


def process_info() -> ProcessInfo:
  """The current process's index, the process count and device counts."""
  return ProcessInfo(
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      local_device_count=jax.local_device_count(),
      device_count=jax.device_count(),
      platform=jax.default_backend(),
  )


def _int_env(env: Mapping[str, str], key: str, default: int = 1) -> int:
  try:
    return int(env.get(key, default))
  except ValueError:
    return default


def detect_cluster(env: Mapping[str, str] | None = None) -> str | None:
  """Name of the multi-process cluster environment in ``env`` (default os.environ), or None.

  Only environments with MORE than one process count: a single-task SLURM job
  or a single TPU VM stays single-host.
  """
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "jax_env"
  if "SLURM_JOB_ID" in env and _int_env(env, "SLURM_NTASKS", _int_env(env, "SLURM_NPROCS")) > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and _int_env(env, "OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_multislice"
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return "tpu"
  return None


def _flag_value(flag_values: flags.FlagValues, name: str):
  if name in flag_values and flag_values.is_parsed():
    return flag_values[name].value
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           local_device_ids: Sequence[int] | None = None,
                           flag_values: flags.FlagValues = flags.FLAGS,
                           env: Mapping[str, str] | None = None) -> ProcessInfo:
  """Initialises ``jax.distributed`` when configured or on a detected cluster.

  Explicit arguments win over the (parsed) absl flags, which win over the
  environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID``. Safe to call twice: a second call only reports.

  Returns:
    :func:`process_info` after initialisation.

  Raises:
    ValueError: ``num_processes``/``process_id`` given without a coordinator
      address outside a detected cluster, or a process id out of range.
  """
  env = os.environ if env is None else env
  coordinator_address = (coordinator_address or _flag_value(flag_values, "coordinator_address")
                         or env.get("JAX_COORDINATOR_ADDRESS") or None)
  if num_processes is None:
    num_processes = _flag_value(flag_values, "num_processes")
  if num_processes is None and env.get("JAX_NUM_PROCESSES"):
    num_processes = int(env["JAX_NUM_PROCESSES"])
  if process_id is None:
    process_id = _flag_value(flag_values, "process_id")
  if process_id is None and env.get("JAX_PROCESS_ID"):
    process_id = int(env["JAX_PROCESS_ID"])
  cluster = detect_cluster(env)

  if jax.distributed.is_initialized():
    logging.info("jax.distributed already initialised; not initialising again")
    return process_info()
  if coordinator_address is None and cluster is None:
    if (num_processes or 1) > 1 or process_id not in (None, 0):
      raise ValueError(
          f"num_processes={num_processes}, process_id={process_id} need a coordinator "
          "address (--coordinator_address=host:port) outside a detected cluster")
    return process_info()  # single host
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"process_id={process_id} is outside [0, {num_processes})")
  logging.info("jax.distributed.initialize(coordinator=%s, num_processes=%s, process_id=%s, "
               "cluster=%s)", coordinator_address, num_processes, process_id, cluster)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)
  info = process_info()
  logging.info("process %d/%d with %d local devices (%d total, %s)", info.process_index,
               info.process_count, info.local_device_count, info.device_count, info.platform)
  return info


def every_process(value: int) -> np.ndarray:
  """Each process's ``value`` (an int), in process order: the same array in every process
  (a collective every process must enter). One process: ``[value]``."""
  if jax.process_count() == 1:
    return np.asarray([int(value)])
  return np.asarray(multihost_utils.process_allgather(np.int32(value))).reshape(-1)


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable ``obj``, in process order (a collective every
  process must enter; for small records such as counters). One process: ``[obj]``."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = every_process(data.size)
  buffer = np.zeros(int(lengths.max()), np.uint8)
  buffer[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(lengths), -1)
  return [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]


def sum_over_processes(value: float) -> float:
  """The sum of every process's ``value`` (a collective every process must enter; float32
  on the wire). One process: ``value``."""
  if jax.process_count() == 1:
    return float(value)
  return float(np.asarray(multihost_utils.process_allgather(np.float32(value))).sum())


def in_any_process(flag: bool) -> bool:
  """Whether ``flag`` holds in at least one process: the same answer in every process, so
  they take the same branch (one process alone skipping or stopping leaves the others
  waiting in their next collective). One process: ``flag``."""
  return bool(every_process(bool(flag)).max())


def in_every_process(flag: bool) -> bool:
  """Whether ``flag`` holds in every process (same answer everywhere)."""
  return bool(every_process(bool(flag)).min())


def highest_in_any_process(value: int) -> int:
  """The highest of each process's ``value`` (e.g. a received signal number, 0 for none)."""
  return int(every_process(value).max())
