"""The AI labeller: P(response A preferred) from a causal LM answering a multiple-choice question.

For a pair (prompt, A, B) and a principle, the judge (any ``from_pretrained`` decoder)
reads ``JudgeTemplate.render(...)`` and we take the log-probabilities of the two
option tokens at the answer position, renormalised over the two:

  P(first slot wins) = exp(ℓ_1) / (exp(ℓ_1) + exp(ℓ_2)),  ℓ_k = log p(label_k | judge text).

Position bias control: each pair is asked in both orders, (A, B) and (B, A), so
P(A) = ½·[P_AB(first) + (1 − P_BA(first))] (Zheng et al. 2023, "Judging LLM-as-a-judge",
arXiv 2306.05685, on position bias). With several principles (``ensemble``) the
per-principle probabilities are averaged before the two orders are.

Scoring is batched and jitted: queries are sorted by token length, cut into batches
of ``batch_size`` rows (the last one padded with filler rows), each right-padded to a
multiple of ``pad_to_multiple`` ≤ ``max_length``; so at most
``max_length / pad_to_multiple`` programs are compiled. Only the answer position's
hidden state goes through the LM head (no ``[B, T, V]`` logits).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import math
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prefjax import files
from prefjax.data import tiny_world as tiny_world_lib
from prefjax.feedback import constitution
from prefjax.feedback import templates as templates_lib
from prefjax.train import metrics as metrics_lib
from prefjax.train import state as train_state

# Times the scoring program was traced (tests check the number of compiled shapes).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Query:
  """One multiple-choice question: which of ``first`` / ``second`` is better under ``principle``."""
  principle: str
  prompt: str
  first: str
  second: str


def option_probability(logp_first: np.ndarray, logp_second: np.ndarray) -> np.ndarray:
  """P(first) = exp(ℓ_1) / (exp(ℓ_1) + exp(ℓ_2)), in float64 (stable for any log-probs)."""
  a, b = np.asarray(logp_first, np.float64), np.asarray(logp_second, np.float64)
  return np.exp(a - np.logaddexp(a, b))


def truncate(text: str, max_chars: int, *, keep: str) -> str:
  """``max_chars`` characters of ``text`` and an ellipsis (0 = no limit), keeping the
  ``start``, the ``end`` or ``both``: the first third and the last two thirds, so that an
  instruction opening a prompt and the latest turn of a dialogue both stay."""
  if max_chars <= 0 or len(text) <= max_chars:
    return text
  if keep == "both" and max_chars >= 3:
    head = max_chars // 3
    return text[:head] + " ... " + text[len(text) - (max_chars - head):]
  return "..." + text[-max_chars:] if keep == "end" else text[:max_chars] + "..."


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _option_logps(graphdef, state, tokens, mask, last, option_ids):
  """log p(option | text) ``[B, 2]`` at position ``last`` of each right-padded row."""
  TRACE_COUNTS["option_logps"] += 1
  model = nnx.merge(graphdef, state)
  hidden = model.hidden_states(tokens, attention_mask=mask)
  answer = hidden[jnp.arange(tokens.shape[0]), last]
  logps = jax.nn.log_softmax(model.logits(answer[:, None, :])[:, 0].astype(jnp.float32), axis=-1)
  return logps[:, option_ids]


class LMJudge:
  """A causal LM as judge: ``option_logps(queries) -> [N, 2]`` log-probs of the two labels."""

  def __init__(self, model: nnx.Module, tokenizer: Any, template: templates_lib.JudgeTemplate,
               *, batch_size: int = 8, max_length: int = 512, pad_to_multiple: int = 64,
               add_bos: bool = False, max_prompt_chars: int = 0, max_response_chars: int = 0):
    self.model, self.tokenizer, self.template = model, tokenizer, template
    self.option_ids = np.asarray(template.option_ids(tokenizer), np.int32)
    self.batch_size, self.max_length = int(batch_size), int(max_length)
    self.pad_to_multiple = int(pad_to_multiple)
    self.add_bos = add_bos and tokenizer.bos_id is not None
    self.max_prompt_chars, self.max_response_chars = max_prompt_chars, max_response_chars
    self.counters: collections.Counter[str] = collections.Counter()

  def _render_ids(self, q: Query, conversation: str, prompt_chars: int,
                  response_chars: int) -> list[int]:
    cut = functools.partial(truncate, max_chars=response_chars, keep="start")
    text = self.template.render(
        self.tokenizer, principle=q.principle,
        prompt=truncate(conversation, prompt_chars, keep="both"),
        first=cut(q.first), second=cut(q.second))
    return self.tokenizer.encode(text, add_bos=self.add_bos)

  def encode(self, q: Query) -> list[int]:
    """Token ids of the judge text, at most ``max_length``: the prompt (its start and its
    end kept) and the responses (kept from their start) are shortened until it fits, so
    both options stay visible; only a template alone over the limit loses its middle.
    Counted: ``prompt_cut`` / ``response_cut`` (questions whose prompt or a response was
    cut), ``shortened_to_fit`` (cut further than the character caps)."""
    conversation = templates_lib.conversation(q.prompt)
    prompt_chars = self.max_prompt_chars or len(conversation)
    response_chars = self.max_response_chars or max(len(q.first), len(q.second))
    ids = self._render_ids(q, conversation, prompt_chars, response_chars)
    if len(ids) > self.max_length:
      self.counters["shortened_to_fit"] += 1
    for _ in range(8):
      if len(ids) <= self.max_length:
        break
      scale = 0.9 * self.max_length / len(ids)
      prompt_chars = max(1, int(prompt_chars * scale))
      response_chars = max(1, int(response_chars * scale))
      ids = self._render_ids(q, conversation, prompt_chars, response_chars)
    self.counters["prompt_cut"] += int(len(conversation) > prompt_chars)
    self.counters["response_cut"] += int(max(len(q.first), len(q.second)) > response_chars)
    if len(ids) > self.max_length:
      self.counters["cut_to_max_length"] += 1
      head = self.max_length // 4
      ids = ids[:head] + ids[len(ids) - (self.max_length - head):]
    return ids

  def _padded_length(self, n: int) -> int:
    return min(self.max_length, math.ceil(n / self.pad_to_multiple) * self.pad_to_multiple)

  def option_logps(self, queries: Sequence[Query], *, desc: str = "judge",
                   progress: str | None = None) -> np.ndarray:
    """``[N, 2]`` log-probs of the two labels. ``progress``: a file the batches judged so
    far are saved in (``files.PartialArrays``), so that a stopped job resumes after them;
    it is keyed by the queries' token ids, the judge's weights, its structure and settings
    (compute dtype, RoPE base… as ``repr(graphdef)`` holds them) and its batching."""
    encoded = [self.encode(q) for q in queries]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    graphdef, state = nnx.split(self.model)
    fingerprint = self._fingerprint(encoded, graphdef, state) if progress else ""
    partial = files.PartialArrays(progress, fingerprint)
    pad = self.tokenizer.pad_id
    with metrics_lib.progress_bar(len(queries), desc, "query", initial=partial.done) as bar:
      for start in range(partial.done, len(order), self.batch_size):
        rows = order[start:start + self.batch_size]
        length = self._padded_length(max(len(encoded[i]) for i in rows))
        tokens = np.full((self.batch_size, length), pad, np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        last = np.zeros((self.batch_size,), np.int32)
        for r, i in enumerate(rows):
          ids = encoded[i]
          tokens[r, :len(ids)], mask[r, :len(ids)], last[r] = ids, 1, len(ids) - 1
        mask[len(rows):, 0] = 1  # filler rows attend to one token
        logps = _option_logps(graphdef, state, tokens, mask, last, self.option_ids)
        partial.add(start + len(rows), rows=rows,
                    logps=np.asarray(jax.device_get(logps), np.float64)[:len(rows)])
        bar.update(len(rows))
    out = np.zeros((len(queries), 2), np.float64)
    if queries:
      judged = partial.arrays()
      out[judged["rows"]] = judged["logps"]
    return out

  def _fingerprint(self, encoded: Sequence[Sequence[int]], graphdef: Any, state: Any) -> str:
    digest = hashlib.sha256(json.dumps([self.option_ids.tolist(), self.batch_size,
                                        self.max_length, self.pad_to_multiple]).encode())
    digest.update(structure_text(graphdef).encode())
    for ids in encoded:
      digest.update(np.asarray([len(ids), *ids], np.int64).tobytes())
    digest.update(train_state.params_sha256(state).encode())
    return digest.hexdigest()


def structure_text(graphdef: Any) -> str:
  """``repr(graphdef)``: the modules and their settings that are not weights (compute
  dtype, RoPE base…), without the memory addresses of the functions it names, which
  differ from one process to the next."""
  return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(graphdef))


class FunctionJudge:
  """A programmatic judge: ``fn(query) -> (ℓ_first, ℓ_second)``; known answers for tests."""

  def __init__(self, fn: Callable[[Query], tuple[float, float]]):
    self.fn = fn
    self.counters: collections.Counter[str] = collections.Counter()

  def option_logps(self, queries: Sequence[Query], *, desc: str = "judge",
                   progress: str | None = None) -> np.ndarray:
    del progress  # a function of each query: nothing worth resuming
    del desc
    return np.asarray([self.fn(q) for q in queries], np.float64).reshape(len(queries), 2)


def tiny_world_judge(world: tiny_world_lib.TinyWorld, *, temperature: float = 1.0,
                     position_bias: float = 0.0) -> FunctionJudge:
  """The tiny world's gold reward as judge: P(first) = σ((r_1 − r_2)/T + bias)."""

  def fn(q: Query) -> tuple[float, float]:
    z = (world.gold_reward(q.prompt, q.first) - world.gold_reward(q.prompt, q.second)) / temperature
    z += position_bias
    return float(-np.logaddexp(0.0, -z)), float(-np.logaddexp(0.0, z))

  return FunctionJudge(fn)


