"""Catalogue of command-line mistakes, run through the real binaries.

Each mistake must end with exit code 1, a short message (at most 5 lines of output,
no traceback) that says what to change, and no workdir where the config never loaded.
Every case fails before a model is built, so each run costs about one import of jax.
"""

import dataclasses
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from configs.dpo import smollm2_hh
from configs.dpo import tiny as dpo_tiny
from configs.rm import hh_minilm
from configs.rm import pandalm_ties
from configs.rl import smollm2_rloo
from configs.rl import tiny_ppo
from configs.rl import tiny_rloo
from configs.rm import tiny as rm_tiny
from configs.sft import tiny as sft_tiny
from experiments import common
from prefjax import configlib
from prefjax import train
from prefjax.data import pipeline as pipeline_lib
from prefjax.data import sources
from prefjax.losses import direct
from prefjax.losses import preference
from prefjax.losses import registry
from prefjax.train import summary as summary_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
BINARIES = {"train_rm": "configs/rm/tiny.py", "train_dpo": "configs/dpo/tiny.py"}
MAX_ERROR_LINES = 5


def run_binary(binary: str, *args: str, env: dict | None = None) -> tuple[int, list[str]]:
  """Runs ``python -m experiments.BINARY ARGS``; returns (exit code, stdout+stderr lines)."""
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env.pop("PREFJAX_VERBOSE_ERRORS", None)
  proc = subprocess.run([sys.executable, "-m", f"experiments.{binary}", *args], cwd=REPO,
                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True, timeout=300)
  return proc.returncode, proc.stdout.splitlines()


def assert_short_error(code: int, lines: list[str], *expected: str) -> str:
  text = "\n".join(lines)
  assert code == 1, text
  assert len(lines) <= MAX_ERROR_LINES, text
  assert "Traceback" not in text, text
  for part in expected:
    assert part in text, f"{part!r} not in:\n{text}"
  return text


@pytest.mark.parametrize("binary", sorted(BINARIES))
def test_unknown_top_level_key_names_the_sections(binary, tmp_path):
  code, lines = run_binary(binary, f"--config={BINARIES[binary]}",
                           f"--workdir={tmp_path / 'w'}", "--config.not_a_key=1")
  text = assert_short_error(code, lines, "config: unknown field(s) ['not_a_key']",
                            "'loop'", "'data'", "'optimizer'")
  assert "did you mean" not in text  # Nothing is close to not_a_key.
  assert not (tmp_path / "w").exists()


def test_unknown_nested_key_names_the_closest_and_the_sections_fields(tmp_path):
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py",
                           f"--workdir={tmp_path / 'w'}", "--config.loop.num_stepz=5")
  assert_short_error(code, lines, "config.loop: unknown field(s) ['num_stepz']",
                     "did you mean num_steps", "'on_config_mismatch'", "'keep_checkpoints'")
  assert not (tmp_path / "w").exists()


def test_an_unknown_loss_field_points_to_the_losses_own_hyperparameters(tmp_path):
  code, lines = run_binary("train_dpo", "--config=configs/dpo/tiny.py",
                           f"--workdir={tmp_path / 'w'}", "--config.loss.gamma=0.1")
  assert_short_error(code, lines, "config.loss: unknown field(s) ['gamma']",
                     "a hyperparameter of the selected loss: --config.loss.kwargs=gamma=VALUE")


def test_missing_config_file_is_one_line_and_creates_no_workdir(tmp_path):
  code, lines = run_binary("train_dpo", "--config=configs/dpo/no_such.py",
                           f"--workdir={tmp_path / 'w'}")
  assert_short_error(code, lines, "config file 'configs/dpo/no_such.py' not found")
  assert not (tmp_path / "w").exists()


def test_unknown_config_variant_is_the_config_files_own_message(tmp_path):
  code, lines = run_binary("train_dpo", "--config=configs/dpo/tiny.py:bogus",
                           f"--workdir={tmp_path / 'w'}")
  assert_short_error(code, lines, "unknown variant 'bogus'; known: quick")
  assert not (tmp_path / "w").exists()


def test_missing_workdir_is_one_line():
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py")
  assert_short_error(code, lines, "--workdir is required")


