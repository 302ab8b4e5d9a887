"""Tests for prefjax.data.tokenize: local tokenizers, special-token policy, chat formatting."""

import logging
import pathlib
import shutil

import pytest

from prefjax.data import tokenize
from prefjax.data.tfds_builders import rows

TEXTS = [
    "Hello world! How are you doing today?",
    "\n\nHuman: what is 2+2?\n\nAssistant: It is 4.",
    "café, naïve — 東京 🙂",
]
HH_PROMPT = ("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you "
             "looking for practical joke ideas?\n\nHuman: yep\n\nAssistant:")


# ---------------------------------------------------------------------------- byte tokenizer


@pytest.mark.parametrize("text", TEXTS + ["", " leading space", "a\x00b"])
def test_byte_round_trip(text):
  tok = tokenize.ByteTokenizer()
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_byte_vocab_and_specials():
  tok = tokenize.ByteTokenizer(extra_specials=("<sep>",))
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258, 260)
  assert tok.token_id("<sep>") == 259
  assert tok.decode([104, 257, 105, 259], skip_special_tokens=False) == "h<bos>i<sep>"
  assert tok.name != tokenize.ByteTokenizer().name
  with pytest.raises(ValueError, match="outside the byte vocabulary"):
    tok.decode([260])
  assert tokenize.load_tokenizer("byte") == tokenize.ByteTokenizer()


@pytest.mark.parametrize("ids,add_bos,add_eos,expected", [
    ([5, 6], True, True, [1, 5, 6, 2]),
    ([1, 5, 6, 2], True, True, [1, 5, 6, 2]),  # already present: never doubled
    ([1, 5], False, True, [1, 5, 2]),
    ([], True, True, [1, 2]),
    ([5, 2], False, False, [5, 2]),
])
def test_add_special_tokens(ids, add_bos, add_eos, expected):
  assert tokenize.add_special_tokens(ids, bos_id=1, eos_id=2, add_bos=add_bos,
                                     add_eos=add_eos) == expected


def test_add_special_tokens_missing_bos_is_an_error():
  with pytest.raises(ValueError, match="no BOS"):
    tokenize.add_special_tokens([3], bos_id=None, eos_id=2, add_bos=True, add_eos=False)


# ---------------------------------------------------------------------------- HF tokenizers

_CACHE = {}


def _load(path):
  key = str(path)
  if key not in _CACHE:
    _CACHE[key] = tokenize.load_tokenizer(path)
  return _CACHE[key]


@pytest.fixture(scope="module")
def smollm(smollm2_gguf):
  return _load(smollm2_gguf)


@pytest.mark.parametrize("add_bos", [True, False])
def test_reward_inputs_are_cut_as_training_cuts_a_chat_prompt(smollm, add_bos):
  """SmolLM2's chat template opens with <|im_start|>, its BOS: the pipeline's cut keeps it
  first whatever add_bos says; the reward encoder (best-of-n, RL) dropped it under
  add_bos=False, so the RM scored tokens it never trained on."""
  from prefjax.data import pipeline  # pylint: disable=import-outside-toplevel
  from prefjax.rl import rewards  # pylint: disable=import-outside-toplevel
  prompt = "\n\nHuman: " + "tell me a long story about dragons and castles " * 8 + "\n\nAssistant:"
  response = " Once upon a time there was a dragon."
  cfg = pipeline.PipelineConfig(max_length=64, max_prompt_length=32, prompt_style="chat",
                                add_bos=add_bos, pad_to_multiple=None)
  example = pipeline.TokenizeFn([{"prompt": prompt, "chosen": response, "rejected": " No."}],
                                smollm, cfg, ("chosen", "rejected"))(0)
  assert example.truncated_prompt and example.prompt[0] == smollm.bos_id
  tokens, mask = rewards.text_encoder(smollm, cfg)([prompt + rewards.MODEL_SEPARATOR + response])
  trained = [*example.prompt, *example.responses[0]]
  assert tokens[0][mask[0] > 0].tolist() == [int(t) for t in trained]


def _pre_type_only_gguf(out: pathlib.Path, pre: str) -> pathlib.Path:
  """A GGUF file holding only a ``tokenizer.ggml.pre`` type."""
  import gguf  # pylint: disable=import-outside-toplevel
  writer = gguf.GGUFWriter(str(out), "llama")
  writer.add_tokenizer_pre(pre)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return out


