"""Scorers for ``experiments/eval_rm.py``: anything that gives each side of a pair a reward.

A scorer spec is ``[NAME=]KIND[:ARG]``:

  rm:WORKDIR[@latest|@best|@STEP]   a ``train_rm`` run (tokenizer, model and head rebuilt
                                    from the config its checkpoint was saved with);
                                    an ensemble yields its
                                    members and the ``mean`` (NAME), ``wco`` and ``uwo``
                                    aggregates (``prefjax.rewards.aggregate``) of its
                                    members standardized over the data's responses
  dpo:WORKDIR[@...]                 a ``train_dpo`` policy, scored by its implicit reward
                                    β·(log π − log π_ref) (the reference rebuilt as the run
                                    built it; per token for length-normalised losses)
  hf:PATH                           a local Hugging Face ``*ForSequenceClassification``
                                    directory, or a prefjax export (``export_hf``): the
                                    head it was saved with (``hf_import.saved_head``:
                                    K labels score as an ensemble or objectives),
                                    pairs read with the training pipeline an export
                                    records (``prefjax.evals.hf_scorer``)
  length | shorter                  the longer (shorter) response wins; characters
  gold                              the dataset's programmatic gold (``meta.gold_chosen`` /
                                    ``meta.gold_rejected``, e.g. the tiny world)

``score(source, dataset)`` returns per-pair rewards of the pairs it scored,
keyed by source row. Model scorers run the pipeline the run itself evaluated
with (padded, fixed order), batched and jitted, batches sharded over the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from prefjax import experiment
from prefjax import parallel
from prefjax.data import pipeline as pipeline_lib
from prefjax.direct import loss as direct_loss_lib
from prefjax.direct import ref_cache as direct_ref_cache
from prefjax.models import heads as heads_lib
from prefjax.models import hf_import
from prefjax.rm import evaluation as rm_evaluation
from prefjax.rm import loss as rm_loss_lib
from prefjax.train import checkpoint
from prefjax.train import metrics as metrics_lib
from prefjax.train import ranking
from prefjax.train import sharding as sharding_lib
from prefjax.train import summary as summary_lib

KINDS = ("rm", "dpo", "hf", "length", "shorter", "gold")


class EvalInputError(ValueError):
  """Bad input to an evaluation (missing checkpoint, dataset, unreadable text); one line."""


@dataclasses.dataclass
class Scored:
  """Rewards of the pairs one scorer scored on one dataset.

  Attributes:
    index: ``[N]`` source rows scored (pipeline drops are absent).
    columns: output name -> (r_chosen ``[N]``, r_rejected ``[N]``); one per scorer, or
      the members and aggregates of an ensemble.
    calibrated: whether σ(margin) is meant as a probability (False for baselines).
    dropped: the pipeline's nonzero ``dropped_*`` counters.
    truncated: the pipeline's nonzero ``truncated_prompt`` / ``truncated_response``
      counters: pairs scored on cut text (a prompt cut from the left, a response from the
      right, losing its end token).
  """
  index: np.ndarray
  columns: dict[str, tuple[np.ndarray, np.ndarray]]
  calibrated: bool = True
  dropped: dict[str, int] = dataclasses.field(default_factory=dict)
  truncated: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ScorerSpec:
  name: str
  kind: str
  path: str = ""
  step: str = "latest"

  @classmethod
  def parse(cls, text: str) -> ScorerSpec:
    text = text.strip()
    name, sep, rest = text.partition("=")
    if not sep:
      name, rest = "", text
    kind, _, arg = rest.partition(":")
    if kind not in KINDS:
      raise EvalInputError(f"scorer {text!r}: unknown kind {kind!r}; expected one of {KINDS}")
    step = "latest"
    if kind in ("rm", "dpo") and "@" in arg:
      arg, step = arg.rsplit("@", 1)
    if kind in ("rm", "dpo", "hf") and not arg:
      raise EvalInputError(f"scorer {text!r}: {kind} needs a path ({kind}:PATH)")
    arg = os.path.expanduser(arg)
    default = os.path.basename(os.path.normpath(arg)) if arg else kind
    return cls(name=name.strip() or default, kind=kind, path=arg, step=step)


def parse_specs(value: str | Sequence[str]) -> list[ScorerSpec]:
  """Specs from a comma-separated string or a list; names must be unique."""
  items = value.split(",") if isinstance(value, str) else list(value)
  specs = [ScorerSpec.parse(s) for s in items if s.strip()]
  names = [s.name for s in specs]
  if len(set(names)) != len(names):
    raise EvalInputError(f"scorer names must be unique, got {names}; name them NAME=KIND:PATH")
  if not specs:
    raise EvalInputError("no scorers given (config.scorers)")
  return specs


def latest_run_config(workdir: str, what: str) -> ml_collections.ConfigDict:
  """The config the latest checkpoint of a training workdir was trained under (a rerun
  that trained on under a changed config saved its own), else its ``config.json``."""
  run = read_run_config(workdir, what)  # checks it is a training workdir
  saved = checkpoint.saved_run_config(workdir)
  return ml_collections.ConfigDict(saved) if saved else run


def read_run_config(workdir: str, what: str) -> ml_collections.ConfigDict:
  """The ``config.json`` of a training workdir, checking it has a checkpoint."""
  path = os.path.join(workdir, summary_lib.CONFIG_FILE)
  if not os.path.isdir(workdir):
    raise EvalInputError(f"{what}: {workdir} does not exist (train that run first, or fix "
                         "the path)")
  if not os.path.isfile(path):
    raise EvalInputError(f"{what}: {workdir} has no {summary_lib.CONFIG_FILE} "
                         "(not a training workdir)")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  if not steps:
    raise EvalInputError(f"{what}: {workdir} has no checkpoint under checkpoints/")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def all_rows(source: Any) -> list[dict[str, Any]]:
  return source.__getitems__(range(len(source)))


# --------------------------------------------------------------------------- text scorers


def length_rewards(source: Any, sign: float) -> tuple[np.ndarray, np.ndarray]:
  """±(characters) of each side: the longer (sign 1) or the shorter (sign −1) response wins."""
  rows = all_rows(source)
  r_c = np.array([sign * len(r["chosen"]) for r in rows], np.float64)
  r_r = np.array([sign * len(r["rejected"]) for r in rows], np.float64)
  return r_c, r_r


def gold_rewards(source: Any) -> tuple[np.ndarray, np.ndarray] | None:
  """``meta.gold_chosen`` / ``meta.gold_rejected`` of every row, or None when any lacks them."""
  rows = all_rows(source)
  metas = [r.get("meta") or {} for r in rows]
  if not all("gold_chosen" in m and "gold_rejected" in m for m in metas):
    return None
  for row, meta in zip(rows, metas):
    for field in ("gold_chosen", "gold_rejected"):
      value = meta[field]
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise EvalInputError(f"row {row.get('id', '?')}: meta.{field}={value!r} must be a finite "
                             "number (the gold scorer's reward)")
  return (np.array([m["gold_chosen"] for m in metas], np.float64),
          np.array([m["gold_rejected"] for m in metas], np.float64))


# --------------------------------------------------------------------------- model scorers


def model_vocab(model: nnx.Module) -> int | None:
  if isinstance(model, heads_lib.DeepEnsemble):
    model = model.member(0)
  trunk = getattr(model, "trunk", model)
  return getattr(getattr(trunk, "config", None), "vocab_size", None)


def unknown_token_id(tokenizer: Any) -> int | None:
  """The id of a tokenizer's unknown token (from the HF tokenizer or its Rust model)."""
  hf = getattr(tokenizer, "hf", None)
  unk = getattr(hf, "unk_token_id", None)
  backend = getattr(hf, "backend_tokenizer", None)
  if unk is None and backend is not None:
    token = getattr(backend.model, "unk_token", None)
    unk = backend.token_to_id(token) if token else None
  return unk