def test_a_module_that_does_not_import_is_one_line(tmp_path):
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py", f"--workdir={tmp_path}",
                           "--imports=no_such_module_of_losses")
  assert_short_error(code, lines, "--imports: cannot import 'no_such_module_of_losses': No "
                                  "module named 'no_such_module_of_losses'")


def test_help_lists_the_binary_flags():
  code, lines = run_binary("train_dpo", "--help")
  text = "\n".join(lines)
  assert code == 1, text  # absl's --help exits 1.
  for flag in ("--config:", "--workdir:", "--[no]config_help:", "--[no]verbose_errors:"):
    assert flag in text, flag


def config_help_fields(binary: str, config: str, *overrides: str) -> dict[str, str]:
  """``--config_help``'s ``config.a.b = repr`` lines, overrides applied, as a dict."""
  code, lines = run_binary(binary, f"--config={config}", "--config_help", *overrides)
  assert code == 0, "\n".join(lines)
  return dict(line.split(" = ", 1) for line in lines)


def test_config_help_lists_every_field_with_overrides_applied():
  fields = config_help_fields("train_dpo", "configs/dpo/tiny.py",
                              "--config.loop.on_config_mismatch=error",
                              "--config.data.pipeline.max_prompt_length=12",
                              "--config.model.remat=attention")
  assert fields["config.loop.on_config_mismatch"] == "'error'"
  assert fields["config.model.remat"] == "'attention'"
  assert fields["config.data.pipeline.max_prompt_length"] == "12"
  assert fields["config.loop.best_metric"] == "None"
  assert fields["config.data.on_bad_row"] == "'error'"
  for cls, section in ((train.LoopConfig, "loop"), (train.OptimizerConfig, "optimizer"),
                       (pipeline_lib.PipelineConfig, "data.pipeline")):
    for field in dataclasses.fields(cls):
      assert f"config.{section}.{field.name}" in fields, (section, field.name)


def test_optional_fields_are_set_back_to_none_from_the_command_line():
  """ml_collections parsed ``=None`` with ``int()``: a config's ``max_prompt_length=48`` or
  the default ``pad_to_multiple=64`` could not be set back to None (max_length // 2; pad
  to the bucket length)."""
  fields = config_help_fields("train_rm", "configs/rm/pandalm_ties.py",
                              "--config.data.pipeline.max_prompt_length=None",
                              "--config.data.pipeline.pad_to_multiple=None",
                              "--config.data.pipeline.num_epochs=3",
                              "--config.loop.best_metric=eval/accuracy")
  assert fields["config.data.pipeline.max_prompt_length"] == "None"
  assert fields["config.data.pipeline.pad_to_multiple"] == "None"
  assert fields["config.data.pipeline.num_epochs"] == "3"  # a placeholder takes a number
  assert fields["config.loop.best_metric"] == "'eval/accuracy'"


@pytest.mark.parametrize("override, expected", [
    ("--config.loop.log_every=None", "--config.loop.log_every=None: this field takes a number"),
    # A field another refers to (total_steps = num_steps) is a reference too: its
    # dataclass refuses None, still before the workdir.
    ("--config.loop.num_steps=None", "LoopConfig.num_steps cannot be None (type int)"),
    ("--config.optimizer.learning_rate=None", "--config.optimizer.learning_rate=None: this "
                                              "field takes a number")])
def test_none_for_a_field_that_takes_a_number_is_one_line(override, expected, tmp_path):
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py",
                           f"--workdir={tmp_path / 'w'}", override)
  assert_short_error(code, lines, expected)
  assert not (tmp_path / "w").exists()


def test_sections_hold_optional_fields_as_typed_placeholders():
  c = configlib.section(pipeline_lib.PipelineConfig, max_prompt_length=48)
  assert configlib.may_be_none(c, "max_prompt_length") and configlib.may_be_none(
      c, "pad_to_multiple")
  assert not configlib.may_be_none(c, "batch_size")
  c.max_prompt_length, c.pad_to_multiple = None, None
  assert pipeline_lib.PipelineConfig.from_mapping(c).pad_to_multiple is None
  with pytest.raises(TypeError):  # still typed
    c.pad_to_multiple = "64"
  c.batch_size = None  # ml_collections lets any field take None; the dataclass does not
  with pytest.raises(configlib.ConfigError, match="PipelineConfig.batch_size cannot be None"):
    pipeline_lib.PipelineConfig.from_mapping(c)


