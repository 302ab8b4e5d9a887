"""Reference log-prob cache: equal to on-the-fly scoring up to round-off; stale values are never read."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from experiments import train_dpo
from prefjax import experiment
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize
from prefjax.direct import loss as loss_lib
from prefjax.direct import ref_cache
from prefjax.models import decoder
from tests import comparisons
from tests import test_train_dpo as helpers


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory):
  root, patch = helpers.isolated_env(tmp_path_factory)
  yield root
  patch.undo()


def _cached_config(cache_dir, steps=8):
  config = helpers.dpo_config(steps=steps)
  config.ref.mode = "cached"
  config.ref.cache_dir = str(cache_dir)
  return config


def test_cached_reference_is_bit_identical_to_online_and_rebuilt_for_new_data(
    tmp_path, monkeypatch):
  cache_dir = tmp_path / "ref_cache"
  online = train_dpo.run(helpers.dpo_config(steps=8), str(tmp_path / "online"))
  cached = train_dpo.run(_cached_config(cache_dir), str(tmp_path / "cached"))
  info = json.loads((tmp_path / "cached" / "reference.json").read_text())
  assert info["mode"] == "cached" and not info["train"]["hit"] and not info["eval"]["hit"]
  # Cached log-probs come from another program (other batch shapes, no fusion with the
  # policy forward), so they may differ from live ones by round-off; compare what is
  # well-conditioned, and demand bit-identity only between runs that read the same cache.
  records = [[r for r in helpers.read_metrics(tmp_path / d) if "loss" in r]
             for d in ("online", "cached")]
  comparisons.assert_same_first_step(*records)
  comparisons.assert_losses_close(helpers.train_losses(tmp_path / "cached"),
                                  helpers.train_losses(tmp_path / "online"))
  comparisons.assert_params_close_after_adam(
      online.state.params, cached.state.params,
      learning_rate=_cached_config(cache_dir).optimizer["learning_rate"], steps=8)
  final = online.summary["final_eval"]
  for name, value in final.items():
    # One pair whose margin round-off flips moves an accuracy by 1/n (n = 211 > 1/1e-3).
    one_pair = 1.0 / final["num_examples"] + 1e-9 if "accurac" in name else 1e-4
    assert cached.summary["final_eval"][name] == pytest.approx(value, rel=1e-3, abs=one_pair), name

  # A second run reads the cache and never builds the reference model (only the policy).
  built = []
  make_model = experiment.make_model
  monkeypatch.setattr(experiment, "make_model",
                      lambda *a, **k: built.append(1) or make_model(*a, **k))
  again = train_dpo.run(_cached_config(cache_dir), str(tmp_path / "again"))
  info_again = json.loads((tmp_path / "again" / "reference.json").read_text())
  assert info_again["train"]["hit"] and info_again["eval"]["hit"]
  assert info_again["train"]["key"] == info["train"]["key"]
  assert len(built) == 1
  assert again.summary["params_sha256"] == cached.summary["params_sha256"]

  # Another dataset (half of the rows) gets a new key and is scored afresh.
  config = _cached_config(cache_dir, steps=2)
  config.data.train_split = "resplit_train[:50%]"
  train_dpo.run(config, str(tmp_path / "other_data"))
  info_other = json.loads((tmp_path / "other_data" / "reference.json").read_text())
  assert not info_other["train"]["hit"]
  assert info_other["train"]["key"] != info["train"]["key"]
  assert info_other["eval"]["hit"]  # The eval split did not change.
  assert len(list(cache_dir.glob("*.npz"))) == 3  # 2 train datasets + 1 eval


class _Source:
  def __init__(self, fingerprint, rows=10, name="ds", split="train"):
    self.fingerprint, self.rows, self.name, self.split = fingerprint, rows, name, split

  def __len__(self):
    return self.rows


def _key(**changes):
  base = dict(ref_weights="params:abc", source=_Source("f0"),
              tokenizer=tokenize.ByteTokenizer(), pipeline=pipeline_lib.PipelineConfig(),
              model_config={"hidden_size": 32}, loss=loss_lib.DirectLoss(),
              mesh=None)
  base.update(changes)
  return ref_cache.cache_key(ref_cache.key_parts(**base))


@pytest.mark.parametrize("change", [
    dict(ref_weights="params:abd"),
    dict(source=_Source("f1")),
    dict(source=_Source("f0", rows=11)),
    dict(source=_Source("f0", split="test")),
    dict(tokenizer=tokenize.ByteTokenizer(extra_specials=("<sep>",))),
    dict(pipeline=pipeline_lib.PipelineConfig(max_length=256)),
    dict(pipeline=pipeline_lib.PipelineConfig(max_prompt_length=100)),
    dict(pipeline=pipeline_lib.PipelineConfig(prompt_keep_start=8)),
    dict(pipeline=pipeline_lib.PipelineConfig(pad_to_multiple=32)),
    dict(pipeline=pipeline_lib.PipelineConfig(prompt_style="chat")),
    dict(pipeline=pipeline_lib.PipelineConfig(batch_size=4)),
    dict(model_config={"hidden_size": 64}),
], ids=lambda c: next(iter(c)))
def test_cache_key_changes_with_everything_the_values_depend_on(change):
  assert _key(**change) != _key()


def test_cache_key_ignores_order_only_settings():
  assert _key(pipeline=pipeline_lib.PipelineConfig(seed=3, shuffle=False, num_epochs=2)) == _key()
  # A new pipeline setting must be sorted into the key or the order-only list.
  fields = {f.name for f in dataclasses.fields(pipeline_lib.PipelineConfig)}
  keyed = set(ref_cache._KEY_PIPELINE_FIELDS)  # pylint: disable=protected-access
  assert fields == keyed | set(ref_cache.ORDER_ONLY_PIPELINE_FIELDS)
  assert not keyed & set(ref_cache.ORDER_ONLY_PIPELINE_FIELDS)


def test_table_lookup_by_example_index_in_any_order():
  table = ref_cache.ReferenceTable.empty(5)
  table.fill(np.array([3, 0, -1]), {"ref_chosen": np.array([-3.0, -1.0, 9.0], np.float32),
                                    "ref_rejected": np.array([-4.0, -2.0, 9.0], np.float32)})
  out = table.lookup(np.array([0, -1, 3]))
  np.testing.assert_array_equal(out["ref_chosen"], [-1.0, 0.0, -3.0])
  np.testing.assert_array_equal(out["ref_rejected"], [-2.0, 0.0, -4.0])
  with pytest.raises(KeyError, match=r"source rows \[1\]"):
    table.lookup(np.array([0, 1]))
  with pytest.raises(KeyError, match="no row 7"):
    table.lookup(np.array([7]))


ROWS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
    ("abc", "dde", "fa"), ("hello", "ok", "nope no"), ("x", "yy", "zzz"),
    ("mno", "pp", "q"), ("ab", "long answer", "short")]]


def test_packed_pair_scores_equal_padded_scores():
  tok = tokenize.ByteTokenizer()
  cfg = decoder.DecoderConfig.tiny_llama(vocab_size=tok.vocab_size, num_layers=1)
  model = decoder.Decoder(cfg, rngs=nnx.Rngs(0))
  base = pipeline_lib.PipelineConfig(batch_size=5, max_length=24, shuffle=False, num_epochs=1)
  packed_cfg = dataclasses.replace(base, mode="packed", pack_rows=4, pack_length=32,
                                   max_segments_per_row=4)
  padded = next(iter(pipeline_lib.preference_dataset(ROWS, tok, base)))
  packed = next(iter(pipeline_lib.preference_dataset(ROWS, tok, packed_cfg)))
  score = nnx.jit(loss_lib.score_pairs, static_argnames="num_segments")
  a = score(model, padded)
  b = score(model, packed, num_segments=4)
  order = np.argsort(padded["example_index"])
  other = np.argsort(packed["example_index"])
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x)[order], np.asarray(y)[other], rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(a.chosen_tokens)[order],
                                [len(r["chosen"]) + 1 for r in ROWS])  # + EOS


def test_processes_agree_on_a_cache_hit_and_wait_for_process_0s_write(tmp_path, monkeypatch):
  """A file seen by one host and not another (per-host cache dirs, or a write landing while
  they look) made one process train while the others scored: a hang."""
  import jax  # pylint: disable=import-outside-toplevel
  built, synced = [], []
  table = ref_cache.ReferenceTable.empty(3)

  def build():
    built.append(1)
    return table
  parts = {"what": "test"}
  ref_cache.load_or_build(parts, 3, build, cache_dir=tmp_path)  # one process: a miss
  assert built == [1]
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  other_sees_it = False  # the other process's view of the cache file
  monkeypatch.setattr(ref_cache.parallel, "in_every_process",
                      lambda flag: flag and other_sees_it)
  monkeypatch.setattr(ref_cache.multihost_utils, "sync_global_devices", synced.append)
  _, info = ref_cache.load_or_build(parts, 3, build, cache_dir=tmp_path)
  assert built == [1, 1] and not info["hit"] and synced == ["prefjax_reference_cache_written"]
  other_sees_it = True
  assert ref_cache.load_or_build(parts, 3, build, cache_dir=tmp_path)[1]["hit"]
  assert built == [1, 1]
