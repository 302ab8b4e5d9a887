"""Self-critique: generate → critique against a principle → revise; (initial, revised) pairs.

As in Constitutional AI's supervised stage (Bai et al. 2022, arXiv 2212.08073): the model
answers a prompt, is asked to critique its answer under a principle, then to rewrite
the answer given the critique. Each stage is one batched ``generate`` call per batch
of prompts (left-padded, prompt lengths rounded up to ``pad_to_multiple``, a fixed
batch size, so the number of compiled programs stays bounded). The pair written is
chosen = revision, rejected = initial answer, outcome 1, with the principle and the
critique in ``meta``; pairs whose revision is empty or equal to the initial answer
are counted and not written (they carry no preference).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from prefjax.data import tokenize as tokenize_lib
from prefjax.data import truncation
from prefjax.feedback import labeller
from prefjax.feedback import templates as templates_lib
from prefjax.models import sampling
from prefjax.train import metrics as metrics_lib


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """``config.sampling``: how every stage samples."""
  max_new_tokens: int = 64
  temperature: float = 0.7
  top_p: float = 0.0  # nucleus mass; 0 (or 1) = off
  batch_size: int = 4
  max_prompt_length: int = 512
  pad_to_multiple: int = 64


def generate_texts(model: nnx.Module, tokenizer: Any, texts: Sequence[str], cfg: GenerationConfig,
                   rng: jax.Array, *, desc: str = "generate",
                   counters: collections.Counter | None = None) -> list[str]:
  """One continuation per text. A text over ``max_prompt_length`` tokens keeps its first
  quarter (a template's system turn and instruction) and its end (the assistant header);
  ``counters`` gets ``<desc>_prompt_cut`` and ``<desc>_no_eos`` (stopped at
  ``max_new_tokens``)."""
  counters = collections.Counter() if counters is None else counters
  encoded = [tokenizer.encode(t) for t in texts]
  counters[f"{desc}_prompt_cut"] += sum(len(ids) > cfg.max_prompt_length for ids in encoded)
  encoded = [truncation.left_truncate(ids, cfg.max_prompt_length, None,
                                      cfg.max_prompt_length // 4) for ids in encoded]
  out: list[str] = [""] * len(texts)
  stops = tokenize_lib.stop_ids(tokenizer)
  with metrics_lib.progress_bar(len(texts), desc, "text") as bar:
    for b, start in enumerate(range(0, len(texts), cfg.batch_size)):
      rows = encoded[start:start + cfg.batch_size]
      length = min(cfg.max_prompt_length,
                   math.ceil(max(len(r) for r in rows) / cfg.pad_to_multiple) * cfg.pad_to_multiple)
      tokens = np.full((cfg.batch_size, length), tokenizer.pad_id, np.int32)
      mask = np.zeros((cfg.batch_size, length), np.int32)
      for r, ids in enumerate(rows):
        tokens[r, length - len(ids):], mask[r, length - len(ids):] = ids, 1
      mask[len(rows):, -1] = 1  # filler rows: one token
      gen = sampling.generate(model, tokens, mask, rng=jax.random.fold_in(rng, b),
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              top_p=cfg.top_p if 0.0 < cfg.top_p < 1.0 else None, eos_id=stops, pad_id=tokenizer.pad_id)
      gen_tokens, gen_mask = jax.device_get((gen.tokens, gen.mask))
      for r in range(len(rows)):
        ids = [int(t) for t, m in zip(gen_tokens[r], gen_mask[r]) if m and t not in stops]
        counters[f"{desc}_no_eos"] += int(len(ids) == int(gen_mask[r].sum()))
        out[start + r] = tokenizer.decode(ids).strip()
      bar.update(len(rows))
  return out


def self_critique(model: nnx.Module, tokenizer: Any, prompts: Sequence[str],
                  sampler: labeller.PrincipleSampler, tmpl: templates_lib.CritiqueTemplates,
                  cfg: GenerationConfig, *, seed: int = 0, prompt_style: str = "chat"
                  ) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Runs the three stages over ``prompts``; returns (preference rows, counters)."""
  rng = jax.random.key(seed)
  counters = collections.Counter(prompts=len(prompts))
  principles = [sampler(i)[0] for i in range(len(prompts))]
  shown = [templates_lib.conversation(p) for p in prompts]
  initial = generate_texts(
      model, tokenizer, [tokenize_lib.format_prompt(p, tokenizer, style=prompt_style)
                         for p in prompts], cfg, jax.random.fold_in(rng, 0), desc="initial",
      counters=counters)
  wrap = lambda text: templates_lib.wrap(text, tokenizer, style=tmpl.style, system=tmpl.system)
  critiques = generate_texts(
      model, tokenizer, [wrap(tmpl.critique.format(prompt=s, principle=pr, response=r))
                         for s, pr, r in zip(shown, principles, initial)],
      cfg, jax.random.fold_in(rng, 1), desc="critique", counters=counters)
  revisions = generate_texts(
      model, tokenizer, [wrap(tmpl.revision.format(prompt=s, principle=pr, response=r, critique=c))
                         for s, pr, r, c in zip(shown, principles, initial, critiques)],
      cfg, jax.random.fold_in(rng, 2), desc="revision", counters=counters)
  rows = []
  for prompt, principle, first, critique, revised in zip(prompts, principles, initial,
                                                         critiques, revisions):
    if not revised.strip() or not first.strip():
      counters["skipped_empty"] += 1
      continue
    if revised == first:
      counters["skipped_unchanged"] += 1
      continue
    rows.append({"prompt": prompt, "chosen": revised, "rejected": first, "outcome": 1.0,
                 "meta": {"principle": principle, "critique": critique, "source": "self_critique"}})
  counters["pairs"] = len(rows)
  return rows, dict(counters)
