"""Tokenizers from local files, a byte tokenizer for tiny worlds, and HH chat formatting.

Every tokenizer here follows one small protocol (``Tokenizer``): ``encode`` never
adds special tokens unless asked, and never doubles a BOS/EOS that the text
already produced. ``name`` is a fingerprint of the vocabulary, merges, special
tokens and chat template, so caches of tokenized data can be keyed by it.

Supported local formats (``load_tokenizer``): a Hugging Face tokenizer
directory, a bare ``tokenizer.json``, a GPT-2 ``encoder.json`` + ``vocab.bpe``
directory, a ``.gguf`` file with an embedded vocabulary, and ``"byte"``.
Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
import struct
from typing import Any, Protocol, Sequence, runtime_checkable

from absl import logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROMPT_STYLES = ("raw", "chat")


@runtime_checkable
class Tokenizer(Protocol):
  """What the data pipelines need from a tokenizer."""

  name: str
  bos_id: int | None
  eos_id: int | None
  pad_id: int
  vocab_size: int

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


def add_special_tokens(ids: list[int], *, bos_id: int | None, eos_id: int | None,
                       add_bos: bool, add_eos: bool) -> list[int]:
  """Prepends BOS / appends EOS when asked and not already there (never doubled)."""
  ids = list(ids)
  if add_bos:
    if bos_id is None:
      raise ValueError("add_bos=True but the tokenizer has no BOS token")
    if not ids or ids[0] != bos_id:
      ids.insert(0, bos_id)
  if add_eos:
    if eos_id is None:
      raise ValueError("add_eos=True but the tokenizer has no EOS token")
    if not ids or ids[-1] != eos_id:
      ids.append(eos_id)
  return ids


def _fingerprint(*parts: str) -> str:
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part.encode("utf-8"))
    digest.update(b"\0")
  return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes 0..255 followed by special tokens (``<pad>``, ``<bos>``, ``<eos>``, extras).

  Round trips any string exactly. ``chat_template`` is None, so chat formatting
  falls back to the HH transcript layout.
  """

  extra_specials: tuple[str, ...] = ()

  @property
  def specials(self) -> tuple[str, ...]:
    return ("<pad>", "<bos>", "<eos>") + tuple(self.extra_specials)

  @property
  def pad_id(self) -> int:
    return 256

  @property
  def bos_id(self) -> int:
    return 257

  @property
  def eos_id(self) -> int:
    return 258

  @property
  def vocab_size(self) -> int:
    return 256 + len(self.specials)

  @property
  def name(self) -> str:
    return "byte:" + _fingerprint(*self.specials)

  chat_template = None

  def token_id(self, token: str) -> int:
    return 256 + self.specials.index(token)

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    ids = list(text.encode("utf-8"))
    return add_special_tokens(ids, bos_id=self.bos_id, eos_id=self.eos_id,
                              add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    out, raw = [], bytearray()
    for i in ids:
      i = int(i)
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})")
      if i < 256:
        raw.append(i)
        continue
      out.append(raw.decode("utf-8", errors="replace"))
      raw = bytearray()
      if not skip_special_tokens:
        out.append(self.specials[i - 256])
    out.append(raw.decode("utf-8", errors="replace"))
    return "".join(out)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]


