"""Preference rows whose fields are chat messages (the conversational layout of TRL and the Hub).

Explicit prompt (a list of messages, or one string read as a user message)::

  {"prompt": [{"role": "user", "content": "2+2?"}],
   "chosen": [{"role": "assistant", "content": "4"}],
   "rejected": [{"role": "assistant", "content": "5"}]}

Implicit prompt (whole conversations; the prompt is the messages both share, up to the
last user message before they diverge)::

  {"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
   "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}

UltraFeedback-binarized's form, a string prompt beside conversations that repeat it, is the
explicit form: messages of ``chosen`` and ``rejected`` equal to the prompt's are dropped.

Rows are stored in the HH transcript layout every other dataset uses (``"\\n\\nHuman: 2+2?
\\n\\nAssistant:"`` and responses ``" 4"``, a leading system message before the first turn as
``"System: ..."``), which ``prompt_style="chat"`` turns back into these messages and renders
through the tokenizer's chat template (`prefjax.data.tokenize.parse_hh_transcript`). A reply
of several messages is kept as a multi-turn response, as HH's are; one that ends with a user
message (a conversation cut short) is a bad row. Content that the layout cannot hold (a turn
tag such as ``"\\n\\nHuman:"`` inside a message), other roles (``tool``), other message keys
(``name``, ``tool_calls``) and content given as a list of parts are bad rows too, never
dropped silently.
"""

from __future__ import annotations

from typing import Any, Mapping

from prefjax.data import tokenize
from prefjax.data.tfds_builders import rows as rows_lib

ROLES = ("system", "user", "assistant")
_FIELDS = ("prompt", "chosen", "rejected")


def has_messages(obj: Mapping[str, Any]) -> bool:
  """Whether a row gives any of its text fields as a list (of messages)."""
  return any(isinstance(obj.get(field), list) for field in _FIELDS)


