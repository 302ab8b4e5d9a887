"""Train steps of the benchmark cases: prefjax (the library's public step API) and PyTorch.

Every builder returns ``(step, info)``: ``step(batch) -> loss`` runs one
optimizer update and blocks until it is done; ``info`` holds the parameter
count and, for jitted steps, a function counting compiled programs, the jitted
``train_step(state, batch)`` and ``state()`` returning its current train state
(``benchmarks.profile_step`` compiles and traces them).

The PyTorch side is the computation TRL's trainers run, written out with
``transformers`` so that no TRL install is needed: ``LlamaForSequenceClassification``
(SDPA attention, reward read at the last non-pad token) with AdamW and
−log σ(r_c − r_r) for the RM; ``LlamaForCausalLM`` with the sigmoid DPO loss
(β = 0.1) on summed response log-probs for DPO. Rows are the same token ids as
prefjax's, cut to the batch's longest real row (TRL pads to the longest).
"""

from __future__ import annotations

import resource
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import workloads
from prefjax.direct import loss as direct_loss_lib
from prefjax.models import decoder as dec
from prefjax.models import heads
from prefjax.rm import loss as rm_loss_lib
from prefjax.train import state as state_lib
from prefjax.train import step as step_lib

LEARNING_RATE = 1e-5
DPO_BETA = 0.1


class PolicyAndReference(nnx.Module):
  """A policy and its frozen reference in one module, so one program runs both forwards."""

  def __init__(self, policy: nnx.Module, reference: nnx.Module):
    self.policy = policy
    self.reference = reference


def _jitted(model: nnx.Module, loss_fn, trainable=nnx.Param) -> tuple[Callable, dict]:
  tx = optax.adamw(LEARNING_RATE)
  graphdef, state = state_lib.create_train_state(model, tx, 0, trainable=trainable)
  jitted = step_lib.jit_train_step(step_lib.make_train_step(graphdef, loss_fn, tx,
                                                            trainable=trainable))
  holder = {"state": state}

  def step(batch):
    holder["state"], metrics = jitted(holder["state"], batch)
    return float(jax.block_until_ready(metrics["loss"]))

  params = state_lib.count_params(state.params)
  return step, {"params": params, "compiles": jitted._cache_size, "train_step": jitted,
                "state": lambda: holder["state"]}


def _decoder(seed: int, num_layers: int | None = None, scan_layers: bool = False,
             remat: bool | str = False, config: dec.DecoderConfig | None = None,
             dtype: Any = None) -> dec.Decoder:
  config = config or workloads.rm_model_config(num_layers=num_layers)
  return dec.Decoder(config, rngs=nnx.Rngs(seed), scan_layers=scan_layers, remat=remat,
                     dtype=dtype)


def prefjax_rm(num_segments: int | None, **decoder_options) -> tuple[Callable, dict]:
  """The RM step; ``decoder_options`` (``num_layers`` or a whole ``config``, ``scan_layers``,
  ``remat``, compute ``dtype``) resize, scan or rematerialise the trunk."""
  model = heads.attach_head(_decoder(0, **decoder_options), "reward", rngs=nnx.Rngs(1))
  loss_fn = rm_loss_lib.make_loss_fn({"name": "bt"}, num_columns=1, objectives=(),
                                      num_segments=num_segments)
  return _jitted(model, loss_fn)


def prefjax_rm_ensemble(members: int, num_segments: int | None, *,
                        config: dec.DecoderConfig | None = None, forward: str = "auto",
                        dtype: Any = None) -> tuple[Callable, dict]:
  """``members`` complete RMs (``DeepEnsemble``, seeds 0, 1, ...) trained in one step;
  ``config`` (default: the workload's), ``forward`` and compute ``dtype`` as in
  ``DeepEnsemble`` and ``Decoder``."""
  config = config or workloads.rm_model_config()
  model = heads.DeepEnsemble(
      lambda rngs: heads.attach_head(dec.Decoder(config, rngs=rngs, dtype=dtype), "reward",
                                     rngs=rngs),
      list(range(members)), forward=forward)
  loss_fn = rm_loss_lib.make_loss_fn({"name": "bt"}, num_columns=members, objectives=(),
                                      num_segments=num_segments)
  return _jitted(model, loss_fn)


