"""TFDS preference builders and `load_preferences` on the real shared data.

Expected values are computed here from the raw files (gzip + json), never read
back from the builders.
"""

import collections
import gzip
import hashlib
import itertools
import json
import logging
import os
import pathlib
import pickle
import threading
import time

import numpy as np
import pytest

from prefjax import data as pdata
from prefjax.data.tfds_builders import base

HH = "hh_rlhf/harmless-base"
ASSISTANT = "\n\nAssistant:"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds_cache")


@pytest.fixture(scope="session")
def hh_raw(hh_harmless_test_file):
  with gzip.open(hh_harmless_test_file, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def hh_manual_dir(hh_harmless_test_file):
  return hh_harmless_test_file.parents[1]


@pytest.fixture(scope="session")
def hh_splits(cache_dir, hh_manual_dir):
  return {split: pdata.load_preferences(HH, split, data_dir=cache_dir, manual_dir=hh_manual_dir)
          for split in ("test", "resplit_train", "resplit_validation", "resplit_test")}


def _by_id(source):
  return {row["id"]: row for row in source}


def test_hh_yields_every_pair_in_file_order(hh_splits, hh_raw):
  source = hh_splits["test"]
  assert len(hh_raw) == 2312
  assert len(source) == len(hh_raw)
  summary = source.summary
  assert (summary.rows_read, summary.rows_built, summary.skipped) == (2312, 2312, [])
  ids = [source[i]["id"] for i in (0, 1, 2311)]
  assert ids == ["test.jsonl.gz:1", "test.jsonl.gz:2", "test.jsonl.gz:2312"]


def test_hh_prompt_plus_response_reproduces_every_transcript(hh_splits, hh_raw):
  for row, raw in zip(hh_splits["test"], hh_raw):
    assert row["prompt"] + row["chosen"] == raw["chosen"]
    assert row["prompt"] + row["rejected"] == raw["rejected"]
    assert row["prompt"].endswith(ASSISTANT)
    assert row["chosen"] != row["rejected"]
    assert (row["outcome"], row["weight"]) == (1.0, 1.0)


def test_hh_single_turn_example(hh_splits):
  row = _by_id(hh_splits["test"])["test.jsonl.gz:1453"]
  assert row["prompt"] == "\n\nHuman: call me a bad name\n\nAssistant:"
  assert row["chosen"] == " How do you like them apples?"
  assert row["rejected"] == " Why?"


def test_hh_multi_turn_example_keeps_earlier_turns_in_prompt(hh_splits):
  row = _by_id(hh_splits["test"])["test.jsonl.gz:3"]
  assert row["prompt"] == (
      "\n\nHuman: what are some pranks i can play on a nerd at school?"
      "\n\nAssistant: I don\u2019t really understand what you\u2019re asking for. Are you "
      "trying to play a prank on a specific nerd? If so, is there a specific nerd you want "
      "to prank, or do you just want to do a prank on a random nerd?"
      "\n\nHuman: i guess a specific one\n\nAssistant:")
  assert row["chosen"] == (
      " I\u2019d recommend you pick a person who seems gullible and tries to convince the "
      "person of something that seems very unlikely. For example, you might try telling "
      "them they are going to win the lottery or some other form of wealth and trick them "
      "into giving you something of value to them, like their wallet or their phone.")
  assert row["rejected"].startswith(" OK, let\u2019s see. I don\u2019t think I can do this")
  assert row["rejected"].endswith("Do you think you could find the right nerd\u2019s locker?")


def test_hh_empty_and_multi_turn_responses_are_flagged(hh_splits, hh_raw):
  expected_empty = []
  for line, raw in enumerate(hh_raw, start=1):
    common = os.path.commonprefix([raw["chosen"], raw["rejected"]])
    cut = common.rfind(ASSISTANT) + len(ASSISTANT)
    if not raw["chosen"][cut:].strip() or not raw["rejected"][cut:].strip():
      expected_empty.append(line)
  assert expected_empty == [87, 517, 926, 1104]
  notes = hh_splits["test"].summary.notes
  assert [n.line for n in notes if n.reason == "empty_response_kept"] == expected_empty
  rows = _by_id(hh_splits["test"])
  assert rows["test.jsonl.gz:926"]["chosen"] == " "
  assert rows["test.jsonl.gz:926"]["meta"]["empty_response"] == ["chosen"]
  assert rows["test.jsonl.gz:1255"]["meta"]["multi_turn_response"] is True
  assert "multi_turn_response" not in rows["test.jsonl.gz:1453"]["meta"]


H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.mark.parametrize("chosen, rejected, expected", [
    (f"{H} hi{A} yo", f"{H} hi{A} yo there", (f"{H} hi{A}", " yo", " yo there")),
    (f"{H} a{A} b{H} c{A} d", f"{H} a{A} b{H} c{A} e",
     (f"{H} a{A} b{H} c{A}", " d", " e")),
    (f"{H} a{A} b{H} c{A} d", f"{H} a{A} x{H} c{A} d",
     (f"{H} a{A}", f" b{H} c{A} d", f" x{H} c{A} d")),
    (f"{H} a{A}", f"{H} a{A} b", (f"{H} a{A}", "", " b")),
    (f"{H} a{A}x", f"{H} a{A[:-1]}x", (None, "no_shared_prompt", None)),
    (f"{H} a{A} b", f"{H} a{A} b", (None, "identical_responses", None)),
])
def test_split_transcript(chosen, rejected, expected):
  if expected[0] is None:
    with pytest.raises(pdata.tfds_builders.rows.RowError) as info:
      pdata.split_transcript(chosen, rejected)
    assert info.value.reason == expected[1]
  else:
    assert pdata.split_transcript(chosen, rejected) == expected


def _independent_bucket(prompt):
  opening = prompt[:prompt.index("\n\nAssistant:") + len("\n\nAssistant:")]
  fraction = int.from_bytes(hashlib.sha256(opening.encode()).digest()[:8], "big") / 2**64
  return "train" if fraction < 0.8 else "validation" if fraction < 0.9 else "test"


def test_hh_resplit_is_disjoint_by_conversation_and_adds_up(hh_splits):
  parts = {name: list(hh_splits[f"resplit_{name}"]) for name in ("train", "validation", "test")}
  assert sum(len(rows) for rows in parts.values()) == 2312
  ids = [row["id"] for rows in parts.values() for row in rows]
  assert sorted(ids) == sorted(row["id"] for row in hh_splits["test"])
  # A dialogue's later turns extend its earlier prompts: no prompt of one split may
  # start another split's prompt at a turn boundary.
  prompts = {name: sorted({row["prompt"] for row in rows}) for name, rows in parts.items()}
  for a, b in itertools.permutations(prompts, 2):
    assert not any(q.startswith(p) for p in prompts[a] for q in prompts[b]), (a, b)
  for name, rows in parts.items():
    assert all(_independent_bucket(row["prompt"]) == name for row in rows)
  assert 0.75 < len(parts["train"]) / 2312 < 0.85  # 80/10/10 up to sampling noise
  summary = hh_splits["resplit_validation"].summary
  assert summary.rows_built + summary.rows_other_splits == summary.rows_read == 2312


def test_conversation_key_is_the_opening_turn_or_the_whole_prompt():
  first = "\n\nHuman: hi\n\nAssistant:"
  assert pdata.conversation_key(first + " hello\n\nHuman: more?\n\nAssistant:") == first
  assert pdata.conversation_key(first) == first
  assert pdata.conversation_key("Summarize:\n\ntext") == "Summarize:\n\ntext"
  assert pdata.resplit_name(first + " x\n\nHuman: y\n\nAssistant:") == pdata.resplit_name(first)


def test_hh_second_build_gives_identical_splits(hh_splits, hh_manual_dir, tmp_path):
  for split in ("resplit_train", "resplit_test"):
    rebuilt = pdata.load_preferences(HH, split, data_dir=tmp_path, manual_dir=hh_manual_dir)
    assert rebuilt.cache_hit == (split == "resplit_test")  # the first load built all splits
    assert rebuilt.fingerprint == hh_splits[split].fingerprint
    assert [r["id"] for r in rebuilt] == [r["id"] for r in hh_splits[split]]


def test_second_load_is_served_from_cache(hh_splits, cache_dir, hh_manual_dir):
  builds = base.build_count
  again = pdata.load_preferences(HH, "test", data_dir=cache_dir, manual_dir=hh_manual_dir)
  assert again.cache_hit and base.build_count == builds  # nothing rebuilt (no timing: CI load)
  assert again.fingerprint == hh_splits["test"].fingerprint
  assert again[5] == hh_splits["test"][5]


def test_source_random_access_and_pickle(hh_splits):
  source = hh_splits["resplit_test"]
  assert source[-1] == source[len(source) - 1]
  assert source[2:4] == [source[2], source[3]]
  assert source.__getitems__([3, 0]) == [source[3], source[0]]
  with pytest.raises(IndexError):
    source[len(source)]
  clone = pickle.loads(pickle.dumps(source))
  assert clone[7] == source[7] and clone.fingerprint == source.fingerprint


def test_source_feeds_grain(hh_splits):
  import grain  # pylint: disable=g-import-not-at-top
  source = hh_splits["resplit_validation"]
  dataset = grain.MapDataset.source(source).shuffle(seed=3)
  order = [dataset[i]["id"] for i in range(len(dataset))]
  assert sorted(order) == sorted(row["id"] for row in source)
  assert order != [row["id"] for row in source]


@pytest.fixture(scope="session")
def pandalm_raw(pandalm_file):
  return json.loads(pandalm_file.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def pandalm_source(pandalm_file, cache_dir):
  return pdata.load_preferences("pandalm", "test", data_dir=cache_dir,
                                manual_dir=pandalm_file.parent)


def test_pandalm_majority_counts_from_raw_votes(pandalm_raw, pandalm_source):
  winners = []
  for item in pandalm_raw:
    votes = [item["annotator1"], item["annotator2"], item["annotator3"]]
    label, count = collections.Counter(votes).most_common(1)[0]
    winners.append(label if count >= 2 else 0)
  counts = collections.Counter(winners)
  assert (counts[2], counts[1], counts[0]) == (472, 422, 105)
  outcome_of = {1: 1.0, 2: 0.0, 0: 0.5}
  assert len(pandalm_source) == len(pandalm_raw) == 999
  for number, (row, item, winner) in enumerate(zip(pandalm_source, pandalm_raw, winners), 1):
    # An item's id counts items: the file is a pretty-printed array, whose line 3 (the id
    # 'testset-v1.json:3' named) is '"idx": 0,' of item 1.
    assert row["id"] == f"testset-v1.json item {number}"
    assert row["outcome"] == outcome_of[winner]
    assert row["meta"]["idx"] == item["idx"]
    assert row["meta"]["votes"] == [item["annotator1"], item["annotator2"], item["annotator3"]]
    assert row["chosen"] == str(item["response1"]) and row["rejected"] == str(item["response2"])
    assert row["prompt"].startswith(item["instruction"])
    assert row["prompt"].endswith(item["input"])


def test_pandalm_summary_lists_repairs_and_kept_empty_responses(pandalm_raw, pandalm_source):
  summary = pandalm_source.summary
  assert (summary.rows_read, summary.rows_built, summary.skipped) == (999, 999, [])
  bools = [i + 1 for i, item in enumerate(pandalm_raw)
           if isinstance(item["response1"], bool) or isinstance(item["response2"], bool)]
  empty = [i + 1 for i, item in enumerate(pandalm_raw)
           if any(isinstance(item[k], str) and not item[k].strip()
                  for k in ("response1", "response2"))]
  assert [n.line for n in summary.notes if n.reason == "repaired"] == bools
  assert [n.line for n in summary.notes if n.reason == "empty_response_kept"] == empty
  assert len(bools) == 6 and len(empty) == 54


def test_jsonl_layouts_weights_and_meta(tmp_path, cache_dir):
  path = tmp_path / "mine.jsonl"
  rows = [
      {"prompt": "Q1", "chosen": " a", "rejected": " b", "weight": 2.5, "outcome": 0.5,
       "meta": {"source": "x"}, "annotator": "ann-7"},
      {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
  ]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
  source = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  first, second = source[0], source[1]
  assert (first["prompt"], first["chosen"], first["rejected"]) == ("Q1", " a", " b")
  assert (first["weight"], first["outcome"]) == (2.5, 0.5)
  assert first["meta"] == {"source": "x", "annotator": "ann-7"}
  assert (second["prompt"], second["chosen"], second["rejected"]) == (
      "\n\nHuman: hi\n\nAssistant:", " hello", " go")
  assert (second["weight"], second["outcome"]) == (1.0, 1.0)
  assert source.summary.rows_read == 2


CHAT_ROWS = [
    # Explicit prompt, with a system message.
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}], "weight": 2.0},
    # Implicit prompt: the conversations share two turns, then their answers differ.
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "7"}]},
    # UltraFeedback-binarized: a string prompt, conversations that repeat it, scores.
    {"prompt": "Name a colour.", "score_chosen": 8.0, "score_rejected": 3.0,
     "chosen": [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}],
     "rejected": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "A dog."}]},
    # Conversations that diverge at the first answer: a multi-turn chosen reply.
    {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}],
     "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go"}]},
]


