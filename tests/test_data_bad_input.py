"""Bad input: every case in both modes, "error" (raise, naming file:line) and "skip".

Each case is a small file written to tmp_path with one good row around one bad
row; the expected line and reason are written here by hand.
"""

import gzip
import json
import logging
import re
import shutil
import zlib

import pytest

from prefjax import data as pdata

GOOD = {"prompt": "Q", "chosen": " yes", "rejected": " no"}
USER, ANSWER = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
SYSTEM = {"role": "system", "content": "Be brief."}
CHAT_GOOD = {"prompt": [USER], "chosen": [ANSWER],
             "rejected": [{"role": "assistant", "content": "5"}]}
HH_GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}


def _line(obj) -> bytes:
  return json.dumps(obj).encode("utf-8")


# name -> (bad line bytes, reason); the bad row is line 2 of 3.
BAD_LINES = {
    "malformed_json": (b'{"prompt": "Q", "chosen": " yes", ', "malformed_json"),
    "trailing_garbage": (_line(GOOD) + b" x", "malformed_json"),
    "nan_weight": (b'{"prompt": "Q", "chosen": " a", "rejected": " b", "weight": NaN}',
                   "malformed_json"),
    "not_an_object": (b'["Q", " yes", " no"]', "not_an_object"),
    "missing_field": (_line({"prompt": "Q", "chosen": " yes"}), "missing_field"),
    "wrong_type": (_line({"prompt": "Q", "chosen": 3, "rejected": " no"}), "wrong_type"),
    "empty_response": (_line({"prompt": "Q", "chosen": " yes", "rejected": " \n"}),
                       "empty_response"),
    "identical_responses": (_line({"prompt": "Q", "chosen": " same", "rejected": " same"}),
                            "identical_responses"),
    "identical_transcripts": (_line({"chosen": HH_GOOD["chosen"], "rejected": HH_GOOD["chosen"]}),
                              "identical_responses"),
    "prompts_disagree": (_line({"chosen": "\n\nHuman: A\n\nAssistant: x",
                                "rejected": "\n\nHuman: B\n\nAssistant: y"}), "no_shared_prompt"),
    "outcome_out_of_range": (_line({**GOOD, "outcome": 2}), "bad_value"),
    "negative_weight": (_line({**GOOD, "weight": -1}), "bad_value"),
    "weight_overflows_float32": (_line({**GOOD, "weight": 1e39}), "bad_value"),
    "weight_huge_integer": (_line({**GOOD, "weight": 10**400}), "bad_value"),
    "meta_not_an_object": (_line({**GOOD, "meta": []}), "bad_value"),
    "meta_contradicted": (_line({**GOOD, "meta": {"subset": "x"}, "subset": "y"}), "bad_value"),
    "non_utf8": (b'{"prompt": "Q", "chosen": " caf\xe9", "rejected": " no"}', "non_utf8"),
    "lone_surrogate_escape": (b'{"prompt": "Q\\ud800", "chosen": " a", "rejected": " b"}',
                              "non_utf8"),
    "duplicate_key": (b'{"prompt": "Q", "chosen": " A", "chosen": " B", "rejected": " B"}',
                      "duplicate_key"),
    "misnamed_field": (_line({"Prompt": "Q", "chosen": " yes", "rejected": " no"}),
                       "misnamed_field"),
    # Kept in meta, it trained with outcome 1 where the row said 0.
    "misspelt_field": (_line({**GOOD, "outcom": 0}), "misnamed_field"),
    # Chat messages (`chat_rows`).
    "messages_beside_text": (_line({"prompt": [USER], "chosen": [ANSWER], "rejected": " no"}),
                             "wrong_type"),
    "message_without_content": (_line({**CHAT_GOOD, "chosen": [{"role": "assistant"}]}),
                                "missing_field"),
    "message_tool_role": (_line({**CHAT_GOOD, "chosen": [{"role": "tool", "content": "4"}]}),
                          "bad_value"),
    "message_extra_key": (_line({**CHAT_GOOD, "chosen": [{**ANSWER, "name": "bot"}]}),
                          "bad_value"),
    "message_content_parts": (_line({**CHAT_GOOD, "chosen": [
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]}), "wrong_type"),
    "message_holds_a_turn_tag": (_line({**CHAT_GOOD, "chosen": [
        {"role": "assistant", "content": "4\n\nHuman: and 3+3?"}]}), "bad_value"),
    # The prompt, repeated with other text: not dropped as a repeat.
    "reply_starts_with_the_user": (_line({**CHAT_GOOD, "chosen": [
        {"role": "user", "content": "2 + 2?"}, ANSWER]}), "bad_value"),
    "prompt_ends_with_the_assistant": (_line({**CHAT_GOOD, "prompt": [USER, ANSWER]}),
                                       "bad_value"),
    "system_message_after_the_first": (_line({**CHAT_GOOD, "prompt": [
        USER, {"role": "system", "content": "Be brief."}, USER]}), "bad_value"),
    "conversations_share_no_user_message": (_line({
        "chosen": [USER, ANSWER], "rejected": [{"role": "user", "content": "3+3?"}, ANSWER]}),
                                            "no_shared_prompt"),
    # A conversation cut short: trained on, the reply would teach the user's turn.
    "reply_ends_with_the_user": (_line({**CHAT_GOOD, "chosen": [
        ANSWER, {"role": "user", "content": "and 3+3?"}]}), "bad_value"),
    "conversations_share_only_a_system_message": (_line({
        "chosen": [SYSTEM, USER, ANSWER],
        "rejected": [SYSTEM, {"role": "user", "content": "3+3?"}, ANSWER]}), "no_shared_prompt"),
    "conversations_diverge_at_a_user_message": (_line({
        "chosen": [USER, USER, ANSWER],
        "rejected": [USER, {"role": "user", "content": "3+3?"}, ANSWER]}), "no_shared_prompt"),
    "identical_conversations": (_line({"chosen": [USER, ANSWER], "rejected": [USER, ANSWER]}),
                                "identical_responses"),
    "empty_reply": (_line({**CHAT_GOOD, "rejected": [{"role": "assistant", "content": " "}]}),
                    "empty_response"),
}


