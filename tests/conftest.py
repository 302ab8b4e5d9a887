"""Test setup: 8 fake CPU devices for sharding tests, and the shared data directory."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The suite is compile-bound (tiny models): XLA's backend optimisation level 0 compiles
# faster (a pair of DPO-loss tests: 19.6 -> 16.5 s) and left run-bound tests unchanged
# (SmolLM2 GGUF + bandit tests: 48.7 vs 49.8 s). Numbers only change within round-off.
# XLA CPU's older elemental emitters in place of its MLIR fusion emitters halved the
# compile time again (decoder, sampling and two train_rm tests, no compilation cache:
# 70-74 -> 30-36 s of backend compilation, wall 104-110 -> 62-72 s; 2026-12-06).
# Tests that launch a binary pass the same flags (tests/child_env.py).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0] + "=" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
from prefjax import xla_cpu  # noqa: E402  (imports nothing of JAX)

xla_cpu.apply_cpu_defaults()  # the binaries' CPU settings, so in-process runs match them
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import atexit  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Built datasets and synthetic worlds go to a private cache of this session, so the suite
# never reads state left in ~/.cache by earlier runs. The process that creates it (the
# xdist controller, or a plain pytest) removes it at exit; xdist workers and launched
# binaries inherit it through the environment.
_ROOT_ENV = "PREFJAX_TEST_CACHE_ROOT"
if _ROOT_ENV not in os.environ:
  os.environ[_ROOT_ENV] = tempfile.mkdtemp(prefix="prefjax-test-cache-")
  atexit.register(shutil.rmtree, os.environ[_ROOT_ENV], ignore_errors=True)
_CACHE_ROOT = pathlib.Path(os.environ[_ROOT_ENV])
os.environ.setdefault("PREFJAX_CACHE_DIR", str(_CACHE_ROOT / "tfds"))
os.environ.setdefault("PREFJAX_SYNTHETIC_DIR", str(_CACHE_ROOT / "synthetic"))

# One XLA compilation cache for the session, its xdist workers and the binaries tests
# launch (they inherit the environment): the same program recurs across runs (resumes,
# reruns, one-device references, repeated configs) and compiles once. Set the variable
# to "" to compile everything afresh.
if os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE_ROOT / "xla")):
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from prefjax import assets  # noqa: E402


def _in_ci() -> bool:
  return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_asset(fn, *args):
  """Returns the asset path; in CI a missing asset FAILS, elsewhere it skips."""
  try:
    path = fn(*args)
    if not pathlib.Path(path).exists():
      raise assets.AssetNotFoundError(str(path))
    return path
  except assets.AssetNotFoundError as e:
    if _in_ci():
      pytest.fail(f"required asset missing in CI: {e}")
    pytest.skip(f"asset missing: {e}")


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  return require_asset(assets.data_dir)


@pytest.fixture(scope="session")
def hh_harmless_test_file() -> pathlib.Path:
  return require_asset(assets.data_file, "hh_rlhf/harmless-base/test.jsonl.gz")


@pytest.fixture(scope="session")
def pandalm_file() -> pathlib.Path:
  return require_asset(assets.data_file, "pandalm/testset-v1.json")


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  return require_asset(assets.minilm_dir)


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
  return require_asset(assets.smollm2_gguf)


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> pathlib.Path:
  return require_asset(assets.gpt2_bpe_dir)


# The slowest test files (measured: `--durations=0`, 2026-12-01). With `--dist loadfile`
# a file runs on one worker; starting the longest ones first keeps the two workers'
# finishing times close (longest-processing-time-first scheduling). xdist's own order,
# most tests first, undid this and left these few-test files for last, one worker alone
# at the end; the Makefile passes --no-loadscope-reorder so collection order holds.
_SLOW_FIRST = ("test_reproduce.py", "test_train_dpo.py", "test_train_rl.py", "test_train_rm.py",
               "test_distributed.py", "test_eval_rm.py", "test_config_errors.py",
               "test_gguf_smollm2.py", "test_preemption.py", "test_workdir_history.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
  """Losses of your own (``PREFJAX_TEST_IMPORTS``) are registered before any test file is
  collected: a file that lists the registry (``test_train_dpo.py``) saw them only when
  collected after the loss-test files that import them."""
  del config
  from tests import numerics  # pylint: disable=import-outside-toplevel
  numerics.user_modules()