class HFTokenizer:
  """A ``transformers`` tokenizer loaded from local files, with implicit specials off.

  Encoding goes through the Rust ``tokenizers`` backend with
  ``add_special_tokens=False`` and with padding/truncation disabled (some
  ``tokenizer.json`` files, e.g. all-MiniLM-L6-v2's, enable padding to 128).
  Encoder tokenizers without BOS/EOS (BERT) use ``[CLS]`` / ``[SEP]`` in their place.
  """

  def __init__(self, hf_tokenizer: Any, *, source: str = "",
               generation_eos_ids: Sequence[int] = ()):
    self.hf = hf_tokenizer
    self.generation_eos_ids = tuple(int(i) for i in generation_eos_ids)
    self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if self._backend is not None:
      self._backend.no_padding()
      self._backend.no_truncation()
    tok = hf_tokenizer
    self.bos_id = _first_id(tok, "bos_token_id", "cls_token_id")
    self.eos_id = _first_id(tok, "eos_token_id", "sep_token_id")
    pad = _first_id(tok, "pad_token_id")
    self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
    self.vocab_size = len(tok)
    self.chat_template = getattr(tok, "chat_template", None) or None
    serial = self._backend.to_str() if self._backend is not None else repr(sorted(tok.get_vocab().items()))
    kind = type(tok).__name__
    label = pathlib.Path(source).name if source else kind
    self.name = f"hf:{label}:" + _fingerprint(
        kind, serial, str(self.chat_template), str((self.bos_id, self.eos_id, self.pad_id)))

  def __repr__(self) -> str:
    return f"HFTokenizer({self.name}, vocab_size={self.vocab_size})"

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    if self._backend is not None:
      ids = self._backend.encode(text, add_special_tokens=False).ids
    else:
      ids = self.hf.encode(text, add_special_tokens=False)
    return add_special_tokens(ids, bos_id=self.bos_id, eos_id=self.eos_id,
                              add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Encodes many texts at once (parallel in the Rust backend); no specials added."""
    if self._backend is None:
      return [self.encode(t) for t in texts]
    return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def adds_bos(self) -> bool:
    """Whether the Hugging Face tokenizer's own ``tokenizer(text)`` starts with BOS (its
    post-processor: Llama's and BERT's do, GPT-2's and SmolLM2's do not)."""
    if self.bos_id is None:
      return False
    ids = self.hf("a")["input_ids"]
    return bool(ids) and ids[0] == self.bos_id

  def apply_chat_template(self, messages: Sequence[dict[str, str]], *,
                          add_generation_prompt: bool = True) -> str:
    if self.chat_template is None:
      raise ValueError(f"{self.name} has no chat template")
    return self.hf.apply_chat_template(list(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

  def assistant_turn_end(self) -> str:
    """What the chat template writes right after an assistant message (SmolLM2:
    ``"<|im_end|>\\n"``; Gemma: ``"<end_of_turn>\\n"``); "" without a template, or when
    the template cannot render a plain user-assistant exchange."""
    if self.chat_template is None:
      return ""
    if not hasattr(self, "_turn_end"):
      sentinel = "PREFJAXRESPONSEEND"
      try:
        text = self.apply_chat_template([{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": sentinel}],
                                        add_generation_prompt=False)
      except Exception:  # pylint: disable=broad-except  # jinja raises its own errors
        text = ""
      self._turn_end = text.rpartition(sentinel)[2] if sentinel in text else ""
    return self._turn_end

  def turn_end_id(self) -> int | None:
    """The one special token that closes an assistant turn in the chat template (Gemma's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``, SmolLM2's ``<|im_end|>``, its EOS); None
    without a template, or when the turn end is not a single special token."""
    if not hasattr(self, "_turn_end_id"):
      text = self.assistant_turn_end().strip()
      ids = self.encode(text) if text and text in self.hf.get_added_vocab() else []
      self._turn_end_id = ids[0] if len(ids) == 1 else None
    return self._turn_end_id

  def extra_stop_ids(self) -> tuple[int, ...]:
    """Tokens besides EOS that end a generated response: the ``eos_token_id`` list of the
    model directory's ``generation_config.json`` and the chat template's turn end."""
    turn_end = self.turn_end_id()
    return self.generation_eos_ids + (() if turn_end is None else (turn_end,))


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
  """Token ids that end a generated response, EOS first; empty without any.

  An instruct model may end its turn with a token other than EOS (Gemma's
  ``<end_of_turn>``, Llama 3's ``<|eot_id|>``); Hugging Face stops on them through
  ``generation_config.json``. Pass this to ``sampling.generate(eos_id=...)``.
  """
  ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  extra = getattr(tokenizer, "extra_stop_ids", None)
  return tuple(dict.fromkeys(ids + list(extra() if extra else ())))


def response_end_id(tokenizer: Tokenizer, style: str = "raw") -> int | None:
  """The token a formatted response ends with: in ``chat`` style the template's
  single-token turn end where it has one (what the model writes, and where generation
  stops, after an assistant turn), else EOS."""
  if style != "chat":
    return tokenizer.eos_id
  turn_end = getattr(tokenizer, "turn_end_id", lambda: None)()
  if turn_end is not None:
    return turn_end
  _warn_if_turn_end_is_not_one_token(tokenizer)
  return tokenizer.eos_id


def _first_id(tok: Any, *attrs: str) -> int | None:
  for attr in attrs:
    value = getattr(tok, attr, None)
    if isinstance(value, int):
      return value
  return None


# GGUF pre-tokenizer types (``tokenizer.ggml.pre``) that split every digit off before GPT-2's
# pattern, as the models' own tokenizer.json does (llama.cpp's StarCoder group). transformers
# reads them as plain GPT-2, which lets whitespace merge into a digit's neighbour: SmolLM2
# saw "\n\n1." as [1116, 33, 30] in training, and GPT-2 splitting gives [198, 198, 33, 30].
_DIGITS_FIRST_PRE_TYPES = frozenset({"starcoder", "refact", "command-r", "smollm", "codeshell",
                                     "exaone", "minerva-7b"})
# Types whose split is GPT-2's, as transformers reads every BPE GGUF.
_GPT2_PRE_TYPES = frozenset({"default", "gpt2"})


def _transformers_split_types() -> frozenset[str]:
  """The GGUF pre-tokenizer types transformers gives their own split (Llama 3, Qwen2, ...)."""
  try:
    from transformers.integrations.gguf import gguf_tokenizer_mapping  # pylint: disable=g-import-not-at-top
  except ImportError:
    return frozenset()
  return frozenset(getattr(gguf_tokenizer_mapping, "GGUF_PRE_TOKENIZER_SPLITS", {}))


def _set_gguf_pre_tokenizer(hf: Any, file: pathlib.Path) -> None:
  import gguf  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  field = gguf.GGUFReader(str(file)).fields.get("tokenizer.ggml.pre")
  pre = None if field is None else bytes(field.parts[field.data[0]]).decode()
  if pre is None or pre in _GPT2_PRE_TYPES or pre in _transformers_split_types():
    return
  if pre not in _DIGITS_FIRST_PRE_TYPES:
    logging.warning("%s: pre-tokenizer type %r is split as GPT-2 splits text (transformers' "
                    "reading of a type it does not know); llama.cpp may split it otherwise "
                    "(digits, punctuation), so compare a few encodings with the model's own "
                    "tokenizer.json", file, pre)
    return
  hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def load_tokenizer(path: str | os.PathLike[str], *, gguf_file: str | None = None) -> Tokenizer:
  """Loads a tokenizer from local files only.

  Args:
    path: ``"byte"`` for ``ByteTokenizer``; a ``.gguf`` file (vocabulary embedded
      in the GGUF metadata); a bare ``tokenizer.json``; a directory with a
      Hugging Face tokenizer (``tokenizer.json`` / ``tokenizer_config.json`` /
      ``vocab.txt``); or a directory with GPT-2's ``encoder.json`` + ``vocab.bpe``.
    gguf_file: name of a ``.gguf`` file inside the directory ``path``.

  Returns:
    A ``Tokenizer``.

  Raises:
    FileNotFoundError: ``path`` does not exist or holds no recognised tokenizer files.
  """
  if str(path) == "byte":
    return ByteTokenizer()
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"tokenizer path {path} does not exist")
  if path.is_file() and path.suffix == ".gguf":
    path, gguf_file = path.parent, path.name
  if gguf_file is not None:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    if not (path / gguf_file).is_file():
      raise FileNotFoundError(f"GGUF file {path / gguf_file} does not exist")
    try:
      hf = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    except (ValueError, IndexError, KeyError, struct.error) as e:  # e.g. a file cut short
      raise ValueError(f"{path / gguf_file}: no tokenizer could be read from this GGUF file: "
                       f"{type(e).__name__}: {e}") from e
    _set_gguf_pre_tokenizer(hf, path / gguf_file)
    return HFTokenizer(hf, source=str(path / gguf_file))
  if path.is_file():
    if path.name.endswith(".json"):
      return _load_bare_tokenizer_json(path)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a tokenizer.json")
  names = {p.name for p in path.iterdir()}
  if names & {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model"}:
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    hf = AutoTokenizer.from_pretrained(str(path))
    if len(hf) <= len(set(hf.all_special_ids)):
      # e.g. tokenizer_config.json alone: all text would read as the unknown token.
      raise FileNotFoundError(f"{path}: the tokenizer its files give has only its {len(hf)} "
                              "special tokens (is a vocabulary file missing, e.g. "
                              "tokenizer.json or vocab.txt?)")
    return HFTokenizer(hf, source=str(path), generation_eos_ids=_generation_eos_ids(path))
  if {"encoder.json", "vocab.bpe"} <= names:
    from transformers import GPT2Tokenizer  # pylint: disable=g-import-not-at-top
    hf = GPT2Tokenizer(vocab=str(path / "encoder.json"), merges=str(path / "vocab.bpe"))
    return HFTokenizer(hf, source=str(path))
  ggufs = sorted(n for n in names if n.endswith(".gguf"))
  if len(ggufs) == 1:
    return load_tokenizer(path / ggufs[0])
  raise FileNotFoundError(
      f"no tokenizer files in {path} (looked for tokenizer.json, tokenizer_config.json, "
      f"vocab.txt, encoder.json+vocab.bpe, or a single .gguf; found {sorted(names)[:10]})")


def _generation_eos_ids(directory: pathlib.Path) -> tuple[int, ...]:
  """``eos_token_id`` (one id or a list) of ``generation_config.json``, where there is one."""
  import json  # pylint: disable=g-import-not-at-top
  file = directory / "generation_config.json"
  if not file.is_file():
    return ()
  try:
    value = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
  except (json.JSONDecodeError, AttributeError) as e:
    raise ValueError(f"{file}: not a JSON object: {e}") from e
  values = value if isinstance(value, list) else [] if value is None else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise ValueError(f"{file}: eos_token_id must be a token id or a list of them, got {value!r}")
  return tuple(values)


def _load_bare_tokenizer_json(path: pathlib.Path) -> HFTokenizer:
  """A lone ``tokenizer.json``: specials come from its post-processor and padding."""
  import json  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  spec = json.loads(path.read_text(encoding="utf-8"))
  bos, eos = _post_processor_specials(spec.get("post_processor") or {})
  kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
  pad = (spec.get("padding") or {}).get("pad_token")
  if pad:
    kwargs["pad_token"] = pad
  return HFTokenizer(PreTrainedTokenizerFast(tokenizer_file=str(path), **kwargs), source=str(path))


def _post_processor_specials(post: dict[str, Any]) -> tuple[str | None, str | None]:
  """(BOS, EOS) tokens a post-processor puts around one sequence: a template's specials
  before and after it, BERT's / RoBERTa's ``cls`` and ``sep``, or the first of a
  ``Sequence`` of processors that has any (Llama 3: ByteLevel, then a template)."""
  kind = post.get("type")
  if kind == "Sequence":
    for processor in post.get("processors") or []:
      found = _post_processor_specials(processor or {})
      if found != (None, None):
        return found
    return None, None
  if kind in ("BertProcessing", "RobertaProcessing"):
    return post["cls"][0], post["sep"][0]
  template = post.get("single") or []
  is_sequence = ["Sequence" in part for part in template]
  if not any(is_sequence):
    return None, None
  first = is_sequence.index(True)
  before = [p["SpecialToken"]["id"] for p in template[:first] if "SpecialToken" in p]
  after = [p["SpecialToken"]["id"] for p in template[first:] if "SpecialToken" in p]
  return (before[0] if before else None), (after[-1] if after else None)


# --------------------------------------------------------------------------- chat

_TURN_RE = re.compile(r"(?:\A\s*|\n\n)(Human|Assistant):")  # many HH copies drop the first "\n\n"
_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
  """Splits an HH-RLHF transcript ``"\\n\\nHuman: … \\n\\nAssistant: …"`` into messages.

  Roles become ``user`` / ``assistant``; contents are stripped. The first marker may
  open the text without the blank line before it. A trailing empty ``Assistant:``
  turn (the generation slot of an HH prompt) is dropped. Consecutive turns of one
  role (4 of HH harmless-base's 2,312 test prompts) become one message, joined by a
  blank line, because chat templates such as Llama-2's and Mistral's refuse roles
  that do not alternate. Text without any turn marker becomes one user message;
  text before the first marker becomes a system message (without the ``"System:"`` tag
  `render_hh_transcript` writes before it).
  """
  if not isinstance(text, str):
    raise TypeError(f"transcript must be str, got {type(text).__name__}")
  matches = list(_TURN_RE.finditer(text))
  if not matches:
    return [{"role": "user", "content": text.strip()}]
  messages = []
  head = text[:matches[0].start()].strip()
  if head:
    messages.append({"role": "system", "content": head.removeprefix("System:").strip()})
  for m, nxt in zip(matches, matches[1:] + [None]):
    end = nxt.start() if nxt is not None else len(text)
    role, content = _ROLES[m.group(1)], text[m.end():end].strip()
    if messages and messages[-1]["role"] == role and (content or nxt is not None):
      messages[-1]["content"] = "\n\n".join(filter(None, [messages[-1]["content"], content]))
    else:
      messages.append({"role": role, "content": content})
  if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  return messages


def render_hh_transcript(messages: Sequence[dict[str, str]], *,
                         add_generation_prompt: bool = True) -> str:
  """Inverse of ``parse_hh_transcript`` (HH layout; a system message only first, and no
  two messages of one role in a row)."""
  names = {"user": "Human", "assistant": "Assistant", "system": "System"}
  out = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages)
  return out + ("\n\nAssistant:" if add_generation_prompt else "")


def format_prompt(prompt_text: str, tokenizer: Tokenizer, *, style: str = "raw") -> str:
  """Prompt text to feed the tokenizer.

  ``raw`` returns the text unchanged (HH transcripts already end in
  ``"\\n\\nAssistant:"``). ``chat`` parses the transcript into messages and
  applies the tokenizer's chat template with the generation prompt; a
  tokenizer without a template gets the HH layout.
  """
  if style == "raw":
    return prompt_text
  if style != "chat":
    raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
  messages = parse_hh_transcript(prompt_text)
  if getattr(tokenizer, "chat_template", None):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[attr-defined]
  return render_hh_transcript(messages, add_generation_prompt=True)


def format_response(response_text: str, *, style: str = "raw",
                    tokenizer: Tokenizer | None = None) -> str:
  """Response text for a prompt formatted with ``style``: chat responses are stripped, and
  follow the HH layout's ``"Assistant:"`` after one space where ``tokenizer`` has no chat
  template (as in the HH transcripts, and as GPT-2's BPE expects a word to start)."""
  if style == "raw":
    return response_text
  if style != "chat":
    raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
  if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
    return " " + response_text.strip()
  return response_text.strip()


def encode_prompt(prompt_text: str, tokenizer: Tokenizer, *, style: str = "raw",
                  add_bos: bool = True) -> list[int]:
  """Formats and encodes a prompt; BOS is added once when the tokenizer has one."""
  text = format_prompt(prompt_text, tokenizer, style=style)
  return tokenizer.encode(text, add_bos=add_bos and tokenizer.bos_id is not None)


def encode_response(response_text: str, tokenizer: Tokenizer, *, style: str = "raw") -> list[int]:
  """Formats and encodes a response ending once with ``response_end_id``: EOS, or in
  ``chat`` style the template's turn-end token."""
  ids = tokenizer.encode(format_response(response_text, style=style, tokenizer=tokenizer))
  return add_special_tokens(ids, bos_id=None, eos_id=response_end_id(tokenizer, style),
                            add_bos=False, add_eos=True)


def _warn_if_turn_end_is_not_one_token(tokenizer: Tokenizer) -> None:
  """Once per tokenizer without a single-token turn end (``response_end_id`` calls it
  then): a template that closes assistant turns with something other than EOS cannot end
  responses here, which end with EOS instead."""
  turn_end_of = getattr(tokenizer, "assistant_turn_end", None)  # HFTokenizer's
  if turn_end_of is None or getattr(tokenizer, "_turn_end_checked", False):
    return  # every response calls this: the check runs once
  tokenizer._turn_end_checked = True  # type: ignore[attr-defined]  # pylint: disable=W0212
  turn_end = turn_end_of().strip()
  if not turn_end:
    return
  eos = tokenizer.decode([tokenizer.eos_id], skip_special_tokens=False) if (
      tokenizer.eos_id is not None) else ""
  if not eos or not turn_end.startswith(eos):
    logging.warning(
        "prompt_style='chat': %s's chat template ends an assistant turn with %r, which is "
        "not one special token; responses here end with the tokenizer's EOS %r instead, and "
        "generation stops there", tokenizer, turn_end, eos)
