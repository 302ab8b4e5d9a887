"""Binaries and their workdirs: one binary per workdir, the lock held to the last write, a
failed start that leaves the workdir to the next binary, Ctrl-C and the "Next:" commands."""

import os
import subprocess
import sys

from experiments import common
from prefjax.train import summary as summary_lib
from tests.test_config_errors import REPO, assert_short_error, run_binary


def test_a_workdir_another_run_holds_is_one_line(tmp_path):
  from prefjax import files  # pylint: disable=import-outside-toplevel
  with files.exclusive(tmp_path):  # the live run
    code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py:quick",
                             f"--workdir={tmp_path}", "--config.data.tiny_world.num_pairs=200",
                             "--config.eval.enabled=False")
  text = "\n".join(lines)  # the run's progress lines, then the error in one line
  assert code == 1 and "Traceback" not in text, text
  assert lines[-1].startswith(f"error: WorkdirBusyError: {tmp_path} is in use by another "
                              "run"), text
  assert not (tmp_path / "logs").exists()  # the live run's logs/log.INFO is left alone


def test_a_url_workdir_is_one_line_before_anything_runs(tmp_path):
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py:quick",
                           f"--workdir=gs://{tmp_path.name}/run")
  assert_short_error(code, lines, "--workdir=gs://", "workdirs are local paths")
  assert not (REPO / "gs:").exists()


def test_a_binary_holds_its_workdir_until_its_last_write(tmp_path):
  """The lock covered only the training loop: a second run could start while the first
  still exported its model or wrote its report."""
  probe = ("from absl import app\n"
           "from experiments import common\n"
           "from prefjax import files\n"
           "def run(config, workdir):\n"
           "  try:\n"
           "    with files.exclusive(workdir):\n"
           "      print('lock: free')\n"
           "  except files.WorkdirBusyError:\n"
           "    print('lock: held')\n"
           "common.define_flags()\n"
           "app.run(common.main_for(run))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", probe, "--config=configs/rm/tiny.py",
                         f"--workdir={tmp_path}"], cwd=REPO, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
  assert proc.returncode == 0, proc.stdout
  assert "lock: held" in proc.stdout.splitlines(), proc.stdout


def test_a_binary_refuses_a_workdir_another_binary_started(tmp_path):
  """eval_rm given the RM run it scores as its workdir replaced the run's config.json with
  its own, with only a warning (a fresh user's slip); it now stops before writing."""
  summary_lib.append_run_record(str(tmp_path), {"argv": [str(REPO / "experiments/train_rm.py")]})
  with open(tmp_path / summary_lib.RUNS_FILE, "a", encoding="utf-8") as f:
    f.write('{"argv": ["/x/experiments/train_rm.py"], "ti')  # a record a full disk cut
  (tmp_path / "config.json").write_text('{"loop": {}}')
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "experiments.eval_rm",
                         "--config=configs/eval/tiny.py", f"--workdir={tmp_path}"],
                        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, timeout=300)
  assert proc.returncode == 1, proc.stdout
  assert (f"error: ConfigError: --workdir={tmp_path} holds a run of experiments.train_rm: "
          "experiments.eval_rm would replace its config.json and outputs; use another "
          "--workdir") in proc.stdout
  assert (tmp_path / "config.json").read_text() == '{"loop": {}}'
  assert len(summary_lib.read_run_records(str(tmp_path), skip_bad=True)) == 1