def test_unknown_direct_loss_lists_every_registered_loss(tmp_path):
  code, lines = run_binary("train_dpo", "--config=configs/dpo/tiny.py",
                           f"--workdir={tmp_path / 'w'}", "--config.loss.name=nope")
  text = assert_short_error(code, lines, "unknown direct loss 'nope'", "'kto'")
  for name in registry.DIRECT_LOSS_SPECS:
    assert f"'{name}'" in text, name


@pytest.mark.parametrize("binary,override,message", [
    ("train_dpo", "--config.loop.num_steps=-5", "loop.num_steps=-5 must be >= 1"),
    ("train_rm", "--config.loop.accum_steps=0", "loop.accum_steps=0 must be >= 1"),
    ("train_rm", "--config.optimizer.learning_rate=inf", "optimizer.learning_rate=inf must be finite"),
    ("train_rm", "--config.optimizer.grad_clip_norm=nan", "optimizer.grad_clip_norm=nan must be finite"),
    ("train_rm", "--config.optimizer.schedule=cosin", "optimizer.schedule='cosin'; expected one "
                                                     "of ('constant', 'linear', 'cosine')"),
    # Refused after the data scan and tokenization, naming no field:
    ("train_rm", "--config.model.remat=atention", "model.remat: remat must be True, False, "
                                                  "'none' or one of"),
    # Refused after creating the workdir's logs and records:
    ("train_rl", "--config.rl.algorithm=grpo", "rl.algorithm='grpo' is not one of ('ppo', "),
    ("best_of_n", "--config.bon.num_samples=1", "bon.num_samples=1 must be >= 2"),
    # Refused at the first eval, after training, naming no field:
    ("train_dpo", "--config.eval.kl_max_new_tokens=-1", "eval.kl_max_new_tokens=-1 must be >= 0"),
    ("train_rm", "--config.eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
])
def test_a_bad_loop_or_optimizer_setting_fails_before_the_workdir(binary, override, message,
                                                                 tmp_path):
  """These used to fail after data and model (num_steps), or train on: an infinite rate into
  NaN parameters, a NaN clip norm without clipping."""
  config = BINARIES.get(binary, {"train_rl": "configs/rl/tiny_rloo.py",
                                 "best_of_n": "configs/bon/tiny.py"}.get(binary))
  code, lines = run_binary(binary, f"--config={config}", f"--workdir={tmp_path / 'w'}", override)
  assert_short_error(code, lines, message)
  assert not (tmp_path / "w").exists()


def test_a_workdir_that_is_a_file_is_named_as_such(tmp_path):
  (tmp_path / "afile").write_text("x")
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py",
                           f"--workdir={tmp_path / 'afile'}")
  assert_short_error(code, lines, f"--workdir={tmp_path / 'afile'} is a file, not a directory")


def test_unknown_reward_loss_fails_before_data_and_lists_every_loss(tmp_path):
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py",
                           f"--workdir={tmp_path / 'w'}", "--config.loss.name=nope")
  text = assert_short_error(code, lines, "unknown preference loss 'nope'")
  for name in preference.PREFERENCE_LOSSES:
    assert f"'{name}'" in text, name
  assert "data " not in text  # No split was loaded.


def test_verbose_errors_keeps_the_traceback(tmp_path):
  code, lines = run_binary("train_dpo", "--config=configs/dpo/tiny.py",
                           f"--workdir={tmp_path / 'w'}", "--config.loss.name=nope",
                           "--verbose_errors")
  text = "\n".join(lines)
  assert code == 1, text
  assert "Traceback" in text and "unknown direct loss 'nope'" in text


