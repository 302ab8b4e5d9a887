"""BERT, RoBERTa and DistilBERT sequence classifiers as reward models, against PyTorch.

These classifiers score their first token through a dense layer and an activation (BERT's
pooler and RoBERTa's ``classifier.dense`` with tanh, DistilBERT's ``pre_classifier`` with
ReLU), then a ``classifier`` layer. Before ``EncoderConfig.pooler`` and the "pooler"
pooling, prefjax refused them (or scored them with a fresh head): a sentiment classifier
such as the one the DPO paper's IMDb experiment uses as its gold reward could not be read.
"""

import json
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from experiments import eval_rm
from prefjax import experiment, models
from prefjax.data import tokenize
from prefjax.models import encoder, heads, hf_export, hf_import
from prefjax.rl import rewards
from tests import test_eval_rm
from tests import test_hf_classifier_labels

VOCAB, PAD = 259, 256  # the byte tokenizer's, so texts can be scored as HF reads them
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")


def _hf_config(family: str, labels=LABELS, pad: int = PAD, vocab: int = VOCAB,
               positions: int = 600):
  common = dict(vocab_size=vocab, pad_token_id=pad, max_position_embeddings=positions,
                num_labels=len(labels), id2label=dict(labels),
                label2id={v: k for k, v in labels.items()})
  if family == "distilbert":
    return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                         **common)
  config_class = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
                  "xlm-roberta": transformers.XLMRobertaConfig}[family]
  extra = {} if family == "bert" else dict(type_vocab_size=1, layer_norm_eps=1e-5)
  return config_class(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, **common, **extra)


def _classifier_dir(tmp_path: pathlib.Path, family: str, labels=LABELS,
                    pad: int = PAD, vocab: int = VOCAB, positions: int = 600) -> pathlib.Path:
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_config(
      _hf_config(family, labels, pad, vocab, positions))
  output = model.classifier.out_proj if "roberta" in family else model.classifier
  with torch.no_grad():  # logits of order 1, so a wrong row, sign or token shows
    output.weight.mul_(30.0)
  model.save_pretrained(tmp_path / family)
  return tmp_path / family


def _torch_logits(path: pathlib.Path, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(tokens).long(),
                 attention_mask=torch.from_numpy(mask).long()).logits.double().numpy()


def _right_padded(lengths=(12, 9, 5, 1), width: int = 12, seed: int = 0):
  tokens = np.random.default_rng(seed).integers(0, PAD, size=(len(lengths), width))
  mask = np.ones_like(tokens)
  for row, length in enumerate(lengths):
    tokens[row, length:], mask[row, length:] = PAD, 0
  return tokens.astype(np.int32), mask.astype(np.int32)


