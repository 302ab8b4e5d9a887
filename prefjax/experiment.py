"""Builds the pieces of an experiment binary from its ml_collections config.

Every binary in ``experiments/`` goes through these functions, so the config
schema is the same everywhere:

  config.tokenizer.path   "byte" | "asset:smollm2" | "asset:minilm" | "asset:gpt2" | a local path
  config.model            arch ("decoder" | "encoder"), preset (a ``DecoderConfig`` /
                          ``EncoderConfig`` constructor, random init), overrides (dict of
                          config fields; vocab_size None = tokenizer's), path (HF dir,
                          .gguf, "asset:smollm2", "asset:minilm": pretrained), head,
                          ensemble ("heads" | "deep"), pooling, dtype, remat (decoder or
                          encoder: recompute each block's activations in the backward pass;
                          True/"full", "dots", "attention": ``stack.REMAT_POLICIES``),
                          scan_layers (one scanned block, faster compiles)
  config.data             name (``load_preferences`` name or "tiny_world"), train_split,
                          eval_split, on_bad_row, tiny_world (seed, num_pairs, label_noise,
                          temperature), and ``pipeline`` fields (``PipelineConfig``);
                          ``data_section`` builds it with every field declared
  config.mesh.shape       over ("data", "fsdp", "tensor"), -1 = remaining devices
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from prefjax import assets
from prefjax import configlib
from prefjax import files
from prefjax import parallel
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import report as report_lib
from prefjax.data import sources
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.data.tfds_builders import synthetic
from prefjax.data import tokenize as tokenize_lib
from prefjax.models import decoder as decoder_lib
from prefjax.models import encoder as encoder_lib
from prefjax.models import heads as heads_lib
from prefjax.models import hf_export
from prefjax.models import hf_import
from prefjax.models import stack
from prefjax.train import summary as summary_lib

_ASSETS = {
    "smollm2": assets.smollm2_gguf,
    "minilm": assets.minilm_dir,
    "gpt2": assets.gpt2_bpe_dir,
}


def resolve_path(path: str) -> str:
  """``asset:NAME`` -> the installed asset's path; anything else unchanged."""
  if isinstance(path, str) and path.startswith("asset:"):
    name = path.split(":", 1)[1]
    if name not in _ASSETS:
      raise ValueError(f"unknown asset {name!r}; known: {sorted(_ASSETS)}")
    return str(_ASSETS[name]())
  return path


def make_tokenizer(cfg: Any) -> tokenize_lib.Tokenizer:
  """Tokenizer from ``config.tokenizer`` (``path``: see module docstring)."""
  return tokenize_lib.load_tokenizer(resolve_path(configlib.plain(cfg).get("path", "byte")))


def _dtype(name: str | None):
  return None if name in (None, "", "auto") else jnp.dtype(name)