def test_verbose_errors_from_the_environment_reads_off_words_as_off(monkeypatch):
  """PREFJAX_VERBOSE_ERRORS=false turned tracebacks on: only "" and "0" counted as off."""
  from prefjax import cli  # pylint: disable=import-outside-toplevel
  for word, on in (("false", False), (" No ", False), ("off", False), ("0", False),
                   ("1", True), ("true", True)):
    monkeypatch.setenv("PREFJAX_VERBOSE_ERRORS", word)
    assert cli.verbose_errors() is on, word


def test_bad_row_error_names_the_row_and_the_skip_flag(tmp_path, monkeypatch):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                 '{"prompt": "a", "chosen": "b"}\n')
  monkeypatch.setenv("PREFJAX_CACHE_DIR", str(tmp_path / "cache"))
  # Built once here, so the run's output is the error (a first build logs two more lines).
  assert len(sources.load_preferences(f"jsonl:{bad}", "train", on_bad_row="skip")) == 1
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py",
                           f"--workdir={tmp_path / 'w'}", f"--config.data.name=jsonl:{bad}",
                           "--config.data.train_split=train")
  assert_short_error(code, lines, "BadRowError", f"{bad}:2: missing_field",
                     "--config.data.on_bad_row=skip")


@pytest.mark.parametrize("module", [rm_tiny, hh_minilm, pandalm_ties, dpo_tiny, smollm2_hh,
                                    sft_tiny], ids=lambda m: m.__name__)
def test_shipped_configs_declare_every_documented_field(module):
  config = module.get_config()
  keys = {key for key, _ in configlib.flat_items(config)}
  for cls, section in ((train.LoopConfig, "loop"), (train.OptimizerConfig, "optimizer"),
                       (pipeline_lib.PipelineConfig, "data.pipeline")):
    missing = [f.name for f in dataclasses.fields(cls)
               if f"config.{section}.{f.name}" not in keys]
    assert not missing, (section, missing)
  for name in ("data.name", "data.train_split", "data.eval_split", "data.on_bad_row",
               "data.cache_dir", "data.tiny_world.num_pairs", "mesh.num_devices",
               "model.remat", "model.scan_layers"):
    assert f"config.{name}" in keys, name


@pytest.mark.parametrize("module", [rm_tiny, hh_minilm, pandalm_ties, dpo_tiny, smollm2_hh,
                                    sft_tiny], ids=lambda m: m.__name__)
@pytest.mark.parametrize("variant", [None, "quick"])
def test_a_decaying_schedule_ends_where_the_run_ends(module, variant):
  """Setting loop.num_steps (as --config.loop.num_steps does) moves optimizer.total_steps."""
  config = module.get_config(variant)
  assert config.optimizer.schedule == "constant" or (
      config.optimizer.total_steps == config.loop.num_steps)
  config.loop.num_steps = 1234
  assert config.optimizer.schedule == "constant" or config.optimizer.total_steps == 1234
  # Setting total_steps itself leaves the run's length alone (a shared reference moved it).
  config.optimizer.total_steps = 99
  assert (config.loop.num_steps, config.optimizer.total_steps) == (1234, 99)


@pytest.mark.parametrize("module", [tiny_ppo, tiny_rloo, smollm2_rloo],
                         ids=lambda m: m.__name__)
def test_rl_configs_declare_the_loop_options_train_rl_honours(module):
  config = module.get_config()
  loop = train.LoopConfig.from_mapping(config.loop)
  assert loop.on_config_mismatch == "warn" and loop.keep_checkpoints == 2
  keys = {key for key, _ in configlib.flat_items(config)}
  assert {"config.model.remat", "config.model.scan_layers", "config.proxy.reference_prompts",
          "config.proxy.reference_samples_per_prompt"} <= keys
  missing = [f.name for f in dataclasses.fields(train.OptimizerConfig)
             if f"config.optimizer.{f.name}" not in keys]
  assert not missing


