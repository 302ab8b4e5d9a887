r"""The tiny-world control behind `make demo-tiny-world`: a planted exploit, on CPU.

COMMAND:
  python -m experiments.demo --workdir=workdirs/demo_tiny_world [--quick]

``--quick`` runs each stage's ``:quick`` variant (a smoke test, not the numbers below) in
folders of its own (``rm_quick``, …), so a later full run in the same workdir starts afresh.

`make demo` runs the overoptimization study (``experiments/reproduce.py``); this is the
smaller end-to-end control beside it, where the proxy's flaw is known. Three stages,
each a real binary run in its own sub-workdir (so a rerun resumes / reuses finished
stages):

  1. ``train_rm``   configs/rm/tiny.py     a reward model learned from gold-labelled pairs
  2. ``best_of_n``  configs/bon/tiny.py    best-of-n against a proxy = gold + planted exploit
  3. ``train_rl``   configs/rl/tiny_rloo.py RLOO with a KL penalty against the same proxy,
                                           gold and proxy scored on the same samples

It writes ``report.md`` / ``report.json`` and copies the figures into
``WORKDIR/figures``. Expected runtime: 1 min 31 s wall (66 s of CPU time) on the 2-core
Intel Xeon on 2026-12-06 (after the sampler fix, 1fc2d9a) at load average ~8 with JAX's
compilation cache warm; 2 min 53 s on 2026-12-05 with other jobs running.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

from configs.bon import tiny as bon_config
from configs.rl import tiny_rloo as rloo_config
from configs.rm import tiny as rm_config
from experiments import best_of_n
from experiments import common
from experiments import preemption
from experiments import train_rl
from experiments import train_rm
from prefjax import experiment
from prefjax import train
from prefjax.train import summary as summary_lib

_QUICK = flags.DEFINE_bool("quick", False, "Use the :quick variant of every stage.")


def _stage(name: str, fn: Callable[[Any, str], Any], config: Any, workdir: str) -> Any:
  stage_dir = os.path.join(workdir, name)
  logging.info("demo stage %s -> %s", name, stage_dir)
  start = time.time()
  result = fn(config, stage_dir)
  if preemption.was_preempted(result):  # Saved; the next stages need this one finished.
    raise preemption.Preempted()
  logging.info("demo stage %s done in %.1f s", name, time.time() - start)
  return result


def stage_names(quick: bool) -> dict[str, str]:
  """Each stage's folder: ``--quick`` runs in folders of their own, so that a full run in
  the same workdir neither resumes a quick run's checkpoints nor reports them as its own."""
  return {stage: stage + "_quick" * quick for stage in ("rm", "bon", "rl")}


def _copy_figures(workdir: str, folders: dict[str, str]) -> list[str]:
  out = os.path.join(workdir, "figures")
  os.makedirs(out, exist_ok=True)
  copied = []
  for stage, folder in folders.items():
    fig_dir = os.path.join(workdir, folder, "figures")
    if not os.path.isdir(fig_dir):
      continue
    for fname in sorted(os.listdir(fig_dir)):
      if fname.endswith(".png"):
        shutil.copy(os.path.join(fig_dir, fname), os.path.join(out, f"{stage}_{fname}"))
        copied.append(f"figures/{stage}_{fname}")
  return copied


def _kl(record: dict[str, Any]) -> float:
  """Exact KL (tiny vocabularies) when logged, else the configured estimator."""
  return record.get("kl/exact", record.get("kl", float("nan")))


