"""A two-label Hugging Face classifier read as a reward model: the log-odds of one label.

``score_label`` (``from_pretrained``, a model config, ``eval_rm``'s ``hf_score_label``) turns a
decoder ``*ForSequenceClassification`` with labels ``(a, b)`` into the one-output reward
``z_a − z_b = log p(a) − log p(b)``. Before it, such a classifier could not be a reward: the
one-output head refused its ``[2, D]`` ``score.weight``, and a ``multi:`` head is refused by
best-of-n and RL. Checked against PyTorch's logits of the same directory.
"""

import json
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from experiments import eval_rm
from prefjax import models
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import tokenize
from prefjax.evals import scorers as scorers_lib
from prefjax.models import hf_import
from prefjax.rl import rewards
from tests import test_eval_rm
from tests import test_hf_parity

VOCAB, PAD = 259, 256  # the byte tokenizer's, so texts can be scored as HF reads them
LABELS = {"0": "NEGATIVE", "1": "POSITIVE"}


def _classifier_dir(tmp_path: pathlib.Path, labels: dict[str, str] = LABELS,
                    name: str = "cls", seed: int = 0) -> pathlib.Path:
  config = test_hf_parity._llama_config(tied=False)  # pylint: disable=protected-access
  config.update(dict(vocab_size=VOCAB, pad_token_id=PAD, num_labels=len(labels),
                     id2label={int(k): v for k, v in labels.items()},
                     label2id={v: int(k) for k, v in labels.items()},
                     max_position_embeddings=512))
  torch.manual_seed(seed)
  model = transformers.LlamaForSequenceClassification(config)
  with torch.no_grad():  # log-odds of order 1, so a wrong row or sign shows
    model.score.weight.mul_(4.0)
  model.save_pretrained(tmp_path / name)
  return tmp_path / name


def _torch_logits(path: pathlib.Path, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  model = transformers.LlamaForSequenceClassification.from_pretrained(path).eval()
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(),
                 attention_mask=torch.from_numpy(mask).long()).logits.double().numpy()


def test_a_two_label_classifier_scores_the_log_odds_of_the_named_label(tmp_path):
  path = _classifier_dir(tmp_path)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, PAD, size=(4, 12)).astype(np.int32)
  mask = np.ones_like(tokens)
  for row, length in enumerate((12, 9, 5, 1)):  # right-padded with the pad id, as HF reads
    tokens[row, length:], mask[row, length:] = PAD, 0
  logits = _torch_logits(path, tokens, mask)
  assert np.ptp(logits[:, 1] - logits[:, 0]) > 0.1  # rows that differ, so the check bites
  for label, expected in (("POSITIVE", logits[:, 1] - logits[:, 0]),
                          ("NEGATIVE", logits[:, 0] - logits[:, 1])):
    model = models.from_pretrained(path, head="reward", score_label=label, dtype=jnp.float32)
    got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)), np.float64)
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-5, atol=1e-5, err_msg=label)


EXPORT = {"prefjax_head": "multi:NEGATIVE,POSITIVE", "prefjax_pooling": "last"}


@pytest.mark.parametrize("labels,label,head,edit,error,match", [
    ({"0": "a", "1": "b", "2": "c"}, "a", "reward", None, hf_import.CheckpointError,
     r"one linear head only with two labels; this one has 3 \['a', 'b', 'c'\].*"
     r"head='multi:a,b,c'"),
    (LABELS, "positive", "reward", None, hf_import.CheckpointError,
     r"score_label='positive' is not one of the classifier's labels \['NEGATIVE', 'POSITIVE'\]"),
    (LABELS, "POSITIVE", "multi:NEGATIVE,POSITIVE", None, ValueError, r"it needs head='reward'"),
    (LABELS, "POSITIVE", "reward", EXPORT, hf_import.CheckpointError,
     r"this directory is not one \(a prefjax export's columns are objectives"),
])
def test_score_label_is_refused_where_the_log_odds_is_not_one_linear_head(
    tmp_path, labels, label, head, edit, error, match):
  path = _classifier_dir(tmp_path, labels)
  if edit:
    test_hf_parity._edit_config(path, lambda c: c.update(edit))  # pylint: disable=protected-access
  with pytest.raises(error, match=match):
    models.from_pretrained(path, head=head, score_label=label, dtype=jnp.float32,
                           score_head="if_fits")


