"""Lesson 20 - Pipeline parallelism: GPipe vs 1F1B on 2 stages, the bubble and the memory.

Objective: split the tiny GPT into 2 consecutive stages on 2 processes (`minitrain.pipeline`),
send activations forward and gradients back with send/recv, and measure for m = 1, 2, 4, 8
micro-batches:
  - the step time of GPipe (all forwards, then all backwards) and 1F1B (one forward, one
    backward in steady state), next to the same model in one process;
  - the bubble: each stage's idle share of the step, from its recorded busy time, against
    the formula (p - 1) / (m + p - 1);
  - the peak activation memory per stage: micro-batches held between their forward and their
    backward (GPipe m, 1F1B at most p) and the bytes autograd saved for them (counted tensors).
Every configuration is first checked to give the single-process gradients.

Serves: syllabus 16-09 (model parallelism: pipeline parallelism, GPipe-style micro-batching);
workshop guide section 13 "Training Infrastructure" (distributed training strategies: "Pipeline
Parallel - split model layers across GPUs - hard to balance") and section 8 "GPU, CUDA &
Parallel Training". Prerequisites: lesson 12 (send/recv), lesson 06 (accumulating micro-batch
gradients: the same 1/m scaling).
Run: python lessons/20_pipeline_parallel.py   (spawns 2 CPU processes, ~30 s)

What 2 CPU cores can and cannot show (say it on the slide): each stage gets one core, as a GPU
each; "sending" is a copy through localhost TCP (gloo). The memory counts are exact and follow
the formulas (GPipe m, 1F1B at most p micro-batches). The bubble is measured for real, but it
also holds every wait for a core, per message, and the stages are unequal (the last one has the
head and the loss), so it sits above (p-1)/(m+p-1); on a calm machine the script asserts that it
falls with m, on a busy one it says so and asserts only the memory (not yet seen calm here). The
speed is not a GPU's: smaller micro-batches make CPU matmuls less efficient, and a pipeline only
pays when the model does not fit on one device, which never happens here.
"""
import json
import os
import statistics
import time

import matplotlib.pyplot as plt
import torch

from benchmarks.bench_pipeline import loss_fn, make_model_and_batch, traced_steps
from minitrain.bench import measure
from minitrain.distributed_utils import launch
from minitrain.pipeline import bubble_fraction, measured_bubble
from minitrain.style import GOLD, MUTED, NAVY, TEXT, outputs_dir

OUT = outputs_dir("lesson20")
P = 2
N_MICROS = (1, 2, 4, 8)
SCHEDULES = ("gpipe", "1f1b")
SIZE = dict(n_layer=4, n_head=4, n_embd=128, batch=16, seq_len=64)
COLORS = {"gpipe": NAVY, "1f1b": GOLD}
ITERS = 4


def one_process_step_ms():
    """The whole model, whole batch, one process on one core: one device doing all the work."""
    model, x, y = make_model_and_batch(**SIZE)

    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x)[0], y).backward()

    return 1e3 * measure(step, tokens_per_step=x.numel(), warmup=1, iters=ITERS)["median_s"]


