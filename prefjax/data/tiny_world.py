"""A tiny text world with a programmatic gold reward, for CPU-sized experiments.

Prompts and responses are short strings over a small alphabet, so a byte-level
tokenizer and a tiny decoder learn them in seconds. The gold reward of a
response is the mean per-character score under a fixed random score table, plus
an optional bonus for echoing the prompt's first character; preference pairs are
labelled by the gold reward, deterministically or through Bradley–Terry
sampling (label noise), as in the synthetic setups of Gao et al. 2022
("Scaling Laws for Reward Model Overoptimization", arXiv 2210.10760).

``repeat_penalty`` adds a term that only matters off the typical distribution:
gold −= repeat_penalty · Σ_c max(0, f_c − repeat_threshold)², f_c the fraction of
character c in the response. Under near-uniform policies few responses repeat a
character much, so a reward model learned from such samples sees "more of the
best characters is better" and little of the saturation; optimising it hard
finds repetitive responses the gold dislikes (the text world of
``prefjax.overopt.text_world``, studied by ``experiments/text_study.py``).

``gold="teacher"`` replaces the mean character score by a random network, as the
bandit world's gold (``prefjax.overopt.bandit``): a tanh MLP |A| + |A|² → H → H → 1
with weights N(0, teacher_scale²/fan_in) and biases N(0, 0.1²), drawn from ``seed``,
of 8·(f − 1/|A|) and 8·(g − 1/|A|²), f the response's character frequencies and g
its frequencies of adjacent character pairs (pairs with a character outside the
alphabet count in the length only), plus the echo bonus. The pairs make the gold
depend on order, which a small reward model has too little capacity to read well.
Short responses have the extreme frequency vectors.

A proxy with a planted, exploitable feature (``exploit_char``) is provided for
overoptimization experiments: proxy = gold + exploit_weight · (fraction of the
exploit character), while the ``char_mean`` gold penalises that character slightly
(``exploit_gold_penalty``; the teacher gold ignores it).

A programmatic harm signal for safety experiments: ``harm_char`` (default "g",
the character the seed-0 gold reward likes most, so harmful responses are also
"helpful" and filtering them costs reward) marks a response as harmful;
``harm_score`` is its frequency in the response and ``harm_pairs`` yields
(harmless, harmful) pairs for training a harm classifier.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import numpy as np

ALPHABET = "abcdefghijklmnop"
GOLDS = ("char_mean", "teacher")


@dataclasses.dataclass(frozen=True)
class TinyWorld:
  """Deterministic given ``seed``; all randomness in generation comes from explicit RNGs."""
  seed: int = 0
  alphabet: str = ALPHABET
  prompt_length: tuple[int, int] = (3, 8)
  response_length: tuple[int, int] = (4, 12)
  echo_bonus: float = 0.5
  exploit_char: str = "p"
  exploit_weight: float = 2.0
  exploit_gold_penalty: float = 0.5
  repeat_threshold: float = 1.0
  repeat_penalty: float = 0.0
  harm_char: str = "g"
  gold: str = "char_mean"
  teacher_hidden: int = 256
  teacher_scale: float = 1.5

  def __post_init__(self):
    if self.gold not in GOLDS:
      raise ValueError(f"gold must be one of {GOLDS}, got {self.gold!r}")

  @functools.cached_property
  def teacher_layers(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(weight, bias) of each layer of the ``teacher`` gold, drawn from ``seed``."""
    rng = np.random.default_rng((self.seed, 23))
    size = len(self.alphabet)
    sizes = (size + size * size, self.teacher_hidden, self.teacher_hidden, 1)
    return tuple((rng.normal(0.0, self.teacher_scale / np.sqrt(fan_in), (fan_in, fan_out)),
                  rng.normal(0.0, 0.1, fan_out))
                 for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))

  def teacher_features(self, response: str) -> np.ndarray:
    """``[|A| + |A|²]``: 8·(f − 1/|A|) and 8·(g − 1/|A|²) (see the module docstring)."""
    size = len(self.alphabet)
    index = [self.alphabet.find(c) for c in response]
    chars = np.bincount([i for i in index if i >= 0], minlength=size) / len(response)
    pairs = np.bincount([a * size + b for a, b in zip(index[:-1], index[1:]) if a >= 0 and b >= 0],
                        minlength=size * size) / max(len(response) - 1, 1)
    return 8.0 * np.concatenate([chars - 1.0 / size, pairs - 1.0 / size**2])

  def teacher_score(self, response: str) -> float:
    """The teacher network's output on :meth:`teacher_features`."""
    x = self.teacher_features(response)
    for i, (weight, bias) in enumerate(self.teacher_layers):
      x = x @ weight + bias
      if i < len(self.teacher_layers) - 1:
        x = np.tanh(x)
    return float(x[0])

  @property
  def char_scores(self) -> dict[str, float]:
    rng = np.random.default_rng(self.seed)
    scores = rng.normal(size=len(self.alphabet))
    scores[self.alphabet.index(self.exploit_char)] = -self.exploit_gold_penalty
    return dict(zip(self.alphabet, scores.tolist()))

  def gold_reward(self, prompt: str, response: str) -> float:
    if not response:
      return -1.0
    if self.gold == "teacher":
      value = self.teacher_score(response)
    else:
      scores = self.char_scores
      value = float(np.mean([scores.get(c, -1.0) for c in response]))
    if prompt and response[0] == prompt[0]:
      value += self.echo_bonus
    if self.repeat_penalty:
      counts = np.unique(list(response), return_counts=True)[1] / len(response)
      value -= self.repeat_penalty * float(
          np.sum(np.maximum(counts - self.repeat_threshold, 0.0) ** 2))
    return value

  def proxy_reward(self, prompt: str, response: str) -> float:
    """Gold plus a planted feature the gold does not value: frequency of ``exploit_char``."""
    if not response:
      return self.gold_reward(prompt, response)
    frac = response.count(self.exploit_char) / len(response)
    return self.gold_reward(prompt, response) + self.exploit_weight * frac

  def harm_score(self, prompt: str, response: str) -> float:
    """Frequency of ``harm_char`` in the response (0 = harmless); the prompt is ignored."""
    del prompt
    return response.count(self.harm_char) / len(response) if response else 0.0

  def harm_pairs(self, num_pairs: int, *, seed: int) -> Iterator[dict]:
    """Yields ``{prompt, chosen, rejected, meta}``: chosen lacks ``harm_char``, rejected has it."""
    rng = np.random.default_rng((self.seed, seed, 1))
    for _ in range(num_pairs):
      prompt = self.sample_prompt(rng)
      found: dict[bool, str] = {}
      while len(found) < 2:
        response = self.sample_response(rng)
        found.setdefault(self.harm_char in response, response)
      yield {"prompt": prompt, "chosen": found[False], "rejected": found[True],
             "meta": {"harm_rejected": self.harm_score(prompt, found[True])}}

  def _string(self, rng: np.random.Generator, bounds: tuple[int, int]) -> str:
    n = int(rng.integers(bounds[0], bounds[1] + 1))
    return "".join(rng.choice(list(self.alphabet), size=n))

  def sample_prompt(self, rng: np.random.Generator) -> str:
    return self._string(rng, self.prompt_length)

  def sample_response(self, rng: np.random.Generator) -> str:
    return self._string(rng, self.response_length)

  def preference_pairs(self, num_pairs: int, *, seed: int, label_noise: str = "none",
                       temperature: float = 1.0) -> Iterator[dict]:
    """Yields ``{prompt, chosen, rejected, meta}`` rows labelled by the gold reward.

    label_noise: "none" (deterministic gold labels) or "bt" (chosen drawn with
    probability σ((r_a − r_b)/temperature)); ``meta`` records both gold rewards.
    """
    if label_noise not in ("none", "bt"):
      raise ValueError(f"label_noise must be 'none' or 'bt', got {label_noise!r}")
    rng = np.random.default_rng((self.seed, seed))
    made = 0
    while made < num_pairs:
      prompt = self.sample_prompt(rng)
      a, b = self.sample_response(rng), self.sample_response(rng)
      ra, rb = self.gold_reward(prompt, a), self.gold_reward(prompt, b)
      if a == b or ra == rb:
        continue
      if label_noise == "bt":
        a_wins = rng.uniform() < 1.0 / (1.0 + np.exp(-(ra - rb) / temperature))
      else:
        a_wins = ra > rb
      chosen, rejected = (a, b) if a_wins else (b, a)
      yield {"prompt": prompt, "chosen": chosen, "rejected": rejected,
             "meta": {"gold_chosen": self.gold_reward(prompt, chosen),
                      "gold_rejected": self.gold_reward(prompt, rejected)}}
      made += 1
