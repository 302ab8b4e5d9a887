"""Evaluates scorers (``prefjax.evals.scorers``) on preference datasets: the core of ``eval_rm``.

A dataset spec is ``NAME[@SPLIT]`` for anything ``load_preferences`` opens
(``hh_rlhf/harmless-base@resplit_test``, ``pandalm@test``, ``jsonl:PATH``; default
split ``test``, ``train`` for ``jsonl:``, whose file is one split), or
``run:WORKDIR[@SPLIT]``: the data of a training run (its ``config.data``, e.g. the
tiny world it generated; default split its ``data.eval_split``), checked against the
content fingerprint the run recorded in ``data_report.json`` (`check_run_data`): a
split whose content changed since the run read it is a warning in the log and the
report.

Per dataset every scorer scores every pair; the metrics are computed on the
pairs every scorer scored (a pipeline may drop over-long pairs; counted) whose
label is decisive (``outcome`` ≠ ½; ties are counted and left out), with one
set of bootstrap resamples shared by all scorers (``prefjax.evals.stats``); pairs
that repeat another's text (same prompt and responses, either order) are drawn
together, as one observation. The
section counts every row: read, skipped as bad by reason, in sibling splits,
scored, ties (``source_counts``, as in a training run's ``data_report.json``).
Rows without ``meta[subset_field]`` in a dataset where others have it form the
``(none)`` subset, left out of the category-weighted mean.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from prefjax import experiment
from prefjax.data import report as report_lib
from prefjax.data import sources
from prefjax.evals import preference
from prefjax.evals import scorers as scorers_lib
from prefjax.evals import stats
from prefjax.rm import evaluation as rm_evaluation

EvalInputError = scorers_lib.EvalInputError


# The responses train_rm and train_dpo scan (``start_data_report``), part of the scan_key
# of a data_report.json written before it recorded the content fingerprint.
RUN_RESPONSE_KEYS = ("chosen", "rejected")


@dataclasses.dataclass
class Dataset:
  label: str
  source: Any
  run_data: dict[str, Any] | None = None  # `check_run_data` of a ``run:`` dataset
  full_label: str = ""  # with the whole path: the label where two short ones coincide


def load_dataset(spec: str, eval_cfg: Any) -> Dataset:
  """Opens one dataset spec (see the module docstring); errors name the spec."""
  spec = spec.strip()
  name, _, split = spec.rpartition("@") if "@" in spec else (spec, "", "")
  run = None
  try:
    if name.startswith("run:"):
      run = scorers_lib.latest_run_config(name[4:], f"dataset {spec!r}")
      data_cfg = run.data
      split = split or data_cfg.eval_split
    else:
      data_cfg = {"name": name, "on_bad_row": eval_cfg.on_bad_row}
      split = split or ("train" if name.startswith("jsonl:") else "test")
    source = experiment.load_split(data_cfg, split)
  except EvalInputError:
    raise
  except sources.BadRowError as e:  # every listed file:line, and eval_rm's own flag
    raise EvalInputError(f"dataset {spec!r}: " + str(e).replace(
        "--config.data.on_bad_row", "--config.on_bad_row")) from e
  except Exception as e:  # pylint: disable=broad-except
    raise EvalInputError(f"dataset {spec!r}: {type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}") from e
  if len(source) == 0:
    raise EvalInputError(f"dataset {spec!r}: split {split!r} has no pairs")
  label = f"{short_name(name)}@{split}"
  run_data = None if run is None else check_run_data(name[4:], run, source, label)
  return Dataset(label, source, run_data, f"{name}@{split}")


def unique_labels(datasets: Sequence[Dataset]) -> list[Dataset]:
  """Datasets whose short labels coincide (``a/test.jsonl``, ``b/test.jsonl``) are labelled
  by their whole paths, so that their report sections, figures and scores stay apart;
  one dataset given twice is an error."""
  count = collections.Counter(d.label for d in datasets)
  out = [dataclasses.replace(d, label=d.full_label) if count[d.label] > 1 else d
         for d in datasets]
  twice = [k for k, n in collections.Counter(d.label for d in out).items() if n > 1]
  if twice:
    raise EvalInputError(f"datasets {twice} are each given more than once (config.datasets)")
  return out


def check_run_data(workdir: str, run: Any, source: Any, label: str) -> dict[str, Any]:
  """Whether ``source`` is the split the run read, by its ``data_report.json`` (the
  content fingerprint; the ``scan_key`` in a report written before it was recorded).

  Returns ``{"run", "split", "files", "status": same | changed | unchecked, "why",
  "message"}``; logs ``message`` (it names the files) as a warning unless ``same``.
  """
  out = {"run": workdir, "split": source.split, "files": sorted(source.summary.input_files)}
  data_report = experiment.read_data_report(workdir)
  recorded = [r for r in (data_report or {}).values()
              if r.get("split") == source.split and r.get("scan_key")]
  if recorded:
    out.update(_compare_scan(recorded[0], run, source))
  elif data_report is None:
    out.update(status="unchecked", why=f"{workdir} has no {report_lib.REPORT_FILE}")
  else:
    out.update(status="unchecked", why=f"its {report_lib.REPORT_FILE} records no scan of "
                                       f"split {source.split!r}")
  out["message"] = run_data_text(out)
  if out["status"] != "same":
    logging.warning("dataset %s: %s", label, out["message"])
  return out


def _compare_scan(then: dict[str, Any], run: Any, source: Any) -> dict[str, str]:
  """By the content fingerprint the report records; a report written before it was
  recorded is compared by its scan_key (content, tokenizer, cuts, as train_rm and
  train_dpo scan)."""
  if then.get("fingerprint"):
    same = then["fingerprint"] == getattr(source, "fingerprint", None)
  else:
    try:
      same = then["scan_key"] == report_lib.scan_key(
          source, experiment.make_tokenizer(run.tokenizer),
          experiment.pipeline_config(run.data), RUN_RESPONSE_KEYS)
    except (OSError, ValueError, KeyError) as e:  # e.g. the run's tokenizer files moved
      return {"status": "unchecked", "why": f"the run's tokenizer did not load: {e}"}
  summary = source.summary
  why = (f"rows read when the run started {then['rows_read']}, now {summary.rows_read}; "
         f"built then {then['rows_built']}, now {summary.rows_built}")
  if then.get("files") and then["files"] != sorted(summary.input_files):
    why += f"; files then {', '.join(then['files'])}"
  return {"status": "same" if same else "changed", "why": why}


def run_data_text(check: dict[str, Any]) -> str:
  """One sentence on a `check_run_data` result, for the log and ``report.md``."""
  files = ", ".join(check["files"]) or "no file"
  if check["status"] == "same":
    return f"the data the run {check['run']} read ({files}; by its data_report.json)"
  if check["status"] == "unchecked":
    return f"not checked against the run {check['run']}: {check['why']}"
  return (f"NOT the data the run {check['run']} read: split {check['split']!r} of {files} "
          f"changed since then (by its data_report.json; {check['why']}), "
          "so these are not the run's own eval numbers")


def short_name(name: str) -> str:
  """``run:/a/b/rm`` -> ``run:rm``, ``jsonl:/a/x.jsonl`` -> ``jsonl:x.jsonl`` (report labels)."""
  kind, sep, path = name.partition(":")
  if sep and kind in ("run", "jsonl"):
    return f"{kind}:{os.path.basename(os.path.normpath(path))}"
  return name


def parse_list(value: Any) -> list[str]:
  items = value.split(",") if isinstance(value, str) else list(value or ())
  return [s.strip() for s in items if s.strip()]


@dataclasses.dataclass
class PairTable:
  """The dataset side of the evaluated pairs: rows, labels, lengths, subsets."""
  index: np.ndarray
  ids: list[str]
  outcome: np.ndarray
  chosen_chars: np.ndarray
  rejected_chars: np.ndarray
  subsets: list[str] | None  # `rm_evaluation.subset_names`: None when no row has one
  text_pairs: np.ndarray  # `stats.text_pair_groups`: copies of one text pair share a label
  prompts: np.ndarray  # `stats.prompt_groups`: the bootstrap's clusters
  without_subset: int = 0  # rows in the ``(none)`` subset

  @classmethod
  def from_rows(cls, source: Any, index: np.ndarray, subset_field: str) -> PairTable:
    rows = source.__getitems__(index.tolist())
    texts = ([r.get("prompt", "") for r in rows], [r["chosen"] for r in rows],
             [r["rejected"] for r in rows])
    subsets, missing = None, 0
    if subset_field:
      subsets, missing = rm_evaluation.subset_names([r.get("meta") for r in rows], subset_field)
    return cls(index, [str(r.get("id", i)) for r, i in zip(rows, index)],
               np.array([float(r.get("outcome", 1.0)) for r in rows]),
               np.array([len(r["chosen"]) for r in rows], np.float64),
               np.array([len(r["rejected"]) for r in rows], np.float64),
               subsets, stats.text_pair_groups(*texts), stats.prompt_groups(*texts), missing)

  @property
  def decisive(self) -> np.ndarray:
    return self.outcome != 0.5

  def relative_length_difference(self) -> np.ndarray:
    d = self.decisive
    prefer_chosen = self.outcome[d] > 0.5
    c, r = self.chosen_chars[d], self.rejected_chars[d]
    return stats.relative_length_difference(np.where(prefer_chosen, c, r),
                                            np.where(prefer_chosen, r, c))


def score_dataset(dataset: Dataset, scorer_fns: dict[str, Any]
                  ) -> tuple[dict[str, scorers_lib.Scored], dict[str, str]]:
  """Each scorer's rewards on the dataset, and why a scorer has none (e.g. no gold)."""
  scored, missing = {}, {}
  for name, fn in scorer_fns.items():
    result = fn(dataset.source, dataset.label)
    if result is None:
      missing[name] = "not available for this dataset"
      logging.info("scorer %s: not available on %s", name, dataset.label)
    else:
      scored[name] = result
  if not scored:
    raise EvalInputError(f"dataset {dataset.label!r}: no scorer could score it ({missing})")
  return scored, missing


