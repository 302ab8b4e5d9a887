"""Two real processes: ``jax.distributed`` over a localhost coordinator, gloo CPU collectives.

The test launches this file twice as a worker (``python tests/test_distributed.py
worker ...``), process ids 0 and 1, 2 CPU devices each (a 4-device global mesh
over ``data``). Each worker runs ``train_rm`` and ``train_dpo`` tiny on its own
data shard (the pipeline takes rows ``process_index::process_count``; unshuffled
here, so the two local batches of 8 pairs together hold the same 16 pairs as one
process's batch of 16). The first run of each binary dies right after its
step-2 checkpoint (an exception in both processes, after the coordinated save);
the rerun in the same workdir resumes from it and finishes step 4.

The reference is ONE process with 4 devices and the same global batch, run here.
Compared: the loss and gradient norm at step 1 (same parameters, same 16 pairs;
the global batch holds them in another order, so reductions differ: relative
1e-6 and 1e-5, not bit-identity), and the losses of steps 2-4, which come after
the resume (relative 1e-4: Adam turns reduction-order ulps into small parameter
differences, while a wrong resume, another batch or lost parameters, moves the
loss by more than 1e-2).

Cost: about 25-40 s on this shared 2-core CPU (each worker imports JAX, joins the
coordinator and compiles both trainers twice, the second time for the resumed
run; the two workers share the two cores). It is the only test that runs more
than one JAX process, which is why it is worth more than the suite's usual
per-test budget.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from configs.dpo import tiny as dpo_tiny
from configs.rm import tiny as rm_tiny
from experiments import train_dpo
from experiments import train_rm
from prefjax import parallel
from prefjax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
BINARIES = ("rm", "dpo")
LOCAL_PAIRS, STEPS, CRASH_AFTER = 8, 4, 2


def make_config(binary: str, *, pairs: int, num_devices: int):
  config = (rm_tiny if binary == "rm" else dpo_tiny).get_config("quick")
  config.loop.num_steps = STEPS
  config.loop.log_every = 1
  config.loop.checkpoint_every = CRASH_AFTER
  config.loop.eval_every = 0
  config.data.pipeline.batch_size = pairs
  config.data.pipeline.shuffle = False
  config.mesh.shape = (-1, 1, 1)
  config.mesh.num_devices = num_devices
  if binary == "rm":
    config.optimizer.warmup_steps = 1
    config.eval.enabled = False
  else:
    config.eval.kl_max_new_tokens = 0
  return config


def _run(binary: str, config, workdir: str):
  return (train_rm if binary == "rm" else train_dpo).run(config, workdir)


class _Crash(Exception):
  pass


def worker(process_id: int, port: int, root: str, binaries=BINARIES) -> None:
  """One of the two processes: both binaries, each killed after step 2 and resumed."""
  info = parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
  assert (info.process_count, info.device_count, info.local_device_count) == (2, 4, 2), info
  save = train.Checkpointer.save

  def save_then_crash(self, state, *args, **kwargs):
    save(self, state, *args, **kwargs)
    if int(state.step) == CRASH_AFTER:
      self.wait()
      raise _Crash(f"process {process_id}: simulated crash after step {CRASH_AFTER}")

  for binary in binaries:
    config = make_config(binary, pairs=LOCAL_PAIRS, num_devices=0)
    workdir = os.path.join(root, binary)
    train.Checkpointer.save = save_then_crash
    try:
      _run(binary, config, workdir)
      raise AssertionError("the first run did not crash")
    except _Crash:
      pass
    train.Checkpointer.save = save
    _run(binary, config, workdir)


def _metrics(workdir: pathlib.Path) -> dict[int, dict]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r for r in records if "loss" in r}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_resume(tmp_path):
  # First the one-process reference; it also builds the tiny-world dataset in this
  # session's cache, which the workers then only read.
  for binary in BINARIES:
    _run(binary, make_config(binary, pairs=2 * LOCAL_PAIRS, num_devices=4),
         str(tmp_path / "one" / binary))
  port, procs = _free_port(), []
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  for process_id in (0, 1):
    procs.append(subprocess.Popen(
        [sys.executable, __file__, "worker", str(process_id), str(port), str(tmp_path / "two")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  for proc in procs:
    try:
      outputs.append(proc.communicate(timeout=900)[0])
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[out.rfind("Traceback"):][-4000:]

  for binary in BINARIES:
    two_dir = tmp_path / "two" / binary
    two, ref = _metrics(two_dir), _metrics(tmp_path / "one" / binary)
    assert sorted(two) == sorted(ref) == list(range(1, STEPS + 1)), (binary, sorted(two))
    assert two[1]["loss"] == pytest.approx(ref[1]["loss"], rel=1e-6), binary
    assert two[1]["grad_norm"] == pytest.approx(ref[1]["grad_norm"], rel=1e-5), binary
    for step in range(2, STEPS + 1):
      assert two[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), (binary, step)
    assert abs(ref[STEPS]["loss"] - ref[1]["loss"]) > 1e-2  # the steps moved the loss
    assert json.loads((two_dir / "summary.json").read_text())["final_step"] == STEPS
    # The resumed run appended to the crashed run's log: one record per step.
    lines = (two_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1)), binary


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], tuple(sys.argv[5:]) or BINARIES)