def test_gguf_pre_tokenizers_of_llama_cpp_s_digit_group_split_digits_first(
    smollm, tmp_path, caplog):
  """llama.cpp splits digits first for seven types; only two were handled, and a type
  nobody checked fell back to GPT-2's split without a word. SmolLM2's vocabulary, read
  as transformers reads a GGUF (GPT-2's split), then given each type's split."""
  import copy  # pylint: disable=import-outside-toplevel
  from tokenizers import pre_tokenizers  # pylint: disable=import-outside-toplevel
  def split_as(pre):
    hf = copy.deepcopy(smollm.hf)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenize._set_gguf_pre_tokenizer(hf, _pre_type_only_gguf(tmp_path / f"{pre}.gguf", pre))  # pylint: disable=protected-access
    return hf.encode("\n\n1.", add_special_tokens=False)
  for pre in ("smollm", "refact", "command-r", "codeshell", "exaone", "minerva-7b"):
    assert split_as(pre) == [1116, 33, 30], pre  # SmolLM2's own tokenizer.json split
  with caplog.at_level(logging.WARNING):
    split_as("llama-bpe")  # a type transformers splits its own way: no warning
    assert "pre-tokenizer type" not in caplog.text
    assert split_as("deepseek-llm") == [198, 198, 33, 30]  # GPT-2's split, and said so
  assert "pre-tokenizer type 'deepseek-llm' is split as GPT-2 splits text" in caplog.text


def test_gguf_matches_transformers(smollm, smollm2_gguf):
  from tokenizers import pre_tokenizers
  from transformers import AutoTokenizer
  direct = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
  # transformers reads the file's pre-tokenizer type ("smollm") as GPT-2's; SmolLM2's own
  # tokenizer.json splits every digit off first.
  direct.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
  assert (smollm.bos_id, smollm.eos_id, smollm.vocab_size) == (1, 2, 49152)
  for text in TEXTS + [HH_PROMPT, "a  1", "\n\n1. Cut it.\n2. Fry it.", "½ ¾", "x\t\t42"]:
    assert smollm.encode(text) == direct.encode(text, add_special_tokens=False)
    assert smollm.decode(smollm.encode(text)) == text


def test_gguf_digits_are_split_as_smollm2_was_trained(smollm):
  """GPT-2's splitting (what transformers reads the GGUF's "smollm" type as) gave
  [81, 216, 216, 33] and [198, 198, 33, 30]: 59 of 4,624 HH harmless test transcripts were
  tokenized unlike training, 12.8 nats less likely on 8 of them. The ids come from an
  independent rebuild of llama.cpp's smollm splitting over the file's vocabulary."""
  assert smollm.encode("a  1") == [81, 256, 33]
  assert smollm.encode("\n\n1.") == [1116, 33, 30]
  assert smollm.encode("½ ¾") == [16738, 216, 43124]