def common_rewards(scored: dict[str, scorers_lib.Scored]
                   ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]], dict]:
  """Rows every scorer scored, each output column's rewards on them, and calibration flags."""
  index = np.array(sorted(set.intersection(*(set(s.index.tolist()) for s in scored.values()))),
                   np.int64)
  columns, calibrated = {}, {}
  for result in scored.values():
    position = {int(i): k for k, i in enumerate(result.index)}
    take = np.array([position[int(i)] for i in index], np.int64)
    for name, (r_c, r_r) in result.columns.items():
      columns[name] = (r_c[take], r_r[take])
      # WCO/UWO margins are of standardized members: no BT log-loss or ECE for them.
      calibrated[name] = result.calibrated and not name.endswith(scorers_lib.AGGREGATES)
  return index, columns, calibrated


def is_primary(column: str) -> bool:
  """Columns compared pairwise and plotted (ensemble members are reported, not compared)."""
  return "/member" not in column


def evaluate_dataset(dataset: Dataset, scorer_fns: dict[str, Any], eval_cfg: Any
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(report section as JSON, arrays for figures and scores.jsonl) of one dataset."""
  scored, missing = score_dataset(dataset, scorer_fns)
  index, columns, calibrated = common_rewards(scored)
  if index.size == 0:
    raise EvalInputError(f"dataset {dataset.label!r}: no pair was scored by every scorer")
  table = PairTable.from_rows(dataset.source, index, eval_cfg.subset_field)
  if table.without_subset:
    logging.warning("dataset %s: %s", dataset.label, rm_evaluation.missing_subset_text(
        table.without_subset, index.size, eval_cfg.subset_field))
  d = table.decisive
  if not d.any():
    raise EvalInputError(f"dataset {dataset.label!r}: every pair is a tie; nothing to score")
  repeats = stats.repeated_items(table.text_pairs[d])
  groups = table.prompts[d]
  num_prompts = int(np.unique(groups).size)
  if num_prompts < d.sum():
    logging.info("dataset %s: %d decisive pairs from %d prompts (%d repeat the text of "
                 "another); the bootstrap draws prompts, with all their pairs",
                 dataset.label, int(d.sum()), num_prompts, repeats)
  counts = stats.resample_counts(int(d.sum()), int(eval_cfg.num_resamples), int(eval_cfg.seed),
                                 groups)
  rel_diff = table.relative_length_difference()
  subsets = None if table.subsets is None else list(np.asarray(table.subsets)[d])
  if subsets is not None:
    only_ties = sorted(set(np.asarray(table.subsets).tolist()) - set(subsets))
    if only_ties:
      logging.warning("dataset %s: subsets %s hold only ties: they get no accuracy, and the "
                      "mean over subsets leaves them out", dataset.label, only_ties)
  signed, metrics = {}, {}
  for name, (r_c, r_r) in columns.items():
    signed[name] = stats.signed_margins(r_c, r_r, table.outcome)[d]
    m = stats.scorer_metrics(signed[name], counts, rel_diff=rel_diff, subsets=subsets,
                             calibrated=calibrated[name], num_bins=int(eval_cfg.num_bins),
                             seed=int(eval_cfg.seed), groups=groups)
    if subsets is not None and rm_evaluation.NO_SUBSET in subsets:
      m["subset_mean"] = named_subset_mean(signed[name], counts, subsets, int(eval_cfg.seed),
                                           groups)
    both = np.concatenate([r_c, r_r])
    m.update(reward_mean=float(both.mean()), reward_std=float(both.std()))
    metrics[name] = m
  primary = [n for n in columns if is_primary(n)]
  comparisons = {f"{b} vs {a}": stats.paired_difference(signed[a], signed[b], counts)
                 for a, b in itertools.combinations(primary, 2)}
  section = {
      "dataset": dataset.label, "rows": len(dataset.source), "pairs_scored": int(index.size),
      "pairs_decisive": int(d.sum()), "ties_left_out": int((~d).sum()),
      "decisive_pairs_repeating_text": repeats, "decisive_prompts": num_prompts,
      "preferred_longer_rate": float(np.mean(rel_diff > 0)),
      "length_bin_counts": {label: int(mask.sum()) for label, mask in stats.length_bins(rel_diff)},
      "source_summary": str(dataset.source.summary),
      "source_counts": report_lib.build_counts(dataset.source),
      "subset_field": eval_cfg.subset_field, "pairs_without_subset": table.without_subset,
      "run_data": dataset.run_data,
      "dropped_by_pipeline": {n: s.dropped for n, s in scored.items() if s.dropped},
      "truncated_by_pipeline": {n: s.truncated for n, s in scored.items() if s.truncated},
      "not_scored": {n: len(dataset.source) - s.index.size for n, s in scored.items()
                     if s.index.size < len(dataset.source)},
      "unavailable": missing, "calibrated": calibrated,
      "metrics": stats.to_json(metrics), "comparisons": stats.to_json(comparisons),
  }
  arrays = {"table": table, "columns": columns, "signed": signed, "primary": primary,
            "calibrated": calibrated, "rel_diff": rel_diff}
  return section, arrays


def named_subset_mean(signed: np.ndarray, counts: np.ndarray, subsets: list[str],
                      seed: int = 0, groups: np.ndarray | None = None) -> stats.Estimate:
  """The category-weighted mean over the named subsets: ``(none)`` is no category."""
  names = np.asarray(subsets)
  named = names != rm_evaluation.NO_SUBSET
  if not named.any():
    return stats.Estimate(float("nan"), float("nan"), float("nan"))
  correct = preference.pair_accuracy(signed)
  return stats.subset_accuracies(correct[named], counts[:, named], names[named].tolist(),
                                 seed, None if groups is None else groups[named])[1]


def figure_name(kind: str, dataset: str) -> str:
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset)
  return os.path.join("figures", f"{kind}_{safe}.png")