def _write_case(tmp_path, bad: bytes, *, gz: bool = False):
  lines = [_line(GOOD), bad, _line({**GOOD, "prompt": "Q3"})]
  payload = b"\n".join(lines) + b"\n"
  path = tmp_path / ("case.jsonl.gz" if gz else "case.jsonl")
  path.write_bytes(gzip.compress(payload) if gz else payload)
  return path


def _load(path, cache, mode, split="train"):
  return pdata.load_preferences(f"jsonl:{path}", split, data_dir=cache, on_bad_row=mode)


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_error_mode_names_file_line_and_reason(tmp_path, case):
  bad, reason = BAD_LINES[case]
  path = _write_case(tmp_path, bad)
  with pytest.raises(pdata.BadRowError) as info:
    _load(path, tmp_path / "cache", "error")
  message = str(info.value)
  assert f"{path}:2: {reason}:" in message
  assert "1 bad row(s) of 3 read" in message
  assert [(p.line, p.reason) for p in info.value.problems] == [(2, reason)]


@pytest.mark.parametrize("line,detail", [
    (b'{"prompt": "Q", "chosen" " yes"}', "Expecting ':' delimiter at column 26"),
    # A control character inside a string reads once, at its column.
    (b'{"prompt": "a\tb", "chosen": " yes", "rejected": " no"}',
     "Invalid control character at column 14"),
])
def test_malformed_json_detail_gives_the_column(tmp_path, line, detail):
  path = _write_case(tmp_path, line)
  with pytest.raises(pdata.BadRowError, match=rf"{path}:2: malformed_json: {detail}"):
    _load(path, tmp_path / "cache", "error")