def check_tokenizer(tokenizer: Any, source: Any, model_vocab: int | None, *, scorer: str,
                    dataset: str, max_unk_fraction: float, sample: int = 128) -> None:
  """Raises ``EvalInputError`` when the tokenizer cannot read the dataset's text.

  On up to ``sample`` rows: ids the model has no embedding for, or a share of the
  tokenizer's unknown token above ``max_unk_fraction``.
  """
  rows = source.__getitems__(range(min(sample, len(source))))
  texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
  what = f"scorer {scorer!r}: tokenizer {tokenizer.name} cannot read dataset {dataset!r}"
  encode_batch = getattr(tokenizer, "encode_batch", None) or (
      lambda batch: [tokenizer.encode(t) for t in batch])
  try:
    ids = np.concatenate([np.asarray(t, np.int64) for t in encode_batch(texts)] +
                         [np.zeros(0, np.int64)])
  except Exception as e:  # pylint: disable=broad-except
    raise EvalInputError(f"{what}: {type(e).__name__}: {e}") from e
  if model_vocab is not None and ids.size and ids.max() >= model_vocab:
    raise EvalInputError(f"{what}: token id {int(ids.max())} >= the model's vocabulary "
                         f"size {model_vocab}")
  unk = unknown_token_id(tokenizer)
  if unk is not None and ids.size:
    fraction = float(np.mean(ids == unk))
    if fraction > max_unk_fraction:
      raise EvalInputError(f"{what}: {fraction:.0%} of the tokens of {len(rows)} rows are its "
                           f"unknown token (limit {max_unk_fraction:.0%}, "
                           "config.max_unk_fraction)")