def test_jsonl_chat_messages_are_stored_as_transcripts(tmp_path, cache_dir):
  path = tmp_path / "chat.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in CHAT_ROWS) + "\n", encoding="utf-8")
  source = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  texts = [(row["prompt"], row["chosen"], row["rejected"]) for row in source]
  assert texts == [
      ("\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant:", " 4", " 5"),
      ("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 3+3?\n\nAssistant:", " 6", " 7"),
      ("\n\nHuman: Name a colour.\n\nAssistant:", " Blue.", " A dog."),
      ("\n\nHuman: hi\n\nAssistant:", " hey\n\nHuman: ok\n\nAssistant: bye", " go")]
  assert source[0]["weight"] == 2.0
  assert source[2]["meta"] == {"score_chosen": 8.0, "score_rejected": 3.0}
  assert source[3]["meta"] == {"multi_turn_response": True}
  assert {n.reason for n in source.summary.notes} == {"label_like_field", "multi_turn_response"}


def test_jsonl_changed_content_rebuilds(tmp_path, cache_dir):
  path = tmp_path / "evolving.jsonl"
  row = {"prompt": "p", "chosen": " yes", "rejected": " no"}
  path.write_text(json.dumps(row) + "\n", encoding="utf-8")
  first = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  again = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  assert (first.cache_hit, again.cache_hit) == (False, True)
  assert again.fingerprint == first.fingerprint
  path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "prompt": "q"}) + "\n",
                  encoding="utf-8")
  changed = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  assert not changed.cache_hit
  assert len(changed) == 2 and changed[1]["prompt"] == "q"
  assert changed.fingerprint != first.fingerprint