def test_check_key_path_messages():
  config = rm_tiny.get_config()
  configlib.check_key_path(config, "data.pipeline.max_prompt_length")
  with pytest.raises(configlib.ConfigError,
                     match=r"config.data.pipeline: unknown field\(s\) \['batch_sise'\] "
                           r"\(did you mean batch_size\?\); known: \['add_bos'"):
    configlib.check_key_path(config, "data.pipeline.batch_sise")
  with pytest.raises(configlib.ConfigError, match=r"config.seed is a value \(int\), not a "
                                                  r"section: cannot set config.seed.x"):
    configlib.check_key_path(config, "seed.x")
  # A field of another section is named; an empty dict field is set whole.
  with pytest.raises(configlib.ConfigError, match=r"\(config.optimizer.warmup_steps exists\)"):
    configlib.check_key_path(config, "loop.warmup_steps")
  from configs.eval import tiny as eval_tiny  # pylint: disable=import-outside-toplevel
  with pytest.raises(configlib.ConfigError, match=r"config.pipeline is an empty dict: set it "
                                                  r"whole, --config.pipeline='\{\"add_bos\""):
    configlib.check_key_path(eval_tiny.get_config(), "pipeline.add_bos")


def test_section_declares_defaults_and_typed_placeholders():
  loop = configlib.section(train.LoopConfig, num_steps=7)
  assert loop.num_steps == 7 and loop.keep_checkpoints == 3 and loop.best_metric is None
  loop.best_metric = "accuracy"  # A placeholder typed str accepts a string ...
  with pytest.raises(TypeError):
    loop.keep_checkpoints = "three"  # ... and typed fields reject other types.
  assert train.LoopConfig.from_mapping(loop).best_metric == "accuracy"
  with pytest.raises(configlib.ConfigError, match=r"LoopConfig.num_steps has no default"):
    configlib.section(train.LoopConfig)
  with pytest.raises(configlib.ConfigError, match=r"did you mean log_every"):
    configlib.section(train.LoopConfig, num_steps=1, log_evry=5)


def test_best_mode_follows_the_metric_name_unless_given():
  assert train.best_mode_for("accuracy") == "max"
  assert train.best_mode_for("eval/length_baseline_accuracy") == "max"
  assert train.best_mode_for("bt_log_loss") == "min"
  assert train.best_mode_for("rewards/accuracies") == "max"  # train_dpo's held-out accuracy
  assert train.best_mode_for("neg_mse") == "max"
  assert train.best_mode_for("accuracy", "min") == "min"  # given: kept
  assert train.LoopConfig(num_steps=1, best_metric="win_rate").best_mode == "max"
  assert train.LoopConfig(num_steps=1, best_metric="kl").best_mode == "min"
  assert train.LoopConfig(num_steps=1).best_mode is None
  with pytest.raises(configlib.ConfigError, match=r"best_metric='score': set loop.best_mode"):
    train.LoopConfig(num_steps=1, best_metric="score")
  # A typo is named as one (it sent a fresh user to set best_mode, then failed at the
  # first eval with every step since the start lost).
  with pytest.raises(configlib.ConfigError, match=r"best_metric='eval/acuracy': a typo of "
                                                  r"'accuracy'\? Else set loop.best_mode"):
    train.LoopConfig(num_steps=1, best_metric="eval/acuracy")
  with pytest.raises(configlib.ConfigError, match=r"best_mode='high'"):
    train.LoopConfig(num_steps=1, best_metric="accuracy", best_mode="high")


def test_on_config_mismatch_error_set_from_the_command_line_stops_a_changed_rerun(tmp_path):
  config = rm_tiny.get_config("quick")
  config.loop.on_config_mismatch = "error"
  config.data.tiny_world.num_pairs = 200
  config.eval.enabled = False
  started_with = summary_lib.config_to_dict(config)
  started_with["seed"] = 1
  started_with["loop"]["on_config_mismatch"] = "warn"  # The policy itself is not compared.
  workdir = tmp_path / "w"
  workdir.mkdir()
  summary_lib.write_json(str(workdir / "config.json"), started_with)
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py:quick",
                           f"--workdir={workdir}", "--config.loop.on_config_mismatch=error",
                           "--config.data.tiny_world.num_pairs=200", "--config.eval.enabled=False")
  text = "\n".join(lines)
  assert code == 1, text
  assert "error: ConfigMismatchError: config differs" in text, text
  assert '-  "seed": 1,' in text and '+  "seed": 0,' in text, text
  assert "Traceback" not in text
  assert not (workdir / "summary.json").exists()