def _progress(batches: Iterator[dict[str, np.ndarray]], total: int, desc: str):
  with metrics_lib.progress_bar(total, desc, "pair") as bar:
    for batch in batches:
      yield batch
      bar.update(int(batch["pair_mask"].sum()))
    if bar.n < total:  # pairs the pipeline dropped: the bar ends full, saying so
      bar.set_postfix_str(f"{total - bar.n} dropped by the pipeline")
      bar.update(total - bar.n)


@functools.partial(jax.jit, static_argnames=("policy_def", "ref_def", "loss"))
def _implicit_rewards(policy_def, policy_state, ref_def, ref_state, batch, loss):
  scores = direct_loss_lib.score_pairs(nnx.merge(policy_def, policy_state), batch)
  if ref_def is not None:
    ref = direct_loss_lib.score_pairs(nnx.merge(ref_def, ref_state), batch)
    batch = {**batch, "ref_chosen": ref.chosen, "ref_rejected": ref.rejected}
  x = direct_loss_lib.pair_logps(loss, scores, batch)
  return direct_loss_lib.implicit_rewards(loss, x)


@dataclasses.dataclass
class ModelScorer:
  """Scores padded pair batches with ``forward(batch) -> (r_c [B(,K)], r_r)``."""
  name: str
  tokenizer: Any
  pcfg: pipeline_lib.PipelineConfig
  forward: Callable[[dict[str, Any]], tuple[Any, Any]]
  model_vocab: int | None
  mesh: jax.sharding.Mesh | None
  max_unk_fraction: float
  output_columns: OutputColumns
  checkpoint: dict[str, Any] | None = None  # {"path", "step"} of a trained run
  calibrated: bool = True  # σ(margin) is a probability (not for a dpo: scorer of IPO, KTO …)

  def _put(self, batch):
    if self.mesh is None:
      return jax.device_put(batch)
    return jax.device_put(batch, sharding_lib.batch_shardings(batch, self.mesh))

  def __call__(self, source: Any, dataset: str) -> Scored:
    check_tokenizer(self.tokenizer, source, self.model_vocab, scorer=self.name, dataset=dataset,
                    max_unk_fraction=self.max_unk_fraction)
    iterator = iter(pipeline_lib.preference_dataset(source, self.tokenizer, self.pcfg))
    parts: dict[str, list[np.ndarray]] = {"r_c": [], "r_r": [], "index": []}
    for batch in _progress(iterator, len(source), f"{self.name} on {dataset}"):
      real = batch["pair_mask"] > 0
      r_c, r_r = jax.device_get(self.forward(self._put(batch)))
      b = real.shape[0]
      parts["r_c"].append(np.asarray(r_c, np.float64).reshape(b, -1)[real])
      parts["r_r"].append(np.asarray(r_r, np.float64).reshape(b, -1)[real])
      parts["index"].append(batch["example_index"][real])
    if not parts["r_c"]:
      raise EvalInputError(f"scorer {self.name!r} kept none of the {len(source)} pairs of "
                           f"{dataset}: its pipeline (max_length={self.pcfg.max_length}, "
                           f"prompt limit {self.pcfg.prompt_limit}) dropped them: "
                           f"{_dropped(iterator)}")
    r_c, r_r = np.concatenate(parts["r_c"]), np.concatenate(parts["r_r"])
    index = np.concatenate(parts["index"])
    if not (finite := np.isfinite(r_c).all(axis=1) & np.isfinite(r_r).all(axis=1)).all():
      raise EvalInputError(f"scorer {self.name!r} gave a non-finite reward on {dataset} to "
                           f"{int((~finite).sum())} of {finite.size} pairs (first: row "
                           f"{int(index[np.argmin(finite)])}); a NaN would count as a wrong "
                           "answer")
    return Scored(index, self.output_columns(r_c, r_r), self.calibrated, _dropped(iterator),
                  _truncated(iterator))


