"""Lazy package names (``prefjax._lazy``): every listed name resolves, and importing
the losses or the train step does not pull in the data and checkpoint stack."""

import importlib
import inspect
import subprocess
import sys

import pytest

LAZY_PACKAGES = ("prefjax.data", "prefjax.models", "prefjax.rm", "prefjax.direct",
                 "prefjax.train")


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_listed_name_resolves(package):
  module = importlib.import_module(package)
  assert dir(module) == module.__all__
  for name in module.__all__:
    assert getattr(module, name) is not None, f"{package}.{name}"


@pytest.mark.parametrize("package", ("prefjax.evals", "prefjax.overopt", "prefjax.parallel",
                                     "prefjax.rewards"))
def test_every_public_name_of_an_eager_package_is_listed(package):
  module = importlib.import_module(package)
  public = {name for name, value in vars(module).items()
            if not name.startswith("_") and not inspect.ismodule(value)}
  assert sorted(public) == sorted(module.__all__)


def test_unknown_name_is_an_attribute_error_naming_the_package():
  import prefjax.rm
  with pytest.raises(AttributeError, match="'prefjax.rm' has no attribute 'no_such_name'"):
    prefjax.rm.no_such_name  # pylint: disable=pointless-statement


def test_losses_and_train_step_import_without_the_data_and_checkpoint_stack():
  # A fresh interpreter: this test process has imported everything already.
  heavy = ("grain", "array_record", "tensorflow", "tensorflow_datasets", "orbax.checkpoint",
           "tensorboardX", "torch", "transformers")
  code = ("import sys\n"
          "import prefjax.rm.loss, prefjax.direct.loss, prefjax.train.step, prefjax.losses\n"
          "from prefjax.train import make_train_step\n"
          "from prefjax.rm import make_loss_fn\n"
          f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""}, timeout=120)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr
