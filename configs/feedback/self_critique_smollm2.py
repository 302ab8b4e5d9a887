r"""Self-critique with SmolLM2-135M-Instruct on HH-RLHF harmless prompts: (initial, revised) pairs.

Command:
  python -m experiments.self_critique --config=configs/feedback/self_critique_smollm2.py \
      --workdir=/tmp/critique_hh
Variant ``:tiny``: a random tiny decoder on tiny-world prompts (byte tokens, seconds;
what the tests run; its texts are noise, the point is the plumbing).

The first 8 prompts of harmless-base ``resplit_train``, one principle of
configs/constitutions/harmlessness.txt each; every stage samples up to 48 new tokens
at temperature 0.7 in batches of 4 (prompts left-padded to 64-token buckets, at most
384 tokens), in SmolLM2's chat template.

CPU cost: 3 stages x 8 prompts x 48 tokens of KV-cached decoding (≈ 0.27 GFLOP per token)
plus prefills of ≤ 384 tokens: about 3 TFLOP, minutes here; generation is latency-bound
on CPU.

Measured 2026-12-01 (this shared 2-core CPU, load average 7-12; noisy): 9.3 min wall
(546 s in the loop: ~3 min per stage, ~20 s per text, compilation included); 8 prompts ->
8 pairs, none skipped. The texts are what a 135M model writes: the critiques are vague
("could be more polished") and revisions often drift (one repeats the conversation's
"Human:" turn), so these pairs show the plumbing; whether revisions are better needs a
judge or a larger model (e.g. --config.model.path / --config.tokenizer.path). That run
used an earlier critique wording, which put the principle (written to compare two replies,
"Which response ...?") to the one reply as if it were a critique request; the wording now
says a reviewer comparing replies asks it.
``:tiny`` (random decoder): 6 prompts -> pairs of byte noise in seconds (tests/test_feedback.py).
"""

from __future__ import annotations

import ml_collections

from configs.feedback import label_smollm2
from prefjax import experiment

CRITIQUE_TEMPLATE = (
    "Here is a conversation and the assistant's reply.\n\n[Conversation]\n{prompt}\n\n"
    "[Reply]\n{response}\n\nCritique the reply. A reviewer comparing replies to this "
    "conversation asks: \"{principle}\" Point out concretely what in this reply would count "
    "against it on that question, in two or three sentences.")
REVISION_TEMPLATE = (
    "Here is a conversation, the assistant's reply and a critique of it.\n\n[Conversation]\n"
    "{prompt}\n\n[Reply]\n{response}\n\n[Critique]\n{critique}\n\nRewrite the reply so that "
    "it fixes the problems named in the critique. Write only the new reply.")
TINY_CRITIQUE = "{principle} {prompt} {response} critique:"
TINY_REVISION = "{prompt} {response} {critique} revision:"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """``arg``: None (SmolLM2 on HH prompts) or ``tiny``."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.tokenizer = dict(path="asset:smollm2")
  c.model = dict(label_smollm2.SMOLLM2_MODEL)
  c.data = experiment.data_section(name="hh_rlhf/harmless-base", split="resplit_train",
                                   max_prompts=8)
  del c.data.pipeline  # prompts and generation are config.sampling's; an override did nothing
  del c.data.train_split, c.data.eval_split  # the binary reads data.split alone
  c.constitution = "configs/constitutions/harmlessness.txt"
  c.principles = dict(seed=0)
  c.critique = dict(critique_template=CRITIQUE_TEMPLATE, revision_template=REVISION_TEMPLATE,
                    style="chat", system="")
  c.sampling = dict(max_new_tokens=48, temperature=0.7, top_p=0.0, batch_size=4,
                    max_prompt_length=384, pad_to_multiple=64)
  if arg == "tiny":
    c.tokenizer.path = "byte"
    c.model = dict(label_smollm2.TINY_MODEL)
    c.data.name, c.data.max_prompts = "tiny_world", 6
    c.data.tiny_world.num_pairs = 200
    c.constitution = "configs/constitutions/style.txt"
    c.critique.update(critique_template=TINY_CRITIQUE, revision_template=TINY_REVISION,
                      style="raw")
    # One prompt bucket (128) for all three stages: a single compiled generation program.
    c.sampling.update(max_new_tokens=8, temperature=1.0, batch_size=4, max_prompt_length=128,
                      pad_to_multiple=128)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r}; known: tiny")
  return c