def test_score_label_on_a_directory_without_a_classifier_head_is_an_error(tmp_path):
  """``score_head='if_fits'`` would keep a fresh head there; a named label must load."""
  config = test_hf_parity._llama_config(tied=False)  # pylint: disable=protected-access
  config.vocab_size = VOCAB
  transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
  with pytest.raises(hf_import.CheckpointError, match=r"does not have"):
    models.from_pretrained(tmp_path / "base", head="reward", score_label="POSITIVE",
                           score_head="if_fits", dtype=jnp.float32)


def test_a_reward_spec_optimises_the_classifier_s_log_odds(tmp_path):
  """The reward of best-of-n and RL: a spec naming the directory and the label."""
  check_reward_spec(_classifier_dir(tmp_path), _torch_logits)


def check_reward_spec(path: pathlib.Path, torch_logits) -> None:
  """A reward spec naming classifier ``path`` and label POSITIVE rewards its log-odds as
  ``torch_logits(path, tokens, mask)`` gives them."""
  spec = ml_collections.ConfigDict(dict(
      kind="model", name="sentiment", tokenizer=dict(path="byte"), checkpoint="",
      max_length=64, aggregation="mean", lam=0.0,
      model=dict(path=str(path), head="reward", dtype="float32", score_label="POSITIVE")))
  reward = rewards.make_reward(spec, seed=0)
  prompts, responses = ["ab", "a question", "q"], ["cd", " an answer", " a longer answer"]
  tokens, mask = rewards.text_encoder(tokenize.ByteTokenizer(),
                                      pipeline_lib.PipelineConfig(max_length=64))(
      [p + rewards.MODEL_SEPARATOR + r for p, r in zip(prompts, responses)])
  logits = torch_logits(path, np.asarray(tokens), np.asarray(mask))
  np.testing.assert_allclose(reward(prompts, responses), logits[:, 1] - logits[:, 0],
                             rtol=1e-5, atol=1e-5)


def test_eval_rm_scores_a_two_label_classifier_as_one_column(tmp_path):
  path = _classifier_dir(tmp_path)
  data = tmp_path / "pairs.jsonl"
  rng = np.random.default_rng(1)
  words = ["good", "bad", "fine", "awful", "great", "meh"]
  data.write_text("".join(json.dumps({
      "prompt": f"Q{i}:", "chosen": " " + " ".join(rng.choice(words, 3)),
      "rejected": " " + " ".join(rng.choice(words, 4))}) + "\n" for i in range(12)))
  config = test_eval_rm.eval_config("sentiment=hf:" + str(path), f"jsonl:{data}@train")
  config.update(hf_tokenizer="byte", hf_score_label="POSITIVE",
                pipeline={"max_length": 64}, num_resamples=50)
  eval_rm.run(config, str(tmp_path / "eval"))
  config.hf_score_label = ""  # each label's logit, a column each (the multi-label head)
  eval_rm.run(config, str(tmp_path / "eval_logits"))
  log_odds = {r["index"]: r["scores"] for r in test_eval_rm.score_rows(tmp_path / "eval")}
  logits = {r["index"]: r["scores"] for r in test_eval_rm.score_rows(tmp_path / "eval_logits")}
  assert len(log_odds) == 12 and all(set(s) == {"sentiment"} for s in log_odds.values())
  for index, row in logits.items():
    expected = np.subtract(row["sentiment/POSITIVE"], row["sentiment/NEGATIVE"])
    np.testing.assert_allclose(log_odds[index]["sentiment"], expected, rtol=1e-5, atol=1e-5)
  config.hf_score_label = "LABEL_9"
  with pytest.raises(scorers_lib.EvalInputError, match=r"'LABEL_9' is not one of"):
    eval_rm.run(config, str(tmp_path / "eval_bad"))


def test_independent_labels_score_their_own_logit(tmp_path):
  """A multi-label classifier (sigmoids): the log-odds of a label is its logit alone; the
  two-label difference was taken for it, and three labels were refused."""
  labels = {"0": "toxic", "1": "insult", "2": "threat"}
  path = _classifier_dir(tmp_path, labels)
  test_hf_parity._edit_config(path, lambda c: c.update(  # pylint: disable=protected-access
      problem_type="multi_label_classification"))
  tokens = np.random.default_rng(2).integers(0, PAD, size=(3, 7)).astype(np.int32)
  mask = np.ones_like(tokens)
  logits = _torch_logits(path, tokens, mask)
  model = models.from_pretrained(path, head="reward", score_label="insult", dtype=jnp.float32)
  got = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)), np.float64)
  np.testing.assert_allclose(got.reshape(-1), logits[:, 1], rtol=1e-5, atol=1e-5)


