r"""Labels preference pairs with an AI judge against written principles (RLAIF).

  python -m experiments.label_ai_feedback --config=configs/feedback/label_smollm2.py \
      --workdir=/tmp/label_hh [--config.data.max_pairs=200 ...]

For every pair of ``config.data`` (A = its chosen, B = its rejected response) the judge
(``config.judge.kind``: ``lm`` = the causal LM of ``config.model``; ``tiny_world_gold``
= the tiny world's gold reward, a programmatic judge with known answers) is asked
``config.judge.template`` in both orders under principles of ``config.constitution``
(``config.principles``: one sampled per pair, or an ensemble); see
``prefjax.feedback.labeller``.

Writes into the workdir:
  labels.jsonl   the AI-labelled pairs (chosen = the judge's pick, ``outcome`` = its
                 probability, principles and both per-order probabilities in ``meta``),
                 readable as ``jsonl:WORKDIR/labels.jsonl`` by every binary;
  report.json / report.md   agreement with the data's own labels for each order and the
                 average (bootstrap CIs), the single orders' position bias, and
                 for PandaLM agreement with each annotator beside inter-annotator agreement;
                 ``source_rows``: the data's rows read, built and skipped by reason.
While judging, ``judged.partial.npz`` holds the batches judged so far (saved at most
every 30 s): a run stopped halfway resumes after them (the same queries, judge weights
and batching), and a finished one relabels from scratch.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from absl import app
from absl import logging

from experiments import common
from prefjax import configlib
from prefjax import experiment
from prefjax.data import report as data_report
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.evals import stats
from prefjax.feedback import agreement
from prefjax.feedback import constitution
from prefjax.feedback import dataset
from prefjax.feedback import labeller
from prefjax.feedback import templates
from prefjax.train import summary as summary_lib

JUDGE_KINDS = ("lm", "tiny_world_gold")
JUDGE_FIELDS = ("kind", "template", "labels", "answer_prefix", "style", "system",
                "temperature", "position_bias")
PROGRESS_FILE = "judged.partial.npz"
# Below this mean mass on the two labels the judge is read where it would write neither
# (SmolLM2-135M: 0.2 on 'A'/'B' with the shipped template, 0.0005 after 'Answer:').
LOW_OPTION_MASS = 0.05
SCORING_FIELDS = ("batch_size", "max_length", "pad_to_multiple", "add_bos",
                  "max_prompt_chars", "max_response_chars")


def make_judge(config: Any) -> Any:
  """The judge of ``config.judge`` (templates and option tokens checked before any model)."""
  configlib.check_fields("config.judge", config.judge, JUDGE_FIELDS)
  kind = config.judge.kind
  if kind == "tiny_world_gold":
    world = tiny_world_lib.TinyWorld(seed=int(config.data.tiny_world.world_seed))
    return labeller.tiny_world_judge(world, temperature=float(config.judge.temperature),
                                     position_bias=float(config.judge.position_bias))
  if kind != "lm":
    raise ValueError(f"config.judge.kind must be one of {JUDGE_KINDS}, got {kind!r}")
  world_only = {"temperature": 1.0, "position_bias": 0.0}  # the programmatic judge's knobs
  if moved := {k: config.judge[k] for k, v in world_only.items()
               if float(config.judge.get(k, v)) != v}:
    raise ValueError(f"config.judge {moved}: only the tiny_world_gold judge reads these; an "
                     "lm judge's probabilities come from the model (leave them at "
                     f"{world_only})")
  configlib.check_fields("config.scoring", config.scoring, SCORING_FIELDS)
  template = templates.JudgeTemplate.from_config(config.judge)
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  template.option_ids(tokenizer)  # a multi-token label fails before the model loads
  model = experiment.make_model(dict(config.model, head=None), vocab_size=tokenizer.vocab_size,
                                seed=int(config.seed))
  s = config.scoring
  return labeller.LMJudge(model, tokenizer, template, batch_size=int(s.batch_size),
                          max_length=int(s.max_length), pad_to_multiple=int(s.pad_to_multiple),
                          add_bos=bool(s.add_bos), max_prompt_chars=int(s.max_prompt_chars),
                          max_response_chars=int(s.max_response_chars))


def agreement_report(pairs: list[dict[str, Any]], judged: list[dict[str, Any]],
                     eval_cfg: Any) -> dict[str, Any]:
  groups = stats.prompt_groups([p["prompt"] for p in pairs], [p["a"] for p in pairs],
                              [p["b"] for p in pairs])
  kwargs = dict(num_resamples=int(eval_cfg.num_resamples), seed=int(eval_cfg.seed),
                groups=groups)
  report = {"human": agreement.human_agreement(
      [j["p_a_first"] for j in judged], [j["p_a_second"] for j in judged],
      [p["outcome"] for p in pairs], **kwargs)}
  if pairs and all(p.get("votes") for p in pairs):
    report["annotators"] = agreement.annotator_agreement(
        [j["p_a"] for j in judged], [p["votes"] for p in pairs], **kwargs)
  return report


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Labels ``config.data``; writes ``labels.jsonl`` and the report; returns the report."""
  experiment.require_one_process("label_ai_feedback")
  start = time.time()
  principles = constitution.load_constitutions(config.constitution)
  sampler = labeller.PrincipleSampler(tuple(principles), mode=config.principles.mode,
                                      num_principles=int(config.principles.num_principles),
                                      seed=int(config.principles.seed))
  sampler(0)  # a bad mode fails before the model loads
  if int(config.eval.num_resamples) < 1:  # before minutes of judging, not after
    raise ValueError(f"config.eval.num_resamples={config.eval.num_resamples}: the bootstrap "
                     "needs at least one resample")
  judge = make_judge(config)
  source = experiment.load_split(config.data, config.data.split)
  pairs, skipped = labeller.pairs_from_source(source, int(config.data.max_pairs))
  logging.info("labelling %d pairs of %s[%s] under %d principles (%s)", len(pairs),
               config.data.name, config.data.split, len(principles), config.principles.mode)
  progress = os.path.join(workdir, PROGRESS_FILE)
  judged = labeller.judge_pairs(judge, pairs, sampler, progress=progress)
  # Before labels.jsonl: a failure leaves the previous labels beside the previous report.
  agreements = agreement_report(pairs, judged, config.eval)
  name = dataset.write_preferences(os.path.join(workdir, "labels.jsonl"),
                                   labeller.preference_rows(pairs, judged))
  written = dataset.read_back(name, cache_dir=config.data.get("cache_dir"))
  if os.path.exists(progress):
    os.remove(progress)  # the labels are written
  report = {"command": " ".join(sys.argv), "dataset": name, "rows_written": len(written),
            "source": f"{config.data.name}[{config.data.split}]", "num_pairs": len(pairs),
            "num_principles": len(principles), "judge": config.judge.kind,
            "counters": dict(judge.counters, skipped_empty_response=skipped),
            "source_rows": data_report.build_counts(source),
            "mean_option_mass": sum(j["option_mass"] for j in judged) / max(len(judged), 1),
            # Written as chosen = A with outcome ½ (a tie), and pairs whose questions put
            # little mass on the two labels (the judge would have written something else).
            "judge_ties": sum(j["p_a"] == 0.5 for j in judged),
            "pairs_with_low_option_mass": sum(j["option_mass"] < LOW_OPTION_MASS
                                              for j in judged),
            **agreements}
  report["wall_seconds"] = time.time() - start
  if report["mean_option_mass"] < LOW_OPTION_MASS:
    logging.warning("label_ai_feedback: the judge puts %.4f of its probability on the two "
                    "labels %r on average: they are not what it would write there (after "
                    "an answer_prefix ending in ':', try labels with a leading space), so "
                    "its labels compare two unlikely tokens", report["mean_option_mass"],
                    tuple(config.judge.labels))
  summary_lib.write_json(os.path.join(workdir, "report.json"), report)
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(f"# AI labels of {report['source']}\n\n{len(pairs)} pairs, judge "
            f"{report['judge']}, mean option mass {report['mean_option_mass']:.3f}\n\n")
    for section, heading in (("human", "Agreement with the data's own labels"),
                             ("annotators", "Agreement with each annotator")):
      if section in report:
        f.write(f"## {heading}\n\n{agreement.markdown(report[section])}\n")
  h = report["human"]
  logging.info("label_ai_feedback: %d pairs in %.1fs; agreement A-first %.3f, A-second %.3f, "
               "average %.3f; position bias %.3f (0 once the orders are averaged); wrote %s",
               len(pairs), report["wall_seconds"], h["agreement_a_first"]["value"],
               h["agreement_a_second"]["value"], h["agreement_average"]["value"],
               h["position_bias_before"]["value"], name)
  # Last, so that a failed rerun leaves the previous config beside the previous report.
  summary_lib.replace_config(workdir, config)
  return report


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run))