def prefjax_dpo(reference: str, num_segments: int | None) -> tuple[Callable, dict]:
  """DPO; ``reference="cached"`` reads ``ref_chosen/ref_rejected`` from the batch,
  ``"live"`` runs the frozen reference's forward inside the same jitted step."""
  direct_loss = direct_loss_lib.DirectLoss(
      name="dpo", beta=DPO_BETA, ref_mode="cached" if reference == "cached" else "online",
      layout="packed" if num_segments else "padded", num_segments=num_segments)
  policy_loss = direct_loss_lib.make_loss_fn(direct_loss)
  if reference == "cached":
    return _jitted(_decoder(0), policy_loss)

  def loss_fn(model, batch, rng):
    refs = direct_loss_lib.reference_fields(model.reference, batch,
                                             num_segments=num_segments, with_kl=False)
    return policy_loss(model.policy, {**batch, **jax.lax.stop_gradient(refs)}, rng)

  trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("reference")))
  return _jitted(PolicyAndReference(_decoder(0), _decoder(0)), loss_fn, trainable)


def prefjax_minilm_rm() -> tuple[Callable, dict]:
  """The encoder RM of ``configs/rm/hh_minilm.py``: MiniLM trunk, mean pooling, reward head."""
  from configs.rm import hh_minilm
  from prefjax import experiment
  config = hh_minilm.get_config()
  model = experiment.make_model(config.model, vocab_size=0, seed=config.seed)
  loss_fn = rm_loss_lib.make_loss_fn({"name": "bt"}, num_columns=1, objectives=(),
                                      num_segments=None)
  step, info = _jitted(model, loss_fn)
  c = model.trunk.config
  matmul = c.num_layers * (4 * c.hidden_size ** 2 + 2 * c.hidden_size * c.intermediate_size)
  # Forward FLOPs per token: 2·matmul params + bidirectional attention over the row.
  info["flops_per_token"] = lambda length: 2 * matmul + 4 * c.num_layers * c.hidden_size * length
  return step, info


def prefjax_ref_precompute() -> tuple[Callable, dict]:
  """``ref_cache.ReferenceScorer`` of the workload decoder (the DPO reference pass)."""
  from prefjax.direct import ref_cache  # here: it reads data through TFDS
  scorer = ref_cache.ReferenceScorer(_decoder(0), direct_loss_lib.DirectLoss(
      name="dpo", beta=DPO_BETA, ref_mode="cached"))

  def step(batch):
    return float(np.sum(scorer(batch)["ref_chosen"]))
  return step, {"params": state_lib.count_params(nnx.state(_decoder(0), nnx.Param)),
                "compiles": ref_cache._score._cache_size}