def test_score_label_on_a_gguf_file_is_refused_before_reading_it(tmp_path):
  with pytest.raises(hf_import.CheckpointError, match=r"a GGUF file holds no classification"):
    models.from_pretrained(tmp_path / "model.gguf", head="reward", score_label="POSITIVE")


def test_the_shipped_reward_specs_take_a_score_label():
  from configs.bon import smollm2 as bon_smollm2  # pylint: disable=import-outside-toplevel
  from configs.rl import smollm2_rloo  # pylint: disable=import-outside-toplevel
  from prefjax import configlib  # pylint: disable=import-outside-toplevel
  for config in (smollm2_rloo.get_config(), bon_smollm2.get_config()):
    for reward in ("proxy", "gold"):
      configlib.check_key_path(config, f"{reward}.model.score_label")


def test_eval_rm_reads_a_label_per_hf_scorer(tmp_path):
  """One label for every hf: scorer failed on a one-output reward model beside the
  classifier; NAME=LABEL names the classifier alone."""
  path = _classifier_dir(tmp_path)
  config = test_hf_parity._llama_config(tied=False)  # pylint: disable=protected-access
  config.update(dict(vocab_size=VOCAB, pad_token_id=PAD, num_labels=1,
                     max_position_embeddings=512))
  transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " yes" * (i + 1),
                                      "rejected": " no"}) + "\n" for i in range(6)))
  eval_cfg = test_eval_rm.eval_config(f"cls=hf:{path},rm=hf:{tmp_path / 'rm'}",
                                      f"jsonl:{data}@train")
  eval_cfg.update(hf_tokenizer="byte", hf_score_label="cls=POSITIVE",
                  pipeline={"max_length": 64}, num_resamples=20)
  eval_rm.run(eval_cfg, str(tmp_path / "eval"))
  rows = test_eval_rm.score_rows(tmp_path / "eval")
  assert all(set(r["scores"]) == {"cls", "rm"} for r in rows) and len(rows) == 6
  eval_cfg.hf_score_label = "cls=POSITIVE,cls=NEGATIVE"
  with pytest.raises(scorers_lib.EvalInputError, match=r"names scorer 'cls' twice"):
    eval_rm.run(eval_cfg, str(tmp_path / "eval_twice"))
  eval_cfg.hf_score_label = "clf=POSITIVE"
  with pytest.raises(scorers_lib.EvalInputError, match=r"'clf=POSITIVE' must be NAME=LABEL "
                                                       r"with NAME one of the hf: scorers "
                                                       r"\['cls', 'rm'\]"):
    eval_rm.run(eval_cfg, str(tmp_path / "eval_bad"))


def test_an_ensemble_of_two_label_classifiers_scores_each_members_log_odds(tmp_path):
  """A ``member_<k>/`` folder of two-label classifiers was scored from member 0's two
  logits alone; it now needs the label, and then scores every member."""
  for k in range(2):
    _classifier_dir(tmp_path / "ens", name=f"member_{k}", seed=k)
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": " yes" * (i + 1),
                                      "rejected": " no"}) + "\n" for i in range(6)))
  eval_cfg = test_eval_rm.eval_config(f"ens=hf:{tmp_path / 'ens'}", f"jsonl:{data}@train")
  eval_cfg.update(hf_tokenizer="byte", pipeline={"max_length": 64}, num_resamples=20)
  with pytest.raises(scorers_lib.EvalInputError, match=r"classifiers with the labels "
                                                       r"\['NEGATIVE', 'POSITIVE'\]; .*"
                                                       r"hf_score_label=ens=POSITIVE"):
    eval_rm.run(eval_cfg, str(tmp_path / "eval_logits"))
  eval_cfg.hf_score_label = "POSITIVE"
  eval_rm.run(eval_cfg, str(tmp_path / "eval"))
  rows = test_eval_rm.score_rows(tmp_path / "eval")
  assert len(rows) == 6
  for k in range(2):
    single = tmp_path / f"single_{k}"
    eval_cfg.scorers = f"one=hf:{tmp_path / 'ens' / f'member_{k}'}"
    eval_rm.run(eval_cfg, str(single))
    alone = {r["index"]: r["scores"]["one"] for r in test_eval_rm.score_rows(single)}
    for row in rows:
      np.testing.assert_allclose(row["scores"][f"ens/member{k}"], alone[row["index"]],
                                 rtol=1e-5, atol=1e-5)
  for row in rows:
    members = np.array([row["scores"][f"ens/member{k}"] for k in range(2)])
    np.testing.assert_allclose(row["scores"]["ens"], members.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(members[0], members[1])  # two different classifiers
