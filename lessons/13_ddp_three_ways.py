"""Lesson 13 - DDP three ways: naive, overlapped with backward, bucketed.

Objective: see that data parallelism is "average the gradients, then step", and that the three
ways of averaging compute the SAME parameters and differ only in how the messages are sent:
  naive     - after backward, one blocking all-reduce per parameter;
  overlap   - an async all-reduce per parameter, launched from
              `register_post_accumulate_grad_hook` while backward continues;
  bucketed  - gradients packed (reverse registration order) into flat buckets, one async
              all-reduce per full bucket (what torch's DistributedDataParallel does).
We train the tiny GPT on 2 CPU processes with each, compare the parameters with torch's DDP after
3 AdamW steps, count the all-reduce calls of one step and time steps round-robin.

Serves: Module 8 deck slide 10 (DDP benefits and costs: replicas, gradient sync,
communication cost) and M8-LAB-04 (the multi-process DDP run; its torchrun launch discipline is
lesson 22); syllabus 16-08 (gradient all-reduce after backward; accumulation vs sync frequency:
`no_sync`); workshop guide Section 8 "GPU, CUDA & Parallel Training" ("Distributed Data Parallel
(DDP)").
Prerequisites: lesson 12 (all-reduce), lesson 06 (gradient accumulation: `no_sync`).
Run: python lessons/13_ddp_three_ways.py   (spawns 2 CPU processes, < 60 s)
Honest caveat: on 2 shared CPU cores compute and communication compete for the same cores, so
overlap helps far less than on GPUs with a separate network engine; the message count is the
robust lesson.
Why per-parameter overlap cannot win here, measured: every message pays a fixed cost (time =
alpha + bytes / bandwidth), so one message per parameter pays it n_params times where one
bucket pays it once. The lesson times the communication alone (one all-reduce per parameter vs
one bucket of the same bytes, no compute) and sets that beside the step-time gap between
overlap and bucketed. Seen on the course machine (five runs): 28 all-reduces back to back take
25-49 ms (0.9-1.7 ms each, against 0.13-0.23 ms for one message alone), one bucket 0.4-0.7 ms,
and overlapping them with backward hid only 2-16 ms of that: the messages' work is CPU work (gloo's threads,
system calls, wake-ups) on the same two cores as the backward pass, so there is little idle
time to hide it in. On a GPU the network engine works while the SMs compute, so overlap pays
off there, and torch's DDP overlaps too, but in buckets.
"""
import json
import os
import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from benchmarks.experiments import compare_ddp_modes
from minitrain.distributed_utils import launch
from minitrain.model import GPT, GPTConfig
from minitrain.style import GOLD, NAVY, outputs_dir

OUT = outputs_dir("lesson13")
WORLD = 2
SETTINGS = dict(n_layer=2, n_head=2, n_embd=32, batch=4, seq_len=64, check_steps=3, warmup=2,
                iters=10)


def message_costs(rank, world, sizes, calls=30):
    """Communication alone, in the ranks' own process group, all ranks lined up by a barrier:
    median ms of one all-reduce per parameter (the given sizes, back to back), of one all-reduce
    of all of them in a single bucket, and of a 1-element all-reduce (alpha)."""
    def timed(tensors):
        out = []
        for _ in range(calls):
            dist.barrier()
            t0 = time.perf_counter()
            for t in tensors:
                dist.all_reduce(t)
            out.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(out[3:])

    return {"per_parameter_ms": timed([torch.zeros(n) for n in sizes]),
            "one_bucket_ms": timed([torch.zeros(sum(sizes))]),
            "alpha_ms": timed([torch.zeros(1)])}