def _scores(model, tokens, mask, **kwargs) -> np.ndarray:
  return np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask), **kwargs),
                    np.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_classifier_scores_its_labels_and_their_log_odds_as_torch_does(tmp_path, family):
  path = _classifier_dir(tmp_path, family)
  tokens, mask = _right_padded()
  logits = _torch_logits(path, tokens, mask)
  assert np.ptp(logits[:, 1] - logits[:, 0]) > 0.1  # rows that differ, so the check bites
  assert hf_import.saved_head(path) == ("multi:NEGATIVE,POSITIVE", "pooler")
  both = models.from_pretrained(path, head="multi:NEGATIVE,POSITIVE", dtype=jnp.float32)
  assert both.pooling == "pooler" and both.trunk.config.model_type == family
  np.testing.assert_allclose(_scores(both, tokens, mask), logits, rtol=1e-5, atol=1e-5)
  for label, expected in (("POSITIVE", logits[:, 1] - logits[:, 0]),
                          ("NEGATIVE", logits[:, 0] - logits[:, 1])):
    model = models.from_pretrained(path, head="reward", score_label=label, dtype=jnp.float32)
    np.testing.assert_allclose(_scores(model, tokens, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_packed_segments_score_as_each_sequence_alone(tmp_path, family):
  """Packed rows pool each segment's first token; RoBERTa's positions restart after its
  pad id in every segment, as in a sequence of its own."""
  path = _classifier_dir(tmp_path, family)
  model = models.from_pretrained(path, head="multi:NEGATIVE,POSITIVE", dtype=jnp.float32)
  rng = np.random.default_rng(3)
  lengths = (5, 7, 3)
  pieces = [rng.integers(0, PAD, size=n) for n in lengths]
  row = np.concatenate(pieces + [np.full(2, PAD)])[None].astype(np.int32)
  segment_ids = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)]
                               + [np.zeros(2)])[None].astype(np.int32)
  packed = np.asarray(model(jnp.asarray(row), segment_ids=jnp.asarray(segment_ids),
                            num_segments=4), np.float64)
  for s, piece in enumerate(pieces):
    alone = _torch_logits(path, piece[None].astype(np.int32), np.ones((1, len(piece)), np.int32))
    np.testing.assert_allclose(packed[0, s + 1], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(packed[0, [0, 4]], 0.0)  # padding and an absent segment


def test_roberta_numbers_positions_after_its_pad_id_as_torch_does(tmp_path):
  """Left padding: RoBERTa counts real tokens only, from pad_token_id + 1 on."""
  path = _classifier_dir(tmp_path, "roberta", pad=1)
  tokens, mask = _right_padded((8, 6, 3), width=8, seed=4)
  tokens = np.where(mask > 0, tokens + 2, 1)[:, ::-1].copy()  # left-padded; ids > pad
  mask = mask[:, ::-1].copy()
  trunk = models.from_pretrained(path, dtype=jnp.float32)
  assert trunk.config.position_offset == 2
  ours = np.asarray(trunk.hidden_states(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  torch_model = transformers.RobertaModel.from_pretrained(path).eval()
  with torch.no_grad():
    theirs = torch_model(input_ids=torch.from_numpy(tokens).long(),
                         attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
  real = mask > 0
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-4, atol=1e-5)
  shifted = trunk.hidden_states(jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                                positions=jnp.broadcast_to(jnp.arange(8), tokens.shape))
  assert np.abs(np.asarray(shifted)[real] - theirs[real]).max() > 1e-2  # the rule matters


@pytest.mark.parametrize("family", FAMILIES)
def test_an_export_of_a_classifier_reward_model_is_a_classifier_transformers_scores(
    tmp_path, family):
  """A pooler-pooled reward model exports as its family's *ForSequenceClassification, one
  regression output: transformers' logits are prefjax's rewards, and from_pretrained
  reads it back."""
  path = _classifier_dir(tmp_path, family)
  model = models.from_pretrained(path, head="reward", score_label="POSITIVE",
                                 dtype=jnp.float32)
  tokens, mask = _right_padded(seed=5)
  expected = _scores(model, tokens, mask)
  hf_export.save_pretrained(model, tmp_path / "export", tokenizer=tokenize.ByteTokenizer())
  hf = json.loads((tmp_path / "export" / "config.json").read_text())
  assert hf["architectures"][0].endswith("ForSequenceClassification")
  assert hf["id2label"] == {"0": "reward"} and hf["problem_type"] == "regression"
  assert hf["pad_token_id"] == PAD  # RoBERTa's own, whatever the tokenizer's
  again = models.from_pretrained(tmp_path / "export", head="reward", dtype=jnp.float32)
  assert again.pooling == "pooler"
  np.testing.assert_allclose(_scores(again, tokens, mask), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(_torch_logits(tmp_path / "export", tokens, mask)[:, 0], expected,
                             rtol=1e-5, atol=1e-5)


def test_a_mean_pooled_reward_model_on_a_classifier_trunk_exports_as_the_base_model(
    tmp_path):
  path = _classifier_dir(tmp_path, "roberta")
  model = models.from_pretrained(path, head="reward", pooling="mean", score_head="if_fits")
  hf_export.save_pretrained(model, tmp_path / "export")
  hf = json.loads((tmp_path / "export" / "config.json").read_text())
  assert hf["architectures"] == ["RobertaModel"] and "prefjax_pooler" not in hf
  tokens, mask = _right_padded(seed=7)
  again = models.from_pretrained(tmp_path / "export", head="reward", dtype=jnp.float32)
  assert again.pooling == "mean" and again.trunk.pooler is None
  np.testing.assert_allclose(_scores(again, tokens, mask), _scores(model, tokens, mask),
                             rtol=1e-6, atol=1e-6)


def test_a_reward_spec_optimises_an_encoder_classifier_s_log_odds(tmp_path):
  """The reward of best-of-n and RL, as TRL's sentiment examples use a DistilBERT one."""
  test_hf_classifier_labels.check_reward_spec(_classifier_dir(tmp_path, "distilbert"),
                                              _torch_logits)


def test_a_pooling_other_than_the_classifier_s_is_refused_or_kept_fresh(tmp_path, caplog):
  path = _classifier_dir(tmp_path, "bert")
  with pytest.raises(hf_import.CheckpointError,
                     match=r"'classifier.weight' reads the pooled first token \(pooling="
                           r"'pooler'\); pooling='mean' would not reproduce it"):
    models.from_pretrained(path, head="multi:NEGATIVE,POSITIVE", pooling="mean")
  fresh = models.from_pretrained(path, head="reward_ensemble:2", score_head="if_fits")
  assert "keeps its fresh initialisation" in caplog.text and fresh.pooling == "pooler"
  trunk = encoder.Encoder(encoder.EncoderConfig.tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"pooling='pooler' reads an encoder's pooler"):
    heads.RewardModel(trunk, pooling="pooler", rngs=nnx.Rngs(0))
  assert heads.RewardModel(trunk, rngs=nnx.Rngs(0)).pooling == "mean"  # no pooler: as before


def test_distilbert_takes_no_token_types_and_roberta_s_length_counts_its_offset(tmp_path):
  distil = models.from_pretrained(_classifier_dir(tmp_path, "distilbert"), dtype=jnp.float32)
  tokens = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="a distilbert encoder has no token types"):
    distil.hidden_states(tokens, token_type_ids=jnp.zeros((1, 4), jnp.int32))
  roberta = encoder.Encoder(encoder.EncoderConfig.tiny(model_type="roberta", pad_token_id=1,
                                                       max_position_embeddings=10),
                            rngs=nnx.Rngs(0))
  assert roberta.hidden_states(jnp.ones((1, 8), jnp.int32)).shape == (1, 8, 32)
  with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_position_embeddings="
                                       r"10 less the 2 rows RoBERTa's positions skip"):
    roberta.hidden_states(jnp.ones((1, 9), jnp.int32))


def _wordpiece_tokenizer(directory: pathlib.Path, words: list[str]) -> None:
  """A BERT-style tokenizer (WordPiece, [CLS] text [SEP]) saved beside a classifier."""
  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
  from tokenizers import models as tok_models
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  vocab = {w: i for i, w in enumerate(specials + sorted(set(words)) + list("?:.,0123456789"))}
  tok = Tokenizer(tok_models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(directory)


@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_eval_rm_with_the_classifier_s_own_tokenizer_scores_what_transformers_scores(
    tmp_path, family):
  """No hf_tokenizer: the directory's WordPiece tokenizer reads each side as
  ``[CLS] prompt response [SEP]``, which is what ``tokenizer(prompt + response)`` feeds
  the classifier in transformers."""
  words = ["good", "bad", "fine", "awful", "great", "meh", "q", "was", "it"]
  path = _classifier_dir(tmp_path, family, pad=0, vocab=5 + len(words) + 14)
  _wordpiece_tokenizer(path, words)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  rng = np.random.default_rng(2)
  pairs = [{"prompt": f"Q{i}: was it good?", "chosen": " " + " ".join(rng.choice(words[:6], 3)),
            "rejected": " " + " ".join(rng.choice(words[:6], 5))} for i in range(8)]
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  eval_cfg = test_eval_rm.eval_config(f"clf=hf:{path}", f"jsonl:{data}@train")
  eval_cfg.update(hf_score_label="POSITIVE", pipeline={"max_length": 64}, num_resamples=20)
  eval_rm.run(eval_cfg, str(tmp_path / "eval"))
  scored = {r["index"]: r["scores"]["clf"] for r in test_eval_rm.score_rows(tmp_path / "eval")}
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  for index, pair in enumerate(pairs):
    batch = hf_tokenizer([pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]],
                         padding=True, return_tensors="pt")
    with torch.no_grad():
      logits = model(**batch).logits.double().numpy()
    np.testing.assert_allclose(scored[index], logits[:, 1] - logits[:, 0], rtol=1e-5,
                               atol=1e-5, err_msg=str(index))
  # 1,000 times the tolerance, so a wrong sign, label or token shows
  assert np.abs(np.concatenate(list(scored.values()))).min() > 0.01


def test_a_head_that_does_not_pool_through_the_pooler_drops_it(tmp_path):
  """A run that trains a mean-pooled head on a classifier's trunk holds no pooler, which
  nothing would read: its checkpoints are those of a trunk without one."""
  path = _classifier_dir(tmp_path, "roberta")
  mean = models.from_pretrained(path, head="reward", pooling="mean", score_head="if_fits")
  assert mean.trunk.pooler is None and mean.trunk.config.pooler is None
  assert not any("pooler" in p for p in hf_import.param_paths(mean))
  assert models.from_pretrained(path, head="value").trunk.pooler is None
  assert models.from_pretrained(path, head="reward", score_label="POSITIVE").trunk.pooler


@pytest.mark.parametrize("head,message", [
    # A multi: head is read under the classifier's own label names, in their order.
    ("multi:POSITIVE,NEGATIVE", r"rows are the outputs 'multi:NEGATIVE,POSITIVE', in that "
                                r"order; the requested head 'multi:POSITIVE,NEGATIVE' would "
                                r"read them"),
    # A two-label classifier read as one reward asks for its label.
    ("reward", r"'classifier.weight' scores the labels \['NEGATIVE', 'POSITIVE'\]; a "
               r"one-output reward reads one label's log-odds: set score_label"),
])
def test_a_head_that_would_misread_a_classifier_s_labels_is_refused(tmp_path, head, message):
  path = _classifier_dir(tmp_path, "distilbert")
  with pytest.raises(hf_import.CheckpointError, match=message):
    models.from_pretrained(path, head=head)


def test_a_one_output_classifier_is_a_reward_without_a_label(tmp_path, caplog):
  path = _classifier_dir(tmp_path, "bert", labels={0: "LABEL_0"})
  tokens, mask = _right_padded(seed=6)
  model = models.from_pretrained(path, head="reward", dtype=jnp.float32)
  np.testing.assert_allclose(_scores(model, tokens, mask), _torch_logits(path, tokens, mask)[:, 0],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(hf_import.CheckpointError, match=r"this classifier has one output, "
                                                      r"already one reward"):
    models.from_pretrained(path, head="reward", score_label="LABEL_0")
  models.from_pretrained(_classifier_dir(tmp_path, "roberta"), head="value")
  assert ("'classifier.out_proj.weight' is not used (head='value'; head='multi:NEGATIVE,"
          "POSITIVE' scores with it, head='reward' with a score_label one label's "
          "log-odds)") in caplog.text


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_a_max_length_past_roberta_s_positions_is_refused_before_training(tmp_path, mode):
  """Packed rows read past the table as NaN, not an error; the binary refuses first."""
  from experiments import train_rm  # pylint: disable=import-outside-toplevel
  from tests import test_train_rm  # pylint: disable=import-outside-toplevel
  path = _classifier_dir(tmp_path, "roberta")
  config = test_train_rm.small_config(1)
  config.model.update(path=str(path), head="reward", score_label="POSITIVE", pooling="")
  config.tokenizer.path = "byte"
  config.data.pipeline.update(max_length=600 - (PAD + 1) + 1, mode=mode)
  with pytest.raises(ValueError, match=r"data.pipeline.max_length=344, but the model has 343 "
                                       r"positions \(max_position_embeddings=600, less the "
                                       r"257 RoBERTa skips\): set data.pipeline.max_length <= "
                                       r"343"):
    train_rm.run(config, str(tmp_path / "rm"))
  experiment.check_max_length(models.from_pretrained(path), 343)  # the longest that fits


def test_eval_rm_cuts_texts_to_a_short_position_table_and_pads_past_it(tmp_path):
  """A RoBERTa of 34 positions (32 after its pad id) that records no pipeline: texts are cut
  to 32 tokens, not the default 512 (refused), and a batch padded to a multiple of 64 past
  its table scores as transformers scores each text alone; the tokenizer pads with another
  id than the model's."""
  path = _classifier_dir(tmp_path, "roberta", pad=1, positions=34)
  pairs = [{"prompt": "Q:", "chosen": " fine" * (i + 1), "rejected": " no" * 9}
           for i in range(4)] + [{"prompt": "Q:", "chosen": " ok", "rejected": " no" * 20}]
  data = tmp_path / "pairs.jsonl"
  data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
  eval_cfg = test_eval_rm.eval_config(f"short=hf:{path}", f"jsonl:{data}@train")
  eval_cfg.update(hf_tokenizer="byte", hf_score_label="POSITIVE", num_resamples=20)
  eval_rm.run(eval_cfg, str(tmp_path / "eval"))
  scored = {r["index"]: r["scores"]["short"] for r in test_eval_rm.score_rows(tmp_path / "eval")}
  assert np.isfinite(scored[4]).all()
  report = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert report["datasets"][0]["truncated_by_pipeline"] == {  # the 64-token side
      "short": {"truncated_response": 1}}
  byte = tokenize.ByteTokenizer()
  for index, pair in enumerate(pairs[:4]):  # texts of at most 32 tokens: not cut
    for side, response in enumerate((pair["chosen"], pair["rejected"])):
      ids = [byte.bos_id] + byte.encode(pair["prompt"] + response) + [byte.eos_id]
      assert len(ids) <= 32
      logits = _torch_logits(path, np.asarray([ids], np.int32), np.ones((1, len(ids)), np.int32))
      np.testing.assert_allclose(scored[index][side], logits[0, 1] - logits[0, 0],
                                 rtol=1e-5, atol=1e-5, err_msg=f"{index} {side}")


def test_a_reward_of_a_short_position_table_cuts_to_it_or_refuses_a_longer_max_length(
    tmp_path):
  """Best-of-n and RL rewards: a long sample crashed mid-run (\"sequence length 96
  exceeds\"); texts are cut to the table, and a max_length past it is refused up front."""
  path = _classifier_dir(tmp_path, "roberta", pad=1, positions=34)
  spec = ml_collections.ConfigDict(dict(
      kind="model", name="sentiment", tokenizer=dict(path="byte"), checkpoint="",
      max_length=0, aggregation="mean", lam=0.0,
      model=dict(path=str(path), head="reward", dtype="float32", score_label="POSITIVE")))
  scores = rewards.make_reward(spec, seed=0)(["q"] * 2, [" fine", " fine" * 40])
  assert np.isfinite(scores).all()
  spec.max_length = 64
  with pytest.raises(ValueError, match=r"the 'sentiment' reward's max_length=64, but the "
                                       r"model has 32 positions"):
    rewards.make_reward(spec, seed=0)


def test_an_export_with_its_tokenizer_scores_texts_in_transformers_as_prefjax_does(tmp_path):
  """The exported tokenizer writes [CLS] text [SEP] as the pipeline did, so
  ``model(**tokenizer(texts))`` in transformers gives prefjax's rewards of those texts."""
  words = ["good", "bad", "fine", "awful", "q", "was", "it"]
  path = _classifier_dir(tmp_path, "distilbert", pad=0, vocab=5 + len(words) + 14)
  _wordpiece_tokenizer(path, words)
  tokenizer = experiment.make_tokenizer({"path": str(path)})
  model = models.from_pretrained(path, head="reward", score_label="POSITIVE", dtype=jnp.float32)
  hf_export.save_pretrained(model, tmp_path / "export", tokenizer=tokenizer)
  texts = ["Q: was it good? good fine", "Q: was it good? awful bad bad"]
  ids = [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
  width = max(map(len, ids))
  tokens = np.array([i + [0] * (width - len(i)) for i in ids], np.int32)
  mask = np.array([[1] * len(i) + [0] * (width - len(i)) for i in ids], np.int32)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
  batch = hf_tokenizer(texts, padding=True, return_tensors="np")
  np.testing.assert_array_equal(batch["input_ids"], tokens)
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "export").eval()
  with torch.no_grad():
    logits = exported(input_ids=torch.from_numpy(tokens).long(),
                      attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  np.testing.assert_allclose(logits[:, 0], _scores(model, tokens, mask), rtol=1e-5, atol=1e-5)
