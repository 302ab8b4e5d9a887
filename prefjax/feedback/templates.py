"""Prompt templates of the AI judge and of the self-critique loop, checked before any model runs.

Templates are ``str.format`` strings from the config. The judge's must hold the two
option placeholders ``{response_a}`` and ``{response_b}`` (what is shown in the
first and second slot) and may use ``{prompt}`` and ``{principle}``. The answer is
read at the position right after the rendered text (after the chat template's
assistant header when the tokenizer has one and ``style="chat"``, then
``answer_prefix``), where each option label (``labels``, default "A" / "B") must
add exactly one token to the judge's tokenization of that text.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, Sequence

from prefjax.data import tokenize as tokenize_lib

OPTION_FIELDS = ("response_a", "response_b")
JUDGE_FIELDS = ("prompt", "principle") + OPTION_FIELDS
CRITIQUE_FIELDS = ("prompt", "principle", "response")
REVISION_FIELDS = ("prompt", "principle", "response", "critique")
STYLES = ("chat", "raw")


def template_fields(template: str) -> set[str]:
  """The ``{name}`` placeholders of a format string."""
  return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, what: str, *, required: Sequence[str],
                   allowed: Sequence[str]) -> None:
  """One-line errors for a template missing a required placeholder or using an unknown one."""
  if not isinstance(template, str) or not template.strip():
    raise ValueError(f"{what} is empty; it must contain {', '.join('{' + f + '}' for f in required)}")
  try:
    fields = template_fields(template)
  except ValueError as e:
    raise ValueError(f"{what} is not a valid format string ({e}); write literal braces as "
                     "{{ and }}") from None
  missing = [f for f in required if f not in fields]
  if missing:
    raise ValueError(f"{what} lacks the placeholder(s) {', '.join('{' + f + '}' for f in missing)}"
                     f"; it must contain {', '.join('{' + f + '}' for f in required)}")
  unknown = sorted(fields - set(allowed))
  if unknown:
    raise ValueError(f"{what} uses unknown placeholder(s) {unknown}; allowed: {list(allowed)}")


def conversation(prompt: str) -> str:
  """A prompt as shown to a judge or critic: stripped, without HH's empty final
  ``"Assistant:"`` slot (the responses are shown separately)."""
  text = prompt.strip()
  tag = tokenize_lib.render_hh_transcript([], add_generation_prompt=True).strip()
  return text[:-len(tag)].rstrip() if text.endswith(tag) and text != tag else text


def wrap(text: str, tokenizer: Any, *, style: str, system: str = "") -> str:
  """``text`` as one user turn: the chat template with its generation prompt (``chat``, when
  the tokenizer has one) or the HH transcript layout; ``raw`` leaves it unchanged."""
  if style not in STYLES:
    raise ValueError(f"template style must be one of {STYLES}, got {style!r}")
  if style == "raw":
    return text
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": text}]
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
  return tokenize_lib.render_hh_transcript(messages, add_generation_prompt=True)


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
  """The multiple-choice question put to the judge (``config.judge``)."""
  template: str
  labels: tuple[str, str] = ("A", "B")
  answer_prefix: str = ""
  style: str = "chat"
  system: str = ""

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> JudgeTemplate:
    cfg = dict(cfg)
    labels = tuple(cfg.get("labels", ("A", "B")))
    out = cls(template=cfg.get("template", ""), labels=labels,  # type: ignore[arg-type]
              answer_prefix=cfg.get("answer_prefix", ""), style=cfg.get("style", "chat"),
              system=cfg.get("system", ""))
    out.check()
    return out

  def check(self) -> None:
    check_template(self.template, "judge template (config.judge.template)",
                   required=OPTION_FIELDS, allowed=JUDGE_FIELDS)
    if len(self.labels) != 2 or len(set(self.labels)) != 2 or not all(self.labels):
      raise ValueError(f"config.judge.labels must be two different non-empty labels, "
                       f"got {self.labels!r}")
    if self.style not in STYLES:
      raise ValueError(f"config.judge.style must be one of {STYLES}, got {self.style!r}")

  def render(self, tokenizer: Any, *, principle: str, prompt: str, first: str,
             second: str) -> str:
    """The full judge text; the option label is the token right after it."""
    body = self.template.format(principle=principle, prompt=prompt, response_a=first,
                                response_b=second)
    return wrap(body, tokenizer, style=self.style, system=self.system) + self.answer_prefix

  def option_ids(self, tokenizer: Any) -> tuple[int, int]:
    """Token ids of the two labels as they follow the judge text.

    The id is what ``encode(text + label)`` adds to ``encode(text)``, not the label
    encoded alone: after ``answer_prefix="Answer:"`` a BPE tokenizer writes " A", and
    after ``"Answer: "`` it would merge the space into the label. A label that is not
    exactly one new token there, or that re-tokenizes the text before it, is an error.
    """
    name = getattr(tokenizer, "name", type(tokenizer).__name__)
    text = self.render(tokenizer, principle="principle", prompt="prompt", first="first",
                       second="second")
    before = tokenizer.encode(text)
    ids = []
    for label in self.labels:
      tokens = tokenizer.encode(text + label)
      added = tokens[len(before):]
      if tokens[:len(before)] != before or len(added) != 1:
        raise ValueError(
            f"tokenizer {name} does not read the option label {label!r} as one token of its "
            f"own after the judge text (ending {text[-24:]!r}): it adds {len(added)} tokens "
            f"{added}{'' if tokens[:len(before)] == before else ' and re-splits the text'}; "
            "choose labels that are one token each there (config.judge.labels, e.g. 'A','B', "
            "or ' A',' B' after an answer_prefix ending in ':'; keep trailing spaces out of "
            "config.judge.answer_prefix)")
      ids.append(added[0])
    if ids[0] == ids[1]:
      raise ValueError(f"option labels {self.labels!r} map to the same token {ids[0]}")
    return ids[0], ids[1]


@dataclasses.dataclass(frozen=True)
class CritiqueTemplates:
  """The self-critique loop's two prompts (``config.critique``)."""
  critique: str
  revision: str
  style: str = "chat"
  system: str = ""

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any]) -> CritiqueTemplates:
    cfg = dict(cfg)
    out = cls(critique=cfg.get("critique_template", ""), revision=cfg.get("revision_template", ""),
              style=cfg.get("style", "chat"), system=cfg.get("system", ""))
    check_template(out.critique, "critique template (config.critique.critique_template)",
                   required=("response", "principle"), allowed=CRITIQUE_FIELDS)
    check_template(out.revision, "revision template (config.critique.revision_template)",
                   required=("response", "critique"), allowed=REVISION_FIELDS)
    return out
