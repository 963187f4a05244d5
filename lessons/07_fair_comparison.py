"""Lesson 07 — a fair comparison: the protocol, and how counting warm-up steps distorts tokens/s.

Objective: compare two ways to run the tiny GPT's training step (fp32 vs bf16 autocast on CPU)
with the protocol every later speed claim in the course follows:
  - fixed seed, fixed data, fixed evaluation batches: two runs with the same seed give
    bit-identical losses (asserted); another seed shows the run-to-run spread of the loss;
  - warm-up steps excluded from throughput: the first steps pay one-off costs (allocations,
    AdamW's state creation, kernel selection), so each method's first `WARMUP` steps are timed
    but left out; we show, measured, what including them does to tokens/s;
  - median and spread (p10 / p90) of the per-step time, never a single run's mean;
  - a run-metadata table (CPU/GPU, torch version, dtype, threads) printed with the numbers.

Serves: Module 8 deck slide 6 (fair comparison protocol), slide 12 (metric stack: warmup vs
steady-state windows), slide 17 / M8-LAB-02 (benchmark protocol and output table), slide 26 /
M8-LAB-08 (seed policy, warmup exclusion windows, hardware notes); syllabus 16-07 (end-to-end
wall-clock benchmarking methodology) and 16-01 (speed benchmarks of fp32 vs bf16).
Prerequisites: lessons 03–06, `minitrain.bench.measure`, `benchmarks.harness.machine_metadata`.

Run: python lessons/07_fair_comparison.py   (~25 s on 2 cores; figure in outputs/lesson07/)
"""
import matplotlib.pyplot as plt
import numpy as np
import torch

from benchmarks.harness import machine_metadata
from minitrain.bench import fastest_thread_count, measure
from minitrain.data import corpus_tokens, get_batch, split_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson07")
BATCH, SEQ, WARMUP, ITERS = 8, 64, 3, 12
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=64)


def make_step(data, dtype, seed=0):
    """A fresh model + optimizer and a closure doing one training step; returns (step, losses)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)                      # the sampler: same batches per seed
    losses = []

    def step():
        x, y = get_batch(data, BATCH, SEQ, rng=rng)       # (B, T), (B, T)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return step, losses, model


def val_loss(model, val_batches):
    with torch.no_grad():
        return float(np.mean([model(x, y)[1].item() for x, y in val_batches]))


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    train, val = split_tokens(corpus_tokens(max_bytes=300_000))
    vrng = np.random.default_rng(1234)                     # the SAME eval batches for every run
    val_batches = [get_batch(val, 16, SEQ, rng=vrng) for _ in range(4)]
    tokens = BATCH * SEQ

    # 1. Timing FIRST, in a fresh process (anything run before would warm it up for the first
    #    method only: order is a confounder too). measure(warmup=0) keeps every step's time.
    results = {}
    for name, dtype in [("fp32", None), ("bf16 autocast", torch.bfloat16)]:
        step, _, _ = make_step(train, dtype, seed=0)
        timing = measure(step, tokens_per_step=tokens, warmup=0, iters=WARMUP + ITERS)
        times = np.array(timing["times_s"])                # (WARMUP + ITERS,) seconds
        steady = times[WARMUP:]
        results[name] = dict(
            times=times,
            naive_tps=tokens * len(times) / times.sum(),   # everything counted, mean
            fair_tps=tokens / np.median(steady),           # warm-up excluded, median
            p10=np.percentile(steady, 10), p90=np.percentile(steady, 90), first=times[0])

    # 2. Determinism: same seed -> identical losses; other seeds -> the spread to beat.
    finals = {}
    for seed in (0, 0, 1, 2):
        step, losses, model = make_step(train, None, seed)
        for _ in range(15):
            step()
        finals.setdefault(seed, []).append((losses, val_loss(model, val_batches)))
    same = finals[0][0][0] == finals[0][1][0]
    vals = [finals[s][0][1] for s in (0, 1, 2)]
    print(f"same seed twice: losses identical = {same}; val loss over seeds 0,1,2 after 15 steps: "
          f"{', '.join(f'{v:.4f}' for v in vals)} (spread {max(vals) - min(vals):.4f})")

    print(f"\n{'method':14} {'step 0':>8} {'median':>8} {'p10':>7} {'p90':>7} "
          f"{'tok/s all steps':>16} {'tok/s fair':>11} {'distortion':>10}")
    for name, r in results.items():
        print(f"{name:14} {r['first'] * 1e3:6.0f}ms {np.median(r['times'][WARMUP:]) * 1e3:6.0f}ms "
              f"{r['p10'] * 1e3:5.0f}ms {r['p90'] * 1e3:5.0f}ms {r['naive_tps']:16,.0f} "
              f"{r['fair_tps']:11,.0f} {r['naive_tps'] / r['fair_tps'] - 1:+10.0%}")
    a, b = results["fp32"], results["bf16 autocast"]
    ratio = b["fair_tps"] / a["fair_tps"]
    print(f"bf16 autocast / fp32 speed (fair): {ratio:.2f}x "
          + ("(SLOWER here: at this small size the casts cost more than the matmuls save, "
             "with or without bf16 units; a negative result is a result)" if ratio < 1 else
             "(faster here: this CPU's bf16 matmuls pay for the casts)"))

    print("\nrun metadata")
    for key, value in machine_metadata(dtype="float32 / bfloat16 autocast").items():
        print(f"  {key:14} {value}")
    print(f"  {'workload':14} tiny GPT {MODEL}, batch {BATCH}x{SEQ}, warm-up {WARMUP} "
          f"excluded, {ITERS} timed steps")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), facecolor=BACKGROUND)
    for (name, r), c, off in zip(results.items(), (NAVY, GOLD), (-0.2, 0.2)):
        idx = np.arange(len(r["times"]))
        axes[0].bar(idx + off, r["times"] * 1e3, 0.4, color=c, label=name)
    axes[0].axvspan(-0.5, WARMUP - 0.5, color=RED, alpha=0.12, label="warm-up (excluded)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("ms")
    axes[0].set_title("every step timed", color=NAVY, loc="left")
    names = list(results)
    pos = np.arange(len(names))
    axes[1].bar(pos - 0.2, [results[n]["naive_tps"] for n in names], 0.4, color=MUTED,
                label="all steps, mean")
    axes[1].bar(pos + 0.2, [results[n]["fair_tps"] for n in names], 0.4, color=NAVY,
                label="warm-up excluded, median")
    axes[1].set_xticks(pos, names)
    axes[1].set_ylabel("tokens / s")
    axes[1].set_title("same runs, two summaries", color=NAVY, loc="left")
    for ax in axes:
        ax.set_facecolor(PANEL)
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "fair_comparison.png", dpi=110)
    plt.close(fig)
    print(f"figure: {OUT / 'fair_comparison.png'}")

    assert same, "a fixed seed and fixed data must reproduce the losses exactly"
    assert len(set(vals)) == 3, "different seeds should give different runs"
    for name, r in results.items():
        assert r["first"] > np.median(r["times"][WARMUP:]), f"{name}: step 0 should pay warm-up"
        assert r["naive_tps"] < r["fair_tps"], f"{name}: counting warm-up understates tokens/s"


if __name__ == "__main__":
    main()