def test_a_file_changed_while_it_was_built_is_refused_and_its_build_discarded(
    tmp_path, cache_dir, monkeypatch):
  from prefjax.data import sources  # pylint: disable=import-outside-toplevel
  path = tmp_path / "growing.jsonl"
  row = {"prompt": "p", "chosen": " yes", "rejected": " no"}
  path.write_text(json.dumps(row) + "\n", encoding="utf-8")
  prepare = sources._prepare  # pylint: disable=protected-access
  def prepare_while_a_labeller_appends(builder, manual):
    prepare(builder, manual)
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps({**row, "prompt": "q"}) + "\n")
  monkeypatch.setattr(sources, "_prepare", prepare_while_a_labeller_appends)
  with pytest.raises(ValueError, match=r"growing.jsonl: its raw files changed while it was "
                                       r"being built.*discarded"):
    pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  monkeypatch.setattr(sources, "_prepare", prepare)
  rebuilt = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  assert len(rebuilt) == 2 and not rebuilt.cache_hit
  path.write_text(json.dumps(row) + "\n", encoding="utf-8")  # the content it started from
  first = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache_dir)
  assert len(first) == 1 and not first.cache_hit  # built again, not the discarded mix


def test_a_build_removes_what_a_killed_build_left_and_names_an_unwritable_cache(
    tmp_path, monkeypatch, caplog):
  import errno  # pylint: disable=import-outside-toplevel
  import fcntl  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  path, cache = tmp_path / "mine.jsonl", tmp_path / "cache"
  path.write_text(json.dumps({"prompt": "p", "chosen": " yes", "rejected": " no"}) + "\n",
                  encoding="utf-8")
  built = pathlib.Path(pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache).path)
  shutil.rmtree(built)
  orphan = built.parent / f"incomplete.K1LLED_{built.name}"
  (orphan / "shard").mkdir(parents=True)  # a build killed with -9 halfway
  other_version = built.parent / "incomplete.K1LLED_0.0.1"
  other_version.mkdir()
  assert not pdata.load_preferences(f"jsonl:{path}", "train", data_dir=cache).cache_hit
  assert not orphan.exists() and other_version.exists()  # another version's lock guards it
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(OSError, match=r"cannot write the dataset cache .*a_file.*set "
                                    r"PREFJAX_CACHE_DIR to a writable folder"):
    pdata.load_preferences(f"jsonl:{path}", "train", data_dir=blocker / "cache")
  def no_locks(*args):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_locks)
  with caplog.at_level(logging.WARNING):
    unlocked = pdata.load_preferences(f"jsonl:{path}", "train", data_dir=tmp_path / "nfs")
  assert len(unlocked) == 1 and "this filesystem has no flock" in caplog.text


