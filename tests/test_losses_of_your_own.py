"""The README's "Adding a loss" in a module of your own: its example loss, kept outside the
project, is covered by the parametrised loss tests through PREFJAX_TEST_IMPORTS."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

REFERENCE = '''

import numpy as np


def ref_my_loss(d, beta, gamma=0.0):
  mean_c = d["pc"] / np.maximum(d["nc"], 1.0)
  mean_r = d["pr"] / np.maximum(d["nr"], 1.0)
  return np.logaddexp(0.0, -(beta * (mean_c - mean_r) - gamma))
'''


def _readme_loss() -> str:
  """The first Python block of the README's "Adding a loss" section, as written."""
  section = (ROOT / "README.md").read_text().split("### Adding a loss", 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_loss_passes_the_loss_tests_from_a_module_of_your_own(tmp_path):
  """A loss in your own module was never imported by the suite, so it went untested; the
  README's example also computed in bfloat16 and failed the float32 test once it was."""
  package = tmp_path / "my_lab"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "my_losses.py").write_text(_readme_loss() + REFERENCE)
  env = dict(os.environ, PREFJAX_TEST_IMPORTS="my_lab.my_losses",
             PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       "-k", "my_loss", str(ROOT / "tests" / "test_losses_direct.py")],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  summary = proc.stdout.strip().splitlines()[-1]
  assert proc.returncode == 0, proc.stdout[-3000:]
  # Reference, formula, finite-difference gradients, dtypes, jit/vmap, monotonicity …
  assert int(re.search(r"(\d+) passed", summary).group(1)) >= 8, summary
  # A file that lists the registry sees the loss when collected alone (conftest imports
  # the modules); test_train_dpo.py saw it only after test_losses_direct.py.
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
       "--collect-only", "-k", "my_loss", str(ROOT / "tests" / "test_train_dpo.py")],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert proc.returncode == 0 and "[my_loss]" in proc.stdout, proc.stdout[-3000:]
