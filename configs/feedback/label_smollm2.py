r"""AI labels from SmolLM2-135M-Instruct judging HH-RLHF harmless pairs against written principles.

Command:
  python -m experiments.label_ai_feedback --config=configs/feedback/label_smollm2.py \
      --workdir=/tmp/label_hh
Variants: ``:pandalm`` (PandaLM test pairs, helpfulness + honesty + style principles,
agreement with each of the three annotators), ``:tiny`` (a random tiny decoder on the
tiny text world, byte tokens; seconds; what the tests run), ``:tiny_gold`` (the tiny
world's gold reward as a programmatic judge, temperature 0.5, planted position bias
+1 logit).

Data: the first 200 pairs of harmless-base ``resplit_train`` (A = the human-chosen
response, B = the rejected one); one principle of configs/constitutions/harmlessness.txt
sampled per pair; both orders asked. Judge text: SmolLM2's chat template (its default
system prompt) around the template below, prompt cut to its last 600 characters,
responses to 400; at most 384 tokens (64-token buckets, batches of 8).

CPU cost: 400 judge forwards of ≤ 384 tokens ≈ 0.27 GFLOP/token: about 30 TFLOP.

Expected (measured 2026-12-01 on this shared 2-core CPU, load from other jobs): see
README "Preference data from AI feedback" for the numbers of the last run:
  MEASURED_HH
"""

from __future__ import annotations

import ml_collections

from prefjax import experiment

JUDGE_TEMPLATE = (
    "Below is a conversation between a human and an AI assistant, followed by two possible "
    "next replies of the assistant.\n\n[Conversation]\n{prompt}\n\n[Reply A]\n{response_a}\n\n"
    "[Reply B]\n{response_b}\n\n{principle} Answer with one letter, A or B.")
TINY_TEMPLATE = "{principle}\n{prompt}\nA: {response_a}\nB: {response_b}\nAnswer: "
SMOLLM2_MODEL = dict(arch="decoder", preset="", path="asset:smollm2", head="", dtype="float32",
                     overrides={})
TINY_MODEL = dict(arch="decoder", preset="tiny_llama", path="", head="", dtype="float32",
                  overrides=dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                 intermediate_size=64, max_position_embeddings=256))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (HH harmless), ``pandalm``, ``tiny`` or ``tiny_gold``."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = dict(path="asset:smollm2")
  c.model = dict(SMOLLM2_MODEL)
  c.data = experiment.data_section(name="hh_rlhf/harmless-base", split="resplit_train[:100]",
                                   max_pairs=100)
  c.constitution = "configs/constitutions/harmlessness.txt"
  c.principles = dict(mode="sample", num_principles=0, seed=0)
  c.judge = dict(kind="lm", template=JUDGE_TEMPLATE, labels=("A", "B"), answer_prefix="",
                 style="chat", system="", temperature=1.0, position_bias=0.0)
  c.scoring = dict(batch_size=8, max_length=256, pad_to_multiple=64, add_bos=False,
                   max_prompt_chars=400, max_response_chars=300)
  c.eval = dict(num_resamples=1000, seed=0)
  if arg == "pandalm":
    c.data.name, c.data.split, c.data.max_pairs = "pandalm", "test[:60]", 60
    c.constitution = ("configs/constitutions/helpfulness.txt,configs/constitutions/honesty.txt,"
                      "configs/constitutions/style.txt")
  elif arg in ("tiny", "tiny_gold"):
    c.tokenizer.path = "byte"
    c.model = dict(TINY_MODEL)
    c.data.name, c.data.split, c.data.max_pairs = "tiny_world", "resplit_train", 64
    c.data.tiny_world.num_pairs = 200
    c.constitution = "configs/constitutions/style.txt"
    c.judge.update(template=TINY_TEMPLATE, style="raw")
    c.scoring.update(max_length=256, pad_to_multiple=64, max_prompt_chars=0,
                     max_response_chars=0)
    c.eval.num_resamples = 200
    if arg == "tiny_gold":
      c.judge.update(kind="tiny_world_gold", temperature=0.5, position_bias=1.0)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: pandalm, tiny, tiny_gold")
  return c
