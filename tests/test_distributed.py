"""Two real processes: ``jax.distributed`` over a localhost coordinator, gloo CPU collectives.

The test launches this file twice as a worker (``python tests/test_distributed.py
worker ...``), process ids 0 and 1, one CPU device each (a 2-device global mesh
over ``data``). Each worker runs ``train_rm`` and ``train_dpo`` tiny for 4 steps on
its own data shard (the pipeline takes rows ``process_index::process_count``,
unshuffled here), then a deep ensemble of 2 reward models with one member per
process (``mesh.ensemble=2``): both processes hold the same rows of its batch, so
both must read the whole data, in the same order (a member that trained on half of
it used to pass unnoticed). The first ``train_dpo`` run dies right after its step-2
checkpoint (an exception in both processes, after the coordinated save); the rerun
in the same workdir resumes from it and finishes step 4. (``train_rm`` resumes
through the same ``train_loop`` and is not crashed: that would cost a third
compilation of it per process.)

The reference is ONE process with two devices and the same global batch of 16
pairs, run in the test process while the workers run. It reads the training rows
in the order the two processes place them on the devices (process p's j-th pair of
batch k is row ``16k + 2j + p``; the reference puts it at position ``16k + 8p + j``),
so each device holds the same rows in both runs.

What is asserted, and why it holds on any x86-64 CPU. The collectives cannot
differ: both runs compute the same rows on each device from the same
initialisation, and with TWO participants every collective is exact whatever its
algorithm (gloo over TCP in one run, XLA's in-process one in the other): a sum of
two floats is commutative (a+b == b+a in IEEE arithmetic), max/min are exact,
gathers and permutes only copy. (Hence 2 devices, not 4: a sum of 4 values is
associated in an order that depends on the collective's algorithm, gloo's ring or
XLA's in-process sum. The previous 4-device version of this test, whose reference
also placed the rows differently, had 3,524 of 26,913 reward-model parameters
differing after 4 Adam steps, by up to 1.1e-3 = 0.09·lr·steps.) But XLA does not
promise the same per-device code for a client with 1 device (a worker) and one with
more (the reference): ``train_dpo`` run here,
in the test process's 8-device client, differs in the last bits from step 2 on
(4,443 of 25,888 parameters after 4 steps, max 1.2e-7; the step-3 loss by 1.8e-7
relative), while a reference process with exactly 2 devices matched the workers
bit for bit (1 and 2 layers; not Eigen's threading: ``--xla_cpu_multi_thread_eigen
=false`` changed nothing). ``train_rm`` matched bit for bit in every layout tried.
So bit-identity is reported, not asserted. Asserted, for both binaries:

* step 1 (the same parameters, the same rows): the loss to 1e-6 relative, the
  gradient norm (a longer chain of roundings) to 1e-5;
* each later step's loss within its first-order bound
  ``1e-6·|L_k| + 2·‖∇L_k‖·‖θ_two − θ_one‖`` (Cauchy-Schwarz with the logged gradient
  norm of step k and the parameter difference before step k, read from a checkpoint
  of every step; the 1e-6 term covers rounding and the second-order term,
  ~‖δ‖² ≈ 1e-13; measured margin 12x for ``train_dpo``);
* the final parameters within Adam's update scale (``tests/comparisons.py``).

A wrong resume, another batch or lost parameters moves the loss by more than 1e-2
and parameters by ~lr.

Cost: 48 s for the file on a quiet 2-core CPU with the ensemble run (2026-12-05; 130 s
without it at load average 7-10, 110 s of CPU; the 4-device version took 199 s and 131 s
of CPU at load 3-9): each worker imports JAX, joins the coordinator and compiles the
three trainers (1 layer); the resumed
``train_dpo`` run takes its executables from a persistent compilation cache the
crashed run filled, and the reference runs while the workers do. It is the only
test that runs more than one JAX process, which is why it is worth more than the
suite's usual per-test budget.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.dpo import tiny as dpo_tiny
from configs.rm import tiny as rm_tiny
from experiments import train_dpo
from experiments import train_rm
from prefjax import experiment
from prefjax import files
from prefjax import parallel
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from tests import child_env
from tests import comparisons
from tests import test_pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
BINARIES = ("rm", "dpo", "ensemble")
RESUMED = "dpo"  # crashed after step CRASH_AFTER and resumed
NUM_PROCESSES, LOCAL_PAIRS, STEPS, CRASH_AFTER = 2, 8, 4, 2
GLOBAL_PAIRS = NUM_PROCESSES * LOCAL_PAIRS
DPO_EVAL_PAIRS = 209


def make_config(binary: str, *, pairs: int):
  config = (dpo_tiny if binary == "dpo" else rm_tiny).get_config("quick")
  config.model.overrides.num_layers = 1  # Less to compile; the collectives are the same.
  config.loop.num_steps = STEPS
  config.loop.log_every = 1
  config.loop.checkpoint_every = 1  # Every step's parameters, for the loss bounds.
  config.loop.keep_checkpoints = STEPS
  config.loop.eval_every = 0
  config.data.pipeline.batch_size = pairs
  config.data.pipeline.shuffle = False
  # What several processes do anyway (see the last test): the reference pads the same.
  config.data.pipeline.update(bucket_boundaries=(), pad_to_multiple=None)
  config.mesh.shape = (-1, 1, 1)
  config.mesh.num_devices = NUM_PROCESSES
  if binary == "ensemble":  # One member per device; the batch is the same on both.
    config.model.update(head=f"reward_ensemble:{NUM_PROCESSES}", ensemble="deep")
    config.mesh.ensemble = NUM_PROCESSES
  if binary != "dpo":
    config.optimizer.warmup_steps = 1
    # The final eval: each process scores its own rows of the 211 validation pairs (34 a
    # batch), and every process gathers all of them.
    config.eval.batch_size = 34
  else:  # The final eval skips the exact KL. Of 209 validation pairs, process 0's 105
    # make 14 batches of 8 and process 1's 104 make 13: process 1 joins the last global
    # batch (and its reference forward) with an empty one.
    config.data.eval_split = f"{config.data.eval_split}[:{DPO_EVAL_PAIRS}]"
    config.eval.batch_size = pairs
    config.eval.kl_max_new_tokens = 0
    config.eval.exact_kl = "false"
  return config


def _run(binary: str, config, workdir: str):
  return (train_dpo if binary == "dpo" else train_rm).run(config, workdir)


def _pairs_per_process(binary: str) -> int:
  return GLOBAL_PAIRS if binary == "ensemble" else LOCAL_PAIRS


class _Crash(Exception):
  pass


def worker(process_id: int, port: int, root: str) -> None:
  """One of the two processes: both binaries, ``RESUMED`` killed after step 2 and rerun."""
  info = parallel.initialize_distributed(f"localhost:{port}", NUM_PROCESSES, process_id)
  assert (info.process_count, info.device_count, info.local_device_count) == (2, 2, 1), info
  save = train.Checkpointer.save

  def save_then_crash(self, state, *args, **kwargs):
    save(self, state, *args, **kwargs)
    if int(state.step) == CRASH_AFTER:
      self.wait()
      raise _Crash(f"process {process_id}: simulated crash after step {CRASH_AFTER}")

  for binary in BINARIES:
    config = make_config(binary, pairs=_pairs_per_process(binary))
    workdir = os.path.join(root, binary)
    if binary == RESUMED:
      train.Checkpointer.save = save_then_crash
      try:
        _run(binary, config, workdir)
        raise AssertionError("the first run did not crash")
      except _Crash:
        pass
      train.Checkpointer.save = save
    _run(binary, config, workdir)
  # The test holds this workdir's lock: both processes stop (process 1 is told by 0).
  try:
    _run("rm", make_config("rm", pairs=LOCAL_PAIRS), os.path.join(root, "busy"))
    raise AssertionError("a busy workdir was trained in")
  except files.WorkdirBusyError as e:
    print(f"process {process_id}: busy: {e}")


def device_order(num_rows: int) -> np.ndarray:
  """Source row at each position of the reference's stream: the two processes' layout."""
  position = np.arange(num_rows)
  batch, i = np.divmod(position, GLOBAL_PAIRS)
  process, j = np.divmod(i, LOCAL_PAIRS)
  rows = batch * GLOBAL_PAIRS + j * NUM_PROCESSES + process
  return np.where(position < num_rows - num_rows % GLOBAL_PAIRS, rows, position)


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "loss" in r}


def _params(workdir: pathlib.Path, step: int) -> np.ndarray:
  """The parameters of a checkpoint as one float64 vector (any process count wrote it)."""
  path = workdir / "checkpoints" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  params = checkpointer.restore(path, restore_args=args)["params"]
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(params)]).astype(np.float64)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def agreeing_worker(process_id: int, port: int, root: str) -> None:
  """A small ``train_loop`` per scenario where the processes' own views differ: SIGTERM
  reaches process 1 at step 2 and process 0 at step 3; process 0 has 3 batches and
  process 1 has 2. Each used to stop alone and leave the other waiting in a collective.
  Each process feeds one row a step, a multiple of the one device it holds, not of the
  mesh's two (those were refused)."""
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed(f"localhost:{port}", NUM_PROCESSES, process_id)
  mesh = parallel.make_mesh((-1, 1, 1), ("data", "fsdp", "tensor"))
  rng = np.random.default_rng(process_id)

  def loss_fn(model, batch, key):
    del key
    return jax.numpy.mean((model(batch["x"])[:, 0] - batch["y"]) ** 2), {}
  scenarios = {"signal": (100, 2 + (process_id == 0)), "exhausted": (3 - process_id, None)}
  with jax.set_mesh(mesh):
    for name, (num_batches, signal_at) in scenarios.items():
      batches = [{"x": rng.normal(size=(1, 4)).astype(np.float32),
                  "y": rng.normal(size=1).astype(np.float32)} for _ in range(num_batches)]
      hooks = [lambda step, *_, at=signal_at: step == at and signal.raise_signal(
          signal.SIGTERM)]
      result = train.train_loop(
          workdir=os.path.join(root, name), model=nnx.Linear(4, 1, rngs=nnx.Rngs(0)),
          loss_fn=loss_fn, optimizer=optax.sgd(0.1), mesh=mesh, hooks=hooks,
          loop={"num_steps": 5, "log_every": 1, "tensorboard": False},
          train_iter=iter(batches))
      print(f"process {process_id}: {name}: step {int(result.state.step)} "
            f"preempted {result.preempted}", flush=True)


