"""Lesson 04 — gradient clipping: what the gradient norm does at a high lr, and what clipping costs.

Objective: train the tiny GPT at a high peak lr three times (same seed, batches, schedule),
changing only the clipping threshold:
  no clipping      (we still measure the norm every step)
  clip_norm = 1.0  the common LLM default
  clip_norm = 0.1  too aggressive: far below the typical norm, it fires on every step
and read off: the distribution of the pre-clip gradient norm, how often clipping fires, the
largest norm spike, the worst loss jump, and the final validation loss.

What the measurements say (and the lesson asserts): without clipping, the high lr produces
rare gradient-norm spikes tens of times the median and a loss jump of several nats, and the run
ends worse; clip 1.0 fires on only a few percent of steps yet removes the jump. Clip 0.1 fires on
every step — and with AdamW it costs surprisingly little: Adam divides each update by the running
RMS of the gradients, so shrinking every gradient by a similar factor is largely undone. What it
does change is that every step is capped alike (a big, informative gradient counts no more than a
small one). With plain SGD the same threshold would shrink every step ~10x: the real cost. The norm we log is the one
`minitrain.clip.clip_grad_norm` returns: BEFORE clipping (logging the clipped one hides spikes).

Serves: Module 8 deck slide 5 (gradient clipping; annotation 9: monitor gradient-norm
distributions), slide 13 / M8-LAB-01, slide 14 / M8-LAB-APP-A (clipping activation check), slide
15 / M8-CODE-01 (the clipping condition); syllabus 16-06 (gradient norm monitoring, max-norm
clipping); notebook section "2. Gradient Clipping".
Prerequisites: lesson 03 (the schedule), `minitrain.clip`.

Run: python lessons/04_gradient_clipping.py   (~25 s on 2 cores; figure in outputs/lesson04/)
"""
import matplotlib.pyplot as plt
import numpy as np
import torch

from minitrain.bench import fastest_thread_count
from minitrain.clip import clip_grad_norm, grad_norm
from minitrain.data import corpus_tokens, get_batch, split_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.schedule import WarmupCosine
from minitrain.style import BACKGROUND, GOLD, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson04")
STEPS, WARMUP, MAX_LR = 200, 10, 2e-2
BATCH, SEQ = 16, 32
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)


def run(data, val_batches, clip, seed=0):
    """One run; returns (losses, pre-clip norms, clipped flags, final val loss)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=MAX_LR, weight_decay=0.0)
    sched = WarmupCosine(opt, total_steps=STEPS, warmup_steps=WARMUP, min_lr=MAX_LR / 10)
    rng = np.random.default_rng(seed)
    losses, norms, fired = [], [], []
    for _ in range(STEPS):
        x, y = get_batch(data, BATCH, SEQ, rng=rng)       # (B, T), (B, T)
        _, loss = model(x, y)
        loss.backward()
        norm = clip_grad_norm(params, clip) if clip is not None else grad_norm(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        norms.append(float(norm))                         # BEFORE clipping
        fired.append(clip is not None and float(norm) > clip)
    with torch.no_grad():
        val = float(np.mean([model(x, y)[1].item() for x, y in val_batches]))
    return np.array(losses), np.array(norms), np.array(fired), val


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    train, val = split_tokens(corpus_tokens(max_bytes=300_000))
    vrng = np.random.default_rng(1234)
    val_batches = [get_batch(val, 32, SEQ, rng=vrng) for _ in range(4)]
    runs = {name: run(train, val_batches, clip)
            for name, clip in [("no clipping", None), ("clip 1.0", 1.0), ("clip 0.1", 0.1)]}

    print(f"tiny GPT, {STEPS} steps, AdamW peak lr {MAX_LR:g} (warmup {WARMUP} + cosine), seed 0")
    print(f"{'run':12} {'median norm':>11} {'p90':>7} {'max':>7} {'clipped':>8} "
          f"{'worst jump':>10} {'val loss':>9}")
    for name, (losses, norms, fired, v) in runs.items():
        jump = np.max(losses[1:] - np.minimum.accumulate(losses)[:-1])   # rise above best so far
        print(f"{name:12} {np.median(norms):11.3f} {np.percentile(norms, 90):7.3f} "
              f"{norms.max():7.2f} {fired.mean():8.0%} {jump:10.3f} {v:9.4f}")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), facecolor=BACKGROUND)
    colors = {"no clipping": RED, "clip 1.0": NAVY, "clip 0.1": GOLD}
    bins = np.logspace(np.log10(min(r[1].min() for r in runs.values())),
                       np.log10(max(r[1].max() for r in runs.values())), 40)
    for name, (losses, norms, fired, v) in runs.items():
        axes[0].hist(norms, bins=bins, color=colors[name], alpha=0.55, label=name)
        axes[1].plot(norms, color=colors[name], lw=1.2, label=name)
        axes[2].plot(np.convolve(losses, np.ones(5) / 5, mode="valid"), color=colors[name],
                     lw=1.6, label=f"{name} (val {v:.3f})")
    axes[0].set_xscale("log")
    axes[0].set_title("pre-clip gradient norm: distribution", color=NAVY, loc="left")
    axes[1].set_yscale("log")
    for clip, c in [(1.0, NAVY), (0.1, GOLD)]:
        axes[1].axhline(clip, color=c, ls="--", lw=1)
    axes[1].set_title("pre-clip norm per step (dashed: thresholds)", color=NAVY, loc="left")
    axes[2].set_title("training loss (5-step mean)", color=NAVY, loc="left")
    for ax in axes:
        ax.set_facecolor(PANEL)
        ax.legend(fontsize=9)
    axes[1].set_xlabel("optimizer step")
    axes[2].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(OUT / "gradient_clipping.png", dpi=110)
    plt.close(fig)
    print(f"figure: {OUT / 'gradient_clipping.png'}")

    none, one, tight = runs["no clipping"], runs["clip 1.0"], runs["clip 0.1"]
    # the first step's norms are identical: clipping changes nothing before the first update
    assert abs(none[1][0] - one[1][0]) < 1e-6 * none[1][0]
    jumps = {k: np.max(r[0][1:] - np.minimum.accumulate(r[0])[:-1]) for k, r in runs.items()}
    assert tight[2].mean() == 1.0, "clip 0.1 is below every measured norm: it fires every step"
    assert 0.0 < one[2].mean() < 0.5, "clip 1.0 should fire on some, not most, steps"
    assert none[1].max() > 10 * np.median(none[1]), "expected a norm spike without clipping"
    assert jumps["no clipping"] > 2 * jumps["clip 1.0"], "clipping should tame the loss jump"
    assert one[3] < none[3], "clip 1.0 should end below the unclipped run at this lr"
    print(f"cost of clip 0.1 vs clip 1.0 under AdamW: {tight[3] - one[3]:+.4f} val loss")


if __name__ == "__main__":
    main()
