r"""Direct alignment of a causal LM on preference pairs: the DPO family and KTO.

  python -m experiments.train_dpo --config=configs/dpo/tiny.py --workdir=/tmp/dpo_tiny \
      [--config.loss.name=ipo --config.loss.beta=0.1 --config.loss.kwargs=label_smoothing=0.1]

Rerunning with the same workdir resumes (params, optimizer, RNG and the data
iterator position are checkpointed by ``prefjax.train``).

``config.loss.name`` is any registered direct loss (``DIRECT_LOSS_SPECS``; for
``kto`` pairs become unpaired examples: chosen desirable, rejected undesirable;
see ``prefjax.direct.loss``), ``config.loss.beta`` its β,
``config.loss.kwargs`` its extra hyperparameters (a dict, or ``"name=value,..."``
on the command line) and ``config.loss.nll_alpha`` the weight of the chosen-NLL
term (RPO; None = the loss's registered default, 1 for ORPO).

Reference (``config.ref``): ``mode`` = ``online`` (a frozen copy scores every
batch), ``cached`` (scored once per example and stored under ``ref.cache_dir``,
keyed by weights/data/tokenizer/pipeline fingerprints; the model is not built
when the cache exists), ``none`` (reference-free), or ``auto`` (``none`` for
SimPO/ORPO, else ``online``). The reference weights are ``ref.path`` (a local HF
directory, a .gguf, ``asset:NAME``) or, when empty, the policy's initial weights
(``model.path``, or the random init from ``seed``). To start from an SFT run,
export it (``train_sft`` with ``export_hf=True``) and set ``model.path`` to
``<sft_workdir>/hf``: policy and reference then both start there.

Logged metrics (TRL names): ``loss``, ``rewards/{chosen,rejected,margins,accuracies}``,
``logps/{chosen,rejected}``, ``nll`` when α > 0, ``kto/kl_ref``. At eval (on
``data.eval_split``): the same on held-out pairs (``eval/rewards/accuracies`` is
the implicit-reward accuracy) and, when a reference model is loaded (online
mode), ``eval/kl/{k1,k3}`` (and ``kl/exact`` for small vocabularies) of the
policy to the reference on responses it samples for the held-out prompts.
``reference.json`` records the reference mode and cache key/hit per split.
``export_hf=True`` writes the trained policy to ``<workdir>/hf`` as a Hugging Face
``*ForCausalLM`` directory (``prefjax.models.hf_export``), which ``best_of_n``,
``train_rl`` and another ``train_dpo`` load through ``model.path``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
from absl import app
from absl import logging
from flax import nnx

from experiments import common
from prefjax import configlib
from prefjax import experiment
from prefjax import parallel
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize as tokenize_lib
from prefjax.direct import evaluation
from prefjax.direct import loss as loss_lib
from prefjax.direct import ref_cache
from prefjax.train import summary as summary_lib

def model_description(model: nnx.Module) -> dict[str, Any]:
  """Architecture + compute dtype of a model (part of the reference-cache key); below
  float32 also ``remat``/``scan_layers``, which change a bfloat16 program's rounding
  (log-probs by up to 0.75 nats a sequence), not a float32 one's."""
  trunk = getattr(model, "trunk", model)
  dtype = getattr(trunk, "dtype", None)
  desc = {"config": dataclasses.asdict(trunk.config), "dtype": str(dtype or "")}
  if experiment.low_precision_compute_dtype(model) is not None:
    desc.update(remat=str(getattr(trunk, "remat", False)),
                scan_layers=bool(getattr(trunk, "scan_layers", False)))
  return desc


