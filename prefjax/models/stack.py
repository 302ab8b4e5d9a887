"""Running a trunk's stack of blocks: rematerialised or not, unrolled or scanned.

Both trunks (``decoder.Decoder``, ``encoder.Encoder``) keep their blocks as an
``nnx.List`` (one module per layer, readable paths, per-layer surgery) and run
them through ``run_blocks``:

- ``remat`` names what each block keeps for the backward pass
  (``REMAT_POLICIES``); the rest of its activations are recomputed there.
- ``scan=True`` runs the blocks as one ``lax.scan`` over their parameters stacked
  inside the program, so the program compiles one block instead of one per layer.

On XLA CPU, remat saves memory only in a scan: with unrolled blocks XLA schedules
every block's recomputation early, so all of them are live at once (8% saved on
the HH RM step against 74% scanned; benchmarks/RESULTS.md, "Remat policies").

Both trunks also take their default compute dtype from here (``default_compute_dtype``).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from prefjax.models import attention as attention_lib

Array = jax.Array


def default_compute_dtype() -> jnp.dtype:
  """float32 on CPU (faster there than bfloat16), bfloat16 on accelerators."""
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


# What a rematerialised block keeps for the backward pass; the rest is recomputed.
# None is jax.checkpoint's default: only the block's input.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names(*attention_lib.SAVEABLE_NAMES),
}


def remat_policy(remat: bool | str) -> str | None:
  """A ``remat`` setting as a ``REMAT_POLICIES`` name, or None for no rematerialisation
  (``False`` or ``"none"``; ``True`` is ``"full"``, and so are ``"True"``/``"False"``
  from a command line)."""
  if isinstance(remat, str) and remat.lower() in ("true", "false"):
    remat = remat.lower() == "true"
  if remat is False or remat == "none":
    return None
  if remat is True:
    return "full"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat must be True, False, 'none' or one of {sorted(REMAT_POLICIES)}; "
                     f"got {remat!r}")
  return remat


@functools.cache
def _rematerialised(forward: Callable, remat: str | None) -> Callable:
  # Cached so that repeated traces reuse one nnx.remat wrapper per (forward, policy).
  if remat is None:
    return forward
  return nnx.remat(forward, policy=REMAT_POLICIES[remat])


def run_blocks(forward: Callable, blocks: Sequence[nnx.Module], x: Array, *args,
               remat: bool | str = False, scan: bool = False) -> Array:
  """``x`` through ``forward(block, x, *args) -> x`` for every block in turn.

  ``forward`` should be a module-level function (it keys a cache); ``args`` are the
  same for every block (positions, masks).
  """
  forward = _rematerialised(forward, remat_policy(remat))
  if scan and blocks:
    graphdef = nnx.graphdef(blocks[0])
    stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *[nnx.state(b) for b in blocks])

    def body(x, state):
      return forward(nnx.merge(graphdef, state), x, *args), None
    x, _ = jax.lax.scan(body, x, stacked)
    return x
  for block in blocks:
    x = forward(block, x, *args)
  return x