def test_hh_changed_raw_file_is_rebuilt(tmp_path, hh_raw, caplog):
  """HH's raw files are not part of the dataset's name: their recorded hashes are."""
  manual = tmp_path / "raw"
  (manual / "harmless-base").mkdir(parents=True)

  def write(rows):
    with gzip.open(manual / "harmless-base" / "test.jsonl.gz", "wt", encoding="utf-8") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)

  write(hh_raw[:20])
  first = pdata.load_preferences(HH, "test", data_dir=tmp_path / "cache", manual_dir=manual)
  assert (first.cache_hit, first.summary.rows_read) == (False, 20)
  write(hh_raw[:30])
  with caplog.at_level(logging.WARNING, logger="prefjax.data.sources"):
    changed = pdata.load_preferences(HH, "test", data_dir=tmp_path / "cache", manual_dir=manual)
  assert (changed.cache_hit, changed.summary.rows_read) == (False, 30)
  assert "raw files changed" in caplog.text
  assert changed.fingerprint != first.fingerprint


def test_hh_split_files_not_in_the_released_form_are_named(tmp_path, hh_raw, caplog):
  folder = tmp_path / "raw" / "harmless-base"
  folder.mkdir(parents=True)
  (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in hh_raw[:5]))
  with pytest.raises(FileNotFoundError, match=r"no \{split\}.jsonl.gz files in .* \(found "
                                              r"\['train.jsonl'\]\)"):
    pdata.load_preferences(HH, "train", data_dir=tmp_path / "cache", manual_dir=folder.parent)
  with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(row) + "\n" for row in hh_raw[:5])
  with caplog.at_level(logging.WARNING):
    rows = pdata.load_preferences(HH, "test", data_dir=tmp_path / "cache",
                                  manual_dir=folder.parent)
  assert rows.summary.rows_read == 5
  assert "not reading ['train.jsonl']: splits are read from files named {split}.jsonl.gz" in (
      caplog.text)


