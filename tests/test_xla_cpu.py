"""The binaries' XLA CPU defaults: added once, never overriding the user's flags."""

import os
import subprocess
import sys

from prefjax import xla_cpu


def test_flags_are_appended_once_and_user_values_win():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_use_xnnpack=true"}
  flags = xla_cpu.apply_cpu_defaults(env)
  assert flags == ("--xla_force_host_platform_device_count=8 --xla_cpu_use_xnnpack=true "
                   "--xla_cpu_experimental_ynn_fusion_type=")
  assert xla_cpu.apply_cpu_defaults(env) == flags
  assert xla_cpu.apply_cpu_defaults({}) == " ".join(xla_cpu.CPU_FLAGS)
  off = {xla_cpu.DISABLE_ENV: "0", "XLA_FLAGS": "--a=1"}
  assert xla_cpu.apply_cpu_defaults(off) == "--a=1" and off["XLA_FLAGS"] == "--a=1"


def test_a_binary_starts_with_the_defaults_and_jax_accepts_them():
  code = ("import experiments, os, jax, jax.numpy as jnp; "
          "print(os.environ['XLA_FLAGS']); print(float(jnp.dot(jnp.ones(3), jnp.ones(3))))")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  env.pop(xla_cpu.DISABLE_ENV, None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout.split("\n")
  assert out[0] == " ".join(xla_cpu.CPU_FLAGS) and out[1] == "3.0"