def test_the_details_of_a_duplicate_key_a_misnamed_field_and_a_one_line_array(tmp_path):
  for bad, detail in ((BAD_LINES["duplicate_key"][0], "key 'chosen' appears twice"),
                      (BAD_LINES["misnamed_field"][0], "field 'Prompt': did you mean 'prompt'?"),
                      (BAD_LINES["misspelt_field"][0], "field 'outcom': did you mean 'outcome'?"),
                      (BAD_LINES["not_an_object"][0], "got list (a JSON array: JSONL holds")):
    with pytest.raises(pdata.BadRowError, match=re.escape(detail)):
      _load(_write_case(tmp_path, bad), tmp_path / f"cache{len(detail)}", "error")


def test_the_details_of_bad_messages_name_the_message(tmp_path):
  for case, detail in (
      ("messages_beside_text", "field 'rejected' must be a list of messages, as another"),
      ("message_tool_role", "chosen[0] has role 'tool'; roles are ['system', 'user', "),
      ("message_extra_key", "chosen[0] has key(s) ['name']"),
      ("message_content_parts", "chosen[0]'s content must be a string, got list (content "
                                "parts are not read"),
      ("message_holds_a_turn_tag", "chosen[0]'s content holds the turn tag '\\n\\nHuman:'"),
      ("reply_starts_with_the_user", "chosen's reply starts with a 'user' message"),
      ("prompt_ends_with_the_assistant", "the prompt ends with an 'assistant' message"),
      ("system_message_after_the_first", "prompt[1] is a system message"),
      ("reply_ends_with_the_user", "chosen's reply ends with a 'user' message"),
      ("conversations_share_only_a_system_message", "share no opening user message")):
    with pytest.raises(pdata.BadRowError, match=re.escape(detail)):
      _load(_write_case(tmp_path, BAD_LINES[case][0]), tmp_path / "cache", "error")


def test_a_prompt_ending_in_a_space_is_built_with_a_note(tmp_path):
  rows = [{"prompt": "Capital of France? Answer: ", "chosen": "Paris", "rejected": " Lyon"},
          {**GOOD, "prompt": "Q2 "}, {**GOOD, "prompt": "Q3"}]
  path = tmp_path / "space.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = _load(path, tmp_path / "cache", "error")
  assert len(source) == 3  # built anyway
  notes = [(n.line, n.reason) for n in source.summary.notes]
  assert notes == [(1, "space_at_prompt_end")]  # row 2's responses start with a space


def test_a_label_under_another_dataset_s_name_is_built_with_a_note(tmp_path):
  rows = [{**GOOD, "label": 0}, {**GOOD, "prompt": "Q2", "Preferred": "rejected"},
          {**GOOD, "prompt": "Q3", "annotator": "a7"}]
  path = tmp_path / "labels.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = _load(path, tmp_path / "cache", "error")
  assert [source[i]["outcome"] for i in range(3)] == [1.0, 1.0, 1.0]  # only outcome is read
  notes = [(n.line, n.reason) for n in source.summary.notes]
  assert notes == [(1, "label_like_field"), (2, "label_like_field")]
  assert "['Preferred'] look like a preference label" in source.summary.notes[1].detail


def test_a_pretty_printed_json_array_is_named_so(tmp_path):
  path = tmp_path / "array.jsonl"
  path.write_text(json.dumps([GOOD, {**GOOD, "prompt": "Q2"}], indent=2))
  with pytest.raises(pdata.BadRowError, match=rf"{path}:1: malformed_json: Expecting value at "
                     r"column 3 \(the file looks like one JSON array: JSONL holds one object "
                     r"per line\)"):
    _load(path, tmp_path / "cache", "error")