def test_a_signal_or_the_end_of_one_process_data_stops_every_process_at_one_step(tmp_path):
  returncodes, outputs = _join_workers(_start_workers(tmp_path, mode="agreeing_worker"),
                                       timeout=240)
  for process_id, (returncode, out) in enumerate(zip(returncodes, outputs)):
    assert returncode == 0, out[-4000:]
    assert f"process {process_id}: signal: step 2 preempted True" in out, out[-2000:]
    assert f"process {process_id}: exhausted: step 2 preempted False" in out, out[-2000:]


# What the coordinator logs before it dies when another program took its port between
# `_free_port` and its bind; the other worker would wait for it until the timeout.
_PORT_TAKEN = "Failed to add port to server"
_PORT_ATTEMPTS = 3


class _Workers(NamedTuple):
  root: pathlib.Path
  mode: str
  attempt: int
  procs: list[subprocess.Popen]
  logs: list[pathlib.Path]


def _start_workers(root: pathlib.Path, mode: str = "worker", attempt: int = 0) -> _Workers:
  # The same XLA flags as this process (conftest's CPU settings), one device each; the
  # session's compilation cache (conftest) comes with the environment.
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=child_env.one_device_xla_flags())
  port = _free_port()
  logs = [root / f"{mode}_{process_id}_attempt{attempt}.log"
          for process_id in range(NUM_PROCESSES)]
  procs = []
  for process_id, log in enumerate(logs):
    with open(log, "w", encoding="utf-8") as out:
      procs.append(subprocess.Popen(
          [sys.executable, __file__, mode, str(process_id), str(port), str(root / "two")],
          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
  return _Workers(root, mode, attempt, procs, logs)


def _join_workers(workers: _Workers, timeout: float) -> tuple[list[int], list[str]]:
  """Waits for the workers; starts them again on a new port (at most `_PORT_ATTEMPTS`
  times) when the coordinator could not bind the one `_free_port` found free."""
  deadline = time.monotonic() + timeout
  port_taken = False
  try:
    while any(proc.poll() is None for proc in workers.procs) and time.monotonic() < deadline:
      port_taken = _PORT_TAKEN in workers.logs[0].read_text(errors="replace")
      if port_taken:
        break
      time.sleep(0.5)
  finally:
    for proc in workers.procs:
      proc.kill()
      proc.wait()
  outputs = [log.read_text(errors="replace") for log in workers.logs]
  port_taken = port_taken or _PORT_TAKEN in outputs[0]
  if port_taken and workers.attempt + 1 < _PORT_ATTEMPTS:
    return _join_workers(_start_workers(workers.root, workers.mode, workers.attempt + 1),
                         timeout)
  return [proc.returncode for proc in workers.procs], outputs


def test_free_port_taken_by_another_program_starts_the_workers_again(tmp_path, monkeypatch):
  """The race `_join_workers` retries: a port found free and taken before the coordinator
  binds it. The first attempt's coordinator meets a taken port; the second gets a free one."""
  with socket.socket() as taken:
    taken.bind(("localhost", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1], _free_port()])
    monkeypatch.setattr(sys.modules[__name__], "_free_port", lambda: next(ports))
    returncodes, outputs = _join_workers(_start_workers(tmp_path, mode="port_worker"),
                                         timeout=120)
  assert _PORT_TAKEN in (tmp_path / "port_worker_0_attempt0.log").read_text()
  assert returncodes == [0] * NUM_PROCESSES, outputs
  assert all("joined 2 processes" in out for out in outputs), outputs


def test_two_processes_match_one_and_resume(tmp_path, monkeypatch):
  # Build the tiny-world dataset (once per session cache) before anyone reads it.
  experiment.load_split(make_config("rm", pairs=GLOBAL_PAIRS).data, "resplit_train")
  busy = files.exclusive(tmp_path / "two" / "busy")  # another run's, for the workers
  busy.__enter__()
  workers = _start_workers(tmp_path)
  try:
    # The ensemble's processes read the rows in file order, as one process does.
    _run("ensemble", make_config("ensemble", pairs=GLOBAL_PAIRS),
         str(tmp_path / "one" / "ensemble"))
    index_dataset = pipeline_lib.index_dataset

    def in_device_order(num_rows, config, **kwargs):
      rows = index_dataset(num_rows, config, **kwargs)
      if config.num_epochs is not None:  # An eval pass: not reordered.
        return rows
      order = device_order(num_rows)
      return rows.map(lambda row: int(order[row]))

    monkeypatch.setattr(pipeline_lib, "index_dataset", in_device_order)
    for binary in ("rm", "dpo"):
      _run(binary, make_config(binary, pairs=GLOBAL_PAIRS), str(tmp_path / "one" / binary))
    returncodes, outputs = _join_workers(workers, timeout=600)
  finally:
    for proc in workers.procs:
      proc.kill()
    busy.__exit__(None, None, None)
  for returncode, out in zip(returncodes, outputs):
    assert returncode == 0, out[out.rfind("Traceback"):][-4000:]
  for process_id, out in enumerate(outputs):
    assert f"process {process_id}: busy: " in out

  for binary in BINARIES:
    two_dir, one_dir = tmp_path / "two" / binary, tmp_path / "one" / binary
    two, one = _metrics(two_dir), _metrics(one_dir)
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1)), (binary, sorted(two))
    assert abs(one[STEPS]["loss"] - one[1]["loss"]) > 1e-2  # the steps moved the loss
    # A resumed run appends to the crashed run's log: still one record per step.
    lines = (two_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1)), binary
    two_summary, one_summary = (json.loads((d / "summary.json").read_text())
                                for d in (two_dir, one_dir))
    assert two_summary["final_step"] == one_summary["final_step"] == STEPS
    # Every validation pair scored once, by one process or the other.
    two_eval, one_eval = two_summary["final_eval"], one_summary["final_eval"]
    if binary != "dpo":
      assert two_eval["num_pairs"] == one_eval["num_pairs"] == 211
      assert abs(two_eval["accuracy"] - one_eval["accuracy"]) <= 2 / 211
    else:
      assert two_eval["num_examples"] == one_eval["num_examples"] == DPO_EVAL_PAIRS
      accuracy = "rewards/accuracies"
      assert abs(two_eval[accuracy] - one_eval[accuracy]) <= 2 / DPO_EVAL_PAIRS
    # The data report counts every process's rows once, as one process does (token_slots
    # differ: several processes pad every batch to its full length).
    counts = [s["data"]["train"]["iterator"] for s in (two_summary, one_summary)]
    for key in ("examples_read", "real_tokens", "batches", "truncated_response"):
      assert counts[0][key] == counts[1][key], (binary, key, counts)
    # tokens_per_sec counts every process's rows once (both hold the ensemble's rows).
    per_step = lambda r: r["tokens_per_sec"] / r["steps_per_sec"]  # noqa: E731
    for step in range(1, STEPS + 1):
      assert per_step(two[step]) == pytest.approx(per_step(one[step]), rel=1e-6), (binary, step)
    # Step 1: the same parameters and rows.
    np.testing.assert_allclose(two[1]["loss"], one[1]["loss"], rtol=1e-6, err_msg=binary)
    np.testing.assert_allclose(two[1]["grad_norm"], one[1]["grad_norm"], rtol=1e-5, err_msg=binary)
    for step in range(2, STEPS + 1):
      delta = np.linalg.norm(_params(two_dir, step - 1) - _params(one_dir, step - 1))
      bound = 1e-6 * abs(one[step]["loss"]) + 2 * one[step]["grad_norm"] * delta
      assert abs(two[step]["loss"] - one[step]["loss"]) <= bound, (binary, step, delta, bound)
    comparisons.assert_params_close_after_adam(
        _params(two_dir, STEPS), _params(one_dir, STEPS), steps=STEPS,
        learning_rate=make_config(binary, pairs=GLOBAL_PAIRS).optimizer.learning_rate)


