r"""AI labels from SmolLM2-135M-Instruct judging HH-RLHF harmless pairs against written principles.

Command:
  python -m experiments.label_ai_feedback --config=configs/feedback/label_smollm2.py \
      --workdir=/tmp/label_hh
Variants: ``:pandalm`` (PandaLM test pairs, helpfulness + honesty + style principles,
agreement with each of the three annotators), ``:tiny`` (a random tiny decoder on the
tiny text world, byte tokens; seconds; what the tests run), ``:tiny_gold`` (the tiny
world's gold reward as a programmatic judge, temperature 0.5, planted position bias
+1 logit).

Data: the first 100 pairs of harmless-base ``resplit_train`` (A = the human-chosen
response, B = the rejected one; 200 would take about 20 min on this loaded CPU); one
principle of configs/constitutions/harmlessness.txt sampled per pair; both orders asked.
Judge text: SmolLM2's chat template (its default system prompt) around JUDGE_TEMPLATE,
the conversation cut to 400 characters (its first third and its end) and responses to
their first 300, then shortened further until the text fits 256 tokens (88 of the 200
questions were); 64-token buckets, batches of 8.

CPU cost: 200 judge forwards of ≤ 256 tokens (mean 224) at ≈ 0.27 GFLOP/token: about
12 TFLOP.

Measured 2026-12-05 on the conversation-disjoint split of builder 1.2.0 with the judge
keeping a cut conversation's first third and its end (a quiet 2-core CPU): 1.6 min wall
(96 s in the run; 11.5 min on 2026-12-01 under a load average of 7-12). Agreement with the
human label [bootstrap 95% CI], 100 pairs: A shown first 1.000 [1.000, 1.000], A shown
second 0.000 [0.000, 0.000], order-averaged 0.450 [0.350, 0.550] (chance). Position bias
P(first wins) − ½: 0.443 [0.439, 0.448] before averaging (SmolLM2-135M answers "A" with
P ≈ 0.94 whatever the order; every decision flips with the order), 0 after (by
construction). Mean probability on the two option tokens: 0.180. The order-averaged P(A)
lies in [0.464, 0.519] (55 of 100 below ½): the 135M judge carries almost no signal here.
Of the 200 questions, 102 had their conversation cut at the character cap, 78 a response,
and 88 were shortened further to fit 256 tokens. Rerun 2026-12-06 after the GGUF tokenizer
learned SmolLM2's digit-first splitting (README, "Data"): these numbers unchanged.
``:pandalm`` (the first 60 pairs of PandaLM ``resplit_test``, a hash sample; the
file's first items are all unanimous; 13 principles of three files; 44 s wall on a quiet
machine): 51 decisive pairs, 9 ties left out; the 60 pairs come from 9 prompts, which the
intervals resample with all their pairs (2026-12-07, 57 s wall; drawn by text pair before:
[0.341, 0.625] for annotator 1). Agreement with annotator 1 / 2 / 3: 0.490 [0.345, 0.706],
0.529 [0.397, 0.721], 0.532 [0.395, 0.727], beside inter-annotator agreement 1-2 0.961
[0.915, 1.000], 1-3 0.936 [0.867, 1.000], 2-3 0.979 [0.942, 1.000] (whole test set: 0.941,
0.956, 0.946). Majority label: A first 0.529, A second 0.471, averaged 0.529 [0.397, 0.721];
position bias 0.451 [0.446, 0.457] -> 0; option mass 0.368. Before the tokenizer fix
(2026-12-05, the judge by then keeping the instruction that opens a cut prompt, which it had
lost in 13 of these 60): 0.451, 0.490, 0.489; averaged 0.490; mass 0.366. Either way, chance.
``:tiny_gold`` (0.3 s of judging): 64 tiny-world pairs; with the planted +1-logit bias,
agreement with the gold labels is 1.000 (A first), 0.328 (A second) and 1.000 averaged;
position bias 0.201 before, 0 after; order-flip rate 0.672. With
``--config.judge.position_bias=0`` every label equals σ(|Δ gold| / 0.5) (tests/test_feedback.py).
``:tiny`` (random decoder; 18 s wall): agreement 0.875 / 0.203 / 0.516 (chance), bias 0.127.

"""

from __future__ import annotations

import ml_collections

from prefjax import experiment

JUDGE_TEMPLATE = (
    "Below is a conversation between a human and an AI assistant, followed by two possible "
    "next replies of the assistant.\n\n[Conversation]\n{prompt}\n\n[Reply A]\n{response_a}\n\n"
    "[Reply B]\n{response_b}\n\n{principle} Answer with one letter, A or B.")
TINY_TEMPLATE = "{principle}\n{prompt}\nA: {response_a}\nB: {response_b}\nAnswer: "
SMOLLM2_MODEL = dict(experiment.MODEL_SWITCHES, arch="decoder", preset="", path="asset:smollm2",
                     head="", dtype="float32", overrides={})
TINY_MODEL = dict(experiment.MODEL_SWITCHES, arch="decoder", preset="tiny_llama", path="",
                  head="", dtype="float32",
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
  del c.data.pipeline  # the judge's cuts are config.scoring's; an override here did nothing
  del c.data.train_split, c.data.eval_split  # the binary reads data.split alone
  c.constitution = "configs/constitutions/harmlessness.txt"
  c.principles = dict(mode="sample", num_principles=0, seed=0)
  c.judge = dict(kind="lm", template=JUDGE_TEMPLATE, labels=("A", "B"), answer_prefix="",
                 style="chat", system="", temperature=1.0, position_bias=0.0)
  c.scoring = dict(batch_size=8, max_length=256, pad_to_multiple=64, add_bos=False,
                   max_prompt_chars=400, max_response_chars=300)
  c.eval = dict(num_resamples=1000, seed=0)
  if arg == "pandalm":
    c.data.name, c.data.split, c.data.max_pairs = "pandalm", "resplit_test[:60]", 60
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