def _rl_sentence(rl: dict[str, Any]) -> str:
  peak, final = rl["peak_gold"], rl["final"]
  text = (f"proxy gain {rl['proxy_gain']:+.3f}; gold rises by {rl['gold_gain_at_peak']:+.3f} to "
          f"its peak at step {peak['step']} (KL {_kl(peak):.2f} nats)")
  # Each eval samples afresh, so the two are independent; the peak is the curve's own
  # maximum, which biases the comparison towards a drop: this sentence describes, the
  # study's criteria (``experiments.reproduce``) test.
  drop = rl["gold_drop_after_peak"]
  se = math.hypot(peak.get("gold_se", math.nan), final.get("gold_se", math.nan))
  if drop > 2 * se:
    return (text + f", then falls by {drop:.3f} ({drop / se:.1f} SE of the difference of the "
            f"two evaluations) by step {final['step']} (KL {_kl(final):.2f} nats): the proxy "
            "keeps rising while the gold peaks and falls (a description: the peak is the "
            "curve's own maximum, so this is not a test).")
  return text + (f"; by step {final['step']} it has not fallen by more than 2 SE of the "
                 "difference (run longer, or use the full config, to see the decline).")


def report(rm: dict[str, Any], bon: dict[str, Any], rl: dict[str, Any],
           figures: list[str]) -> str:
  ev = rm.get("eval") or {}
  peak = max(range(len(bon["gold"])), key=lambda i: bon["gold"][i])
  lines = [
      "# prefjax demo: tiny-world reward overoptimization", "",
      "The tiny-world control beside the overoptimization study of `make demo` "
      "(a Gao et al. 2022 / Coste et al. 2023 reproduction). Everything runs on CPU "
      "with a tiny byte-level decoder on a synthetic text world whose gold reward is a "
      "program; the proxy adds a planted feature that the gold penalises.", "",
      "## 1. Reward model (configs/rm/tiny.py)", "",
      f"validation accuracy {ev.get('accuracy', float('nan')):.3f}, "
      f"BT log-loss {ev.get('bt_log_loss', float('nan')):.3f}, "
      f"ECE {ev.get('ece', float('nan')):.3f}, "
      f"length-only baseline {ev.get('length_baseline_accuracy', float('nan')):.3f}", "",
      "## 2. Best-of-n against the planted proxy (configs/bon/tiny.py)", "",
      f"n = 1 … {bon['n'][-1]}: proxy {bon['proxy'][0]:+.3f} → {bon['proxy'][-1]:+.3f}; gold "
      f"peaks at n = {bon['n'][peak]} ({bon['gold'][peak]:+.3f} ± {bon['gold_se'][peak]:.3f}) "
      f"and is {bon['gold'][-1]:+.3f} ± {bon['gold_se'][-1]:.3f} at n = {bon['n'][-1]}.", "",
      "## 3. RLOO with a KL penalty against the planted proxy (configs/rl/tiny_rloo.py)", "",
      _rl_sentence(rl), "",
  ]
  lines += [f"![{f}]({f})" for f in figures]
  return "\n".join(lines) + "\n"


def run(workdir: str, quick: bool = False) -> dict[str, Any]:
  experiment.require_one_process("experiments.demo")
  arg, folders = "quick" if quick else None, stage_names(quick)
  rm = _stage(folders["rm"], train_rm.run, rm_config.get_config(arg), workdir)
  bon = _stage(folders["bon"], best_of_n.run, bon_config.get_config(arg), workdir)
  rl = _stage(folders["rl"], train_rl.run, rloo_config.get_config(arg), workdir)
  figures = _copy_figures(workdir, folders)
  text = report(rm, bon, rl, figures)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  summary = {"rm_eval": rm.get("eval"), "bon": {k: bon[k] for k in ("n", "proxy", "gold", "gold_se")},
             "rl": rl}
  summary_lib.write_json(os.path.join(workdir, "report.json"), summary)
  print(text)
  return summary


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected positional arguments: {argv[1:]}")
  workdir = common.prepare_workdir(flags.FLAGS.workdir)
  with train.hold_workdir(workdir):  # its report; each stage holds its own sub-workdir
    common.start_logs(workdir)
    common.record_invocation(workdir)  # runs.jsonl: the command, commit and versions
    run(workdir, quick=_QUICK.value)


if __name__ == "__main__":
  if "workdir" not in flags.FLAGS:
    # Not workdirs/demo: that is `make demo`'s study, whose report this would replace.
    flags.DEFINE_string("workdir", "workdirs/demo_tiny_world",
                        "Output directory; a rerun resumes.")
  app.run(common.report_errors(main))