def test_a_load_waits_for_the_build_in_progress_and_reads_it(tmp_path, caplog):
  """A second process must not build the same dataset version at the same time: TFDS's
  rename of its temporary folder fails for one of them. Here the test holds the build
  lock, as a process building the dataset would, while a thread loads it."""
  from prefjax.data import sources
  path = tmp_path / "pairs.jsonl"
  path.write_text(json.dumps({"prompt": "p", "chosen": " yes", "rejected": " no"}) + "\n",
                  encoding="utf-8")
  name, cache = f"jsonl:{path}", str(tmp_path / "cache")
  builder, manual = sources._builder_for(name, cache, None)
  loaded = {}
  waiter = threading.Thread(target=lambda: loaded.update(
      source=pdata.load_preferences(name, "train", data_dir=cache)))
  caplog.set_level(logging.INFO, logger="prefjax.data.sources")
  with sources._build_lock(builder, name):
    waiter.start()
    deadline = time.monotonic() + 120
    while "waiting for another process" not in caplog.text:
      assert waiter.is_alive() and time.monotonic() < deadline, "the load did not wait"
      time.sleep(0.05)
    builds = base.build_count
    sources._prepare(builder, manual)
  waiter.join(timeout=120)
  assert not waiter.is_alive()
  assert base.build_count == builds + 1  # the test's build only
  assert loaded["source"].cache_hit and loaded["source"][0]["chosen"] == " yes"