def threads_per_rank(world):
    """All cores, shared by the ranks: one process per rank, cores // world threads each."""
    return max(1, (os.cpu_count() or 1) // world)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ranks = launch(compare_ddp_modes, WORLD, timeout_s=150, threads=threads_per_rank(WORLD),
                   **SETTINGS)
    n_params = len(list(GPT(GPTConfig(vocab_size=256, block_size=SETTINGS["seq_len"],
                                      n_layer=2, n_head=2, n_embd=32)).parameters()))
    print(f"tiny GPT: {n_params} parameter tensors, {WORLD} ranks, batch {SETTINGS['batch']} x "
          f"{SETTINGS['seq_len']} tokens per rank")
    print(f"{'variant':<22} {'all-reduces/step':>16} {'median ms':>10} {'p90 ms':>8} "
          f"{'max|dparam| vs torch':>21}")
    rows = []
    for label in ranks[0]:
        times = [max(r[label]["times_s"][i] for r in ranks)  # a step ends when the slowest rank does
                 for i in range(len(ranks[0][label]["times_s"]))]
        row = {"variant": label, "all_reduces": ranks[0][label]["all_reduces_per_step"],
               "median_ms": 1e3 * statistics.median(times),
               "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
               "max_diff": max(r[label]["max_diff"] for r in ranks)}
        rows.append(row)
        calls = "C++ reducer" if label == "torch_ddp" else row["all_reduces"]
        print(f"{label:<22} {calls!s:>16} {row['median_ms']:>10.1f} {row['p90_ms']:>8.1f} "
              f"{row['max_diff']:>21.2e}")
    by = {r["variant"]: r for r in rows}
    # The lesson's claims, checked:
    assert all(r["max_diff"] < 1e-5 for r in rows), "every variant must train like torch's DDP"
    assert by["naive"]["all_reduces"] == n_params and by["overlap"]["all_reduces"] == n_params
    assert by["bucketed"]["all_reduces"] == 1, "25 MB holds the whole tiny GPT: one message"
    sizes = [p.numel() for p in GPT(GPTConfig(vocab_size=256, block_size=SETTINGS["seq_len"],
                                              n_layer=2, n_head=2, n_embd=32)).parameters()]
    costs = launch(message_costs, WORLD, sizes, timeout_s=60, threads=threads_per_rank(WORLD),
                   preload=())
    cost = {k: max(c[k] for c in costs) for k in costs[0]}  # a collective ends with its slowest rank
    gap_ms = by["overlap"]["median_ms"] - by["bucketed"]["median_ms"]
    comm_gap_ms = cost["per_parameter_ms"] - cost["one_bucket_ms"]
    per_message = cost["per_parameter_ms"] / n_params
    print(f"why overlap loses: {n_params} messages instead of 1. Communication alone (no compute): "
          f"{n_params} all-reduces {cost['per_parameter_ms']:.1f} ms ({per_message:.2f} ms each "
          f"back to back; one message alone {cost['alpha_ms']:.2f} ms), one bucket "
          f"{cost['one_bucket_ms']:.1f} ms:")
    hidden = comm_gap_ms - gap_ms
    print(f"  the extra messages cost {comm_gap_ms:.1f} ms; in the step overlap - bucketed = "
          f"{gap_ms:.1f} ms, so overlapping with backward "
          + (f"hid {hidden:.1f} ms of it" if hidden >= 0 else
             f"added {-hidden:.1f} ms (gloo's threads compete with backward for the cores)"))
    for row in rows:
        row.update(cost)
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["variant"] for r in rows]
    axes[0].bar(labels, [r["median_ms"] for r in rows],
                color=[NAVY if lab != "torch_ddp" else GOLD for lab in labels])
    axes[0].set_ylabel("median step time (ms), 2 shared CPU cores")
    axes[0].set_title("step time (same run, round-robin)")
    counts = [r["all_reduces"] for r in rows if r["variant"] != "torch_ddp"]
    axes[1].bar([lab for lab in labels if lab != "torch_ddp"], counts, color=NAVY)
    axes[1].set_ylabel("all-reduce calls per step")
    axes[1].set_title("messages per step: buckets amortise the latency")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(OUT / "ddp_three_ways.png", dpi=110)
    plt.close(fig)
    print(f"all variants reach torch DDP's parameters; figure: {OUT / 'ddp_three_ways.png'}")


if __name__ == "__main__":
    main()
