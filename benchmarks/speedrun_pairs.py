"""The speedrun's headline ratio, measured in pairs: the demo's adopted recipe vs the baseline.

Why: `bench_speedrun.py` runs its rows one after another, minutes apart, and on this shared
2-core machine the speed of the same training step drifts by up to ~30% over minutes (measured:
the same B=8 step at 45 ms in one minute, 62-65 ms a few minutes later). A ratio between a row
at minute 1 and a row at minute 12 carries that drift. Here the baseline (`bench_speedrun`'s row
0: the demo's original recipe) and the record (`minitrain.demo.SPEEDRUN_RECIPE` on all cores,
what `make demo` now trains) run back to back, B R B R ..., each in a fresh process, and every
pair gives its own ratio record / baseline: drift slower than one pair (~2.5 min) cancels.

The same measuring stick as the table (`bench_speedrun.run_row`): time from the start of
train() to the first evaluation <= 2.01 on the demo's fixed evaluation batches, evaluation time
excluded, with the same checks (same data split, same evaluation batches).

Writes outputs/bench/speedrun_pairs.md and .json.

    python benchmarks/speedrun_pairs.py [--pairs 3]
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

from benchmarks.bench_speedrun import (TARGET, TARGET_SPEEDUP, baseline_recipe, demo_recipe, run_row_process,
                                       validate_row)
from benchmarks.harness import machine_metadata, write_report
from minitrain.demo import SPEEDRUN_RECIPE
from minitrain.style import outputs_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="baseline/record pairs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be >= 1")
    base = baseline_recipe()
    record = demo_recipe(SPEEDRUN_RECIPE, threads=os.cpu_count() or 1)  # what `make demo` runs
    pairs, reference, t0 = [], None, time.perf_counter()
    with tempfile.TemporaryDirectory(dir=outputs_dir()) as tmp:
        for i in range(args.pairs):
            got = {}
            for name, recipe in (("baseline", base), ("record", record)):
                row = run_row_process(recipe, TARGET, tmp, args.timeout)
                reference = reference or row
                problem = validate_row(row, reference)
                if problem or not row["reached"]:
                    raise SystemExit(f"pair {i} {name}: {problem or 'target not reached'}")
                got[name] = row
            pair = {"pair": i, "baseline_s": got["baseline"]["time_to_loss_s"],
                    "record_s": got["record"]["time_to_loss_s"],
                    "baseline_tokens": got["baseline"]["tokens"],
                    "record_tokens": got["record"]["tokens"]}
            pair["ratio"] = pair["record_s"] / pair["baseline_s"]
            pairs.append(pair)
            print(f"pair {i}: baseline {pair['baseline_s']:.1f} s, record {pair['record_s']:.1f} s"
                  f", ratio {pair['ratio']:.3f}", flush=True)
    meta = machine_metadata()
    ratios = [p["ratio"] for p in pairs]
    met = all(r <= TARGET_SPEEDUP for r in ratios)
    lines = ["# Speedrun in pairs: the demo's recipe vs the original one", "",
             f"Made by `python benchmarks/speedrun_pairs.py --pairs {args.pairs}` on {meta['cpu']} "
             f"({meta['cpu_count']} cores), torch {meta['torch']}; "
             f"{time.perf_counter() - t0:.0f} s in all.", "",
             f"Record recipe: `{SPEEDRUN_RECIPE}` on {record['threads']} threads; baseline: the "
             "demo's original recipe on 1 thread. Time to val <= 2.01 as in `make speedrun`.", "",
             "| pair | baseline s | record s | record / baseline | tokens (baseline -> record) |",
             "|---:|---:|---:|---:|---|"]
    lines += [f"| {p['pair']} | {p['baseline_s']:.1f} | {p['record_s']:.1f} | {p['ratio']:.3f} | "
              f"{p['baseline_tokens']:,} -> {p['record_tokens']:,} |" for p in pairs]
    lines += ["", f"Ratio: median **{statistics.median(ratios):.3f}** (min {min(ratios):.3f}, "
              f"max {max(ratios):.3f}); target <= {TARGET_SPEEDUP} in every pair: "
              f"**{'met' if met else 'NOT met'}**.", ""]
    text = "\n".join(lines)
    write_report(outputs_dir("bench"), "speedrun_pairs", text,
                 {"machine": meta, "pairs": pairs, "record_recipe": SPEEDRUN_RECIPE,
                  "threads": record["threads"], "target": TARGET})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
