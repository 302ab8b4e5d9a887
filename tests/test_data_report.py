"""data_report.json: what a run did to its rows (read, built, skipped, dropped, truncated).

Every case writes a small jsonl file to tmp_path; the expected counts are derived
by hand from the file and the byte tokenizer (one token per UTF-8 byte, BOS on
the prompt, EOS on each response).
"""

import json
import re

import pytest

from configs.rm import tiny as rm_tiny
from experiments import train_rm
from prefjax import data as pdata
from prefjax import experiment
from prefjax.data import pipeline
from prefjax.data import report
from prefjax.data import tokenize

BYTES = tokenize.load_tokenizer("byte")
PAIR = ("chosen", "rejected")
LONG_RESPONSE = " " + "y" * 199_999  # 200,000 characters


def _rows(count: int) -> list[dict]:
  """``count`` rows whose 40-byte prompts and responses all exceed the tiny limits (16 / 32)."""
  return [{"prompt": f"Question {i:02d}: " + "q" * 27, "chosen": f" good answer {i:02d} " + "g" * 24,
           "rejected": f" bad answer {i:02d} " + "b" * 25} for i in range(count)]


def _write(path, lines) -> str:
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def _messy_file(tmp_path) -> str:
  """50 good rows (row 7's chosen is 200,000 characters) + 2 bad rows at lines 4 and 11."""
  good = [json.dumps(r) for r in _rows(50)]
  good[6] = json.dumps({**_rows(50)[6], "chosen": LONG_RESPONSE})
  lines = good[:3] + ['{"prompt": "Q", "chosen": " a", "rejected": " b", "weight": 1e39}']
  lines += good[3:9] + ['{"prompt": "Q", "chosen"'] + good[9:]
  return _write(tmp_path / "messy.jsonl", lines)


def _load(path, tmp_path, split="train"):
  return pdata.load_preferences(f"jsonl:{path}", split, data_dir=tmp_path / "cache",
                                on_bad_row="skip")


def test_report_counts_skips_truncations_and_the_200k_response(tmp_path):
  path = _messy_file(tmp_path)
  got = report.split_report(_load(path, tmp_path), BYTES,
                            pipeline.PipelineConfig(max_length=32), PAIR)
  assert (got["rows_read"], got["rows_built"], got["rows_skipped"]) == (52, 50, 2)
  assert got["rows_read"] == got["rows_built"] + got["rows_in_other_splits"] + got["rows_skipped"]
  assert got["skipped_by_reason"] == {"bad_value": 1, "malformed_json": 1}
  assert got["skipped_examples"]["bad_value"] == [
      f"{path}:4: bad_value: field 'weight' = 1e+39 is outside [0.0, 1000000000000.0]"]
  assert got["skipped_examples"]["malformed_json"][0].startswith(f"{path}:11: malformed_json")
  assert (got["rows_selected"], got["rows_used"], got["rows_dropped"]) == (50, 50, 0)
  # Prompts: BOS + 40 bytes > 16 = max_length // 2; responses: 40 bytes + EOS > 32 - 16.
  assert got["truncated_prompts"]["count"] == got["truncated_responses"]["count"] == 50
  assert got["truncated_prompts"]["examples"] == [f"messy.jsonl:{n}" for n in (1, 2, 3, 5, 6)]
  assert got["longest_response"] == {"tokens": 200_001, "row": "messy.jsonl:8"}
  assert got["longest_prompt"] == {"tokens": 41, "row": "messy.jsonl:1"}  # BOS + 40 bytes
  assert (got["prompt_limit"], got["max_length"]) == (16, 32)
  line = report.one_line({"train": got})
  assert "read 52, built 50, skipped 2" in line and "\n" not in line
  assert "truncated 50 prompts (longest 41 tokens at messy.jsonl:1, limit 16)" in line
  assert ("50 responses (longest 200001 tokens at messy.jsonl:8; a prompt and its response "
          "share max_length 32)") in line