def test_hf_dir_matches_transformers(minilm_dir):
  from transformers import AutoTokenizer
  tok = _load(minilm_dir)
  direct = AutoTokenizer.from_pretrained(str(minilm_dir))
  long_text = " ".join(["preference"] * 150) + " " + TEXTS[0]
  for text in TEXTS + [long_text]:
    # transformers pads/truncates this tokenizer.json to 128 when asked for tensors; ids must not.
    expected = direct(text, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
    assert tok.encode(text) == expected
  ids = tok.encode(long_text, add_bos=True, add_eos=True)
  assert len(ids) > 150 and tok.pad_id not in ids  # padding/truncation to 128 turned off
  assert (ids[0], ids[-1]) == (101, 102)  # [CLS] ... [SEP] stand in for BOS/EOS
  assert tok.decode(tok.encode(TEXTS[0])) == TEXTS[0].lower()


def test_bare_tokenizer_json_equals_hf_dir(minilm_dir):
  bare = _load(pathlib.Path(minilm_dir) / "tokenizer.json")
  full = _load(minilm_dir)
  assert (bare.bos_id, bare.eos_id, bare.pad_id) == (full.bos_id, full.eos_id, full.pad_id)
  for text in TEXTS:
    assert bare.encode(text, add_bos=True, add_eos=True) == full.encode(
        text, add_bos=True, add_eos=True)


@pytest.mark.parametrize("post_processor", [
    {"type": "BertProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101]},
    {"type": "RobertaProcessing", "sep": ["[SEP]", 102], "cls": ["[CLS]", 101],
     "trim_offsets": True, "add_prefix_space": False},
    "sequence"])
def test_bare_tokenizer_json_reads_specials_of_every_post_processor(minilm_dir, tmp_path,
                                                                    post_processor):
  """BERT/RoBERTa processors and a Sequence around a template (Llama 3's layout) gave no
  BOS or EOS: prompts lost [CLS] silently, responses failed with "no EOS token"."""
  import json  # pylint: disable=import-outside-toplevel
  spec = json.loads((pathlib.Path(minilm_dir) / "tokenizer.json").read_text())
  if post_processor == "sequence":
    post_processor = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}, spec["post_processor"]]}
  spec["post_processor"] = post_processor
  (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
  tok = tokenize.load_tokenizer(tmp_path / "tokenizer.json")
  assert (tok.bos_id, tok.eos_id) == (101, 102)
  assert tokenize.encode_prompt("hi there", tok)[0] == 101


def test_gpt2_bpe_dir(gpt2_bpe_dir):
  tok = _load(gpt2_bpe_dir)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (50256, 50256, 50257)
  assert tok.encode("Hello world") == [15496, 995]  # GPT-2's published ids
  assert tok.encode("\n\nHuman: hi") == [198, 198, 20490, 25, 23105]
  for text in TEXTS + [HH_PROMPT]:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(TEXTS + [HH_PROMPT]) == [tok.encode(t) for t in TEXTS + [HH_PROMPT]]
  assert tok.encode("hi", add_eos=True) == [5303, 50256]
  assert tok.encode("hi<|endoftext|>", add_eos=True) == [5303, 50256]


@pytest.mark.parametrize("marker", ["bos", "eos"])
def test_no_double_special_tokens_from_text(smollm, marker):
  # The text itself already produces the special token: add_bos/add_eos must not repeat it.
  if marker == "bos":
    ids = smollm.encode("<|im_start|>user\nhi", add_bos=True)
    assert ids[0] == smollm.bos_id and ids[1] != smollm.bos_id
    assert ids.count(smollm.bos_id) == 1
  else:
    ids = smollm.encode("bye<|im_end|>", add_eos=True)
    assert ids[-1] == smollm.eos_id and ids[-2] != smollm.eos_id
    assert ids.count(smollm.eos_id) == 1


def test_tokenizer_names_are_distinct_fingerprints(smollm, minilm_dir, gpt2_bpe_dir):
  names = {smollm.name, _load(minilm_dir).name, _load(gpt2_bpe_dir).name,
           tokenize.ByteTokenizer().name}
  assert len(names) == 4
  assert _load(minilm_dir).name == tokenize.load_tokenizer(minilm_dir).name  # stable


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenize.load_tokenizer(tmp_path / "missing")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    tokenize.load_tokenizer(tmp_path)


def test_a_gguf_file_cut_short_is_named(smollm2_gguf, tmp_path):
  cut = tmp_path / "cut.gguf"
  with open(smollm2_gguf, "rb") as f:
    cut.write_bytes(f.read(3000))  # inside the vocabulary's metadata
  with pytest.raises(ValueError, match=rf"{cut}: no tokenizer could be read from this GGUF"):
    tokenize.load_tokenizer(cut)


def test_a_tokenizer_config_without_a_vocabulary_is_refused(minilm_dir, tmp_path):
  # transformers builds a 5-token tokenizer from it that reads all text as [UNK].
  shutil.copy(pathlib.Path(minilm_dir) / "tokenizer_config.json", tmp_path)
  with pytest.raises(FileNotFoundError, match=r"the tokenizer its files give has only its 5 "
                                              r"special tokens \(is a vocabulary file missing"):
    tokenize.load_tokenizer(tmp_path)
  shutil.copy(pathlib.Path(minilm_dir) / "vocab.txt", tmp_path)
  assert tokenize.load_tokenizer(tmp_path).vocab_size == _load(minilm_dir).vocab_size


# ---------------------------------------------------------------------------- chat formatting


def test_parse_hh_transcript():
  messages = tokenize.parse_hh_transcript(HH_PROMPT)
  assert messages == [
      {"role": "user", "content": "what are some pranks with a pen i can do?"},
      {"role": "assistant", "content": "Are you looking for practical joke ideas?"},
      {"role": "user", "content": "yep"},
  ]
  assert tokenize.render_hh_transcript(messages) == HH_PROMPT
  assert tokenize.parse_hh_transcript("just a question") == [
      {"role": "user", "content": "just a question"}]
  assert tokenize.parse_hh_transcript("Be brief.\n\nHuman: hi\n\nAssistant:")[0] == {
      "role": "system", "content": "Be brief."}
  # Copies of HH that drop the first blank line: the first turn is still the user's.
  assert tokenize.parse_hh_transcript(HH_PROMPT.lstrip("\n")) == messages


def test_parse_hh_transcript_merges_turns_of_one_role():
  """HH harmless-base test row 764 has two assistant turns in a row; templates that want
  alternating roles would refuse it."""
  text = ("\n\nHuman: hi\n\nAssistant: hello\n\nAssistant: how can I help?"
          "\n\nHuman: a joke\n\nAssistant:")
  assert tokenize.parse_hh_transcript(text) == [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello\n\nhow can I help?"},
      {"role": "user", "content": "a joke"}]
  slot_after_assistant = "\n\nHuman: hi\n\nAssistant: hello\n\nAssistant:"
  assert tokenize.parse_hh_transcript(slot_after_assistant)[-1] == {
      "role": "assistant", "content": "hello"}  # the empty generation slot is not merged


def test_chat_prompt_uses_template_with_generation_prompt(smollm):
  text = tokenize.format_prompt(HH_PROMPT, smollm, style="chat")
  assert text.startswith("<|im_start|>system\n")
  assert "<|im_start|>user\nyep<|im_end|>\n" in text
  assert text.endswith("<|im_start|>assistant\n")
  ids = tokenize.encode_prompt(HH_PROMPT, smollm, style="chat")
  assert ids[0] == smollm.bos_id and ids[1] != smollm.bos_id  # the template's BOS, once
  assert ids == smollm.encode(text)
  response = tokenize.encode_response(" Sure, here is one.", smollm, style="chat")
  assert response == smollm.encode("Sure, here is one.") + [smollm.eos_id]
  already = tokenize.encode_response("Sure.<|im_end|>", smollm, style="chat")
  assert already.count(smollm.eos_id) == 1 and already[-1] == smollm.eos_id


def test_chat_rows_meet_the_template_as_the_messages_they_were_given_as(smollm):
  """A row given as chat messages is stored as an HH transcript; in ``chat`` style the
  tokenizer's template must see the messages themselves again."""
  prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
  row = rows.parse_preference_object(
      {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4, surely."}],
       "rejected": [{"role": "assistant", "content": " 5\n"}]})
  assert tokenize.parse_hh_transcript(row.prompt) == prompt
  assert tokenize.format_prompt(row.prompt, smollm, style="chat") == (
      smollm.apply_chat_template(prompt, add_generation_prompt=True))
  for reply, content in ((row.chosen, "4, surely."), (row.rejected, "5")):
    assert tokenize.encode_response(reply, smollm, style="chat") == (
        smollm.encode(content) + [smollm.eos_id])


def _retemplated(smollm, template, eos="<|endoftext|>"):
  """SmolLM2's tokenizer with another chat template and EOS (a Gemma-like chat model)."""
  import copy  # pylint: disable=import-outside-toplevel
  hf = copy.deepcopy(smollm.hf)
  hf.chat_template, hf.eos_token = template, eos
  return tokenize.HFTokenizer(hf, source="retemplated")


GEMMA_LIKE = ("{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + "
              "m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def test_chat_responses_end_with_the_templates_turn_end_where_it_is_not_eos(smollm, caplog):
  """Gemma's and Phi-3's templates close an assistant turn with their own token, not EOS:
  chat responses end with it, and generation stops on it as well as on EOS."""
  assert smollm.assistant_turn_end() == "<|im_end|>\n"
  assert smollm.turn_end_id() == smollm.eos_id and tokenize.stop_ids(smollm) == (smollm.eos_id,)
  gemma_like = _retemplated(smollm, GEMMA_LIKE)
  turn_end = smollm.hf.convert_tokens_to_ids("<|im_end|>")
  assert gemma_like.eos_id == smollm.hf.convert_tokens_to_ids("<|endoftext|>") != turn_end
  assert gemma_like.turn_end_id() == turn_end
  assert tokenize.stop_ids(gemma_like) == (gemma_like.eos_id, turn_end)
  with caplog.at_level(logging.WARNING):
    chat = tokenize.encode_response(" Sure.", gemma_like, style="chat")
    raw = tokenize.encode_response(" Sure.", gemma_like)
  assert chat == gemma_like.encode("Sure.") + [turn_end]
  assert raw == gemma_like.encode(" Sure.") + [gemma_like.eos_id]  # raw transcripts: EOS
  assert tokenize.encode_response("Sure.<|im_end|>", gemma_like, style="chat") == chat
  assert "assistant turn" not in caplog.text


def test_the_pipeline_ends_chat_responses_with_the_turn_end(smollm):
  from prefjax.data import pipeline  # pylint: disable=import-outside-toplevel
  gemma_like = _retemplated(smollm, GEMMA_LIKE)
  rows = [{"prompt": "\n\nHuman: Capital?\n\nAssistant:", "chosen": " Paris", "rejected": " Rome"}]
  config = pipeline.PipelineConfig(batch_size=1, max_length=64, max_prompt_length=48,
                                   num_epochs=1, shuffle=False, prompt_style="chat")
  batch = next(iter(pipeline.preference_dataset(rows, gemma_like, config)))
  for tokens, loss in zip(batch["tokens"], batch["loss_mask"]):
    response = tokens[loss > 0].tolist()
    assert response[-1] == gemma_like.turn_end_id() and gemma_like.eos_id not in response
    assert gemma_like.decode(response) in ("Paris", "Rome")


def test_chat_responses_warn_when_the_turn_end_is_not_one_special_token(smollm, caplog):
  """A template closing turns with plain text (here "END") gives no token to end on:
  responses keep EOS, and the run says so, once."""
  plain_end = _retemplated(smollm, GEMMA_LIKE.replace("<|im_end|>", "END"))
  assert plain_end.assistant_turn_end() == "END\n" and plain_end.turn_end_id() is None
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      ids = tokenize.encode_response(" Sure.", plain_end, style="chat")
  assert ids[-1] == plain_end.eos_id and tokenize.stop_ids(plain_end) == (plain_end.eos_id,)
  assert caplog.text.count("ends an assistant turn with 'END', which is not one special") == 1
  assert "the tokenizer's EOS '<|endoftext|>' instead" in caplog.text


def test_generation_config_eos_ids_are_stop_ids(smollm, tmp_path):
  """Llama 3's ``generation_config.json`` lists several ids that end a response."""
  smollm.hf.save_pretrained(tmp_path)
  assert tokenize.stop_ids(tokenize.load_tokenizer(tmp_path)) == (smollm.eos_id,)
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, 2, 9]}')
  assert tokenize.stop_ids(tokenize.load_tokenizer(tmp_path)) == (smollm.eos_id, 7, 9)
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": 5}')
  assert tokenize.stop_ids(tokenize.load_tokenizer(tmp_path)) == (smollm.eos_id, 5)
  (tmp_path / "generation_config.json").write_text('{"eos_token_id": ["</s>"]}')
  with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be"):
    tokenize.load_tokenizer(tmp_path)


def test_raw_and_fallback_chat_formatting():
  tok = tokenize.ByteTokenizer()
  assert tokenize.format_prompt(HH_PROMPT, tok, style="raw") == HH_PROMPT
  assert tokenize.format_prompt(HH_PROMPT, tok, style="chat") == HH_PROMPT  # no template
  assert tokenize.encode_prompt("ab", tok) == [tok.bos_id, 97, 98]
  assert tokenize.encode_response(" ok", tok) == [32, 111, 107, tok.eos_id]
  # Without a template the chat fallback is the HH layout, "Assistant: ok": the response
  # kept no space ("Assistant:ok", "No" for GPT-2's " No"), unlike the raw transcripts.
  chat = tokenize.format_prompt(HH_PROMPT, tok, style="chat") + tokenize.format_response(
      "  ok \n", style="chat", tokenizer=tok)
  assert chat == HH_PROMPT + " ok"
  assert tokenize.encode_response("ok ", tok, style="chat") == [32, 111, 107, tok.eos_id]
  with pytest.raises(ValueError, match="prompt style"):
    tokenize.format_prompt("x", tok, style="fancy")