def _dropped(iterator: Any) -> dict[str, int]:
  """The pipeline's drop counters that are not zero."""
  return {k: int(v) for k, v in iterator.counters.items() if k.startswith("dropped_") and v}


def _truncated(iterator: Any) -> dict[str, int]:
  """The pipeline's counts of scored pairs whose prompt or a response was cut, if any."""
  return {k: int(iterator.counters.get(k, 0)) for k in ("truncated_prompt", "truncated_response")
          if iterator.counters.get(k, 0)}


OutputColumns = Callable[[np.ndarray, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]
ENSEMBLE_NORMALIZATIONS = ("standardize", "center", "none")
AGGREGATES = ("/wco", "/uwo")  # column suffixes of the conservative ensemble aggregates


def reward_columns(name: str, objectives: Sequence[str], uwo_lambda: float,
                   normalization: str = "standardize") -> OutputColumns:
  """Output columns of a reward head with C columns: one, an ensemble, or objectives.

  ``(r_c [N, C], r_r [N, C]) -> {column: (chosen [N], rejected [N])}``. An ensemble gives
  its mean, each member, and the WCO and UWO aggregates (Coste et al. 2023). BT training
  fixes neither a member's offset nor exactly its scale, and the minimum and the variance
  across members depend on both, so WCO and UWO see members standardized over this
  data's responses, both sides (``normalization="standardize"``, as Coste et al.'s code
  normalises each RM over its eval responses; ``"center"`` only shifts; ``"none"``).
  """
  if not uwo_lambda >= 0:
    raise EvalInputError(f"config.uwo_lambda={uwo_lambda} must be >= 0 (UWO subtracts λ times "
                         "the members' variance; a negative λ rewards their disagreement)")
  if normalization not in ENSEMBLE_NORMALIZATIONS:
    raise EvalInputError(f"config.ensemble_normalization={normalization!r}: expected one of "
                         f"{list(ENSEMBLE_NORMALIZATIONS)}")

  def columns(r_c: np.ndarray, r_r: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if objectives:
      return {f"{name}/{o}": (r_c[:, k], r_r[:, k]) for k, o in enumerate(objectives)}
    if r_c.shape[1] == 1:
      return {name: (r_c[:, 0], r_r[:, 0])}
    n_c, n_r = _normalized_members(r_c, r_r, normalization)
    out = {name: (r_c.mean(axis=1), r_r.mean(axis=1)),
           f"{name}/wco": (n_c.min(axis=1), n_r.min(axis=1))}
    out[f"{name}/uwo"] = tuple(r.mean(axis=1) - uwo_lambda * r.var(axis=1) for r in (n_c, n_r))
    out.update({f"{name}/member{k}": (r_c[:, k], r_r[:, k]) for k in range(r_c.shape[1])})
    return out

  return columns


def _normalized_members(r_c: np.ndarray, r_r: np.ndarray, normalization: str
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Each member shifted (and scaled) by its statistics over both sides' responses."""
  if normalization == "none":
    return r_c, r_r
  both = np.concatenate([r_c, r_r])
  mean, scale = both.mean(axis=0), np.ones(both.shape[1])
  if normalization == "standardize":
    std = both.std(axis=0)
    scale = np.where(std > 0, std, 1.0)  # A constant member is only centred.
  return (r_c - mean) / scale, (r_r - mean) / scale


def build_model(model_cfg: Any, vocab_size: int, seed: int, mesh) -> nnx.Module:
  with experiment.mesh_context(mesh):
    model = experiment.make_model(model_cfg, vocab_size=vocab_size, seed=seed)
    if mesh is not None:
      parallel.shard_model(model, mesh, experiment.partition_rules(model, mesh))
  return model


def reward_forward(model: nnx.Module) -> Callable[[dict[str, Any]], tuple[Any, Any]]:
  graphdef, state = nnx.split(model)
  return lambda batch: rm_evaluation.jitted_pair_rewards(graphdef, state, batch)


def _resolve_step(spec: ScorerSpec, run: Any) -> tuple[int, dict[str, Any]]:
  """The step ``spec`` names (latest, best or a number) and how "best" is ranked."""
  step: Any = spec.step
  if step not in ("latest", "best"):
    if not str(step).isdigit():
      raise EvalInputError(f"scorer {spec.name!r}: checkpoint {step!r} is not latest, best "
                           "or a step number")
    step = int(step)
  loop = run.get("loop") or {}
  best_metric = loop.get("best_metric")
  if step == "best" and not best_metric:
    try:
      checkpoint.run_ranking(spec.path)  # its error names what is missing
    except ValueError as e:
      raise EvalInputError(f"scorer {spec.name!r}: {e}") from e
  ranked_by = {"best_metric": best_metric,
               "best_mode": ranking.best_mode_for(best_metric, loop.get("best_mode"))
               if best_metric else "min"}
  try:
    return int(checkpoint.saved_step(spec.path, step, **ranked_by)), ranked_by
  except (FileNotFoundError, ValueError) as e:
    raise EvalInputError(f"scorer {spec.name!r}: cannot restore {spec.path}@{step}: "
                         f"{str(e).splitlines()[0]}") from e


def _run_at(spec: ScorerSpec, run: Any, step: int) -> ml_collections.ConfigDict:
  """The config checkpoint ``step`` was trained under (``config.json`` is the config the
  run started with; a rerun may have trained on under a changed one)."""
  saved = checkpoint.saved_run_config(spec.path, step)
  if not saved:  # none, or unreadable: the restore will say why
    return run
  changed = sorted(k for k in ("model", "tokenizer", "data", "loss", "ref")
                   if saved.get(k) != run.to_dict().get(k))
  if changed:
    logging.warning("scorer %r: step %d of %s was trained under another config than its "
                    "config.json (%s differ; a rerun changed them): rebuilt as that step "
                    "was trained", spec.name, step, spec.path, ", ".join(changed))
  return ml_collections.ConfigDict(saved)


def _load(spec: ScorerSpec, model: nnx.Module, step: int, ranking: dict[str, Any]
          ) -> dict[str, Any]:
  """Loads checkpoint ``step`` into ``model``; returns its ``{"path", "step"}``."""
  try:
    checkpoint.load_params(spec.path, model, step=step, **ranking)
  except (FileNotFoundError, ValueError) as e:
    raise EvalInputError(f"scorer {spec.name!r}: cannot restore {spec.path}@{step}: "
                         f"{str(e).splitlines()[0]}") from e
  return {"path": os.path.abspath(spec.path), "step": int(step)}


def _run_pipeline(run: Any, eval_cfg: Any, scorer: str) -> pipeline_lib.PipelineConfig:
  batch_size = int(eval_cfg.batch_size or (run.get("eval") or {}).get("batch_size", 32))
  overrides = {"mode": "padded", "shuffle": False, "num_epochs": 1, "drop_remainder": False,
               "batch_size": batch_size}
  trained = experiment.pipeline_config(run.data, **overrides)
  pcfg = experiment.pipeline_config(run.data, **{**overrides,
                                                 **dict(eval_cfg.get("pipeline") or {})})
  warn_on_changed_text(scorer, trained.text_fields(), pcfg, "its training pipeline")
  return pcfg


def warn_on_changed_text(scorer: str, trained: Mapping[str, Any],
                         pcfg: pipeline_lib.PipelineConfig, what: str) -> None:
  """``config.pipeline`` may cut or format pairs unlike training; say so, field by field."""
  changed = {k: (v, trained[k]) for k, v in pcfg.text_fields().items()
             if k in trained and v != trained[k]}
  if changed:
    logging.warning("scorer %r reads pairs unlike %s: %s (config.pipeline); its scores are "
                    "not the trained model's on these pairs", scorer, what,
                    ", ".join(f"{k}={v!r} (trained: {t!r})" for k, (v, t) in changed.items()))


def rm_scorer(spec: ScorerSpec, eval_cfg: Any, mesh) -> ModelScorer:
  run, step, ranking = trained_run(spec)
  tokenizer = experiment.make_tokenizer(run.tokenizer)
  model = build_model(run.model, tokenizer.vocab_size, int(run.get("seed", 0)), mesh)
  saved = _load(spec, model, step, ranking)
  _, objectives = rm_loss_lib.reward_columns(model)
  if objectives:
    field = (run.get("data") or {}).get("objective_field") or "objective"
    logging.warning("scorer %r has one head per objective %s and eval_rm scores every pair "
                    "with each; for each head on the pairs labelled with its objective add "
                    "--config.subset_field=%s", spec.name, list(objectives), field)
  return ModelScorer(spec.name, tokenizer, _run_pipeline(run, eval_cfg, spec.name),
                     reward_forward(model), model_vocab(model), mesh,
                     float(eval_cfg.max_unk_fraction),
                     reward_columns(spec.name, objectives, float(eval_cfg.uwo_lambda),
                                    str(eval_cfg.get("ensemble_normalization", "standardize"))),
                     saved)


REWARD_HEADS = ("reward", "reward_ensemble", "multi")
# What a run's config.json must hold for a model to be rebuilt and its texts cut as trained.
RUN_SECTIONS = ("model", "tokenizer", "data")


def trained_run(spec: ScorerSpec) -> tuple[ml_collections.ConfigDict, int, dict[str, Any]]:
  """An ``rm:``/``dpo:`` spec's run: the config its checkpoint ``spec.step`` was trained
  under, that step as a number, and how the run ranks "best" (errors name the scorer)."""
  run = read_run_config(spec.path, f"scorer {spec.name!r}")
  missing = [k for k in RUN_SECTIONS if not run.get(k)]
  if "model" not in missing:  # a run of the other kind is named as such first
    _check_run_kind(spec, run)
  if missing:
    raise EvalInputError(
        f"scorer {spec.name!r}: {os.path.join(spec.path, summary_lib.CONFIG_FILE)} has no "
        f"{', '.join(missing)}: the binaries save every section; a train_loop call of your "
        f"own needs config= holding {', '.join(RUN_SECTIONS)} (data.pipeline: the cuts)")
  step, ranking = _resolve_step(spec, run)
  return _run_at(spec, run, step), step, ranking


def _check_run_kind(spec: ScorerSpec, run: Any) -> None:
  """``rm:`` needs a run whose model has a reward head; ``dpo:`` one whose model has none."""
  head = (run.get("model") or {}).get("head")
  is_rm = heads_lib.parse_head(head or None)[0] in REWARD_HEADS  # train_rl saves head ''
  # train_sft saves every section but a loss (a train_loop call of one's own may save less).
  is_sft = not is_rm and not run.get("loss") and all(run.get(k) for k in RUN_SECTIONS)
  if is_sft:
    raise EvalInputError(f"scorer {spec.name!r}: {spec.path} is a train_sft run (no reward "
                         "head, no preference loss): neither rm: nor dpo: can score pairs "
                         "with it; score a train_rm run (rm:) or a train_dpo run (dpo:)")
  if spec.kind == "rm" and not is_rm:
    raise EvalInputError(f"scorer {spec.name!r}: {spec.path} trained a model with no reward "
                         f"head (model.head={head!r}: a train_dpo run); eval_rm scores a "
                         f"policy trained on preferences by its implicit reward, as "
                         f"dpo:{spec.path}")
  if spec.kind == "dpo" and is_rm:
    raise EvalInputError(f"scorer {spec.name!r}: {spec.path} trained a reward model "
                         f"(model.head={head!r}, a train_rm run); score it as rm:{spec.path}")


def dpo_scorer(spec: ScorerSpec, eval_cfg: Any, mesh) -> ModelScorer:
  run, step, ranking = trained_run(spec)
  try:
    loss = direct_loss_lib.DirectLoss.from_config(run)
  except KeyError as e:  # a loss the run registered from a module of its own
    raise EvalInputError(f"scorer {spec.name!r}: {e.args[0]}, as for its training"
                         f"{summary_lib.imports_hint(spec.path)}") from e
  tokenizer = experiment.make_tokenizer(run.tokenizer)
  policy = build_model(run.model, tokenizer.vocab_size, int(run.get("seed", 0)), mesh)
  saved = _load(spec, policy, step, ranking)
  policy_def, policy_state = nnx.split(policy)
  ref_def = ref_state = None
  if loss.needs_reference:  # As train_dpo builds it: ref.path, else the policy's init.
    ref_cfg = run.model.to_dict()
    if (run.get("ref") or {}).get("path"):
      ref_cfg["path"] = run.ref.path
    reference = build_model(ref_cfg, tokenizer.vocab_size, int(run.get("seed", 0)), mesh)
    _check_reference(spec, ref_cfg, reference)
    ref_def, ref_state = nnx.split(reference)

  def forward(batch):
    return _implicit_rewards(policy_def, policy_state, ref_def, ref_state, batch, loss)

  return ModelScorer(spec.name, tokenizer, _run_pipeline(run, eval_cfg, spec.name), forward,
                     model_vocab(policy), mesh, float(eval_cfg.max_unk_fraction),
                     reward_columns(spec.name, (), 0.0), saved,
                     calibrated=loss.spec.bradley_terry)


def _check_reference(spec: ScorerSpec, ref_cfg: Mapping[str, Any], reference: nnx.Module
                     ) -> None:
  """The reference rebuilt for a ``dpo:`` scorer must be the one the run trained against
  (``reference.json``; runs from before it was recorded are not checked)."""
  if direct_ref_cache.recorded_reference_weights(spec.path) is None:
    return
  path = ref_cfg.get("path")
  weights = direct_ref_cache.weights_fingerprint(
      experiment.resolve_path(path) if path else "", reference)
  try:
    direct_ref_cache.check_same_reference(spec.path, weights, what=f"scorer {spec.name!r}")
  except ValueError as e:
    raise EvalInputError(str(e)) from e


def make_scorer(spec: ScorerSpec, eval_cfg: Any, mesh) -> Callable[[Any, str], Scored | None]:
  """``score(source, dataset) -> Scored`` (None: not available on that dataset, e.g. gold)."""
  if spec.kind in ("length", "shorter"):
    sign = 1.0 if spec.kind == "length" else -1.0
    return lambda source, dataset: _every_row(spec.name, length_rewards(source, sign), False)
  if spec.kind == "gold":  # a score on its own scale: σ(Δ gold) is no label probability
    return lambda source, dataset: (None if (g := gold_rewards(source)) is None
                                    else _every_row(spec.name, g, False))
  if spec.kind == "hf":
    from prefjax.evals import hf_scorer  # pylint: disable=g-import-not-at-top  # imports this
    return hf_scorer.hf_scorer(spec, eval_cfg, mesh)
  build = {"rm": rm_scorer, "dpo": dpo_scorer}[spec.kind]
  return build(spec, eval_cfg, mesh)


def _every_row(name: str, rewards: tuple[np.ndarray, np.ndarray], calibrated: bool) -> Scored:
  r_c, r_r = rewards
  return Scored(np.arange(r_c.size), {name: (r_c, r_r)}, calibrated)