def test_only_the_200k_response_is_truncated_among_short_rows(tmp_path):
  rows = [{"prompt": "Q", "chosen": " yes", "rejected": " no"},
          {"prompt": "Q2", "chosen": " a", "rejected": LONG_RESPONSE},
          {"prompt": "Q3", "chosen": " a", "rejected": " bb"}]
  path = _write(tmp_path / "short.jsonl", [json.dumps(r) for r in rows])
  got = report.split_report(_load(path, tmp_path), BYTES,
                            pipeline.PipelineConfig(max_length=32), PAIR)
  assert got["truncated_prompts"] == {"count": 0, "examples": []}
  assert got["truncated_responses"] == {"count": 1, "examples": ["short.jsonl:2"]}
  assert got["longest_prompt"] == {"tokens": 3, "row": "short.jsonl:2"}  # BOS Q 2
  assert got["longest_response"] == {"tokens": 200_001, "row": "short.jsonl:2"}
  assert (got["rows_read"], got["rows_used"], got["rows_skipped"]) == (3, 3, 0)


def test_rows_all_dropped_as_over_long_fail_naming_the_split(tmp_path):
  path = _write(tmp_path / "long.jsonl", [json.dumps(r) for r in _rows(3)])
  config = pipeline.PipelineConfig(max_length=32, min_response_length=20)  # budget 16 < 20
  with pytest.raises(report.EmptyDataError) as info:
    report.split_report(_load(path, tmp_path), BYTES, config, PAIR)
  assert str(info.value) == (
      f"jsonl:{path} split 'train' has no usable rows: read 3 from {path}; "
      "dropped 3 in tokenization {'over_long': 3}")


@pytest.mark.parametrize("rows, hard_labels, message", [
    ([{"weight": 0.0}] * 3, False, "all 3 usable rows have weight 0"),
    ([{"outcome": 0.5}, {"outcome": 0.7}, {"outcome": 0.5, "weight": 0.0}], True,
     "none of its 2 weighted rows has outcome 0 or 1, and the loss drops ties"),
])
def test_rows_a_loss_would_give_no_weight_fail_before_training(tmp_path, rows, hard_labels,
                                                                message):
  """All-zero weights trained train_rm on a loss of 0 without a word, and all ties failed
  train_dpo's hinge only at the eval after training, naming no file."""
  lines = [json.dumps({**_rows(3)[i], **extra}) for i, extra in enumerate(rows)]
  source = _load(_write(tmp_path / "w.jsonl", lines), tmp_path)
  with pytest.raises(report.EmptyDataError, match=f"split 'train': {message}"):
    experiment.start_data_report(str(tmp_path), {"train": source}, BYTES,
                                 pipeline.PipelineConfig(max_length=128), PAIR,
                                 weighted=("train",), hard_labels=hard_labels)
  # A soft-label loss learns from ties; SFT, which reads no weights, from weight-0 rows.
  experiment.start_data_report(str(tmp_path), {"train": source}, BYTES,
                               pipeline.PipelineConfig(max_length=128), PAIR,
                               weighted=("train",) if hard_labels else ())


@pytest.mark.parametrize("content, detail", [
    ("", "read 0 from {path}"),
    ('{"prompt": "Q", "chosen": " a", "rejected": " a"}\n{"x": 1}\n',
     "read 2 from {path}; skipped 2 {{'identical_responses': 1, 'missing_field': 1}} "
     "(first: {path}:1: identical_responses: chosen and rejected responses are identical)"),
])
def test_empty_or_fully_skipped_source_fails_in_one_line(tmp_path, content, detail):
  path = tmp_path / "empty.jsonl"
  path.write_text(content)
  data_cfg = {"name": f"jsonl:{path}", "on_bad_row": "skip", "cache_dir": str(tmp_path / "c")}
  with pytest.raises(pdata.EmptyDataError) as info:
    experiment.load_split(data_cfg, "train")
  message = str(info.value)
  assert message == (f"jsonl:{path} split 'train' has no usable rows: "
                     + detail.format(path=path))
  assert "\n" not in message


