r"""Reward-model scoring throughput of ``eval_rm``'s scorers (pairs/s, tokenization included).

  python -m benchmarks.rm_scoring_throughput --scorer=minilm=hf:asset:minilm \
      --dataset=hh_rlhf/harmless-base@test --out=/tmp/rm_scoring.json

Uses ``configs/eval/hh_minilm.py`` (HH lengths: prompt 32 tokens, prompt+response 80,
batches of 32 pairs, buckets 48/80) unless ``--max_length`` etc. say otherwise. The
scorer is any ``eval_rm`` spec (``rm:WORKDIR`` for a trained run; ``hf:asset:minilm`` is
the same MiniLM trunk with a fresh head, so the same compute). One untimed pass
compiles every bucket shape; the timed passes then score the whole split.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from configs.eval import hh_minilm
from prefjax import files
from prefjax import experiment
from prefjax.evals import reward_eval
from prefjax.evals import scorers as scorers_lib


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scorer", default="minilm=hf:asset:minilm")
  parser.add_argument("--dataset", default="hh_rlhf/harmless-base@test")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--max_length", type=int, default=80)
  parser.add_argument("--max_prompt_length", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  config = hh_minilm.get_config()
  config.batch_size = args.batch_size
  config.hf_pooling = "mean"
  config.pipeline = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                         bucket_boundaries=(48,))
  dataset = reward_eval.load_dataset(args.dataset, config)
  scorer = scorers_lib.make_scorer(scorers_lib.ScorerSpec.parse(args.scorer), config,
                                   experiment.make_optional_mesh(config))
  start = time.perf_counter()
  scored = scorer(dataset.source, dataset.label)
  first = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    scorer(dataset.source, dataset.label)
    times.append(time.perf_counter() - start)
  pairs = int(scored.index.size)
  result = {"scorer": args.scorer, "dataset": dataset.label, "pairs": pairs,
            "batch_size": args.batch_size, "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length, "devices": jax.device_count(),
            "backend": jax.default_backend(), "first_pass_s": first,
            "pass_s": times, "pairs_per_s": pairs / statistics.median(times)}
  print(f"| {args.scorer} | {dataset.label} | {pairs} | {jax.default_backend()} | "
        f"{result['pairs_per_s']:.1f} pairs/s | first pass (compiling) {first:.1f} s |")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(files.dumps(result, indent=2))


if __name__ == "__main__":
  main()
