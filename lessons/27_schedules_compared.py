"""Lesson 27 — five learning-rate schedules on the same tiny GPT, the same budget, the same batches.

Objective: the notebook "Training optimization fundamentals" (section 1, "Learning Rate
Scheduling: Essential Schedules") compares schedules by drawing their curves. Here each one
TRAINS the same model from the same seed on the same batches for the same number of steps, so
the only difference is the lr the optimizer was handed:
  constant        lr = peak, the baseline
  warmup+cosine   minitrain.schedule.WarmupCosine (lesson 03)
  step decay      x0.3 every third of the run (torch StepLR)
  one-cycle       peak/25 -> peak at 30% -> peak/25e4 (torch OneCycleLR)
  plateau         x0.5 when the held-out loss stops improving for 2 evaluations (ReduceLROnPlateau)
  inverse sqrt    a LambdaSchedule: linear warmup then 1/sqrt(step) (the original Transformer's)
Every schedule here is proven equal to its torch scheduler in tests/test_schedules_compared.py.

What the measurements say: at this size and budget the schedules' final losses differ by less
than their run-to-run spread. Two runs of this lesson that differed only in the thread count (1
vs 2 threads, which changes the float rounding of every matmul) gave constant 3.38 / 2.97 and
warmup+cosine 3.08 / 3.07: the ranking of the two flipped. So read the table as lesson 07
teaches -- a single run ranks nothing -- and the lesson asserts only what does not depend on
noise: each schedule handed the optimizer the lrs its formula says (one-cycle starts at peak/25
and reaches the peak; the plateau rule cut the lr once the held-out loss stalled). To rank
schedules, repeat each over several seeds and compare the spread (minitrain.hparam does that).

Serves: notebook 002 section 1 (LambdaLR, OneCycleLR, ReduceLROnPlateau, StepLR, cosine);
Module 8 deck M8-LAB-01 / M8-LAB-APP-A (scheduler-enhanced loop); syllabus 16-06 (warmup schedules).
Prerequisites: lesson 03 (warmup + cosine).

Run: python lessons/27_schedules_compared.py   (~30 s on 2 cores; figure in outputs/lesson27/)
"""
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from minitrain.data import corpus_tokens, get_batch, split_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.schedule import (LambdaSchedule, ReduceOnPlateau, WarmupCosine, one_cycle,
                                step_decay)
from minitrain.style import BACKGROUND, GOLD, GREEN, MUTED, NAVY, PANEL, RED, TEXT, outputs_dir

STEPS, PEAK, WARMUP, EVAL_EVERY = 120, 1e-2, 12, 10
BATCH, SEQ = 16, 32
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)


def make_scheduler(name, opt):
    """(scheduler, does it need the eval loss?) for `name`, built on `opt` whose lr is PEAK.
    Build exactly one per optimizer: a scheduler reads the group's lr as its base at birth."""
    if name == "constant":
        return None, False
    if name == "warmup+cosine":
        return WarmupCosine(opt, total_steps=STEPS, warmup_steps=WARMUP, min_lr=PEAK / 10), False
    if name == "step decay":
        return LambdaSchedule(opt, lambda s: step_decay(s, lr=1.0, step_size=STEPS // 3,
                                                        gamma=0.3)), False
    if name == "one-cycle":
        return LambdaSchedule(opt, lambda s: one_cycle(min(s, STEPS - 1), max_lr=1.0,
                                                       total_steps=STEPS)), False
    if name == "plateau":
        return ReduceOnPlateau(opt, factor=0.5, patience=2, threshold=1e-3), True
    if name == "inverse sqrt":
        return LambdaSchedule(opt, lambda s: min((s + 1) / WARMUP,
                                                 math.sqrt(WARMUP / (s + 1)))), False
    raise ValueError(f"unknown schedule {name!r}")


NAMES = ["constant", "warmup+cosine", "step decay", "one-cycle", "plateau", "inverse sqrt"]


def run(name, train, val_batches):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK, weight_decay=0.0)
    sched, needs_metric = make_scheduler(name, opt)
    rng = np.random.default_rng(0)  # the same batches for every schedule
    lrs, losses, evals = [], [], []
    for step in range(STEPS):
        x, y = get_batch(train, BATCH, SEQ, rng=rng)  # (B, T), (B, T)
        _, loss = model(x, y)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])  # the lr this step uses
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if needs_metric and (step + 1) % EVAL_EVERY == 0:
            val = evaluate(model, val_batches[:2])  # a cheap held-out estimate drives the rule
            evals.append(val)
            sched.step(val)
        elif sched is not None and not needs_metric:
            sched.step()
    return lrs, losses, evaluate(model, val_batches)


@torch.no_grad()
def evaluate(model, batches):
    return float(np.mean([model(x, y)[1].item() for x, y in batches]))


def main():
    # One thread: for a model this small it is the fastest setting (the matmuls are too small
    # to split; on the shared 2-core machine a second thread only spins). Nothing here is timed.
    torch.set_num_threads(1)
    out = outputs_dir("lesson27")
    train, val = split_tokens(corpus_tokens(max_bytes=300_000))
    vrng = np.random.default_rng(1234)
    val_batches = [get_batch(val, 32, SEQ, rng=vrng) for _ in range(4)]
    names = NAMES
    runs = {name: run(name, train, val_batches) for name in names}

    print(f"tiny GPT ({MODEL['n_layer']} layers, width {MODEL['n_embd']}), {STEPS} steps, batch "
          f"{BATCH}x{SEQ}, AdamW peak lr {PEAK:g}, same seed and batches for every schedule")
    print(f"{'schedule':14} {'lr step 0':>10} {'max lr':>9} {'lr last':>9} "
          f"{'train (last 20)':>16} {'val loss':>9}")
    for name, (lrs, losses, val_loss) in runs.items():
        print(f"{name:14} {lrs[0]:10.2e} {max(lrs):9.2e} {lrs[-1]:9.2e} "
              f"{np.mean(losses[-20:]):16.4f} {val_loss:9.4f}")

    colors = dict(zip(names, [MUTED, NAVY, GOLD, RED, GREEN, TEXT]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), facecolor=BACKGROUND)
    for name, (lrs, losses, val_loss) in runs.items():
        axes[0].plot(lrs, color=colors[name], lw=2, label=name)
        smooth = np.convolve(losses, np.ones(10) / 10, mode="valid")
        axes[1].plot(np.arange(len(smooth)) + 9, smooth, color=colors[name], lw=2,
                     label=f"{name} (val {val_loss:.3f})")
    axes[0].set_title("learning rate handed to AdamW", color=NAVY, loc="left")
    axes[1].set_title("training loss (10-step mean), same batches", color=NAVY, loc="left")
    for ax in axes:
        ax.set_facecolor(PANEL)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "schedules_compared.png", dpi=110)
    plt.close(fig)
    print(f"figure: {out / 'schedules_compared.png'}")

    # The lesson's claims, on these runs.
    for name in NAMES:
        assert math.isfinite(runs[name][2]), f"{name} ended with a non-finite validation loss"
    assert runs["warmup+cosine"][0][0] == PEAK / WARMUP and math.isclose(
        runs["warmup+cosine"][0][-1], PEAK / 10, rel_tol=0.05), "warmup+cosine: peak/W -> peak/10"
    assert runs["plateau"][0][-1] < PEAK, "the plateau rule should have cut the lr at least once"
    assert math.isclose(runs["one-cycle"][0][0], PEAK / 25) and \
        math.isclose(max(runs["one-cycle"][0]), PEAK), "one-cycle: start at peak/25, reach peak"


if __name__ == "__main__":
    main()