def split_messages(obj: Mapping[str, Any]) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) texts of a row given as messages.

  Raises:
    rows.RowError: a field or message that is not as described in the module docstring,
      ``identical_responses``, or ``no_shared_prompt`` when the conversations share no
      opening user message.
  """
  chosen, rejected = (_messages(obj, field) for field in ("chosen", "rejected"))
  explicit = obj.get("prompt") is not None
  if explicit:
    prompt = _prompt_messages(obj["prompt"])
    chosen, rejected = _after(prompt, chosen), _after(prompt, rejected)
  else:
    if chosen == rejected:
      raise rows_lib.RowError("identical_responses", "chosen and rejected messages are identical")
    shared = _shared_prefix_length(chosen, rejected)
    while shared and chosen[shared - 1]["role"] != "user":  # replies start at an answer
      shared -= 1
    if not shared:
      raise rows_lib.RowError(
          "no_shared_prompt", "chosen and rejected share no opening user message, so their "
          "prompts disagree (give the prompt as a 'prompt' field if the replies hold it)")
    prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
  _check_prompt(prompt)
  for field, reply in (("chosen", chosen), ("rejected", rejected)):
    _check_reply(field, reply, explicit=explicit)
  return (_render(prompt, add_generation_prompt=True), _reply_text(chosen),
          _reply_text(rejected))


def _messages(obj: Mapping[str, Any], field: str) -> list[dict[str, str]]:
  if field not in obj or obj[field] is None:
    raise rows_lib.RowError("missing_field", f"missing field {field!r} (fields present: "
                                             f"{sorted(obj)})")
  value = obj[field]
  if not isinstance(value, list):
    raise rows_lib.RowError("wrong_type", f"field {field!r} must be a list of messages, as "
                            f"another field of this row is, got {type(value).__name__}")
  return [_message(item, f"{field}[{i}]") for i, item in enumerate(value)]


def _message(item: Any, where: str) -> dict[str, str]:
  if not isinstance(item, dict):
    raise rows_lib.RowError("wrong_type", f"{where} must be an object with 'role' and "
                                          f"'content', got {type(item).__name__}")
  for key in ("role", "content"):
    if key not in item:
      raise rows_lib.RowError("missing_field", f"{where} has no {key!r} (keys: {sorted(item)})")
  if unknown := sorted(set(item) - {"role", "content"}):
    raise rows_lib.RowError("bad_value", f"{where} has key(s) {unknown}: a message here holds "
                                         "only 'role' and 'content', and nothing is dropped")
  role, content = item["role"], item["content"]
  if role not in ROLES:
    raise rows_lib.RowError("bad_value", f"{where} has role {role!r}; roles are {list(ROLES)}")
  if not isinstance(content, str):
    hint = (" (content parts are not read: join their text into one string)"
            if isinstance(content, list) else "")
    raise rows_lib.RowError("wrong_type", f"{where}'s content must be a string, got "
                                          f"{type(content).__name__}{hint}")
  for tag in (rows_lib.HUMAN_TAG, rows_lib.ASSISTANT_TAG):
    if tag in content:
      raise rows_lib.RowError(
          "bad_value", f"{where}'s content holds the turn tag {tag!r}, which the transcript "
          "layout rows are stored in reserves for turn boundaries")
  return {"role": role, "content": content}


def _prompt_messages(value: Any) -> list[dict[str, str]]:
  if isinstance(value, str):
    return [_message({"role": "user", "content": value}, "prompt")]
  if not isinstance(value, list):
    raise rows_lib.RowError("wrong_type", "field 'prompt' must be a string or a list of "
                                          f"messages, got {type(value).__name__}")
  return [_message(item, f"prompt[{i}]") for i, item in enumerate(value)]


def _after(prompt: list[dict[str, str]], reply: list[dict[str, str]]) -> list[dict[str, str]]:
  """A conversation without its opening messages where they repeat the prompt."""
  return reply[len(prompt):] if reply[:len(prompt)] == prompt else reply


def _shared_prefix_length(a: list[Any], b: list[Any]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _check_prompt(prompt: list[dict[str, str]]) -> None:
  if not prompt or prompt[-1]["role"] != "user":
    last = f"ends with {_a(prompt[-1]['role'])} message" if prompt else "is empty"
    raise rows_lib.RowError("bad_value", f"the prompt {last}; it must end with the user "
                                         "message the replies answer")
  for i, message in enumerate(prompt[1:], start=1):
    if message["role"] == "system":
      raise rows_lib.RowError("bad_value", f"prompt[{i}] is a system message; only the first "
                                           "message may be")


def _check_reply(field: str, reply: list[dict[str, str]], *, explicit: bool) -> None:
  if not reply:
    raise rows_lib.RowError("empty_response", f"{field} holds no reply after the prompt")
  if reply[0]["role"] != "assistant" and not explicit:
    raise rows_lib.RowError("no_shared_prompt", "chosen and rejected diverge at a user "
                                                "message right after their shared prompt's "
                                                "last one, so their prompts disagree")
  if reply[0]["role"] != "assistant":
    raise rows_lib.RowError("bad_value", f"{field}'s reply starts with {_a(reply[0]['role'])} "
                                         "message, not the assistant's (are the prompt's "
                                         "messages repeated there with other text?)")
  if reply[-1]["role"] != "assistant":
    raise rows_lib.RowError("bad_value", f"{field}'s reply ends with {_a(reply[-1]['role'])} "
                                         "message, not the assistant's (a conversation cut "
                                         "short? trained on, it would teach the user's turn)")
  if any(message["role"] == "system" for message in reply):
    raise rows_lib.RowError("bad_value", f"{field}'s reply holds a system message")


def _a(role: str) -> str:
  return f"{'an' if role == 'assistant' else 'a'} {role!r}"


def _render(messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
  return tokenize.render_hh_transcript(messages, add_generation_prompt=add_generation_prompt)


def _reply_text(reply: list[dict[str, str]]) -> str:
  """The first message's content after one space, then any later turns in the transcript
  layout (a multi-turn response)."""
  return " " + reply[0]["content"] + _render(reply[1:], add_generation_prompt=False)