def _random_trunk(cfg: dict[str, Any], vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
  arch, preset = cfg.get("arch", "decoder"), cfg.get("preset", "tiny_llama")
  overrides = {k: v for k, v in configlib.plain(cfg.get("overrides")).items() if v is not None}
  overrides.setdefault("vocab_size", vocab_size)
  if arch == "decoder":
    config_cls, model_cls = decoder_lib.DecoderConfig, decoder_lib.Decoder
  elif arch == "encoder":
    config_cls, model_cls = encoder_lib.EncoderConfig, encoder_lib.Encoder
  else:
    raise ValueError(f"model.arch must be 'decoder' or 'encoder', got {arch!r}")
  if not hasattr(config_cls, preset):
    raise ValueError(f"model.preset {preset!r} is not a {config_cls.__name__} constructor")
  model_config = getattr(config_cls, preset)(**overrides)
  return model_cls(model_config, rngs=rngs, dtype=_dtype(cfg.get("dtype")))


# The trunk's training switches, declared by every training config so that the
# command line can set them (``--config.model.remat=attention``).
MODEL_SWITCHES = dict(remat="none", scan_layers=False)


def model_section(**fields: Any) -> ml_collections.ConfigDict:
  """``config.model`` with ``MODEL_SWITCHES`` declared: ``remat`` ("none", or a
  ``stack.REMAT_POLICIES`` name) and ``scan_layers``; ``fields`` as in ``make_model``."""
  return ml_collections.ConfigDict(dict(MODEL_SWITCHES, **fields))


def low_precision_compute_dtype(model: nnx.Module) -> jnp.dtype | None:
  """The dtype a model (its trunk, under a head) computes in, when it is below float32."""
  dtype = getattr(getattr(model, "trunk", model), "dtype", None)
  return None if dtype is None or jnp.dtype(dtype).itemsize >= 4 else jnp.dtype(dtype)


def warn_low_precision_policy(model: nnx.Module, binary: str) -> None:
  """Warns when a policy computes below float32: the log-ratios to its reference that
  ``binary`` reports carry rounding noise (README, "Precision")."""
  dtype = low_precision_compute_dtype(model)
  if dtype is None:
    return
  logging.warning(
      "%s: the policy computes in %s, so its log-ratios to the reference (KL estimates, "
      "DPO's rewards/*) carry about 0.5-1 nat of rounding noise a sequence once it moves, "
      "biased upward for k2/k3 (README, Precision); --config.model.dtype=float32 where "
      "they are the result%s", binary, dtype.name,
      "; float16 also runs without loss scaling here" if dtype == jnp.float16
      else "")


def check_before_the_workdir(config: Any) -> None:
  """What every binary refuses before its workdir, data and model: the loop's and the
  optimizer's settings, an unknown ``data.name``, and a bad ``remat``/``scan_layers`` of
  any model section."""
  if "loop" in config:
    train.LoopConfig.from_mapping(config.loop)  # its own checks, num_steps >= 1 among them
  if "optimizer" in config:
    train.make_optimizer(config.optimizer)
  data = config.get("data")
  if hasattr(data, "get") and data.get("name"):
    try:
      sources.check_dataset_name(str(data.name), also=("tiny_world", "tiny_world_harm"))
    except ValueError as e:
      raise configlib.ConfigError(f"config.data.name: {e}") from None
  sections = [("model", config.get("model"))] + [
      (f"{name}.model", config[name].get("model")) for name in
      ("proxy", "gold", "ref", "judge", "policy") if hasattr(config.get(name), "get")]
  for field, section in sections:
    if hasattr(section, "get"):
      model_switches(section, field)  # a misspelt remat policy, named


def model_switches(cfg: Any, field: str = "model") -> dict[str, Any]:
  """``{"remat": policy name or None, "scan_layers": bool}`` of a model section; a bad
  value is an error naming ``field`` (``"True"``/``"False"`` strings read as booleans)."""
  cfg = configlib.plain(cfg)
  try:
    remat = stack.remat_policy(cfg.get("remat") or False)
  except ValueError as e:
    raise ValueError(f"{field}.remat: {e}") from e
  scan = cfg.get("scan_layers") or False
  if isinstance(scan, str) and scan.lower() in ("true", "false"):
    scan = scan.lower() == "true"
  if not isinstance(scan, bool):
    raise ValueError(f"{field}.scan_layers must be True or False, got {scan!r}")
  return {"remat": remat, "scan_layers": scan}


def make_model(cfg: Any, *, vocab_size: int, seed: int) -> nnx.Module:
  """A model (trunk + optional head) from ``config.model``.

  ``ensemble="deep"`` with head ``reward_ensemble:K`` builds K complete models
  (``DeepEnsemble``) from seeds ``seed, seed+1, ...``; otherwise K heads share a trunk.
  ``ensemble_forward`` (``"auto"``, ``"vmap"``, ``"unrolled"``): how a deep ensemble's
  members run in one step (``DeepEnsemble``). ``score_head`` (with ``path``): a saved head
  that does not fit the requested one is an error (``"require"``) or left fresh with a
  warning (``"if_fits"``, the default; ``hf_import.from_pretrained``). ``score_label`` (with
  ``path`` and head ``reward``): a classifier's label whose log-odds is the reward.
  """
  cfg = configlib.plain(cfg)
  head, pooling = cfg.get("head"), cfg.get("pooling") or None
  kind, members = heads_lib.parse_head(head)
  switches = model_switches(cfg)
  if switches["remat"] and not switches["scan_layers"] and jax.default_backend() == "cpu":
    logging.warning("model.remat=%r without model.scan_layers: XLA CPU schedules unrolled "
                    "blocks' recomputation early, so it saves little memory (8%% on the HH "
                    "RM step); scanned blocks recompute one at a time (README, Speed)",
                    switches["remat"])

  def build(rngs: nnx.Rngs, member_head: str | None) -> nnx.Module:
    model = _random_trunk(cfg, vocab_size, rngs)
    model = heads_lib.attach_head(model, member_head, rngs=rngs, pooling=pooling)
    _set_switches(getattr(model, "trunk", model), switches, cfg)
    return model

  if cfg.get("score_label") and not cfg.get("path"):
    raise ValueError(f"model.score_label={cfg['score_label']!r} reads a classifier saved in "
                     "model.path, which is not set")
  if cfg.get("path"):
    if kind == "reward_ensemble" and cfg.get("ensemble", "heads") == "deep":
      raise ValueError("a deep ensemble of pretrained trunks is not supported; "
                       "use ensemble='heads' with a pretrained path")
    # A reward checkpoint's own head (HF ``score``) is loaded where the head can take it.
    model = hf_import.from_pretrained(resolve_path(cfg["path"]), head=head, seed=seed,
                                      dtype=_dtype(cfg.get("dtype")), pooling=pooling,
                                      score_head=cfg.get("score_head", "if_fits"),
                                      score_label=cfg.get("score_label") or None)
    trunk = getattr(model, "trunk", model)
    _warn_on_unapplied_overrides(cfg.get("overrides") or {}, trunk.config, cfg["path"])
    _check_vocabulary(vocab_size, trunk.config.vocab_size, cfg["path"])
    _set_switches(trunk, switches, cfg)
    return model
  if kind == "reward_ensemble" and cfg.get("ensemble", "heads") == "deep":
    seeds = [seed + k for k in range(members)]
    forward = cfg.get("ensemble_forward", "auto")
    if forward not in heads_lib.DeepEnsemble.FORWARDS:
      raise ValueError(f"model.ensemble_forward must be one of "
                       f"{heads_lib.DeepEnsemble.FORWARDS}, got {forward!r}")
    return heads_lib.DeepEnsemble(lambda rngs: build(rngs, "reward"), seeds, forward=forward)
  return build(nnx.Rngs(seed), head)


def _trunk_config(model: nnx.Module) -> Any:
  """The config of ``model``'s trunk (a deep ensemble's stacked members share one)."""
  if isinstance(model, heads_lib.DeepEnsemble):
    model = model.members  # their structure: nothing sliced
  return getattr(model, "trunk", model).config


def position_limit(model: nnx.Module) -> int | None:
  """The longest sequence ``model``'s learned position table holds (its trunk config's
  ``position_limit``: an encoder's, RoBERTa's less its offset, a GPT-2-style decoder's);
  None for rotary positions."""
  return _trunk_config(model).position_limit


def check_max_length(model: nnx.Module, max_length: int,
                     setting: str = "data.pipeline.max_length") -> None:
  """Refuses sequences of ``max_length`` tokens that would read past ``model``'s learned
  position table (``position_limit``): packed rows would get NaN there, padded ones an
  error at the first step."""
  limit = position_limit(model)
  if limit is not None and max_length > limit:
    table = _trunk_config(model).max_position_embeddings
    raise ValueError(f"{setting}={max_length}, but the model has {limit} positions "
                     f"(max_position_embeddings={table}"
                     + (f", less the {table - limit} RoBERTa skips" if table > limit else "")
                     + f"): set {setting} <= {limit}")


def check_policy_length(policy: nnx.Module, length: int, what: str) -> None:
  """Refuses a policy's sequences of ``length`` tokens (``what``: the settings that sum to
  it) past a decoder's learned position table (``Decoder.check_positions``)."""
  try:
    getattr(policy, "check_positions", lambda _: None)(length)
  except ValueError as e:
    raise ValueError(f"{what} = {length}: {e}") from None


def _warn_on_unapplied_overrides(overrides: dict[str, Any], config: Any, path: str) -> None:
  """``model.overrides`` shape a random model only; a loaded one keeps its own config."""
  same = lambda a, b: (tuple(a) if isinstance(a, list) else a) == (  # noqa: E731
      tuple(b) if isinstance(b, list) else b)
  differ = {k: (v, getattr(config, k)) for k, v in overrides.items()
            if hasattr(config, k) and not same(getattr(config, k), v)}
  if differ:
    logging.warning("model.overrides are not applied to the model loaded from %s: %s", path,
                    ", ".join(f"{k}={v!r} (loaded: {got!r})" for k, (v, got) in differ.items()))


def _check_vocabulary(tokenizer_vocab: int, model_vocab: int, path: str) -> None:
  if tokenizer_vocab > model_vocab:
    raise ValueError(f"the tokenizer has {tokenizer_vocab} ids but the model at {path} embeds "
                     f"only {model_vocab}: ids past {model_vocab - 1} have no embedding; use "
                     "the tokenizer the model was trained with")
  if tokenizer_vocab < model_vocab // 2:  # models pad their vocabulary, but not by half
    logging.warning("the tokenizer has %d ids and the model at %s embeds %d: is it the "
                    "model's own tokenizer?", tokenizer_vocab, path, model_vocab)


def _set_switches(trunk: nnx.Module, switches: dict[str, Any], cfg: dict[str, Any]) -> None:
  for flag, value in switches.items():
    if value:
      if not hasattr(trunk, flag):
        raise ValueError(f"model.{flag}={cfg[flag]!r}: {type(trunk).__name__} has no "
                         f"{flag} option")
      setattr(trunk, flag, value)


def partition_rules(model: nnx.Module, mesh: jax.sharding.Mesh | None = None) -> list:
  """Partition rules of the model's trunk (decoder or encoder), ensemble-aware.

  A ``DeepEnsemble``'s member axis goes over the mesh's ``ensemble`` axis, or is
  replicated when ``mesh`` is given and has none.
  """
  if (not isinstance(model, heads_lib.DeepEnsemble) and mesh is not None
      and mesh.shape.get("ensemble", 1) > 1):
    logging.warning("mesh.ensemble=%d, but only a deep ensemble (model.ensemble='deep') "
                    "splits over that axis: this model is replicated on it, each copy doing "
                    "the same work", mesh.shape["ensemble"])
  if isinstance(model, heads_lib.DeepEnsemble):
    member_rules = partition_rules(model.member(0))
    if mesh is not None and "ensemble" not in mesh.shape:
      return [(pattern, P(None, *spec)) for pattern, spec in member_rules]
    return heads_lib.ensemble_partition_rules(member_rules)
  trunk = getattr(model, "trunk", model)
  if isinstance(trunk, encoder_lib.Encoder):
    return list(encoder_lib.PARTITION_RULES)
  return list(decoder_lib.PARTITION_RULES)


def tiny_world_dataset_name(tw: Mapping[str, Any]) -> str:
  return (f"tiny_world-w{tw.get('world_seed', 0)}-s{tw.get('seed', 0)}-n{tw['num_pairs']}"
          f"-{tw.get('label_noise', 'none')}-t{tw.get('temperature', 1.0)}")


def ensure_tiny_world(tw: Mapping[str, Any]) -> str:
  """Writes the tiny-world dataset described by ``tw`` once; returns its ``synthetic:`` name.

  The recorded label-noise rate is the measured fraction of pairs whose label
  disagrees with the gold reward (0 for deterministic labels).
  """
  name = tiny_world_dataset_name(tw)
  if not synthetic.dataset_exists(name):
    world = tiny_world_lib.TinyWorld(seed=tw.get("world_seed", 0))
    rows = list(world.preference_pairs(
        tw["num_pairs"], seed=tw.get("seed", 0), label_noise=tw.get("label_noise", "none"),
        temperature=tw.get("temperature", 1.0)))
    flipped = sum(r["meta"]["gold_chosen"] < r["meta"]["gold_rejected"] for r in rows)
    synthetic.write_synthetic_dataset(
        name, rows, label_noise=flipped / len(rows),
        gold_name=f"tiny_world(seed={world.seed})", meta=dict(tw))
  return f"synthetic:{name}"


DATA_DEFAULTS = dict(name="tiny_world", train_split="resplit_train",
                     eval_split="resplit_validation", on_bad_row="error", cache_dir="")
TINY_WORLD_DEFAULTS = dict(world_seed=0, seed=0, num_pairs=2000, label_noise="none",
                           temperature=1.0)


def data_section(*, pipeline: Mapping[str, Any] | None = None,
                 tiny_world: Mapping[str, Any] | None = None,
                 **fields: Any) -> ml_collections.ConfigDict:
  """``config.data`` declaring every field the binaries read, defaults filled in.

  ``fields`` override ``DATA_DEFAULTS`` (a binary's own keys, e.g. ``objective``, are
  added); ``pipeline`` holds ``PipelineConfig`` values, ``tiny_world`` the world's.
  Shipped configs build their data section here, so every documented option can be
  set from the command line (``--config.data.pipeline.max_prompt_length=64``).
  """
  return ml_collections.ConfigDict(dict(
      DATA_DEFAULTS, **fields, tiny_world=dict(TINY_WORLD_DEFAULTS, **(tiny_world or {})),
      pipeline=configlib.section(pipeline_lib.PipelineConfig, **(pipeline or {}))))


def load_split(data_cfg: Any, split: str) -> sources.PreferenceSource:
  """``load_preferences`` for ``config.data`` (the tiny world is written on first use)."""
  cfg = configlib.plain(data_cfg)
  name = cfg["name"]
  if name == "tiny_world":
    name = ensure_tiny_world(dict(TINY_WORLD_DEFAULTS,
                                  **configlib.plain(cfg.get("tiny_world") or {})))
  source = sources.load_preferences(name, split, on_bad_row=cfg.get("on_bad_row", "error"),
                                    data_dir=cfg.get("cache_dir"))
  logging.info("data %s[%s]: %d pairs (%s)", name, split, len(source), source.summary)
  report_lib.check_nonempty(source)
  return source


@dataclasses.dataclass
class DataReport:
  """A run's ``data_report.json``: scanned before any model is built, written by
  :meth:`write` as a ``train_loop`` start hook (once the workdir's config and checkpoint
  are accepted, so a refused rerun leaves the run's record of its data alone), and
  completed by :meth:`finish`."""
  workdir: str
  report: dict[str, Any]
  written: bool = False

  def write(self, step: int = 0, state: Any = None) -> None:
    del step, state
    summary_lib.write_json(f"{self.workdir}/{report_lib.REPORT_FILE}", self.report)
    self.written = True

  def finish(self, train_iter: Any, summary: dict[str, Any], mesh: Any = None) -> None:
    """Adds the train iterator's counters (all epochs, resumes included; summed over the
    processes' data shards of ``mesh``) and rewrites the report; a finished run's
    ``summary.json`` gets it as ``data``. A rerun of a finished run (the loop never
    started) keeps the report and summary it finished with, unless that run was killed
    between its summary and its report: then its own report (this run's scan if it wrote
    none) gets the final checkpoint's iterator counters, and the summary gets the report."""
    if not self.written:
      if not summary or "data" in summary:
        return
      logging.warning("%s: the finished run's summary.json lacks its data report (the run "
                      "was stopped before writing it): written now", self.workdir)
      self.report = read_data_report(self.workdir) or self.report
    counters = getattr(train_iter, "counters", None)
    if counters is not None:
      self.report["train"]["iterator"] = parallel.summed_counts(counters, mesh,
                                                                per_step=("batches",))
    self.write()
    if summary:
      summary["data"] = self.report
      summary_lib.write_summary(self.workdir, summary)


def _warn_on_a_bos_the_tokenizer_does_not_add(tokenizer: tokenize_lib.Tokenizer,
                                              config: pipeline_lib.PipelineConfig) -> None:
  """SmolLM2's and GPT-2's own encoding adds no BOS; a raw prompt given one starts with a
  token the model never saw there (SmolLM2: ``<|im_start|>``; 2.0 nats on log p(response))."""
  adds_bos = getattr(tokenizer, "adds_bos", None)
  if (config.add_bos and config.prompt_style == "raw" and tokenizer.bos_id is not None
      and adds_bos is not None and not adds_bos()):
    logging.warning("data.pipeline.add_bos=True puts id %d (%r) before every prompt, which "
                    "%s's own encoding does not; for a model trained with it, set "
                    "data.pipeline.add_bos=False", tokenizer.bos_id,
                    tokenizer.decode([tokenizer.bos_id], skip_special_tokens=False),
                    tokenizer.name)


def start_data_report(workdir: str, splits: Mapping[str, sources.PreferenceSource],
                      tokenizer: tokenize_lib.Tokenizer, config: pipeline_lib.PipelineConfig,
                      response_keys: tuple[str, ...], *, weighted: Sequence[str] = (),
                      hard_labels: bool = False) -> DataReport:
  """Scans each split (`prefjax.data.report`) and logs one line; pass the result's
  ``write`` to ``train_loop(start_hooks=...)`` and call its ``finish`` at the end.

  Call it before building a model: a split with no usable row raises `EmptyDataError`, and
  so does a split named in ``weighted`` (those whose weights the loss applies) whose rows
  all have weight 0, or (``hard_labels``: a loss that drops ties and soft preferences) none
  with outcome 0 or 1.
  """
  _warn_on_a_bos_the_tokenizer_does_not_add(tokenizer, config)
  previous = read_data_report(workdir) or {}
  report = {name: report_lib.split_report(source, tokenizer, config, response_keys,
                                          previous=previous.get(name))
            for name, source in splits.items()}
  logging.info("%s (details: %s)", report_lib.one_line(report), report_lib.REPORT_FILE)
  for name in weighted:
    report_lib.check_trainable(report[name], hard_labels=hard_labels)
  for line in report_lib.mostly_truncated(report):
    logging.warning("%s", line)
  return DataReport(workdir, report)


def read_data_report(workdir: str) -> dict[str, Any] | None:
  """``workdir/data_report.json``, or None when the run read no preference data."""
  path = f"{workdir}/{report_lib.REPORT_FILE}"
  if not os.path.exists(path):
    return None
  return files.read_json(path)


def pipeline_config(data_cfg: Any, *, mesh: jax.sharding.Mesh | None = None,
                    **overrides) -> pipeline_lib.PipelineConfig:
  """``data.pipeline`` with ``overrides``; a ``mode="padded"`` override (eval passes)
  also turns ``share_prompt`` and ``trim_rows`` off, which only packed training
  batches use. In a multi-process job, ``mesh`` sets the data shard this process reads
  (``parallel.data_shard``): processes that hold the same rows of a batch (an
  ``ensemble`` or ``tensor`` axis across processes) read the same shard."""
  fields = {**configlib.plain(configlib.plain(data_cfg).get("pipeline")), **overrides}
  if overrides.get("mode") == "padded":
    fields.update(share_prompt=False, trim_rows=False)
  unset = fields.get("shard_index") is None and fields.get("shard_count") is None
  if mesh is not None and jax.process_count() > 1 and unset:
    fields["shard_index"], fields["shard_count"] = parallel.data_shard(mesh)
  return pipeline_lib.PipelineConfig.from_mapping(fields)


def eval_batch_size(config: Any, source: Sequence[Any], mesh: jax.sharding.Mesh | None) -> int:
  """``eval.batch_size``, cut to the eval split's size (rounded up to the data-parallel
  devices) in a one-process run: a larger batch is filler past the split, computed all the
  same (100,000 rows for a 211-pair split took 72 s)."""
  size = int(config.eval.batch_size)
  multiple = 1 if mesh is None else train.data_parallel_size(mesh)
  enough = max(1, -(-len(source) // multiple)) * multiple
  if size <= enough or jax.process_count() > 1:
    return size
  logging.info("eval.batch_size=%d exceeds the %d examples of the eval split: batches of %d",
               size, len(source), enough)
  return enough


def check_eval_section(config: Any, fields: Sequence[str], binary: str) -> None:
  """``config.eval`` holds only ``fields``; the error for a section of another binary's
  config (its eval fields) says to check that ``--config`` is ``binary``'s."""
  configlib.check_fields("config.eval", config.eval, fields,
                         hint=f"is --config a {binary} config? the shipped ones are in "
                         f"configs/{binary.removeprefix('train_')}/")
  if "batch_size" in config.eval and int(config.eval.batch_size) < 1:
    raise ValueError(f"eval.batch_size={config.eval.batch_size} must be >= 1")


def make_mesh(mesh_cfg: Any) -> jax.sharding.Mesh:
  """``config.mesh`` -> mesh; ``mesh.num_devices`` > 0 uses only the first that many devices.
  An empty ``mesh.shape`` is one device (per ensemble member), as for the binaries that
  run without a mesh (``make_optional_mesh``)."""
  fields = configlib.plain(mesh_cfg)
  if not fields.get("shape"):
    require_one_process("a run with an empty config.mesh.shape")
    mesh_cfg = fields = {**fields, "shape": (1, 1, 1),
                         "num_devices": int(fields.get("ensemble") or 1)}
  num_devices = int(fields.get("num_devices", 0) or 0)
  if num_devices < 0:
    raise ValueError(f"mesh.num_devices={num_devices}: 0 (every device) or a count")
  if num_devices == 0:
    return parallel.mesh_from_config(mesh_cfg)
  if num_devices > jax.device_count():
    raise ValueError(f"mesh.num_devices={num_devices} but only {jax.device_count()} devices")
  return parallel.mesh_from_config(mesh_cfg, devices=jax.devices()[:num_devices])


# Largest vocabulary for which evals compute the exact full-vocabulary KL along samples
# (memory O(B·T·V)); ``config.eval.exact_kl_max_vocab`` overrides it.
EXACT_KL_MAX_VOCAB = 4096


def make_optional_mesh(config: Any) -> jax.sharding.Mesh | None:
  """``config.mesh`` -> a mesh; no ``mesh`` or an empty ``mesh.shape`` means no mesh
  (one process only: several would each train their own copy)."""
  mesh_cfg = config.get("mesh")
  if not mesh_cfg or not mesh_cfg.get("shape"):
    require_one_process("a run without config.mesh.shape")
    return None
  return make_mesh(mesh_cfg)


def require_one_process(what: str) -> None:
  """Refuses a multi-process job for work that does not split over processes: each
  process would redo all of it, or score its own rows and report them as the whole."""
  if jax.process_count() > 1:
    raise configlib.ConfigError(
        f"{what} runs in one process; this job has {jax.process_count()} (README, "
        "\"Multi-host launch\"): launch it as a single process")


def mesh_context(mesh: jax.sharding.Mesh | None):
  """``jax.set_mesh(mesh)``, or a no-op context without a mesh."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


HF_EXPORT_DIR = "hf"


def export_hf(config: Any, workdir: str, model: nnx.Module, tokenizer: Any, *,
              what: str) -> str | None:
  """``config.export_hf``: writes ``model`` to ``<workdir>/hf`` as a Hugging Face directory.

  A reward model is written as ``*ForSequenceClassification``, a deep ensemble as one
  such directory per member, a policy as ``*ForCausalLM`` (``prefjax.models.hf_export``),
  with the tokenizer's special ids and files. Every process gathers its parameter
  shards; process 0 writes. Returns the directory (None when not exporting here).
  """
  if not config.get("export_hf"):
    return None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.tree.map(
        lambda x: (multihost_utils.process_allgather(x, tiled=True)
                   if isinstance(x, jax.Array) and not x.is_fully_addressable else x), state))
  if jax.process_index() != 0:
    return None
  text = pipeline_config(config.get("data") or {}).text_fields()
  path = hf_export.save_pretrained(model, os.path.join(workdir, HF_EXPORT_DIR),
                                   tokenizer=tokenizer, add_bos=text["add_bos"], pipeline=text)
  logging.info("exported the %s to %s (Hugging Face format)", what, path)
  return str(path)


def tokens_in_batch(batch: Mapping[str, Any]) -> float:
  """Real tokens of a host batch, padded (``attention_mask``) or packed (``segment_ids``)."""
  key = "segment_ids" if "segment_ids" in batch else "attention_mask"
  return float(np.count_nonzero(batch[key]))
