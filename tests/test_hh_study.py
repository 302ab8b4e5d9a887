"""The SmolLM2 / HH world of the overoptimization study (``experiments/hh_study.py``) wired
up with a tiny random Llama and 100 HH rows in place of SmolLM2 and the full file."""

from __future__ import annotations

import gzip
import json
import os
import zlib

import numpy as np
import pytest

from configs.dpo import smollm2_hh as dpo_smollm2
from configs.reproduce import smollm2_hh
from configs.rl import smollm2_rloo as rl_smollm2
from experiments import hh_study
from prefjax.data import sources
from prefjax.data import tokenize as tokenize_lib
from prefjax.data.tfds_builders import synthetic
from prefjax.overopt import criteria as C
from prefjax.overopt import report as report_lib
from prefjax.rewards import base as reward_fns
from prefjax.rl import rewards as rl_rewards

HH = "hh_rlhf/harmless-base"


@pytest.fixture(scope="module")
def world(tmp_path_factory, hh_harmless_test_file):
  tmp_path = tmp_path_factory.mktemp("hh_world")
  folder = tmp_path / "data" / "hh_rlhf" / "harmless-base"
  folder.mkdir(parents=True)
  with gzip.open(hh_harmless_test_file, "rt", encoding="utf-8") as f:
    lines = [next(f) for _ in range(100)]  # 10 in resplit_validation: 4 eval prompts fit
  with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as f:
    f.writelines(lines)
  with pytest.MonkeyPatch.context() as env:
    env.setenv("PREFJAX_DATA_DIR", str(tmp_path / "data"))
    env.setenv("PREFJAX_CACHE_DIR", str(tmp_path / "tfds"))
    env.setenv("PREFJAX_SYNTHETIC_DIR", str(tmp_path / "synthetic"))
    tw = hh_study.HHWorld(smollm2_hh.get_config("tiny").text, str(tmp_path / "work"))
    # A programmatic gold stands in for the trained RM (the study only calls it).
    tw._gold = rl_rewards.PairReward(reward_fns.ProgrammaticReward(_text_hash, inputs="texts",
                                                                   name="text_hash"),
                                     lambda p, r: r)
    yield tw


def _text_hash(texts):
  """Distinct texts score apart. A vowel share tied at 0 for most of the random policy's
  6-byte responses: 9 of 40 sampling streams kept no pair of a test prompt."""
  return np.array([zlib.crc32(t.encode("utf-8", "surrogatepass")) / 2**32 for t in texts],
                  np.float32)


def _prompts(split: str) -> set[str]:
  return {row["prompt"] for row in sources.load_preferences(HH, split)}


def test_pairs_are_gold_ordered_samples_of_hh_prompts(world):
  out = world.policy_pairs()
  name = out["dataset"].split(":", 1)[1]
  with open(synthetic.synthetic_root() / name / synthetic.DATA_FILE) as f:
    rows = [json.loads(line) for line in f]
  train, test = _prompts("resplit_train"), _prompts("resplit_test")
  num_test = min(8, len(test))
  assert len(rows) == out["num_pairs"]
  assert len(rows) + sum(out["skipped"].values()) == 32 + num_test
  assert {r["prompt"] for r in rows} <= train | test
  assert sum(r["prompt"] in test for r in rows) == len(sources.load_preferences(
      out["dataset"], "resplit_test")) > 0
  assert len(sources.load_preferences(out["dataset"], "resplit_validation")) == 0
  prompts = [r["prompt"] for r in rows]
  chosen = world.gold(prompts, [r["chosen"] for r in rows])
  rejected = world.gold(prompts, [r["rejected"] for r in rows])
  assert np.all(chosen > rejected)
  np.testing.assert_allclose(chosen, [r["meta"]["gold_chosen"] for r in rows], rtol=1e-5,
                             atol=1e-6)


def test_eval_prompts_are_held_out_hh_prompts_in_the_chat_template(world):
  prompts = world.eval_prompts()
  assert len(prompts.texts) == 4 and prompts.tokens.shape == (4, 40)
  assert set(prompts.texts) <= _prompts("resplit_validation")
  ends = [world.tokenizer.decode(row[mask > 0].tolist()) for row, mask in
          zip(prompts.tokens, prompts.mask)]
  chat = [tokenize_lib.format_prompt(t, world.tokenizer, style="chat") for t in prompts.texts]
  assert all(c.endswith(e) for c, e in zip(chat, ends)), (chat, ends)


def test_binary_configs_link_the_stages(world):
  gold = world.gold_config()
  assert (gold.data.name, gold.data.eval_split) == (HH, "resplit_validation")
  assert gold.loop.num_steps == gold.optimizer.total_steps == 6
  proxy = world.rm_config(16, "synthetic:pairs")
  assert (proxy.data.name, proxy.data.eval_split) == ("synthetic:pairs", "resplit_test")
  assert proxy.model.overrides.hidden_size == 16 and proxy.model.arch == "encoder"
  for c in (world.bon_config(32), world.rl_config(32)):
    assert c.gold.checkpoint == world.gold_dir
    assert c.proxy.checkpoint == os.path.join(world.workdir, "proxies", "w32")
    assert (c.prompts.style, c.prompts.max_length, c.sampling.max_new_tokens) == ("chat", 40, 6)
    assert c.model.preset == "tiny_llama" and c.data.name == HH
  assert world.rl_config(32).loop.checkpoint_every == 1
  # Curve-only settings stay out of the best-of-n stage (and its key): changing them
  # redraws the curve from the samples instead of refusing the finished stage.
  before = world.bon_config(32).to_dict()
  world.cfg.bon.num_points += 3
  try:
    assert world.bon_config(32).to_dict() == before
  finally:
    world.cfg.bon.num_points -= 3
  dpo = world.dpo_config("ipo", 0.1, "synthetic:pairs")
  assert (dpo.loss.name, dpo.loss.beta, dpo.ref.mode, dpo.loop.num_steps) == ("ipo", 0.1,
                                                                               "cached", 2)
  default = smollm2_hh.get_config().text
  assert default.policy.model.path == "asset:smollm2" and default.gold.model.path == "asset:minilm"
  # The study replaces the RL and DPO binaries' model section with its policy's: it must keep
  # their switches (it set scan_layers=False under their scan_layers=True, so 30 unrolled
  # blocks compiled in each train step).
  switches = lambda model: (model.scan_layers, model.remat)
  assert switches(world.rl_config(32).model) == switches(rl_smollm2.get_config().model)
  assert switches(dpo.model) == switches(dpo_smollm2.get_config().model)
  with pytest.raises(ValueError, match="unknown variant 'big'"):
    smollm2_hh.get_config("big")


def test_report_without_a_bandit_world(tmp_path):
  found = [C.Criterion("G2-hh", True, 0.99, "R² ≥ 0.95", "fits", "figures/hh_bon.png",
                       world="hh")]
  report = report_lib.write_report(str(tmp_path), found, None, {}, {"command": "x", "wall_s": 3},
                                   extra_sections=["## SmolLM2 on HH", "", "text"])
  assert set(report) == {"criteria", "verdicts", "command", "wall_s", "figures"}
  assert report["verdicts"]["G2"] == {"carried_by": "hh", "pass": True, "by_world": {"hh": True}}
  markdown = (tmp_path / "report.md").read_text()
  assert "### G2-hh — PASS (hh world)" in markdown and "## SmolLM2 on HH" in markdown
  assert "## Fits by proxy size" not in markdown