@dataclasses.dataclass(frozen=True)
class PrincipleSampler:
  """Which principles each pair is judged under (``config.principles``)."""
  principles: tuple[str, ...]
  mode: str = "sample"
  num_principles: int = 0
  seed: int = 0

  def __call__(self, index: int) -> list[str]:
    return constitution.principles_for_pair(self.principles, index, mode=self.mode,
                                            seed=self.seed, num_principles=self.num_principles)


def judge_pairs(judge: Any, pairs: Sequence[Mapping[str, Any]], sampler: PrincipleSampler,
                progress: str | None = None) -> list[dict[str, Any]]:
  """Asks every pair ``{prompt, a, b}`` in both orders under its principles (``progress``:
  as in ``LMJudge.option_logps``).

  Returns per pair ``{principles, p_a_first, p_a_second, p_a, option_mass}``:
  P(A wins) with A shown first, with A shown second (= 1 − P(first) of the swapped
  question), their mean, and the mean probability the judge put on the two labels.
  """
  queries, spans = [], []
  for i, pair in enumerate(pairs):
    principles = sampler(i)
    spans.append((len(queries), principles))
    for principle in principles:
      queries.append(Query(principle, pair["prompt"], pair["a"], pair["b"]))
      queries.append(Query(principle, pair["prompt"], pair["b"], pair["a"]))
  logps = judge.option_logps(queries, desc=f"judging {len(pairs)} pairs x 2 orders",
                             progress=progress)
  p_first = option_probability(logps[:, 0], logps[:, 1])
  mass = np.exp(np.logaddexp(logps[:, 0], logps[:, 1]))
  out = []
  for start, principles in spans:
    k = len(principles)
    ab = p_first[start:start + 2 * k:2]
    ba = p_first[start + 1:start + 2 * k:2]
    p_a_first, p_a_second = float(np.mean(ab)), float(np.mean(1.0 - ba))
    out.append({"principles": principles, "p_a_first": p_a_first, "p_a_second": p_a_second,
                "p_a": 0.5 * (p_a_first + p_a_second),
                "option_mass": float(np.mean(mass[start:start + 2 * k]))})
  return out