def test_a_directory_given_as_a_jsonl_file_is_named_so(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a directory, not a file"):
    _load(tmp_path, tmp_path / "cache", "error")


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_skip_mode_counts_and_keeps_the_rest(tmp_path, case):
  bad, reason = BAD_LINES[case]
  path = _write_case(tmp_path, bad)
  source = _load(path, tmp_path / "cache", "skip")
  assert [row["id"] for row in source] == ["case.jsonl:1", "case.jsonl:3"]
  summary = source.summary
  assert (summary.rows_read, summary.rows_built) == (3, 2)
  assert summary.skipped_by_reason == {reason: 1}
  assert summary.skipped[0].location() == f"{path}:2"


def test_both_modes_share_one_build_and_skips_are_logged(tmp_path, caplog):
  path = _write_case(tmp_path, BAD_LINES["malformed_json"][0])
  with pytest.raises(pdata.BadRowError):
    _load(path, tmp_path / "cache", "error")
  with caplog.at_level(logging.WARNING, logger="prefjax.data.sources"):
    assert _load(path, tmp_path / "cache", "skip").cache_hit
  assert f"{path}:2: malformed_json" in caplog.text


def test_a_copy_elsewhere_shares_the_build_and_its_errors_name_the_copy(tmp_path):
  """The build cache is keyed by the file's name and content: a copy in another folder read
  the first file's build, whose bad rows named the first file (deleted since, here)."""
  first, copy = tmp_path / "old", tmp_path / "new"
  first.mkdir(), copy.mkdir()
  original = _write_case(first, BAD_LINES["missing_field"][0])
  (copy / original.name).write_bytes(original.read_bytes())
  with pytest.raises(pdata.BadRowError):
    _load(original, tmp_path / "cache", "error")
  shutil.rmtree(first)
  source = _load(copy / original.name, tmp_path / "cache", "skip")
  assert source.cache_hit
  assert list(source.summary.input_files) == [str(copy / original.name)]
  assert str(source.summary.skipped[0]).startswith(f"{copy / original.name}:2: missing_field")
  with pytest.raises(pdata.BadRowError, match=rf"{copy / original.name}:2: missing_field"):
    _load(copy / original.name, tmp_path / "cache", "error")


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
  path = tmp_path / "windows.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + _line(GOOD) + b"\r\n" + _line({**GOOD, "prompt": "R"}) + b"\r\n")
  source = _load(path, tmp_path / "cache", "error")
  assert [r["prompt"] for r in source] == ["Q", "R"]


def _truncated_gzip(tmp_path, rows: int = 400):
  payload = b"".join(_line({**GOOD, "prompt": f"Q{i} " + "x" * 40}) + b"\n" for i in range(rows))
  compressed = gzip.compress(payload)
  cut = compressed[:len(compressed) // 2]
  path = tmp_path / "cut.jsonl.gz"
  path.write_bytes(cut)
  complete_lines = zlib.decompressobj(31).decompress(cut).count(b"\n")
  assert 0 < complete_lines < rows
  return path, complete_lines


def test_truncated_gzip_error_mode(tmp_path):
  path, complete = _truncated_gzip(tmp_path)
  with pytest.raises(pdata.BadRowError, match=rf"{path}:{complete + 1}: truncated_gzip: "
                     rf"compressed stream ends .* after line {complete}"):
    _load(path, tmp_path / "cache", "error")


def test_truncated_gzip_skip_mode_keeps_every_complete_line(tmp_path):
  path, complete = _truncated_gzip(tmp_path)
  source = _load(path, tmp_path / "cache", "skip")
  assert len(source) == complete
  assert source[complete - 1]["id"] == f"cut.jsonl.gz:{complete}"
  assert source.summary.skipped_by_reason == {"truncated_gzip": 1}
  assert source.summary.rows_read == complete + 1


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_non_utf8_inside_gzip(tmp_path, mode):
  path = _write_case(tmp_path, BAD_LINES["non_utf8"][0], gz=True)
  if mode == "error":
    with pytest.raises(pdata.BadRowError, match=rf"case.jsonl.gz:2: non_utf8: invalid UTF-8 "
                       r"byte b'\\xe9'"):
      _load(path, tmp_path / "cache", mode)
  else:
    assert len(_load(path, tmp_path / "cache", mode)) == 2


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_file_with_only_bad_rows(tmp_path, mode):
  path = tmp_path / "all_bad.jsonl"
  path.write_bytes(b"not json\n" + _line({"prompt": "Q", "chosen": " a", "rejected": " a"}) + b"\n")
  if mode == "error":
    with pytest.raises(pdata.BadRowError, match="2 bad row"):
      _load(path, tmp_path / "cache", mode)
  else:
    source = _load(path, tmp_path / "cache", mode)
    assert len(source) == 0
    assert source.summary.skipped_by_reason == {"malformed_json": 1, "identical_responses": 1}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_resplit_lists_unassignable_bad_rows_in_every_part(tmp_path, mode):
  path = _write_case(tmp_path, BAD_LINES["malformed_json"][0])
  cache = tmp_path / "cache"
  for part in ("resplit_train", "resplit_validation", "resplit_test"):
    if mode == "error":
      with pytest.raises(pdata.BadRowError, match=f"(?s){part}.*case.jsonl:2: malformed_json"):
        _load(path, cache, mode, part)
    else:
      summary = _load(path, cache, mode, part).summary
      assert summary.skipped_by_reason == {"malformed_json": 1}
      assert summary.rows_built + summary.rows_other_splits + 1 == summary.rows_read == 3


def _hh_manual_dir(tmp_path, bad_row):
  folder = tmp_path / "raw" / "harmless-base"
  folder.mkdir(parents=True)
  rows = [_line(HH_GOOD), _line(bad_row), _line({**HH_GOOD, "rejected": HH_GOOD["chosen"] + "!"})]
  (folder / "test.jsonl.gz").write_bytes(gzip.compress(b"\n".join(rows) + b"\n"))
  return folder.parent


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_hh_builder_reports_disagreeing_prompts(tmp_path, mode):
  manual = _hh_manual_dir(tmp_path, {"chosen": "\n\nHuman: A\n\nAssistant: x",
                                     "rejected": "\n\nHuman: B\n\nAssistant: y"})
  kwargs = dict(data_dir=tmp_path / "cache", manual_dir=manual, on_bad_row=mode)
  if mode == "error":
    with pytest.raises(pdata.BadRowError, match=r"harmless-base/test.jsonl.gz:2: no_shared_prompt"):
      pdata.load_preferences("hh_rlhf/harmless-base", "test", **kwargs)
  else:
    source = pdata.load_preferences("hh_rlhf/harmless-base", "test", **kwargs)
    assert [r["id"] for r in source] == ["test.jsonl.gz:1", "test.jsonl.gz:3"]
    assert source.summary.skipped_by_reason == {"no_shared_prompt": 1}


def test_hh_raw_file_change_triggers_rebuild(tmp_path):
  manual = _hh_manual_dir(tmp_path, {**HH_GOOD, "rejected": HH_GOOD["chosen"] + " there"})
  kwargs = dict(data_dir=tmp_path / "cache", manual_dir=manual)
  first = pdata.load_preferences("hh_rlhf/harmless-base", "test", **kwargs)
  raw = manual / "harmless-base" / "test.jsonl.gz"
  raw.write_bytes(gzip.compress(_line(HH_GOOD) + b"\n"))
  second = pdata.load_preferences("hh_rlhf/harmless-base", "test", **kwargs)
  assert (len(first), len(second), second.cache_hit) == (3, 1, False)


def _pandalm_dir(tmp_path, items_json: str):
  folder = tmp_path / "pandalm"
  folder.mkdir()
  (folder / "testset-v1.json").write_text(items_json, encoding="utf-8")
  return folder


def _panda_item(idx, votes=(1, 1, 2), **overrides):
  item = {"idx": idx, "instruction": "Say hi", "input": "", "response1": "hi",
          "response2": "hello", "annotator1": votes[0], "annotator2": votes[1],
          "annotator3": votes[2]}
  return {**item, **overrides}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_pandalm_bad_vote_missing_response_and_lone_surrogate(tmp_path, mode):
  items = [_panda_item(0), _panda_item(1, votes=(1, 3, 2)), _panda_item(2, response2=None),
           _panda_item(3, votes=(0, 1, 2)), _panda_item(4, response2="\ud800")]
  manual = _pandalm_dir(tmp_path, json.dumps(items))
  kwargs = dict(data_dir=tmp_path / "cache", manual_dir=manual, on_bad_row=mode)
  if mode == "error":
    with pytest.raises(pdata.BadRowError, match=r"testset-v1.json item 2: bad_value: votes"):
      pdata.load_preferences("pandalm", "test", **kwargs)
  else:
    source = pdata.load_preferences("pandalm", "test", **kwargs)
    assert [r["meta"]["idx"] for r in source] == [0, 3]
    assert [r["outcome"] for r in source] == [1.0, 0.5]  # 1-1-1 split is a tie
    assert source.summary.skipped_by_reason == {"bad_value": 1, "missing_field": 1,
                                                "non_utf8": 1}


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_pandalm_unparsable_file_names_line_and_column(tmp_path, mode):
  manual = _pandalm_dir(tmp_path, "[\n" + json.dumps(_panda_item(0)) + ",\n{oops}\n]")
  with pytest.raises(ValueError, match=r"testset-v1.json:3:2: malformed JSON"):
    pdata.load_preferences("pandalm", "test", data_dir=tmp_path / "cache", manual_dir=manual,
                           on_bad_row=mode)


def test_missing_raw_folder_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="third_party/README.md"):
    pdata.load_preferences("pandalm", "test", data_dir=tmp_path / "cache",
                           manual_dir=tmp_path / "nowhere")


def test_escaped_surrogate_pair_is_text_not_a_bad_row(tmp_path):
  line = b'{"prompt": "Q \\ud83d\\ude00", "chosen": " a", "rejected": " b"}'
  source = _load(_write_case(tmp_path, line), tmp_path / "cache", "error")
  assert source[1]["prompt"] == "Q \U0001F600"


def test_extra_keys_that_are_not_near_misses_are_kept_in_meta(tmp_path):
  extra = {"prompt_id": "p1", "source": "web", "label": 0, "chosen_model": "m"}
  path = _write_case(tmp_path, _line({**GOOD, **extra}))
  row = _load(path, tmp_path / "cache", "error")[1]
  assert {k: row["meta"][k] for k in extra} == extra


def test_cr_only_line_endings_are_named(tmp_path):
  """A file saved with old-Mac line endings read as one malformed row, with no hint."""
  path = tmp_path / "cr.jsonl"
  path.write_bytes(_line(GOOD) + b"\r" + _line({**GOOD, "prompt": "Q2"}) + b"\r")
  with pytest.raises(pdata.BadRowError, match="CR-only line endings"):
    _load(path, tmp_path / "cache", "error")
  crlf = tmp_path / "crlf.jsonl"  # Windows endings read fine
  crlf.write_bytes(_line(GOOD) + b"\r\n" + _line({**GOOD, "prompt": "Q2"}) + b"\r\n")
  assert len(_load(crlf, tmp_path / "cache2", "error")) == 2


def test_a_repeated_pair_is_built_with_a_note_naming_its_first(tmp_path):
  """Duplicates were trained on without a count (no data is lost: eval_rm clusters them)."""
  from prefjax.data import report  # pylint: disable=g-import-not-at-top
  rows = [GOOD, {**GOOD, "prompt": "Q2"}, GOOD, {**GOOD, "outcome": 0.5}]
  path = tmp_path / "dup.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  source = _load(path, tmp_path / "cache", "error")
  assert len(source) == 4
  notes = [(n.line, n.reason, n.detail) for n in source.summary.notes]
  assert notes == [(3, "duplicate_pair", "same prompt and responses as dup.jsonl:1"),
                   (4, "duplicate_pair", "same prompt and responses as dup.jsonl:1")]
  assert report.build_counts(source)["notes_by_reason"] == {"duplicate_pair": 2}
