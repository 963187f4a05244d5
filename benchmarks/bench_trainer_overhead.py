"""Benchmark the trainer's own cost: a `minitrain.train` step vs a bare loop doing the same work.
Writes outputs/bench/trainer_overhead.md and trainer_overhead.json (with machine metadata).

What: the same model (`build_model`), optimizer (`build_optimizer`), lr schedule, data, batches
(the same seeded sampler) and thread count, trained two ways:
- "trainer": `minitrain.train.train(cfg)` with its per-step bookkeeping switched ON (metrics.jsonl
  line, peak memory, a log line every 10 steps, the tqdm progress bar, the failure checks);
- "bare":    x, y = get_batch(...); loss = lm_loss(model(x), y); loss.backward();
             torch.nn.utils.clip_grad_norm_; optimizer.step(); scheduler.step(); zero_grad().
A step's time is measured the same way for both: from one batch draw to the next, so everything
the trainer does after the optimizer step (the JSONL write, the log line, the bar) is inside it.
(For the trainer this needs a timestamp at each draw: we wrap `minitrain.train._draw_micro_batches`
with a spy that records `time.perf_counter()` and calls the original.)

Validate, then benchmark: every round, both loops must produce the same loss at every step (same
seed, same batches: the bare loop really does the same work) before any time is reported.

Formula: per round, median step time over the steps after `--warmup`;
    ratio(round pair i) = median_step(trainer, i) / median_step(bare, i)
reported as the median over pairs with min / max (the spread); target <= 1.05x.
The same ratio of CPU time per step (`time.process_time`) is reported next to it: it does
not grow while other processes hold the cores, so on a loaded machine it is the one to trust
(exact with 1 thread; with several, OpenMP's spin-waits count too).

Why alternating rounds IN ONE PROCESS (ABBA order: T B B T T B ...) rather than a fresh process
per round: what we compare is the per-step cost, and both loops run in a warm interpreter with
the same allocator, thread pool and page cache, so the only difference left is the loop itself.
A fresh process per round would add import time, first-touch page faults and thread-pool start
to each round: constant per round, not per step, and noisy. Drift (other work on the machine,
thermal) is what can hit one loop and not the other; pairing each trainer round with the bare
round next to it, and swapping who goes first every pair, makes drift hit both equally.

Common bug: timing the trainer with its own `tokens_per_s` field: that clock stops BEFORE the
bookkeeping, so it can never see the overhead this benchmark is looking for.

Run: python benchmarks/bench_trainer_overhead.py [--rounds 6] [--steps 24] [--threads N]
     python benchmarks/bench_trainer_overhead.py --quick   (2 pairs of 6 steps, a smaller model:
                                                           a smoke test, not the measurement)
"""
import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_

import minitrain.train as trainer
from benchmarks import ladder_runner
from benchmarks.harness import machine_metadata, write_report
from minitrain.data import get_batch, load_dataset, split_tokens
from minitrain.schedule import WarmupCosine
from minitrain.style import outputs_dir
from minitrain.train import TrainConfig, build_model, build_optimizer, lm_loss, train

TARGET = 1.05  # trainer step time / bare step time
LOSS_RTOL = 1e-5  # same work => the same losses (only float rounding may differ: clip's sum order)
MODEL = dict(n_layer=4, n_head=4, n_embd=128, seq_len=256, batch_size=16)  # the tiny GPT default
QUICK_MODEL = dict(n_layer=2, n_head=2, n_embd=64, seq_len=64, batch_size=8)  # --quick: smoke


def make_config(steps, data, out_dir, seed=0, model=None):
    """The trainer's run: default bookkeeping ON (log every 10, progress bar, metrics.jsonl);
    evaluation and the checkpoint happen once, at the last step, which is never timed."""
    return TrainConfig(steps=steps, **(model or MODEL), max_lr=1e-3, min_lr=1e-4, warmup_steps=2,
                       clip_norm=1.0, weight_decay=0.1, data=data, eval_every=steps,
                       eval_iters=1, checkpoint_every=steps, log_every=10, progress=True,
                       out_dir=str(out_dir), overwrite=True, seed=seed, device="cpu")


def _stamp():
    """(wall clock, this process's CPU time): CPU time does not grow while other processes
    hold the cores, so its ratio survives a loaded machine (with 1 thread it is exact)."""
    return time.perf_counter(), time.process_time()