@pytest.mark.parametrize("split, what", [
    ("train[1:1]", "selects no row of the 2 in 'train'"),
    ("train[5:]", "selects no row of the 2 in 'train'"),
    ("train[abc]", "is not a TFDS slice")])
def test_a_slice_that_selects_no_row_names_the_dataset_and_split(tmp_path, split, what):
  """"Paths sequence can not be of 0 length" (TFDS) named neither."""
  path = _write(tmp_path / "two.jsonl", [json.dumps({"prompt": "Q", "chosen": f" a{i}",
                                                     "rejected": " b"}) for i in range(2)])
  with pytest.raises(ValueError, match=rf"^jsonl:{path}: the split '{re.escape(split)}' {what}"):
    pdata.load_preferences(f"jsonl:{path}", split, data_dir=tmp_path / "cache")


def test_weights_whose_batch_sums_could_overflow_float32_are_bad_rows(tmp_path):
  rows = [{"prompt": "Q", "chosen": " a", "rejected": " b", "weight": w}
          for w in (1e12, 3.4e38, 1e39, 1.0)]
  path = _write(tmp_path / "w.jsonl", [json.dumps(r) for r in rows])
  with pytest.raises(pdata.BadRowError, match=rf"{path}:2: bad_value: field 'weight' = "
                                              r"3.4e\+38 is outside \[0.0, 1000000000000.0\]"):
    pdata.load_preferences(f"jsonl:{path}", "train", data_dir=tmp_path / "cache")
  source = _load(path, tmp_path)
  assert [row["weight"] for row in source] == [pytest.approx(1e12, rel=1e-7), 1.0]


def _rm_config(path, tmp_path, steps=2):
  config = rm_tiny.get_config("quick")
  config.data.update(name=f"jsonl:{path}", train_split="train", eval_split="train",
                     on_bad_row="skip", cache_dir=str(tmp_path / "cache"))
  config.data.pipeline.update(batch_size=8, bucket_boundaries=())
  config.model.overrides.num_layers = 1
  config.mesh.update(shape=(1, 1, 1), num_devices=1)
  config.loop.update(num_steps=steps, tensorboard=False)
  config.optimizer.warmup_steps = 0
  config.eval.enabled = False
  return config


def test_train_rm_writes_data_report_and_summary_carries_it(tmp_path, caplog):
  path = _messy_file(tmp_path)
  workdir = tmp_path / "rm"
  with caplog.at_level("INFO"):
    out = train_rm.run(_rm_config(path, tmp_path), str(workdir))
  written = json.loads((workdir / "data_report.json").read_text())
  assert set(written) == {"train", "eval"}
  train = written["train"]
  assert (train["rows_read"], train["rows_built"], train["rows_skipped"]) == (52, 50, 2)
  assert train["truncated_responses"]["count"] == 50
  assert train["longest_response"] == {"tokens": 200_001, "row": "messy.jsonl:8"}
  # Two steps of 8 pairs: 16 examples read, each of them truncated.
  assert train["iterator"]["examples_read"] == train["iterator"]["truncated_response"] == 16
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["data"] == written == out["summary"]["data"]
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: train")]
  assert len(lines) == 1 and "skipped 2" in lines[0] and "longest 200001 tokens" in lines[0]
  # A refused rerun on other data leaves the run's record of its data alone (eval_rm's
  # run: check compares against it): refused for its config, or for its data.
  before = (workdir / "data_report.json").read_bytes()
  other = _rm_config(_write(tmp_path / "other.jsonl", [json.dumps(r) for r in _rows(20)]),
                     tmp_path)
  other.loop.on_config_mismatch = "error"
  with pytest.raises(ValueError, match="config differs"):
    train_rm.run(other, str(workdir))
  other.loop.on_config_mismatch = "warn"
  with pytest.raises(ValueError, match="iterator state was saved by another pipeline"):
    train_rm.run(other, str(workdir))
  assert (workdir / "data_report.json").read_bytes() == before