def test_a_misspelt_dataset_name_is_refused_before_the_workdir_with_the_closest():
  """The list of known datasets left out tiny_world, every tiny config's default, and the
  failed run had already written its workdir."""
  from prefjax import experiment  # pylint: disable=import-outside-toplevel
  config = dpo_tiny.get_config("quick")
  config.data.name = "tiny_wrold"
  with pytest.raises(configlib.ConfigError, match=r"config.data.name: unknown preference "
                                                  r"dataset 'tiny_wrold' \(did you mean "
                                                  r"'tiny_world'\?\); known: \['tiny_world'"):
    experiment.check_before_the_workdir(config)
  for name in ("tiny_world", "hh_rlhf/harmless-base", "pandalm", "jsonl:/x.jsonl"):
    config.data.name = name
    experiment.check_before_the_workdir(config)


def test_the_demo_s_quick_stages_share_no_folder_with_the_full_ones(monkeypatch, tmp_path):
  """A full run after --quick in one workdir resumed the quick RM past its finished
  schedule and reported the mix as configs/rm/tiny.py's run (a helper's review)."""
  from experiments import demo  # pylint: disable=import-outside-toplevel
  ran, summary = [], {"n": [1], "proxy": [0.0], "gold": [0.0], "gold_se": [0.0]}
  for name in ("train_rm", "best_of_n", "train_rl"):
    monkeypatch.setattr(getattr(demo, name), "run",
                        lambda config, path: ran.append(os.path.basename(path)) or summary)
  monkeypatch.setattr(demo, "report", lambda *a: "")
  monkeypatch.setattr(demo.summary_lib, "write_json", lambda *a: None)
  for quick in (True, False):
    demo.run(str(tmp_path), quick=quick)
  assert ran == ["rm_quick", "bon_quick", "rl_quick", "rm", "bon", "rl"]


def test_setting_the_mismatch_policy_on_a_rerun_is_not_a_mismatch(tmp_path):
  config = {"seed": 0, "loop": {"num_steps": 5, "on_config_mismatch": "warn"}}
  summary_lib.write_or_check_config(str(tmp_path), config)
  strict = {"seed": 0, "loop": {"num_steps": 5, "on_config_mismatch": "error"}}
  assert summary_lib.write_or_check_config(str(tmp_path), strict, on_mismatch="error") == strict
  longer = {"seed": 0, "loop": {"num_steps": 6, "on_config_mismatch": "error"}}
  with pytest.raises(summary_lib.ConfigMismatchError, match=r'\+    "num_steps": 6'):
    summary_lib.write_or_check_config(str(tmp_path), longer, on_mismatch="error")
  assert not (tmp_path / "config.rerun.json").exists()


def test_pairwise_loss_lookup_names_unpaired_losses_too():
  with pytest.raises(KeyError, match=r"unknown direct loss 'nope'; registered: \[.*'dpo'.*\] "
                                     r"\(pairwise\) and \['kto'\] \(unpaired"):
    direct.get_direct_loss("nope")
  with pytest.raises(KeyError, match=r"direct loss 'kto' is unpaired"):
    direct.get_direct_loss("kto")


def test_binary_logs_drop_orbax_detail_and_its_read_only_notice_but_keep_its_warnings():
  def record(path, level, msg):
    return logging.LogRecord("absl", level, path, 1, msg, ("/w",), None)
  quiet = common._QuietLibraries()
  orbax = f"{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint{os.sep}checkpoint_manager.py"
  assert not quiet.filter(record(orbax, logging.INFO, "Saving checkpoint at step %s"))
  assert not quiet.filter(record(orbax, logging.WARNING, "Given directory is read only=%s"))
  assert quiet.filter(record(orbax, logging.WARNING, "Could not finalize %s"))
  assert quiet.filter(record(f"{os.sep}prefjax{os.sep}train{os.sep}loop.py", logging.INFO, "x"))
  bridge = f"{os.sep}site-packages{os.sep}jax{os.sep}_src{os.sep}xla_bridge.py"
  assert not quiet.filter(record(bridge, logging.INFO, "Unable to initialize backend 'tpu'"))
  assert quiet.filter(record(bridge, logging.WARNING, "An NVIDIA GPU may be present"))
  x2num = f"{os.sep}site-packages{os.sep}tensorboardX{os.sep}x2num.py"
  assert not quiet.filter(record(x2num, logging.WARNING, "NaN or Inf found in input tensor."))
  assert quiet.filter(record(x2num, logging.WARNING, "something else"))