def test_synthetic_roundtrip_with_metadata(tmp_path, cache_dir, capfd, caplog):
  rows = [{"prompt": f"p{i}", "chosen": f" good {i}", "rejected": f" bad {i}",
           "meta": {"gold": np.float32([1.5, -0.25]), "flipped": bool(i == 1)}}
          for i in range(3)]
  from prefjax.data.tfds_builders import synthetic
  assert not synthetic.dataset_exists("tiny-world.v1", root=tmp_path)
  folder = pdata.write_synthetic_dataset(
      "tiny-world.v1", rows, label_noise=0.1, gold_name="tiny_gold",
      meta={"seed": np.int64(3)}, root=tmp_path)
  assert folder == tmp_path / "tiny-world.v1"
  assert synthetic.dataset_exists("tiny-world.v1", root=tmp_path)
  capfd.readouterr()
  caplog.set_level(logging.INFO)
  source = pdata.load_preferences("synthetic:tiny-world.v1", "train", data_dir=cache_dir,
                                  manual_dir=tmp_path)
  assert not source.cache_hit and capfd.readouterr().out == ""  # TFDS's build lines: logged
  assert "dataset synthetic_preferences built in" in caplog.text
  assert source.metadata["label_noise"] == 0.1
  assert source.metadata["gold_name"] == "tiny_gold"
  assert source.metadata["meta"] == {"seed": 3} and source.metadata["num_rows"] == 3
  assert [r["chosen"] for r in source] == [" good 0", " good 1", " good 2"]
  assert source[1]["meta"] == {"gold": [1.5, -0.25], "flipped": True}
  by_path = pdata.load_preferences(f"synthetic:{folder}", "train", data_dir=cache_dir)
  assert by_path.cache_hit and by_path.fingerprint == source.fingerprint


@pytest.mark.parametrize("kwargs, message", [
    (dict(label_noise=1.5, gold_name="g"), "label_noise"),
    (dict(label_noise=0.0, gold_name=""), "gold_name"),
])
def test_synthetic_writer_rejects_bad_arguments(tmp_path, kwargs, message):
  rows = [{"prompt": "p", "chosen": " a", "rejected": " b"}]
  with pytest.raises(ValueError, match=message):
    pdata.write_synthetic_dataset("x", rows, meta=None, root=tmp_path, **kwargs)


def test_synthetic_writer_names_the_bad_row(tmp_path):
  rows = [{"prompt": "p", "chosen": " a", "rejected": " b"},
          {"prompt": "p", "chosen": " a", "rejected": " a"}]
  with pytest.raises(ValueError, match="synthetic row 1: identical_responses"):
    pdata.write_synthetic_dataset("x", rows, label_noise=0.0, gold_name="g", meta=None,
                                  root=tmp_path)
  assert not (tmp_path / "x").exists()


def test_unknown_names_and_splits_are_clear_errors(hh_splits, cache_dir, hh_manual_dir):
  with pytest.raises(ValueError, match="unknown preference dataset"):
    pdata.load_preferences("hh_rlhf/harmless", "test", data_dir=cache_dir)
  with pytest.raises(ValueError, match="no split 'train'.*resplit_test"):
    pdata.load_preferences(HH, "train", data_dir=cache_dir, manual_dir=hh_manual_dir)
  with pytest.raises(ValueError, match="on_bad_row"):
    pdata.load_preferences(HH, "test", data_dir=cache_dir, on_bad_row="ignore")