def test_a_run_killed_between_its_summary_and_its_data_report_is_completed_by_a_rerun(
    tmp_path, caplog):
  """A SIGKILL after the loop wrote summary.json and before the binary added ``data`` left
  both without it for good: every rerun said "already finished"."""
  path = _messy_file(tmp_path)
  workdir = tmp_path / "rm"
  train_rm.run(_rm_config(path, tmp_path), str(workdir))
  finished = json.loads((workdir / "summary.json").read_text())
  report = json.loads((workdir / "data_report.json").read_text())
  killed = {k: v for k, v in finished.items() if k != "data"}
  (workdir / "summary.json").write_text(json.dumps(killed))
  (workdir / "data_report.json").write_text(json.dumps(
      {**report, "train": {k: v for k, v in report["train"].items() if k != "iterator"}}))
  # Rerun with another eval split: the report stays the finished run's (its own scan).
  rerun = _rm_config(path, tmp_path)
  rerun.data.eval_split = "resplit_test"
  train_rm.run(rerun, str(workdir))
  assert "lacks its data report (the run was stopped before writing it)" in caplog.text
  assert json.loads((workdir / "data_report.json").read_text()) == report
  assert json.loads((workdir / "summary.json").read_text())["data"] == report
  caplog.clear()
  train_rm.run(_rm_config(path, tmp_path), str(workdir))  # complete: left as it is
  assert "lacks its data report" not in caplog.text


def test_empty_training_file_fails_before_any_model_is_built(tmp_path, monkeypatch):
  path = tmp_path / "nothing.jsonl"
  path.write_text("\n")
  monkeypatch.setattr(experiment, "make_model", lambda *a, **k: pytest.fail("model built"))
  with pytest.raises(pdata.EmptyDataError, match=rf"^jsonl:{path} split 'train' has no usable"):
    train_rm.run(_rm_config(path, tmp_path), str(tmp_path / "rm"))


def test_rl_and_best_of_n_dataset_prompts_are_reported(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from prefjax.rl import setup  # pylint: disable=g-import-not-at-top
  rows = [{"prompt": "p" * n, "chosen": " a", "rejected": " b"} for n in (5, 30, 12)]
  path = _write(tmp_path / "prompts.jsonl", [json.dumps(r) for r in rows])
  config = ml_collections.ConfigDict({
      "seed": 0, "data": {"name": f"jsonl:{path}", "cache_dir": str(tmp_path / "cache")},
      "prompts": {"source": "dataset", "split": "train", "eval_split": "train", "num_eval": 2,
                  "max_length": 16, "style": "raw"}})
  hooks = []  # train_rl's: written once train_loop has accepted the workdir
  setup.make_prompts(config, BYTES, None, workdir=str(tmp_path), start_hooks=hooks)
  assert not (tmp_path / "data_report.json").exists() and len(hooks) == 1
  _, eval_prompts = setup.make_prompts(config, BYTES, None, workdir=str(tmp_path))
  got = json.loads((tmp_path / "data_report.json").read_text())["train"]
  # BOS + 30 bytes > 16: the one prompt the sampler cuts (it keeps the last 16 tokens).
  assert got["truncated_prompts"] == {"count": 1, "examples": ["prompts.jsonl:2"]}
  assert got["longest_prompt"] == {"tokens": 31, "row": "prompts.jsonl:2"}
  assert (got["rows_read"], got["rows_used"], got["prompt_limit"]) == (3, 3, 16)
  assert eval_prompts.tokens.shape == (2, 16)
  assert report.one_line({"train": got}).endswith(
      "truncated 1 prompts (longest 31 tokens at prompts.jsonl:2, limit 16)")


def test_a_resumed_run_reuses_the_scan_unless_the_cuts_changed(tmp_path, monkeypatch):
  path = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in _rows(4)])
  source, config = _load(path, tmp_path), pipeline.PipelineConfig(max_length=32)
  first = report.split_report(source, BYTES, config, PAIR)
  previous = {**first, "iterator": {"batches": 3}}
  monkeypatch.setattr(report, "scan", lambda *a: pytest.fail("scanned again"))
  assert report.split_report(source, BYTES, config, PAIR, previous=previous) == first
  monkeypatch.undo()
  longer = report.split_report(source, BYTES, pipeline.PipelineConfig(max_length=128), PAIR,
                               previous=previous)
  assert longer["scan_key"] != first["scan_key"] and longer["max_length"] == 128
  assert first["truncated_prompts"]["count"] == 4 and first["truncated_responses"]["count"] == 4
  assert longer["truncated_prompts"]["count"] == longer["truncated_responses"]["count"] == 0