def preference_rows(pairs: Sequence[Mapping[str, Any]], judged: Sequence[Mapping[str, Any]]
                    ) -> list[dict[str, Any]]:
  """Rows for ``load_preferences("jsonl:...")``: chosen = the response the judge prefers,
  ``outcome`` = P(chosen preferred) ∈ [½, 1], the source row's ``weight``; ``meta`` keeps
  the principles, both per-order probabilities of the input's A, whether chosen is A, the
  source label, and the source row's own ``meta`` (``source_meta``; its ``subset`` also
  as ``subset``, so ``eval_rm`` scores the labels by subset as it did the source)."""
  rows = []
  for pair, j in zip(pairs, judged):
    a_wins = j["p_a"] >= 0.5
    source_meta = dict(pair.get("meta") or {})
    meta = {"principles": j["principles"], "p_a_first": j["p_a_first"],
            "p_a_second": j["p_a_second"], "p_a": j["p_a"], "option_mass": j["option_mass"],
            "chosen_is_a": bool(a_wins), "source_id": pair.get("id"),
            "source_outcome": pair.get("outcome")}
    votes = pair.get("votes", source_meta.get("votes"))
    if votes is not None:
      meta["votes"] = votes
    if "subset" in source_meta:
      meta["subset"] = source_meta["subset"]
    if source_meta:
      meta["source_meta"] = source_meta
    row = {"prompt": pair["prompt"], "chosen": pair["a"] if a_wins else pair["b"],
           "rejected": pair["b"] if a_wins else pair["a"],
           "outcome": max(j["p_a"], 1.0 - j["p_a"]), "meta": meta}
    if pair.get("weight", 1.0) != 1.0:  # a weight-0 row ("do not train on it") stays so
      row["weight"] = float(pair["weight"])
    rows.append(row)
  return rows


def pairs_from_source(source: Sequence[Mapping[str, Any]], max_pairs: int = 0
                      ) -> tuple[list[dict[str, Any]], int]:
  """(``{id, prompt, a, b, outcome, votes}`` pairs with A = chosen, B = rejected, number of
  pairs skipped because a response is empty: a JSONL preference file cannot hold them)."""
  n = len(source) if max_pairs <= 0 else min(max_pairs, len(source))
  out, skipped = [], 0
  for i in range(n):
    row = source[i]
    if not row["chosen"].strip() or not row["rejected"].strip():
      skipped += 1
      continue
    out.append({"id": row.get("id", str(i)), "prompt": row["prompt"], "a": row["chosen"],
                "b": row["rejected"], "outcome": float(row.get("outcome", 1.0)),
                "weight": float(row.get("weight", 1.0)), "meta": row.get("meta") or {},
                "votes": (row.get("meta") or {}).get("votes")})
  return out, skipped