def _step_times(stamps, warmup):
    """(wall, cpu) lists of step times. Step k's time = stamp[k+1] - stamp[k]; the last step
    (eval + checkpoint) has no next stamp and so is never counted; the first `warmup` steps
    are dropped."""
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    return (wall[warmup:] or wall[-1:]), (cpu[warmup:] or cpu[-1:])


def run_trainer(cfg, warmup):
    """(losses, timed step times) of train(cfg); bookkeeping output goes to /dev/null."""
    original = trainer._draw_micro_batches
    stamps = []

    def spy(*args, **kwargs):  # a timestamp at each step's start, then the trainer's own code
        stamps.append(_stamp())
        return original(*args, **kwargs)

    trainer._draw_micro_batches = spy
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
                contextlib.redirect_stderr(null):
            result = train(cfg)
    finally:
        trainer._draw_micro_batches = original
    if len(stamps) != cfg.steps:
        raise RuntimeError(f"the spy saw {len(stamps)} batch draws for {cfg.steps} steps: "
                           "minitrain.train changed how it draws batches; update run_trainer")
    return result.losses, _step_times(stamps, warmup)


def run_bare(cfg, train_data, warmup):
    """The same work as train(cfg), written as the shortest loop: (losses, step times)."""
    model = build_model(cfg, "cpu")  # seeds torch with cfg.seed, as the trainer does
    optimizer = build_optimizer(model, cfg, "cpu", say=lambda *a: None)
    scheduler = WarmupCosine(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             min_lr=cfg.min_lr)
    sampler = np.random.default_rng(cfg.seed)  # the trainer's sampler: the same batches
    model.train()
    losses, stamps = [], []
    for _ in range(cfg.steps):
        stamps.append(_stamp())
        x, y = get_batch(train_data, cfg.batch_size, cfg.seq_len, rng=sampler)  # (B, T) each
        loss = lm_loss(model(x), y)
        loss.backward()
        torch_clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, _step_times(stamps, warmup)


def check_same_losses(trainer_losses, bare_losses, rtol=LOSS_RTOL):
    """None if both loops computed the same losses, else a one-line reason."""
    if len(trainer_losses) != len(bare_losses):
        return f"{len(trainer_losses)} trainer losses vs {len(bare_losses)} bare"
    for step, (a, b) in enumerate(zip(trainer_losses, bare_losses)):
        if a is None or not abs(a - b) <= rtol * abs(b):
            return f"step {step}: trainer loss {a} vs bare loss {b} (rtol {rtol:g})"
    return None