def with_cached_reference(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds stand-in reference log-probs (the step's cost does not depend on their values)."""
  pairs = batch["pair_mask"].shape[0]
  rng = np.random.default_rng(pairs)
  return {**batch, "ref_chosen": rng.normal(-300, 30, pairs).astype(np.float32),
          "ref_rejected": rng.normal(-300, 30, pairs).astype(np.float32)}


# --------------------------------------------------------------------------- PyTorch


def _torch_llama_config(num_labels: int | None) -> Any:
  import transformers
  c = workloads.rm_model_config()
  kwargs = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                num_key_value_heads=c.num_kv_heads, intermediate_size=c.intermediate_size,
                max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
                tie_word_embeddings=False, pad_token_id=c.pad_id, bos_token_id=c.bos_id,
                eos_token_id=c.eos_id, attn_implementation="sdpa")
  if num_labels:
    kwargs["num_labels"] = num_labels
  return transformers.LlamaConfig(**kwargs)


def _torch_rows(batch: dict[str, np.ndarray]) -> tuple[Any, Any, Any]:
  """Token ids, attention mask and loss mask cut to the longest real row (TRL's padding)."""
  import torch
  longest = int(batch["attention_mask"].sum(-1).max())
  pick = lambda k: torch.from_numpy(np.ascontiguousarray(batch[k][:, :longest]).astype(np.int64))
  return pick("tokens"), pick("attention_mask"), pick("loss_mask")


def _torch_update(opt: Any, loss: Any) -> float:
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return float(loss)


def _torch_setup() -> None:
  """Seeds PyTorch and flushes denormals to zero, as XLA's CPU runtime does. Without it
  PyTorch's cached-reference DPO step on the one batch padded to 448 tokens ran 6.5x
  longer (31 s against 4.7 s, in both of two passes over the batches), and that one step
  set the total-time ratio (``benchmarks/RESULTS.md``)."""
  import torch
  torch.manual_seed(0)
  torch.set_flush_denormal(True)


def torch_rm() -> tuple[Callable, dict]:
  import torch
  import transformers
  _torch_setup()
  model = transformers.LlamaForSequenceClassification(_torch_llama_config(1))
  opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

  def step(batch):
    tokens, mask, _ = _torch_rows(batch)
    rewards = model(input_ids=tokens, attention_mask=mask).logits[:, 0]
    pairs = rewards.shape[0] // 2
    loss = -torch.nn.functional.logsigmoid(rewards[:pairs] - rewards[pairs:]).mean()
    return _torch_update(opt, loss)

  return step, {"params": sum(p.numel() for p in model.parameters())}


def torch_dpo(reference: str) -> tuple[Callable, dict]:
  import torch
  import transformers
  _torch_setup()
  policy = transformers.LlamaForCausalLM(_torch_llama_config(None))
  ref_model = transformers.LlamaForCausalLM(_torch_llama_config(None)).eval()
  opt = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)

  def logps(model, tokens, mask, loss_mask):
    logits = model(input_ids=tokens, attention_mask=mask).logits[:, :-1]
    per_token = torch.gather(logits.log_softmax(-1), 2, tokens[:, 1:, None])[..., 0]
    return (per_token * loss_mask[:, 1:]).sum(-1)

  def step(batch):
    tokens, mask, loss_mask = _torch_rows(batch)
    pairs = tokens.shape[0] // 2
    if reference == "cached":
      ref = torch.from_numpy(np.concatenate([batch["ref_chosen"], batch["ref_rejected"]]))
    else:
      with torch.no_grad():
        ref = logps(ref_model, tokens, mask, loss_mask)
    margin = logps(policy, tokens, mask, loss_mask) - ref
    loss = -torch.nn.functional.logsigmoid(DPO_BETA * (margin[:pairs] - margin[pairs:])).mean()
    return _torch_update(opt, loss)

  return step, {"params": sum(p.numel() for p in policy.parameters())}


def matmul_probe(size: int = 2048, dtype: Any = jnp.float32) -> Callable[[int], float]:
  """``probe(repeats)``: FLOP/s of a jitted ``size``² dot in ``dtype``, median of ``repeats``
  calls on the same operands (compiled and warmed up here, once)."""
  import time
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()

  def probe(repeats: int) -> float:
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      dot(a, a).block_until_ready()
      times.append(time.perf_counter() - start)
    return 2 * size ** 3 / float(np.median(times))

  return probe


def peak_rss_mb() -> int:
  """This process's peak resident memory so far, in MB."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def matmul_ceiling(size: int = 2048, repeats: int = 10, dtype: Any = jnp.float32) -> float:
  """This machine's matmul FLOP/s: median of ``repeats`` jitted ``size``² dots in ``dtype``."""
  return matmul_probe(size, dtype)(repeats)


def xla_flops(compiled: Any) -> float | None:
  """FLOPs XLA's cost analysis counts for a compiled program (None if it has none).

  A conditional counts as its costliest branch, so a step whose attention tiles are
  run-time conditionals (``attention.causal_attention(tiled=True)``) counts every tile.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def xla_flops_per_batch(train_step: Any, state: Any,
                        batches: list[dict[str, np.ndarray]]) -> list[float | None]:
  """``xla_flops`` of ``train_step``'s program for each batch's shapes: one lowering per
  distinct shape, served from the jit's cache when that shape already ran."""
  by_shape: dict[Any, float | None] = {}
  out = []
  for batch in batches:
    key = tuple(sorted((k, np.shape(v)) for k, v in batch.items()))
    if key not in by_shape:
      by_shape[key] = xla_flops(train_step.lower(state, batch).compile())
    out.append(by_shape[key])
  return out
