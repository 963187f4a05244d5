"""Lesson 11 - the speed ladder: one change at a time, each one measured.

Objective: climb the first rungs of minitrain.ladder on a small GPT and read the table: which
change paid on this machine, which did not, and why; check that every rung still computes the
same thing (same step-0 loss) before believing its speed.
Serves: Module 8 deck slides 8-9 (the speed ladder, single-device changes), slide 16 (additive,
logged changes; validate the loss after each), slide 17 / M8-LAB-02, slide 18 / M8-LAB-03, slide
19 (the hour-2 animation, animations/speed_ladder.py), M8-CODE-02 (baseline -> optimized deltas
with preserved training semantics); syllabus 16-10 (each optimization added incrementally,
speedup per stage); GPT-2 notes "Summary: The 7x Journey" and "Quick Reference: Enabling
Optimizations".
Prerequisites: lessons 02 (loaders, batching), 07 (fair timing), 08 (attention), 09 (precision),
10 (compile).

The rungs (minitrain.ladder.RUNGS; each adds ONE TrainConfig change to the rung below):
    0 baseline: memmap + Python-loop batches + from-scratch LayerNorm/GELU + naive attention
      + fp32 + plain AdamW
    1 RAM preload  2 vectorized batching  3 native layers  4 SDPA  5 bf16 autocast
    6 fused AdamW  (7 torch.compile and 8 larger batch: `make bench`, because a cold compile
    alone takes longer than this lesson's 60 s budget on 2 cores)

Read the table like an engineer: speedup vs rung 0 is the cumulative gain; "vs the rung below"
is what that one change bought. A rung below 1.00x is a real, measured slowdown on this hardware
(its note says why), not an error. Here every rung trains in this one process, so peak memory
is not compared (benchmarks/bench_ladder.py runs each rung in a fresh process for that).
The measuring (train a rung, validate, tabulate) is benchmarks/ladder_runner.py.

Run: python lessons/11_speed_ladder.py   (~20-40 s on 2 busy cores)
"""
import pathlib
import tempfile

import matplotlib.pyplot as plt
import torch

from benchmarks import ladder_runner as runner
from minitrain import ladder
from minitrain.bench import fastest_thread_count
from minitrain.style import GOLD, MUTED, NAVY, outputs_dir

OUT = outputs_dir("lesson11")
KEYS = ("0", "1", "2", "3", "4", "5", "6")
MODEL = dict(steps=10, batch_size=4, seq_len=256, n_layer=2, n_head=4, n_embd=128)
WARMUP = 4  # steps excluded from the median tokens/s


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = runner.prepare_data(pathlib.Path(tmp) / "tokens.bin", max_bytes=1_000_000)
        base = ladder.default_base(**MODEL, data=data)
        results = [runner.train_rung(k, base, out_dir=pathlib.Path(tmp) / k, warmup=WARMUP)
                   for k in KEYS]
    valid = runner.validate(results)  # validate first: same step-0 loss as rung 0
    rows = runner.ladder_table(results)
    print(f"Tiny GPT: {MODEL['n_layer']} layers, width {MODEL['n_embd']}, B={MODEL['batch_size']}"
          f", T={MODEL['seq_len']}, {MODEL['steps']} steps per rung, median of the last "
          f"{MODEL['steps'] - WARMUP}; {torch.get_num_threads()} thread(s)\n")
    print(runner.format_table(rows, valid=valid, memory=False))  # one process: one shared peak
    best = runner.best_rung(rows, valid=valid)
    print(f"\nbest rung: {best['key']} ({best['name']}), {best['speedup']:.2f}x rung 0")
    for r in rows:
        if r["vs_parent"] is not None and r["vs_parent"] < 1:
            print(f"rung {r['key']} slowed this machine down ({r['vs_parent']:.2f}x): {r['note']}")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['key']}\n{r['name']}" for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(labels, values, color=[MUTED] + [NAVY] * (len(rows) - 1))
    bars[rows.index(best)].set_color(GOLD)
    for bar, r in zip(bars, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{r['speedup']:.2f}x",
                ha="center", va="bottom")
    ax.set_ylabel("tokens/s (median, measured)")
    ax.set_title("The speed ladder on this machine: one change per rung")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "speed_ladder.png", dpi=100)
    plt.close(fig)
    print(f"wrote {OUT / 'speed_ladder.png'}")

    # The claims: every rung computes the same function (validated), and the ladder pays.
    bad = {k: reason for k, (ok, reason) in valid.items() if not ok}
    assert not bad, f"rungs failed validation: {bad}"
    assert best["speedup"] > 1.5, f"best rung only {best['speedup']:.2f}x rung 0"
    # The two columns agree: the cumulative speedup of a main rung is the product of the
    # one-change gains on its path (a table dividing by the wrong rung breaks this).
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        product, key = 1.0, r["key"]
        while by_key[key]["vs_parent"] is not None:
            product *= by_key[key]["vs_parent"]
            key = ladder.get_rung(key).builds_on
        assert abs(product - r["speedup"]) <= 1e-9 * r["speedup"], (r["key"], product)


if __name__ == "__main__":
    main()