def test_a_shard_without_rows_names_the_source(tmp_path):
  path = _write(tmp_path / "one.jsonl", [json.dumps(_rows(1)[0])])
  config = pipeline.PipelineConfig(max_length=32, shard_index=1, shard_count=2)
  with pytest.raises(ValueError, match=rf"^jsonl:{path}\[train\] has 1 rows, so shard 1 of 2 "
                     r"\(one per process\) is empty$"):
    pipeline.preference_dataset(_load(path, tmp_path), BYTES, config)


def test_a_split_whose_responses_are_mostly_cut_is_named():
  def split(used, cut, longest=40):
    return {"rows_used": used, "truncated_responses": {"count": cut},
            "longest_response": {"tokens": longest}, "max_length": 32}
  lines = report.mostly_truncated({"train": split(60, 60), "eval": split(60, 30),
                                       "prompts_only": split(60, 60, longest=0)})
  assert lines == ["train: 60 of 60 rows have a response cut to fit max_length 32 (prompt + "
                   "response); raise data.pipeline.max_length unless that is intended"]


def test_a_bos_the_tokenizers_own_encoding_does_not_add_is_warned_about(tmp_path, smollm2_gguf,
                                                                        caplog):
  """SmolLM2 was trained without a BOS; the raw pipeline's default put <|im_start|> before
  every prompt, moving log p(response) by 2.0 nats on HH pairs, without a word."""
  smollm = tokenize.load_tokenizer(smollm2_gguf)
  source = _load(_write(tmp_path / "p.jsonl", [json.dumps(r) for r in _rows(2)]), tmp_path)
  for add_bos, warned in ((True, True), (False, False)):
    caplog.clear()
    experiment.start_data_report(str(tmp_path / str(add_bos)), {"train": source}, smollm,
                                 pipeline.PipelineConfig(max_length=128, add_bos=add_bos), PAIR)
    assert ("data.pipeline.add_bos=True puts id 1 ('<|im_start|>') before every prompt"
            in caplog.text) == warned, caplog.text
  caplog.clear()  # the byte tokenizer adds its BOS by design
  experiment.start_data_report(str(tmp_path / "byte"), {"train": source}, BYTES,
                               pipeline.PipelineConfig(max_length=128), PAIR)
  assert "puts id" not in caplog.text


def test_the_tiny_world_loads_from_python_with_the_binaries_defaults(tmp_path, monkeypatch):
  """``load_split({"name": "tiny_world"})`` raised a bare KeyError: 'num_pairs'."""
  monkeypatch.setenv("PREFJAX_SYNTHETIC_DIR", str(tmp_path / "synthetic"))
  monkeypatch.setenv("PREFJAX_CACHE_DIR", str(tmp_path / "cache"))
  source = experiment.load_split({"name": "tiny_world"}, "train")
  defaults = experiment.load_split(
      {"name": "tiny_world", "tiny_world": dict(experiment.TINY_WORLD_DEFAULTS)}, "train")
  assert len(source) == len(defaults) > 0 and source[0] == defaults[0]
  assert "-n2000-" in source.name