def main():
    t_start = time.perf_counter()
    # One thread per stage and for the baseline: a stage plays one device (a core), so the
    # pipeline uses P cores and the baseline one. (All cores for one process would be the other
    # fair comparison on this CPU; on a shared 2-core box thread contention makes it erratic.)
    torch.set_num_threads(1)
    single_ms = one_process_step_ms()
    runs = [(s, m) for m in N_MICROS for s in SCHEDULES]
    ranks = launch(traced_steps, P, runs=runs, size=SIZE, warmup=1, iters=ITERS,
                   count_bytes=True, threads=1, timeout_s=240, preload=())
    rows = []
    for k, (schedule, m) in enumerate(runs):
        per_rank = [r[k] for r in ranks]
        iters = len(per_rank[0]["times_s"])
        times = [max(r["times_s"][j] for r in per_rank) for j in range(iters)]  # slowest rank
        # The bubble of the least disturbed step (the fastest): other processes on the machine
        # only ever add waiting, so the minimum is the best estimate of the schedule's own.
        fastest = min(range(iters), key=lambda j: times[j])
        rows.append({"schedule": schedule, "m": m, "step_ms": 1e3 * statistics.median(times),
                     "bubble": measured_bubble([r["events"][fastest] for r in per_rank])[1],
                     "formula": bubble_fraction(P, m),
                     "held": [r["peak_held"] for r in per_rank],
                     "held_kib": [r["peak_held_bytes"] / 1024 for r in per_rank],
                     "max_diff": max(r["max_diff"] for r in per_rank)})
    print(f"tiny GPT {SIZE}, {P} stages (1 thread each); the whole model in one process (1 "
          f"thread): {single_ms:.1f} ms per step. Bubble: of the fastest of {ITERS} steps")
    print(f"{'schedule':<8} {'m':>2} | {'step ms':>8} {'vs 1 proc':>9} | {'bubble s0':>9} "
          f"{'s1':>5} {'formula':>7} | {'held s0':>7} {'s1':>3} | {'KiB s0':>8} {'s1':>8}")
    for r in rows:
        print(f"{r['schedule']:<8} {r['m']:>2} | {r['step_ms']:>8.1f} "
              f"{single_ms / r['step_ms']:>8.2f}x | {r['bubble'][0]:>9.2f} {r['bubble'][1]:>5.2f}"
              f" {r['formula']:>7.2f} | {r['held'][0]:>7} {r['held'][1]:>3} | "
              f"{r['held_kib'][0]:>8.0f} {r['held_kib'][1]:>8.0f}")
    by = {(r["schedule"], r["m"]): r for r in rows}
    # The lesson's claims, checked on the measured numbers:
    assert all(r["max_diff"] < 1e-5 for r in rows), "every run must give one process' gradients"
    for r in rows:  # GPipe holds all m micro-batches, 1F1B at most p - s on stage s
        want = [r["m"]] * P if r["schedule"] == "gpipe" else [min(P - s, r["m"]) for s in range(P)]
        assert r["held"] == want, (r["schedule"], r["m"], r["held"])
    assert by[("1f1b", 8)]["held_kib"][0] < 0.5 * by[("gpipe", 8)]["held_kib"][0], \
        "at m=8, 1F1B keeps 2 of 8 micro-batches on stage 0: far fewer bytes than GPipe"
    load = os.getloadavg()[0] / (os.cpu_count() or 1)  # runnable processes per core
    if load <= 1.5:  # more micro-batches, smaller bubble: a timing claim, only on a calm machine
        for s in SCHEDULES:
            assert statistics.mean(by[(s, 8)]["bubble"]) < statistics.mean(by[(s, 1)]["bubble"]), s
    else:
        print(f"NOTE: load {load:.1f} runnable processes per core: every wait costs a scheduling"
              " round, so the measured bubble mostly shows the other processes; the timing claim"
              " (bubble falls with m) is not asserted this run, the memory claims are.")
    (OUT / "results.json").write_text(json.dumps({"single_ms": single_ms, "rows": rows},
                                                 indent=1))

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ms = list(N_MICROS)
    fine = [x / 10 for x in range(10, 81)]
    axes[0].plot(fine, [(P - 1) / (x + P - 1) for x in fine], color=MUTED, lw=3,
                 label="(p-1)/(m+p-1)")
    for s in SCHEDULES:
        axes[0].plot(ms, [statistics.mean(by[(s, m)]["bubble"]) for m in ms], "o-",
                     color=COLORS[s], label=f"{s} measured (mean of stages)")
        axes[1].plot(ms, [by[(s, m)]["step_ms"] for m in ms], "o-", color=COLORS[s], label=s)
        for stage, style in ((0, "o-"), (1, "s--")):
            axes[2].plot(ms, [by[(s, m)]["held_kib"][stage] for m in ms], style,
                         color=COLORS[s], label=f"{s} stage {stage}")
    axes[1].axhline(single_ms, color=MUTED, ls=":", label="one process, 1 thread")
    titles = ("bubble: idle share of the step", "step time (ms), 2 shared CPU cores",
              "peak activation KiB held per stage")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("micro-batches m", color=TEXT)
        ax.set_title(title, color=NAVY)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "pipeline_parallel.png", dpi=110)
    plt.close(fig)
    print("checked: single-process gradients everywhere; GPipe holds m micro-batches of B/m (the"
          " whole batch's activations, whatever m), 1F1B at most p of them (p/m of the batch)"
          + ("; the bubble falls with m" if load <= 1.5 else "") +
          f". {time.perf_counter() - t_start:.0f} s; figure: {OUT / 'pipeline_parallel.png'}")


if __name__ == "__main__":
    main()
