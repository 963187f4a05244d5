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

Lockstep, step by step: the two loops take turns, T0 B0 T1 B1 ..., in one process: the spy runs
bare step k just before trainer step k+1 starts, and each trainer step is compared with the bare
step right after it. Why not whole rounds of one, then of the other: on this shared 2-core
machine the speed of a step drifts by up to 1.8x within seconds (measured: 175-317 ms for the
same step, in both loops and in CPU time alike), so a round of the trainer and a round of the
bare loop 5 s apart disagree by +-30% on their own. Steps a fraction of a second apart see the
same machine. Both loops' models, optimizers and batches alternate in the caches, so each step
starts after a step of the other loop: the same handicap for both.

Validate, then benchmark: both loops must produce the same loss at every step (same seed, same
batches: the bare loop really does the same work) before any time is reported.

Formula: per round, the median over timed steps k of trainer_step(k) / bare_step(k); reported
as the median over rounds with min / max (the spread); target <= 1.05x. The same ratio of CPU
time per step (`time.process_time`) is reported next to it: it does not grow while other
processes hold the cores (exact with 1 thread; with several, OpenMP's spin-waits count too).

Common bug: timing the trainer with its own `tokens_per_s` field: that clock stops BEFORE the
bookkeeping, so it can never see the overhead this benchmark is looking for.

Run: python benchmarks/bench_trainer_overhead.py [--rounds 3] [--steps 40] [--threads N]
     python benchmarks/bench_trainer_overhead.py --quick   (2 rounds of 8 steps, a smaller model:
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
from benchmarks.harness import machine_metadata, paired_ratio, write_report
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


def bare_loop(cfg, train_data):
    """The same work as train(cfg), written as the shortest loop. Builds the model, optimizer,
    schedule and sampler now and returns step(): one training step per call, giving
    (loss, wall seconds, CPU seconds) of that step."""
    model = build_model(cfg, "cpu")  # seeds torch with cfg.seed, as the trainer does
    optimizer = build_optimizer(model, cfg, "cpu", say=lambda *a: None)
    scheduler = WarmupCosine(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             min_lr=cfg.min_lr)
    sampler = np.random.default_rng(cfg.seed)  # the trainer's sampler: the same batches
    model.train()

    def step():
        wall0, cpu0 = _stamp()
        x, y = get_batch(train_data, cfg.batch_size, cfg.seq_len, rng=sampler)  # (B, T) each
        loss = lm_loss(model(x), y)
        loss.backward()
        torch_clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        wall1, cpu1 = _stamp()
        return value, wall1 - wall0, cpu1 - cpu0

    return step


def run_lockstep(cfg, train_data):
    """train(cfg) and the bare loop, one step each in turn: T0 B0 T1 B1 T2 ... .

    The spy on `minitrain.train._draw_micro_batches` marks the start of each trainer step; just
    before it we run the bare step of the previous index (timed on its own). Trainer step k's
    time is from its start to the moment the spy is entered again, so everything it does after
    the optimizer step (the JSONL line, the log line, the bar, the checks) is inside it and bare
    step k, which runs right after, is not. Returns (trainer losses, bare losses,
    [(trainer wall, trainer CPU, bare wall, bare CPU) for steps 0 .. steps-2]): the last trainer
    step (evaluation and the checkpoint) has no next stamp and no bare partner."""
    original = trainer._draw_micro_batches
    bare_step = bare_loop(cfg, train_data)  # built first: train() then reseeds torch itself
    bare_losses, bare_times, starts, ends = [], [], [], []

    def spy(*args, **kwargs):
        if starts:  # trainer step k-1 ends here; bare step k-1 runs before trainer step k
            ends.append(_stamp())
            loss, wall, cpu = bare_step()
            bare_losses.append(loss)
            bare_times.append((wall, cpu))
        starts.append(_stamp())  # this trainer step starts here
        return original(*args, **kwargs)

    trainer._draw_micro_batches = spy
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
                contextlib.redirect_stderr(null):
            result = train(cfg)
    finally:
        trainer._draw_micro_batches = original
    if len(starts) != cfg.steps:
        raise RuntimeError(f"the spy saw {len(starts)} batch draws for {cfg.steps} steps: "
                           "minitrain.train changed how it draws batches; update run_lockstep")
    steps = [(ends[k][0] - starts[k][0], ends[k][1] - starts[k][1], *bare_times[k])
             for k in range(cfg.steps - 1)]  # trainer step k runs from starts[k] to ends[k]
    return result.losses[:-1], bare_losses, steps


def check_same_losses(trainer_losses, bare_losses, rtol=LOSS_RTOL):
    """None if both loops computed the same losses, else a one-line reason."""
    if len(trainer_losses) != len(bare_losses):
        return f"{len(trainer_losses)} trainer losses vs {len(bare_losses)} bare"
    for step, (a, b) in enumerate(zip(trainer_losses, bare_losses)):
        if a is None or not abs(a - b) <= rtol * abs(b):
            return f"step {step}: trainer loss {a} vs bare loss {b} (rtol {rtol:g})"
    return None


def summarize(rounds):
    """Per round: the median over its steps of (trainer step / the bare step next to it), in
    wall and CPU time; overall: the median, min and max of those round medians."""
    ratios = [r["ratio"] for r in rounds]
    cpu = [r["cpu_ratio"] for r in rounds]
    return {"cpu_ratios": cpu, "cpu_ratio_median": statistics.median(cpu),
            "cpu_ratio_min": min(cpu), "cpu_ratio_max": max(cpu), "ratios": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios),
            "trainer_step_ms": 1e3 * statistics.median(r["trainer_s"] for r in rounds),
            "bare_step_ms": 1e3 * statistics.median(r["bare_s"] for r in rounds)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="lockstep runs (fresh models)")
    parser.add_argument("--steps", type=int, default=40, help="steps per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per round")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads for both loops (default: all cores)")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None,
                        help="where trainer_overhead.md/.json go (default <repo>/outputs/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds of 8 steps of a smaller model: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 8, 2
    if args.rounds < 1 or args.threads < 1 or args.warmup < 0 or args.steps < args.warmup + 4:
        parser.error("need --rounds >= 1, --threads >= 1, --warmup >= 0 and "
                     "--steps >= --warmup + 4")
    model = QUICK_MODEL if args.quick else MODEL
    torch.set_num_threads(args.threads)
    meta = machine_metadata()
    out_dir = args.out_dir if args.out_dir is not None else outputs_dir("bench")
    t_start = time.perf_counter()
    rounds, problems = [], []
    with tempfile.TemporaryDirectory(dir=outputs_dir()) as tmp:
        data = ladder_runner.prepare_data(pathlib.Path(tmp) / "tokens.bin",
                                          max_bytes=400_000 if args.quick else 4_000_000)
        cfg = make_config(args.steps, data, pathlib.Path(tmp) / "run", model=model)
        train_data, _ = split_tokens(load_dataset(data, mode=cfg.loader), cfg.val_fraction)
        for i in range(args.rounds):
            trainer_losses, bare_losses, steps = run_lockstep(cfg, train_data)
            problem = check_same_losses(trainer_losses, bare_losses)
            if problem:
                problems.append(f"round {i}: {problem}")
                break
            timed = steps[args.warmup:]
            rnd = {"round": i, "steps_timed": len(timed),
                   "trainer_s": statistics.median(t[0] for t in timed),
                   "bare_s": statistics.median(t[2] for t in timed),
                   "ratio": paired_ratio([t[0] for t in timed], [t[2] for t in timed]),
                   "cpu_ratio": paired_ratio([t[1] for t in timed], [t[3] for t in timed]),
                   "steps_s": [list(t) for t in timed]}
            rounds.append(rnd)
            print(f"round {i}: trainer {1e3 * rnd['trainer_s']:.1f} ms, bare "
                  f"{1e3 * rnd['bare_s']:.1f} ms, median step-pair ratio {rnd['ratio']:.3f} "
                  f"(CPU time {rnd['cpu_ratio']:.3f})", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    record = {"machine": meta, "model": model, "quick": args.quick, "steps_per_round": args.steps,
              "warmup_steps_excluded": args.warmup, "rounds": rounds,
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
             f"{args.rounds} rounds of {args.steps} steps; in each, the trainer and the bare "
             "loop take turns step by step (T B T B ...), and a trainer step is compared with "
             f"the bare step just before it. The first {args.warmup} steps and the last "
             "(evaluation, checkpoint) are not timed. Trainer bookkeeping on: metrics.jsonl, "
             "peak memory, log line every 10 steps, progress bar (to /dev/null), failure "
             "checks.", ""]
    if problems:
        lines += ["**VALIDATION FAILED** (no time reported): " + "; ".join(problems), ""]
    else:
        s = summarize(rounds)
        record.update(s, target_met=s["ratio_median"] <= TARGET)
        lines += ["| round | steps timed | trainer step ms | bare step ms | median step ratio | "
                  "median CPU-time ratio |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['round']} | {r['steps_timed']} | {1e3 * r['trainer_s']:.1f} | "
                  f"{1e3 * r['bare_s']:.1f} | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} |"
                  for r in rounds]
        lines += ["", f"Validated: both loops computed the same loss at every step of every "
                  f"round (rtol {LOSS_RTOL:g}).", "",
                  f"Ratio trainer / bare: **median {s['ratio_median']:.3f}x** (rounds: min "
                  f"{s['ratio_min']:.3f}, max {s['ratio_max']:.3f}). "
                  f"Target <= {TARGET}x: **{'met' if s['ratio_median'] <= TARGET else 'NOT met'}"
                  "**.", "",
                  f"CPU time per step (this process; does not count time spent waiting for a "
                  f"core): **median {s['cpu_ratio_median']:.3f}x** (min "
                  f"{s['cpu_ratio_min']:.3f}, max {s['cpu_ratio_max']:.3f}).", ""]
    text = "\n".join(lines)
    write_report(out_dir, "trainer_overhead", text, record)
    print(text)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
