r"""Self-critique loop: generate → critique against a principle → revise; writes (initial, revised) pairs.

  python -m experiments.self_critique --config=configs/feedback/self_critique_smollm2.py \
      --workdir=/tmp/critique_hh

Prompts are the first ``config.data.max_prompts`` distinct prompts of ``config.data``
(their responses are not used; the report's ``source_rows`` counts the rows repeating an
earlier prompt, ``duplicate_prompt_rows``, and those the data skipped, ``rows_skipped``).
Each prompt gets one principle of ``config.constitution`` (sampled,
``config.principles.seed``); the critique and revision prompts are
``config.critique.critique_template`` / ``revision_template`` (see
``prefjax.feedback.critique``). Writes ``pairs.jsonl`` (chosen = revision, rejected =
initial answer, outcome 1, principle and critique in ``meta``; read it as
``jsonl:WORKDIR/pairs.jsonl``) and ``report.json`` (counts, wall time, a few examples).
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
from prefjax.feedback import constitution
from prefjax.feedback import critique
from prefjax.feedback import dataset
from prefjax.feedback import labeller
from prefjax.feedback import templates
from prefjax.train import summary as summary_lib


def run(config: Any, workdir: str) -> dict[str, Any]:
  """Runs the loop over ``config.data``'s prompts; returns the report."""
  experiment.require_one_process("self_critique")
  start = time.time()
  principles = constitution.load_constitutions(config.constitution)
  sampler = labeller.PrincipleSampler(tuple(principles), mode="sample",
                                      seed=int(config.principles.seed))
  tmpl = templates.CritiqueTemplates.from_config(config.critique)
  gen_cfg = configlib.dataclass_from_mapping(critique.GenerationConfig, dict(config.sampling))
  tokenizer = experiment.make_tokenizer(config.tokenizer)
  source = experiment.load_split(config.data, config.data.split)
  prompts, rows_read = distinct_prompts(source, int(config.data.max_prompts))
  model = experiment.make_model(dict(config.model, head=None), vocab_size=tokenizer.vocab_size,
                                seed=int(config.seed))
  rows, counters = critique.self_critique(
      model, tokenizer, prompts, sampler, tmpl, gen_cfg, seed=int(config.seed),
      prompt_style=config.critique.style)
  name = dataset.write_preferences(os.path.join(workdir, "pairs.jsonl"), rows)
  written = dataset.read_back(name, cache_dir=config.data.get("cache_dir")) if rows else []
  report = {"command": " ".join(sys.argv), "dataset": name, "rows_written": len(written),
            "source": f"{config.data.name}[{config.data.split}]", "counters": counters,
            "source_rows": dict(data_report.build_counts(source), rows_used=rows_read,
                                duplicate_prompt_rows=rows_read - len(prompts)),
            "examples": rows[:3], "wall_seconds": time.time() - start}
  summary_lib.write_json(os.path.join(workdir, "report.json"), report)
  logging.info("self_critique: %d prompts -> %d pairs in %.1fs (%s); wrote %s", len(prompts),
               len(rows), report["wall_seconds"], counters, name)
  # Last, so that a failed rerun leaves the previous config beside the previous report.
  summary_lib.replace_config(workdir, config)
  return report


def distinct_prompts(source: Any, limit: int) -> tuple[list[str], int]:
  """The first ``limit`` distinct prompts of ``source`` and the number of rows read for them
  (several pairs of one prompt give it once)."""
  prompts: dict[str, None] = {}
  rows = 0
  while rows < len(source) and len(prompts) < limit:
    prompts.setdefault(source[rows]["prompt"], None)
    rows += 1
  return list(prompts), rows


if __name__ == "__main__":
  common.define_flags()
  app.run(common.main_for(run))
