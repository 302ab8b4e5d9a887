"""SIGTERM at any moment of a binary's life: exit codes, what is saved, the rerun.

A real ``train_rm`` process (tiny config) is signalled while it imports JAX,
while it builds data and model, and while it trains.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments import preemption
from tests import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 300


def command(workdir, num_steps):
  return [sys.executable, "-m", "experiments.train_rm", "--config=configs/rm/tiny.py:quick",
          f"--workdir={workdir}", f"--config.loop.num_steps={num_steps}",
          "--config.loop.log_every=1", "--config.optimizer.warmup_steps=0",
          "--config.data.tiny_world.num_pairs=600", "--config.data.pipeline.batch_size=8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("preemption_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=child_env.one_device_xla_flags(),
              PREFJAX_CACHE_DIR=str(root / "cache"),
              PREFJAX_SYNTHETIC_DIR=str(root / "synthetic"))


def wait_for(condition, proc, what):
  deadline = time.time() + TIMEOUT
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f"exited with {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}")
    if time.time() > deadline:
      proc.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.05)


def sigterm_and_wait(proc):
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, stderr


def catches_sigterm(pid):
  """Whether the process has a SIGTERM handler (Linux: the SigCgt mask in /proc)."""
  with open(f"/proc/{pid}/status") as f:
    mask = next(line for line in f if line.startswith("SigCgt:")).split()[1]
  return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def launch(workdir, env, num_steps):
  return subprocess.Popen(command(workdir, num_steps), cwd=REPO, env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def checkpoint_steps(workdir):
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.exists()) else []


def test_sigterm_during_imports_and_set_up_exits_with_the_preempted_code(tmp_path, env):
  assert preemption.PREEMPTED_EXIT_CODE not in (0, 1, 128 + signal.SIGTERM)
  # While Python imports JAX: the handler installed by experiments/__init__.py.
  proc = launch(tmp_path / "imports", env, num_steps=3)
  wait_for(lambda: catches_sigterm(proc.pid), proc, "the SIGTERM handler")
  code, stderr = sigterm_and_wait(proc)
  assert code == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert "outside training: nothing new to save" in stderr
  assert not (tmp_path / "imports").exists()  # main() never ran.
  # While building data and model (the workdir exists, training has not started).
  workdir = tmp_path / "set_up"
  proc = launch(workdir, env, num_steps=3)
  wait_for(lambda: (workdir / "logs").exists(), proc, "the workdir")
  code, stderr = sigterm_and_wait(proc)
  assert code == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert "Traceback" not in stderr
  assert not (workdir / "summary.json").exists()


def test_sigterm_while_waiting_for_the_other_processes_exits_with_the_preempted_code(
    tmp_path, env):
  # jax.distributed.initialize waits in native code, where Python's handler never runs:
  # the process used to ignore SIGTERM until its partner came or JAX aborted (5 min).
  workdir = tmp_path / "waiting"
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen(command(workdir, 3) + [
      f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0"],
      cwd=REPO, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  lines = []
  wait_for(lambda: "jax.distributed.initialize(" in (lines.append(proc.stderr.readline())
                                                      or "".join(lines)), proc, "the wait")
  time.sleep(1.0)  # inside the native wait
  start = time.time()
  code, stderr = sigterm_and_wait(proc)
  assert code == preemption.PREEMPTED_EXIT_CODE, "".join(lines) + stderr[-3000:]
  assert time.time() - start < 60  # not the 5 min JAX's own wait takes to give up
  assert "outside training: nothing new to save" in stderr


def test_sigterm_while_training_saves_skips_eval_and_the_rerun_resumes(tmp_path, env):
  workdir = tmp_path / "run"
  proc = launch(workdir, env, num_steps=100_000)
  metrics = workdir / "metrics.jsonl"
  wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, proc,
           "two train steps")
  code, stderr = sigterm_and_wait(proc)
  assert code == preemption.PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert "saving a checkpoint and stopping" in stderr
  (saved,) = checkpoint_steps(workdir)
  assert saved >= 2
  assert not (workdir / "summary.json").exists()
  assert not list(workdir.glob("eval_*.json"))  # The final eval was skipped.
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert not any(k.startswith("eval/") for r in records for k in r)
  assert_damaged_copy_stops_with_one_line(workdir, tmp_path / "damaged", env, saved)
  # The rerun resumes at the saved step, finishes two steps later and exits 0.
  proc = subprocess.run(command(workdir, saved + 2), cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"at step {saved}" in proc.stderr and "resumed" in proc.stderr
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["final_step"] == saved + 2
  assert (workdir / f"eval_{saved + 2}.json").exists()


def assert_damaged_copy_stops_with_one_line(workdir, copy, env, saved):
  shutil.copytree(workdir, copy)
  os.remove(copy / "checkpoints" / str(saved) / "state" / "_METADATA")
  proc = subprocess.run(command(copy, saved + 2), cwd=REPO, env=env, text=True,
                        capture_output=True, timeout=TIMEOUT, check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert f"checkpoint step {saved} in {copy}/checkpoints is damaged: state/_METADATA: missing" in (
      proc.stderr)
  last = proc.stderr.rstrip("\n").splitlines()[-1]
  assert last.startswith(f"error: no intact checkpoint in {copy}/checkpoints"), last
  assert last.endswith("rerun with --config.loop.allow_restart=True to start from scratch")
