"""Lesson 14 - ZeRO: shard the optimizer state, then the gradients, then the parameters.

Objective: measure, per rank, the bytes of parameters, gradients and AdamW state under
  stage 0  DDP + AdamW              every rank holds everything
  stage 1  DDP + ZeroOptimizer(stage=1)   optimizer state / N
  stage 2  ZeroOptimizer(stage=2)         + gradients / N
  stage 3  FSDP + AdamW (minitrain.fsdp)  + parameters / N
and check them against the prediction (fp32, AdamW = 2 state values per parameter):
  params = 4P (/N at stage 3), grads = 4P (/N from stage 2), state = 8P (/N from stage 1).
All four stages train the tiny GPT to the same loss: sharding changes where bytes live, not the
arithmetic.

Serves: syllabus 16-09 (parameter, gradient and optimizer-state sharding; ZeRO Stage 1/2/3
comparison); workshop guide Section 8 ("Memory Optimization Techniques": FSDP) and Section 13
"Training Infrastructure" ("Distributed Training Strategies"). The Module 8 deck has no ZeRO
slide; this continues its M8-LAB-04 DDP run.
Prerequisites: lessons 12-13 (all-reduce, DDP).
Run: python lessons/14_zero_sharding.py   (spawns 2 and 3 CPU processes, < 60 s)
What the numbers leave out (say it on the slide): activations, DDP's bucket buffers, and stage
3's one gathered block at a time; stage 2 here reduces after backward, so the full gradient still
exists during backward (production ZeRO-2 reduces bucket by bucket from hooks).
"""
import json
import os

import matplotlib.pyplot as plt
import torch

from benchmarks.experiments import train_with_stage
from minitrain.distributed_utils import launch
from minitrain.model import GPT, GPTConfig
from minitrain.style import GOLD, MUTED, NAVY, RED, outputs_dir

OUT = outputs_dir("lesson14")
WORLDS = (2, 3)
KINDS = ("params", "grads", "optimizer_state")
SETTINGS = dict(n_layer=2, n_embd=32, steps=2, seed=0)


def threads_per_rank(world):
    """All cores, shared by the ranks: one process per rank, cores // world threads each."""
    return max(1, (os.cpu_count() or 1) // world)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    for world in WORLDS:
        for stage in range(4):
            for r in launch(train_with_stage, world, stage, timeout_s=120,
                            threads=threads_per_rank(world), **SETTINGS):
                rows.append({"world": world, **r})
    print(f"tiny GPT: {rows[0]['num_params']:,} parameters; bytes per rank, measured (predicted)")
    print(f"{'N':>2} {'stage':>5} {'rank':>4} | " + " | ".join(f"{k:>22}" for k in KINDS)
          + f" | {'loss':>7}")
    for r in rows:
        cells = " | ".join(f"{r['measured'][k]:>10,} ({r['predicted'][k]:>9,.0f})" for k in KINDS)
        print(f"{r['world']:>2} {r['stage']:>5} {r['rank']:>4} | {cells} | {r['loss']:.4f}")
    # The lesson's claims, checked on the measured numbers:
    n_tensors = len(list(GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=SETTINGS["n_layer"],
                                       n_head=2, n_embd=SETTINGS["n_embd"])).parameters()))
    for world in WORLDS:
        losses = {r["loss"] for r in rows if r["world"] == world}
        assert max(losses) - min(losses) < 1e-4, f"all stages must train alike: {losses}"
        for r in (r for r in rows if r["world"] == world):
            for k in KINDS:  # greedy partition / padding: within 10% of the prediction
                pred, meas = r["predicted"][k], r["measured"][k]
                assert abs(meas - pred) <= 0.10 * pred, (world, r["stage"], r["rank"], k)
            total_state = sum(x["measured"]["optimizer_state"] for x in rows
                              if x["world"] == world and x["stage"] == r["stage"])
            expected = 8 * r["num_params"] * (world if r["stage"] == 0 else 1)
            # Shards add up to one copy, up to stage 3's padding: each parameter tensor is
            # zero-padded to a multiple of N (<= N-1 values, 8 bytes of AdamW state each).
            assert abs(total_state - expected) <= 8 * (world - 1) * n_tensors, (world, r["stage"])
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))

    fig, axes = plt.subplots(1, len(WORLDS), figsize=(13, 4.8), sharey=True)
    colors = {"params": NAVY, "grads": MUTED, "optimizer_state": GOLD}
    for ax, world in zip(axes, WORLDS):
        sel = [r for r in rows if r["world"] == world and r["rank"] == 0]
        bottom = [0.0] * len(sel)
        for k in KINDS:
            vals = [r["measured"][k] / 1024 for r in sel]
            ax.bar([f"stage {r['stage']}" for r in sel], vals, bottom=bottom, color=colors[k],
                   label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot([f"stage {r['stage']}" for r in sel],
                [sum(r["predicted"][k] for k in KINDS) / 1024 for r in sel], "o--",
                color=RED, label="predicted total")
        ax.set_title(f"rank 0 of N = {world}")
        ax.set_ylabel("KiB per rank (measured)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(OUT / "zero_memory.png", dpi=110)
    plt.close(fig)
    print(f"measured bytes match the ZeRO formulas within 10%; figure: {OUT / 'zero_memory.png'}")


if __name__ == "__main__":
    main()