def test_a_workdir_whose_other_binary_stopped_before_writing_is_not_refused(tmp_path):
  """train_dpo given an RM config stopped on it after recording its start, and the right
  binary was then refused that workdir, which held nothing of train_dpo's but its records.
  The config's sections are now checked before the workdir; a later error of a run (a
  missing split) still leaves records only, and another binary takes the workdir."""
  workdir = tmp_path / "w"
  code, lines = run_binary("train_dpo", "--config=configs/rm/tiny.py", f"--workdir={workdir}")
  assert_short_error(code, lines, "config.eval: unknown field(s)",
                     "(is --config a train_dpo config? the shipped ones are in configs/dpo/)")
  assert not workdir.exists()
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py", f"--workdir={workdir}",
                           "--config.data.eval_split=nosuch")
  text = "\n".join(lines)  # the run's own log lines come first
  assert code == 1 and "has no split 'nosuch'" in text, text
  assert {p.name for p in workdir.iterdir()} == common.RECORDS_ONLY
  code, lines = run_binary("train_dpo", "--config=configs/dpo/tiny.py", f"--workdir={workdir}",
                           "--config.data.eval_split=nosuch")
  text = "\n".join(lines)
  assert code == 1 and "has no split 'nosuch'" in text and "holds a run of" not in text, text
  records = summary_lib.read_run_records(str(workdir))
  assert [summary_lib.binary_name(r["argv"][0]) for r in records] == [
      "experiments.train_rm", "experiments.train_dpo"]
  # From here the workdir is train_dpo's: train_rm is refused once it holds an output.
  (workdir / "config.json").write_text('{"loop": {}}')
  code, lines = run_binary("train_rm", "--config=configs/rm/tiny.py", f"--workdir={workdir}")
  assert_short_error(code, lines, "holds a run of experiments.train_dpo")


def test_next_commands_carry_the_runs_imports(tmp_path):
  """train_dpo's "Next:" eval_rm command, run as printed, failed on a loss of the user's
  own: it lacked the run's --imports."""
  probe = ("import sys\n"
           "from absl import flags\n"
           "from experiments import common\n"
           "common.define_flags()\n"
           "print('unparsed:', repr(common.imports_flag()))\n"
           "flags.FLAGS(sys.argv)\n"
           "print('parsed:', repr(common.imports_flag()))\n")
  for imports, expected in (("--imports=json,my_lab.my_losses",
                             "' --imports=json,my_lab.my_losses'"), ("--imports=", "''")):
    proc = subprocess.run([sys.executable, "-c", probe, "--config=configs/rm/tiny.py", imports],
                          cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=300)
    assert proc.stdout.splitlines()[-2:] == ["unparsed: ''", f"parsed: {expected}"], proc.stdout


def test_ctrl_c_outside_training_is_one_line_and_exit_130():
  """It was a 128-line KeyboardInterrupt traceback (while loading data, or in best_of_n's
  sampling), where SIGTERM at the same points is one line."""
  probe = ("from absl import app\n"
           "from experiments import common\n"
           "def main(argv):\n"
           "  raise KeyboardInterrupt\n"
           "common.define_flags()\n"
           "app.run(common.report_errors(main))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PREFJAX_VERBOSE_ERRORS", None)
  proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
  assert proc.returncode == common.INTERRUPTED_EXIT_CODE == 130, proc.stdout
  assert proc.stdout.strip().splitlines() == [
      "interrupted (Ctrl-C) outside training: nothing new to save; rerun with the same "
      "--workdir: it goes on from what was saved"], proc.stdout


def test_another_binarys_config_read_by_item_is_named_as_such(tmp_path):
  """eval_rm given an RM config ended in "KeyError: 'num_resamples'" (read as
  ``config[field]``); read as an attribute it was already this one line."""
  code, lines = run_binary("eval_rm", "--config=configs/rm/tiny.py", f"--workdir={tmp_path}")
  text = "\n".join(lines)
  assert code == 1 and "error: ConfigError: the config has no field 'num_resamples' that " \
      "this binary reads: is --config a config for this binary?" in text, text


def test_the_demo_records_its_command_and_holds_its_workdir(tmp_path):
  probe = ("from absl import app, flags\n"
           "from experiments import common, demo\n"
           "from prefjax import files\n"
           "def run(workdir, quick=False):\n"
           "  try:\n"
           "    with files.exclusive(workdir):\n"
           "      print('lock: free')\n"
           "  except files.WorkdirBusyError:\n"
           "    print('lock: held', quick)\n"
           "demo.run = run\n"
           "flags.DEFINE_string('workdir', None, '')\n"
           "app.run(common.report_errors(demo.main))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", probe, f"--workdir={tmp_path}", "--quick"],
                        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, timeout=300)
  assert proc.returncode == 0 and "lock: held True" in proc.stdout.splitlines(), proc.stdout
  (record,) = summary_lib.read_run_records(str(tmp_path))
  assert record["argv"][1:] == [f"--workdir={tmp_path}", "--quick"] and record["imports"] == []