def summarize(pairs):
    """Ratios per pair and their median / min / max, plus each loop's median step time."""
    ratios = [p["trainer_s"] / p["bare_s"] for p in pairs]
    cpu = [p["trainer_cpu_s"] / p["bare_cpu_s"] for p in pairs]
    return {"cpu_ratios": cpu, "cpu_ratio_median": statistics.median(cpu),
            "cpu_ratio_min": min(cpu), "cpu_ratio_max": max(cpu), "ratios": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "trainer_step_ms": 1e3 * statistics.median(p["trainer_s"] for p in pairs),
            "bare_step_ms": 1e3 * statistics.median(p["bare_s"] for p in pairs)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="pairs of (trainer, bare) rounds")
    parser.add_argument("--steps", type=int, default=24, help="steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for both loops (default: all cores)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None,
                        help="where trainer_overhead.md/.json go (default <repo>/outputs/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="2 pairs of 6 steps of a smaller model: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 6, 2
    if args.rounds < 1 or args.threads < 1 or args.steps < args.warmup + 2:
        parser.error("need --rounds >= 1, --threads >= 1 and --steps >= --warmup + 2")
    model = QUICK_MODEL if args.quick else MODEL
    torch.set_num_threads(args.threads)
    meta = machine_metadata()
    out_dir = args.out_dir if args.out_dir is not None else outputs_dir("bench")
    t_start = time.perf_counter()
    pairs, problems = [], []
    with tempfile.TemporaryDirectory(dir=outputs_dir()) as tmp:
        data = ladder_runner.prepare_data(pathlib.Path(tmp) / "tokens.bin",
                                          max_bytes=400_000 if args.quick else 4_000_000)
        cfg = make_config(args.steps, data, pathlib.Path(tmp) / "run", model=model)
        train_data, _ = split_tokens(load_dataset(data, mode=cfg.loader), cfg.val_fraction)
        for i in range(args.rounds):
            order = ("trainer", "bare") if i % 2 == 0 else ("bare", "trainer")  # ABBA
            got = {}
            for which in order:
                got[which] = (run_trainer(cfg, args.warmup) if which == "trainer"
                              else run_bare(cfg, train_data, args.warmup))
            problem = check_same_losses(got["trainer"][0], got["bare"][0])
            if problem:
                problems.append(f"round {i}: {problem}")
                break
            pair = {"round": i, "order": list(order),
                    "trainer_s": statistics.median(got["trainer"][1][0]),
                    "bare_s": statistics.median(got["bare"][1][0]),
                    "trainer_cpu_s": statistics.median(got["trainer"][1][1]),
                    "bare_cpu_s": statistics.median(got["bare"][1][1]),
                    "trainer_times_s": got["trainer"][1][0], "bare_times_s": got["bare"][1][0]}
            pairs.append(pair)
            print(f"round {i} ({order[0]} first): trainer {1e3 * pair['trainer_s']:.1f} ms, "
                  f"bare {1e3 * pair['bare_s']:.1f} ms, ratio "
                  f"{pair['trainer_s'] / pair['bare_s']:.3f} (CPU time ratio "
                  f"{pair['trainer_cpu_s'] / pair['bare_cpu_s']:.3f})", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {"machine": meta, "model": model, "quick": args.quick, "steps_per_round": args.steps,
              "warmup_steps_excluded": args.warmup, "rounds": args.rounds, "pairs": pairs,
              "validation_problems": problems, "target": TARGET, "load_avg_1min": load,
              "elapsed_s": time.perf_counter() - t_start}
    quick_note = " (--quick: a smoke test, not the measurement)" if args.quick else ""
    command = " ".join(["python benchmarks/bench_trainer_overhead.py"]
                       + (sys.argv[1:] if argv is None else list(argv)))
    lines = ["# Trainer overhead: `minitrain.train` step vs a bare loop", "",
             f"Made by `{command}` on {meta['cpu']} ({meta['cpu_count']} cores, "
             f"{args.threads} torch threads), torch {meta['torch']}; load avg (1 min) at the "
             f"end: {load if load is None else f'{load:.1f}'}.", "",
             f"Model: {model['n_layer']} layers, width {model['n_embd']}, T={model['seq_len']}, "
             f"B={model['batch_size']}{quick_note}, fp32, plain AdamW, clip 1.0. "
             f"{args.rounds} pairs of "
             f"rounds, {args.steps} steps each, alternating who goes first; step time = batch "
             f"draw to next batch draw, median over steps after {args.warmup} warm-up steps. "
             "Trainer bookkeeping on: metrics.jsonl, peak memory, log line every 10 steps, "
             "progress bar (to /dev/null), failure checks.", ""]
    if problems:
        lines += ["**VALIDATION FAILED** (no time reported): " + "; ".join(problems), ""]
    else:
        s = summarize(pairs)
        record.update(s, target_met=s["ratio_median"] <= TARGET)
        lines += ["| round | first | trainer step ms | bare step ms | ratio | trainer CPU ms | "
                  "bare CPU ms | CPU ratio |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['round']} | {p['order'][0]} | {1e3 * p['trainer_s']:.1f} | "
                  f"{1e3 * p['bare_s']:.1f} | {p['trainer_s'] / p['bare_s']:.3f} | "
                  f"{1e3 * p['trainer_cpu_s']:.1f} | {1e3 * p['bare_cpu_s']:.1f} | "
                  f"{p['trainer_cpu_s'] / p['bare_cpu_s']:.3f} |"
                  for p in pairs]
        lines += ["", f"Validated: both loops computed the same loss at every step of every "
                  f"round (rtol {LOSS_RTOL:g}).", "",
                  f"Ratio trainer / bare: **median {s['ratio_median']:.3f}x** (min "
                  f"{s['ratio_min']:.3f}, max {s['ratio_max']:.3f} over {len(pairs)} pairs). "
                  f"Target <= {TARGET}x: **{'met' if s['ratio_median'] <= TARGET else 'NOT met'}"
                  "**.", "",
                  f"CPU time per step (this process; does not count time spent waiting for a "
                  f"core, so it is the number to trust on a loaded machine): **median "
                  f"{s['cpu_ratio_median']:.3f}x** (min {s['cpu_ratio_min']:.3f}, max "
                  f"{s['cpu_ratio_max']:.3f}).", ""]
    text = "\n".join(lines)
    write_report(out_dir, "trainer_overhead", text, record)
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