def port_worker(process_id: int, port: int, root: str) -> None:
  del root
  parallel.initialize_distributed(f"localhost:{port}", NUM_PROCESSES, process_id)
  print(f"joined {jax.process_count()} processes", flush=True)


_WORKERS = {"worker": worker, "agreeing_worker": agreeing_worker, "port_worker": port_worker}
if __name__ == "__main__" and sys.argv[1:2] and sys.argv[1] in _WORKERS:
  _WORKERS[sys.argv[1]](int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])


def test_several_processes_pad_every_batch_to_the_same_shape(monkeypatch):
  """Each process batches its own rows and the local batches join into one global array,
  so every process must build the same shapes at every step: with several processes a
  padded batch is always its full length (no buckets, no ``pad_to_multiple``)."""
  cfg = test_pipeline.config(shuffle=False, pad_to_multiple=8)
  def shapes():
    ds = pipeline_lib.preference_dataset(test_pipeline.SOURCE, test_pipeline.TOK, cfg)
    return {b["tokens"].shape for b in test_pipeline.run(ds)[0]}
  assert len(shapes()) > 1  # one process: the length follows each batch's longest row
  monkeypatch.setattr(pipeline_lib, "_process_count", lambda: 2)
  assert shapes() == {(2 * cfg.batch_size, cfg.max_length)}

