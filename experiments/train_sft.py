r"""Supervised fine-tuning of a causal LM on prompt+response pairs (loss on the response only).

  python -m experiments.train_sft --config=configs/sft/tiny.py --workdir=/tmp/sft_tiny \
      [--config.export_hf=True ...]

Rerunning with the same workdir resumes (params, optimizer, RNG and the data
iterator position are checkpointed by ``prefjax.train``).

Data: ``pipeline.sft_dataset`` over ``data.train_split`` of a preference
dataset, using the ``data.response_key`` response of each row (``chosen`` by
default: the usual way to make a DPO reference policy). Padded or packed rows. A row's
``weight`` and ``outcome`` are not read: every response counts once, by its tokens.

Loss: token-mean negative log-likelihood of the response tokens,
Σ_t −log p(y_t | y_<t, x) · m_t / Σ_t m_t over the batch (prompt tokens and
padding have m = 0); the token count is passed to the core as ``loss_weight``
so gradient accumulation gives the exact token mean of the whole batch. Each batch is
one step, so a token weighs 1 / (response tokens of its batch): padded batches of a
fixed number of rows hold similar counts, but the packer groups sequences of similar
length, and a packed batch of short ones (capped at ``batch_size`` sequences) holds
few tokens; on the tiny world a helper measured short responses' share of the objective
at 0.303 packed against 0.227 padded (their share of the tokens: 0.224). Padded and
packed runs of the same data therefore weigh its tokens differently.

Eval (``data.eval_split``): held-out response ``nll`` (token mean over the
whole split) and ``perplexity`` = exp(nll) in ``summary.json``. The final policy
is the core's orbax checkpoint; ``export_hf=True`` also writes a Hugging Face
directory ``<workdir>/hf`` (``config.json`` + ``model.safetensors``) that
``prefjax.models.from_pretrained`` and ``transformers`` load — point
``train_dpo``'s ``model.path`` at it to start DPO from this policy.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import app
from absl import logging
from flax import nnx

from experiments import common
from prefjax import experiment
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.models import sampling
from prefjax.models import segments as seg
from prefjax.train import summary as summary_lib


def response_nll(model: nnx.Module, batch: Any) -> tuple[jax.Array, jax.Array]:
  """(summed response NLL, response token count) of a padded or packed SFT batch."""
  tokens, mask = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
  segment_ids = batch.get("segment_ids")
  logits = model(tokens, attention_mask=None if segment_ids is not None else
                 batch["attention_mask"], segment_ids=segment_ids,
                 positions=batch.get("positions"))
  if segment_ids is not None:
    # A segment's first token has no in-segment context: it is never a target.
    mask = mask * seg.continues_run(segment_ids)
  per_token = sampling.token_logps(logits, tokens) * mask
  return -jnp.sum(per_token), jnp.sum(mask)


def loss_fn(model: nnx.Module, batch: Any, rng: jax.Array):
  """Token-mean response NLL; ``loss_weight`` = response tokens (exact under accumulation)."""
  del rng
  total, count = response_nll(model, batch)
  loss = total / jnp.maximum(count, 1.0)
  return loss, {"nll": loss, "loss_weight": count}


def eval_fn(model: nnx.Module, batch: Any):
  """Per-batch token-mean NLL weighted by the batch's token count (-> split token mean)."""
  total, count = response_nll(model, batch)
  return {"nll": total / jnp.maximum(count, 1.0), "num_tokens": count}


def _add_perplexity(workdir: str, result: train.TrainResult) -> None:
  final_eval = result.summary.get("final_eval") or {}
  if "nll" in final_eval:
    # A finished run's rerun reads summary.json, where a non-finite nll is "nan"/"inf";
    # exp overflows past ~709 nats (a diverged run): inf.
    nll = float(final_eval["nll"])
    result.summary["final_perplexity"] = math.inf if nll > 709.0 else math.exp(nll)
    summary_lib.write_summary(workdir, result.summary)


def check_config(config: Any) -> None:
  """What ``run`` checks first, before the binary touches the workdir."""
  experiment.check_eval_section(config, ("batch_size",), "train_sft")


def run(config: Any, workdir: str) -> train.TrainResult:
  """Trains the policy; returns the train core's ``TrainResult``."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  mesh = experiment.make_optional_mesh(config)
  response_key = config.data.get("response_key", "chosen")
  train_source = experiment.load_split(config.data, config.data.train_split)
  eval_source = experiment.load_split(config.data, config.data.eval_split)
  pcfg = experiment.pipeline_config(config.data, mesh=mesh)
  eval_pcfg = experiment.pipeline_config(config.data, mesh=mesh, shuffle=False, num_epochs=1,
                                         drop_remainder=False,
                                         batch_size=experiment.eval_batch_size(
                                             config, eval_source, mesh))
  data_report = experiment.start_data_report(
      workdir, {"train": train_source, "eval": eval_source}, tokenizer, pcfg, (response_key,))
  train_ds = pipeline_lib.sft_dataset(train_source, tokenizer, pcfg, response_key=response_key)
  train.check_batch_shapes(train_ds, mesh,
                           accum_steps=int(config.loop.get("accum_steps", 1)))
  eval_ds = pipeline_lib.sft_dataset(eval_source, tokenizer, eval_pcfg,
                                     response_key=response_key)
  with experiment.mesh_context(mesh):
    model = experiment.make_model(config.model, vocab_size=tokenizer.vocab_size,
                                  seed=config.seed)
    experiment.check_max_length(model, pcfg.max_length)
    rules = experiment.partition_rules(model)
    train_iter = iter(train_ds)
    result = train.train_loop(
        workdir=workdir, config=config, model=model, loss_fn=loss_fn,
        optimizer=config.optimizer, loop=config.loop, train_iter=train_iter,
        evaluators=[train.BatchEvaluator(eval_fn, lambda: iter(eval_ds), mesh=mesh)],
        tokens_in_batch=experiment.tokens_in_batch, mesh=mesh, partition_rules=rules,
        start_hooks=[data_report.write])
  data_report.finish(train_iter, result.summary, mesh)
  if not result.preempted:
    _add_perplexity(workdir, result)
    experiment.export_hf(config, workdir, result.model, tokenizer, what="policy")
    logging.info("done: %s/summary.json. Next, DPO from this policy (its export, written with "
                 "--config.export_hf=True): python -m experiments.train_dpo --config=configs/dpo/"
                 "tiny.py --config.model.path=%s/hf --workdir=DPO", workdir, workdir)
  return result


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run, check=check_config))