class References:
  """Builds the reference model lazily and the per-split reference-field providers."""

  def __init__(self, config: Any, loss: loss_lib.DirectLoss, tokenizer: Any,
               mesh: jax.sharding.Mesh | None, policy: nnx.Module):
    self.config, self.loss, self.tokenizer, self.mesh = config, loss, tokenizer, mesh
    self._policy = policy  # Read before training only (its arrays are donated later).
    self._model_desc = model_description(policy)
    self._model: nnx.Module | None = None
    self._scorer: ref_cache.ReferenceScorer | None = None
    self._fingerprint: str | None = None
    self.info: dict[str, Any] = {"mode": loss.ref_mode, "path": self.weights_path}

  @property
  def weights_path(self) -> str:
    return self.config.ref.get("path") or self.config.model.get("path") or ""

  @property
  def model(self) -> nnx.Module | None:
    return self._model

  def build_model(self) -> nnx.Module:
    if self._model is None:
      model_cfg = self.config.model.to_dict()
      if self.config.ref.get("path"):
        model_cfg["path"] = self.config.ref.path
      with experiment.mesh_context(self.mesh):
        model = experiment.make_model(model_cfg, vocab_size=self.tokenizer.vocab_size,
                                      seed=self.config.seed)
        if self.mesh is not None:
          parallel.shard_model(model, self.mesh, experiment.partition_rules(model))
      self._model = model
      self._scorer = ref_cache.ReferenceScorer(model, self.loss, self.mesh)
      logging.info("reference model built from %s", self.weights_path or
                   f"the policy's random init (seed {self.config.seed})")
    return self._model

  def weights_fingerprint(self) -> str:
    """The reference's files' digest, or its parameters' (the policy's init) when it has
    no files; computed once (before training: the policy's arrays are donated later)."""
    if self._fingerprint is None:
      path = self.weights_path
      self._fingerprint = ref_cache.weights_fingerprint(
          experiment.resolve_path(path) if path else "", self._policy)
    return self._fingerprint

  def provider(self, name: str, source: Any, pcfg: pipeline_lib.PipelineConfig
               ) -> Callable[[Any], dict[str, np.ndarray]] | None:
    """The batch -> reference fields function for one split (None when reference-free)."""
    mode = self.loss.ref_mode
    if mode == "none":
      return None
    if mode == "online":
      self.build_model()
      return self._scorer
    parts = ref_cache.key_parts(
        ref_weights=self.weights_fingerprint(), source=source, tokenizer=self.tokenizer,
        pipeline=pcfg, model_config=self._model_desc, loss=self.loss, mesh=self.mesh)

    def build() -> ref_cache.ReferenceTable:
      self.build_model()
      batches = iter(pipeline_lib.preference_dataset(source, self.tokenizer,
                                                     ref_cache.cache_pipeline(pcfg)))
      return ref_cache.compute_table(self._scorer, batches, len(source))

    table, info = ref_cache.load_or_build(parts, len(source), build,
                                          cache_dir=self.config.ref.get("cache_dir") or None)
    self.info[name] = info
    return ref_cache.table_provider(table)


EVAL_FIELDS = ("batch_size", "kl_max_new_tokens", "kl_temperature", "exact_kl",
               "exact_kl_max_vocab")
REF_FIELDS = ("mode", "path", "cache_dir")


def kl_config(config: Any, tokenizer: Any) -> evaluation.KLEvalConfig | None:
  eval_cfg = config.eval
  if not eval_cfg.get("kl_max_new_tokens"):
    return None
  temperature = float(eval_cfg.get("kl_temperature", 1.0))
  if temperature != 1.0:
    raise ValueError(
        f"eval.kl_temperature={temperature}: the KL to the reference is estimated on samples "
        "of the policy itself (temperature 1); the estimators score each sample with the "
        "policy's own log-probs, so samples drawn at another temperature bias them")
  exact = str(eval_cfg.get("exact_kl", "auto")).lower()
  if exact not in ("auto", "true", "false"):
    raise ValueError(f"eval.exact_kl must be auto, true or false; got {exact!r}")
  max_vocab = int(eval_cfg.get("exact_kl_max_vocab", experiment.EXACT_KL_MAX_VOCAB))
  exact = tokenizer.vocab_size <= max_vocab if exact == "auto" else exact == "true"
  return evaluation.KLEvalConfig(
      max_new_tokens=int(eval_cfg.kl_max_new_tokens),
      temperature=temperature, exact=bool(exact),
      eos_id=tokenize_lib.stop_ids(tokenizer), pad_id=tokenizer.pad_id, seed=int(config.seed))


def _check_kl_positions(policy: nnx.Module, max_length: int, config: Any) -> None:
  """The KL eval samples after prompts as wide as their batch's rows: a learned position
  table must hold the row and the sample (else the first eval failed, mid-run)."""
  new_tokens = int(config.eval.get("kl_max_new_tokens") or 0)
  if new_tokens:
    experiment.check_policy_length(policy, max_length + new_tokens,
                                   "data.pipeline.max_length + eval.kl_max_new_tokens")


def check_config(config: Any) -> None:
  """What ``run`` checks first, before the binary touches the workdir."""
  experiment.check_eval_section(config, EVAL_FIELDS, "train_dpo")
  new_tokens = config.eval.get("kl_max_new_tokens")
  if new_tokens is not None and int(new_tokens) < 0:
    raise ValueError(f"eval.kl_max_new_tokens={new_tokens} must be >= 0 (0 or None: no KL "
                     "eval)")


