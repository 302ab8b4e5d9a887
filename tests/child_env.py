"""What a test gives a binary it launches: the suite's XLA flags, on one CPU device."""

import os
import re


def one_device_xla_flags() -> str:
  """conftest's XLA flags (its compile settings) with one host device in place of eight."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", ""))
  return f"{flags} --xla_force_host_platform_device_count=1".strip()
