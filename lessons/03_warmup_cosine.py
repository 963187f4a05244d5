"""Lesson 03 — learning-rate warmup + cosine decay, measured on the tiny GPT.

Objective: train the same tiny GPT three times — same seed, same batches, same number of steps,
same peak lr — changing only the lr schedule:
  constant      lr = max_lr from step 0 (no warmup, no decay)
  warmup+cosine 20 warmup steps, cosine to max_lr/10 at the last step (minitrain.schedule)
  bug: T x 4    the same schedule with total_steps counted in micro-batches (accum_steps = 4):
                the cosine has barely started when training ends (lr still ~0.9 max_lr)
  bug: T / 4    total_steps divided by accum_steps once too often: the lr reaches min_lr at a
                quarter of the run and idles there
and compare the loss curves and the final validation loss; plot the four lr curves.

What the measurements say (and the lesson asserts): warmup+cosine ends clearly below the
constant lr without warmup, and clearly below the too-early decay (T / 4). The T x 4 run is the
instructive one: in a 200-step run of an under-trained model a higher lr keeps paying off, so
the buggy schedule can even score LOWER than the correct one. That is how this bug survives:
the run looks fine, and a comparison then credits (or blames) the wrong thing. Always plot the
lr the optimizer actually used (the trainer logs it in metrics.jsonl) and check its last value.

Serves: Module 8 deck slide 4 (warmup and cosine decay; annotation 8 "miscomputed total
iteration count" is the bug measured here), slide 7 (the hour-1 animation,
animations/scheduler_stability.py), slide 13 / M8-LAB-01, slide 14 / M8-LAB-APP-A (LR schedule
correctness check), slide 15 / M8-CODE-01 (the warmup and cosine branches); syllabus 16-06
(warmup schedules: linear, cosine); notebook section "1. Learning Rate Scheduling"; GPT-2 notes
"Learning Rate Scheduler (Cosine Decay)" and "Learning Rate Warmup"; workshop guide Section 10
"Critical Hyperparameters" ("Cosine Schedule with Warmup").
Prerequisites: lesson 01 (the training step), `minitrain.schedule`, AdamW.

Run: python lessons/03_warmup_cosine.py   (~25 s on 2 cores; figure in outputs/lesson03/)
"""
import matplotlib.pyplot as plt
import numpy as np
import torch

from minitrain.bench import fastest_thread_count
from minitrain.data import corpus_tokens, get_batch, split_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.schedule import WarmupCosine, warmup_cosine
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson03")
STEPS, WARMUP, MAX_LR, ACCUM = 200, 20, 1e-2, 4
BATCH, SEQ = 16, 32
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)


def run(data, val_batches, *, total_steps, warmup_steps, min_lr, seed=0):
    """One training run; returns (train losses, lrs used, final val loss)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=MAX_LR, weight_decay=0.0)
    sched = WarmupCosine(opt, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=min_lr)
    rng = np.random.default_rng(seed)                     # the same batches in every run
    losses, lrs = [], []
    for _ in range(STEPS):
        x, y = get_batch(data, BATCH, SEQ, rng=rng)       # (B, T), (B, T)
        _, loss = model(x, y)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])             # the lr this step uses
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()                                      # after opt.step(): the torch order
        losses.append(loss.item())
    with torch.no_grad():
        val = float(np.mean([model(x, y)[1].item() for x, y in val_batches]))
    return losses, lrs, val


def smooth(values, k=10):
    return np.convolve(values, np.ones(k) / k, mode="valid")


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    train, val = split_tokens(corpus_tokens(max_bytes=300_000))
    vrng = np.random.default_rng(1234)
    val_batches = [get_batch(val, 32, SEQ, rng=vrng) for _ in range(4)]
    runs = {
        "constant": run(train, val_batches, total_steps=STEPS, warmup_steps=0, min_lr=MAX_LR),
        "warmup+cosine": run(train, val_batches, total_steps=STEPS, warmup_steps=WARMUP,
                             min_lr=MAX_LR / 10),
        "bug: T x 4": run(train, val_batches, total_steps=STEPS * ACCUM, warmup_steps=WARMUP,
                          min_lr=MAX_LR / 10),
        "bug: T / 4": run(train, val_batches, total_steps=STEPS // ACCUM, warmup_steps=WARMUP,
                          min_lr=MAX_LR / 10),
    }
    print(f"tiny GPT ({MODEL['n_layer']} layers, width {MODEL['n_embd']}), {STEPS} steps, "
          f"batch {BATCH}x{SEQ}, AdamW peak lr {MAX_LR:g}, seed 0")
    print(f"{'schedule':15} {'lr step 0':>10} {'lr last':>10} {'train (last 20)':>16} {'val loss':>9}")
    for name, (losses, lrs, v) in runs.items():
        print(f"{name:15} {lrs[0]:10.2e} {lrs[-1]:10.2e} {np.mean(losses[-20:]):16.4f} {v:9.4f}")
    last_bug = warmup_cosine(STEPS - 1, max_lr=MAX_LR, total_steps=STEPS * ACCUM,
                             warmup_steps=WARMUP, min_lr=MAX_LR / 10)
    print(f"\nbug: at the real last step the lr is still {last_bug / MAX_LR:.0%} of max_lr "
          f"(correct schedule: {runs['warmup+cosine'][1][-1] / MAX_LR:.0%})")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), facecolor=BACKGROUND)
    colors = {"constant": MUTED, "warmup+cosine": NAVY, "bug: T x 4": RED, "bug: T / 4": GOLD}
    for name, (losses, lrs, v) in runs.items():
        axes[0].plot(lrs, color=colors[name], lw=2, label=name)
        axes[1].plot(np.arange(len(smooth(losses))) + 9, smooth(losses), color=colors[name],
                     lw=2, label=f"{name} (val {v:.3f})")
    axes[0].set_title("learning rate per optimizer step", color=NAVY, loc="left")
    axes[1].set_title("training loss (10-step mean)", color=NAVY, loc="left")
    axes[1].set_ylim(None, np.percentile(runs["constant"][0], 90))
    for ax in axes:
        ax.set_facecolor(PANEL)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "warmup_cosine.png", dpi=110)
    plt.close(fig)
    print(f"figure: {OUT / 'warmup_cosine.png'}")

    # The lesson's claims, on these runs.
    const, good, early = (runs[k] for k in ("constant", "warmup+cosine", "bug: T / 4"))
    assert good[1][0] == MAX_LR / WARMUP and good[1][0] > 0, "step 0 must use max_lr / W, not 0"
    assert abs(good[1][-1] - MAX_LR / 10) < 0.01 * MAX_LR, "the schedule must end near min_lr"
    assert last_bug > 0.8 * MAX_LR, "the miscounted schedule should still be near max_lr"
    assert good[2] < const[2], "warmup+cosine should end below the constant lr on this run"
    assert good[2] < early[2], "decaying 4x too early should cost validation loss"
    assert runs["bug: T x 4"][1][-1] > 0.8 * MAX_LR and min(early[1][STEPS // ACCUM:]) == MAX_LR / 10


if __name__ == "__main__":
    main()