def run(config: Any, workdir: str) -> train.TrainResult:
  """Trains the policy; returns the train core's ``TrainResult``."""
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  configlib.check_fields("config.ref", config.get("ref"), REF_FIELDS)
  with summary_lib.naming_recorded_imports(workdir):
    loss = loss_lib.DirectLoss.from_config(config)
  if not loss.needs_reference and (ref_path := (config.get("ref") or {}).get("path")):
    logging.warning("ref.path=%s is not read: %r runs with ref.mode='none' (set ref.mode="
                    "'online' to measure the eval KL to that reference)", ref_path, loss.name)
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  mesh = experiment.make_optional_mesh(config)
  train_source = experiment.load_split(config.data, config.data.train_split)
  eval_source = experiment.load_split(config.data, config.data.eval_split)
  pcfg = experiment.pipeline_config(config.data, mesh=mesh)
  eval_pcfg = experiment.pipeline_config(
      config.data, mesh=mesh, mode="padded", shuffle=False, num_epochs=1, drop_remainder=False,
      batch_size=experiment.eval_batch_size(config, eval_source, mesh))
  data_report = experiment.start_data_report(
      workdir, {"train": train_source, "eval": eval_source}, tokenizer, pcfg,
      ("chosen", "rejected"), weighted=("train", "eval"), hard_labels=not loss.spec.soft_label)
  logging.info("loss: %s", loss)

  with experiment.mesh_context(mesh):
    policy = experiment.make_model(config.model, vocab_size=tokenizer.vocab_size,
                                   seed=config.seed)
  experiment.check_max_length(policy, pcfg.max_length)
  _check_kl_positions(policy, eval_pcfg.max_length, config)
  experiment.warn_low_precision_policy(policy, "train_dpo")
  refs = References(config, loss, tokenizer, mesh, policy)
  train_ds = pipeline_lib.preference_dataset(train_source, tokenizer, pcfg)
  train.check_batch_shapes(train_ds, mesh,
                           accum_steps=int(config.loop.get("accum_steps", 1)))
  eval_ds = pipeline_lib.preference_dataset(eval_source, tokenizer, eval_pcfg)
  train_iter = ref_cache.ReferenceIterator(iter(train_ds), refs.provider("train", train_source,
                                                                         pcfg))
  eval_provider = refs.provider("eval", eval_source, eval_pcfg)
  kl = kl_config(config, tokenizer)
  if kl is not None and refs.model is None:
    logging.info("eval KL to the reference skipped: no reference model is loaded in "
                 "ref.mode=%s", loss.ref_mode)
  evaluator = evaluation.make_evaluator(
      # Every process joins every eval batch's reference forward (online mode).
      loss, lambda: ref_cache.ReferenceIterator(iter(train.JoinedByEveryProcess(eval_ds)),
                                                eval_provider),
      reference=refs.model, kl=kl, mesh=mesh)
  if loss.needs_reference:
    refs.info["weights"] = refs.weights_fingerprint()
    if os.path.isdir(os.path.join(workdir, "checkpoints")):  # resuming: the same reference
      ref_cache.check_same_reference(workdir, refs.info["weights"], what="train_dpo")

  def write_reference_record(start_step: int, state: Any) -> None:
    del start_step, state  # written once the loop holds the workdir: a refused rerun keeps it
    summary_lib.write_json(os.path.join(workdir, ref_cache.REFERENCE_FILE), refs.info)

  with experiment.mesh_context(mesh):
    result = train.train_loop(
        workdir=workdir, config=config, model=policy,
        loss_fn=loss_lib.make_loss_fn(loss), optimizer=config.optimizer,
        loop=config.loop, train_iter=train_iter, evaluators=[evaluator],
        tokens_in_batch=experiment.tokens_in_batch, mesh=mesh,
        partition_rules=experiment.partition_rules(policy),
        start_hooks=[data_report.write, write_reference_record])
  data_report.finish(train_iter, result.summary, mesh)
  if not result.preempted:
    experiment.export_hf(config, workdir, result.model, tokenizer, what="policy")
    logging.info("done: %s/summary.json. Next, its implicit reward beside other scorers: "
                 "python -m experiments.eval_rm --config=configs/eval/tiny.py --workdir=EVAL "
                 "--config.scorers=dpo:%s --config.datasets=run:%s%s", workdir, workdir, workdir,
                 common.imports_flag())
  return result


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run, check=check_config))