def test_work_that_does_not_split_over_processes_refuses_several(monkeypatch, tmp_path):
  """Each process would redo it all or report its own rows as the whole (train_safety chose
  its threshold from one process's scores; eval_rm stopped with an AssertionError)."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs.eval import tiny as eval_tiny  # pylint: disable=import-outside-toplevel
  from experiments import best_of_n, eval_rm, train_rl  # pylint: disable=import-outside-toplevel
  from configs.bon import tiny as bon_tiny  # pylint: disable=import-outside-toplevel
  from prefjax import experiment  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  for run, config, what in [(eval_rm.run, eval_tiny.get_config(), "eval_rm"),
                            (best_of_n.run, bon_tiny.get_config(), "best_of_n"),
                            (train_rl.run, tiny_rloo.get_config(), "train_rl")]:
    with pytest.raises(configlib.ConfigError, match=rf"{what}.* runs in one process; this "
                                                    r"job has 2"):
      run(config, str(tmp_path / what))
  with pytest.raises(configlib.ConfigError, match=r"a run without config.mesh.shape runs in "
                                                  r"one process"):
    experiment.make_optional_mesh({"mesh": {"shape": ()}})
  with pytest.raises(configlib.ConfigError, match=r"an empty config.mesh.shape runs in one "
                                                  r"process"):
    experiment.make_mesh({"shape": ()})
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  # train_rm and train_safety build a mesh: an empty shape is one device, as elsewhere
  # (it stopped with "mesh config shape () must have 3 entries").
  mesh = experiment.make_mesh({"shape": ()})
  assert mesh.devices.size == 1 and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def _config_modules():
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  return [f"configs.{path.parent.name}.{path.stem}" for path in root.glob("*/*.py")
          if not path.name.startswith("_")]


@pytest.mark.parametrize("name", sorted(_config_modules()))
def test_every_config_refuses_a_variant_it_does_not_have(name):
  """configs/rm/pandalm_ties.py passed any variant on to hh_minilm's, so ':cls' built an
  undocumented model and a typo was answered with hh_minilm's variants."""
  import importlib
  import re
  module = importlib.import_module(name)
  with pytest.raises(ValueError, match=r"'bogus'") as refused:
    module.get_config("bogus")
  message = str(refused.value)
  if "configs/" in message:  # a file it names is its own
    assert name.replace(".", "/") + ".py" in message, message
  if "has none" in message:
    return
  listed = re.split(r"known:|expected|use", message)[-1]
  variants = set(re.findall(r"\w+", listed)) - {"none", "or"}
  assert variants, message
  for variant in variants:  # the variants it names are its own, documented in its header
    assert f":{variant}" in module.__doc__, (name, variant)
    module.get_config(variant)


def test_model_switches_read_the_strings_of_a_dict_spec_as_booleans():
  """A reward spec built in code with scan_layers="False" scanned its blocks (bool("False"))."""
  from prefjax import experiment
  assert experiment.model_switches({"scan_layers": "False", "remat": "none"}) == {
      "remat": None, "scan_layers": False}
  assert experiment.model_switches({"scan_layers": "True", "remat": True}) == {
      "remat": "full", "scan_layers": True}
  with pytest.raises(ValueError, match=r"proxy.model.scan_layers must be True or False, got 2"):
    experiment.model_switches({"scan_layers": 2}, "proxy.model")


def test_another_binarys_config_is_one_line_naming_the_missing_section(tmp_path):
  """Three chained tracebacks ending in AttributeError: "'safety'"."""
  code, lines = run_binary("train_safety", "--config=configs/rm/tiny.py:quick",
                           f"--workdir={tmp_path / 'w'}")
  assert_short_error(code, lines, "the config has no field 'safety' that this binary reads")
