"""Scheduler + clipping = stability: two real trainer runs, controls off vs on.

Storyboard ("hour 15" of the course): the lr rises during warmup, then decays along the cosine;
at a high peak lr a gradient-norm spike arrives — with clipping it is cut to the threshold (red
marks: steps where clipping fired) — and the loss trajectory of the controlled run stays smooth
while the uncontrolled one (constant lr, no warmup, no clipping) jumps.

Both runs are `minitrain.train.train(TrainConfig(...))` calls with the same seed, data and steps;
every curve is read from their metrics.jsonl (lr, loss, grad_norm before clipping, clipped).

Run: python animations/scheduler_stability.py [--quick] [--out FILE.gif] [--stills]
"""
import pathlib
import tempfile

import numpy as np
import torch

from minitrain.files import read_jsonl
from minitrain.train import TrainConfig, train
import deck  # animations/deck.py: this script's folder is on sys.path

MAX_LR, WARMUP, CLIP = 2e-2, 10, 1.0
TINY = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=16, corpus_bytes=300_000,
            weight_decay=0.0, seed=0, log_every=0, eval_iters=2)
FULL_STEPS, QUICK_STEPS = 200, 8
FULL_FRAMES, QUICK_FRAMES = 90, 3


def real_runs(steps, out_root):
    """(controls off, controls on): lists of metrics.jsonl records."""
    configs = {
        "off": dict(max_lr=MAX_LR, min_lr=MAX_LR, warmup_steps=0, clip_norm=None),
        "on": dict(max_lr=MAX_LR, min_lr=MAX_LR / 10, warmup_steps=min(WARMUP, steps // 2),
                   clip_norm=CLIP),
    }
    runs = {}
    for name, kw in configs.items():
        cfg = TrainConfig(steps=steps, eval_every=steps, checkpoint_every=steps,
                          out_dir=str(pathlib.Path(out_root) / name), **TINY, **kw)
        result = train(cfg)
        runs[name] = read_jsonl(result.metrics_path)
    return runs["off"], runs["on"]


def main():
    args = deck.parse_args(__doc__)
    torch.set_num_threads(1)  # fixed: the same numbers on every run, no thread thrashing
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    with tempfile.TemporaryDirectory() as tmp:
        off, on = real_runs(steps, tmp)
    step = np.arange(steps)
    col = {k: np.array([r[k] if r[k] is not None else np.nan for r in on], dtype=float)
           for k in ("lr", "loss", "grad_norm")}
    col_off = {k: np.array([r[k] if r[k] is not None else np.nan for r in off], dtype=float)
               for k in ("lr", "loss", "grad_norm")}
    clipped = np.array([r["clipped"] for r in on])
    spike = int(np.nanargmax(col_off["grad_norm"]))

    fig, axes = deck.figure(2, 2, title="Warmup + cosine + clipping: the same model, calmer",
                            wisdom="Clip the spike, decay the step: stability is a schedule, "
                                   "not luck.")
    ax_lr, ax_loss, ax_norm, ax_text = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.1, hspace=0.35, wspace=0.18)
    deck.style_axes(ax_lr, "learning rate (from metrics.jsonl)")
    deck.style_axes(ax_loss, "training loss")
    deck.style_axes(ax_norm, "gradient norm before clipping (log)")
    ax_text.axis("off")
    lines = {
        "lr_off": ax_lr.plot([], [], color=deck.MUTED, lw=3, label="controls off: constant")[0],
        "lr_on": ax_lr.plot([], [], color=deck.NAVY, lw=3, label="controls on: warmup + cosine")[0],
        "loss_off": ax_loss.plot([], [], color=deck.RED, lw=2, alpha=0.8, label="off")[0],
        "loss_on": ax_loss.plot([], [], color=deck.NAVY, lw=2.5, label="on")[0],
        "norm_off": ax_norm.plot([], [], color=deck.RED, lw=1.5, alpha=0.8, label="off")[0],
        "norm_on": ax_norm.plot([], [], color=deck.NAVY, lw=2, label="on")[0],
    }
    fired = ax_norm.scatter([], [], color=deck.GOLD, s=50, zorder=3, label="clipped (on)")
    ax_norm.axhline(CLIP, color=deck.GOLD, ls="--", lw=1.5)
    ax_lr.set_xlim(0, steps)
    ax_lr.set_ylim(0, MAX_LR * 1.1)
    ax_loss.set_xlim(0, steps)
    ax_loss.set_ylim(np.nanmin([col["loss"], col_off["loss"]]) * 0.95,
                     np.nanmax([col["loss"], col_off["loss"]]) * 1.02)
    ax_norm.set_xlim(0, steps)
    ax_norm.set_yscale("log")
    ax_norm.set_ylim(np.nanmin([col["grad_norm"], col_off["grad_norm"]]) * 0.7,
                     np.nanmax([col["grad_norm"], col_off["grad_norm"]]) * 1.5)
    for ax in (ax_lr, ax_loss, ax_norm):
        ax.set_xlabel("optimizer step")
        ax.legend(loc="upper right", fontsize=12)
    cursor = [ax.axvline(0, color=deck.GOLD, lw=1.5, alpha=0.6) for ax in (ax_lr, ax_loss, ax_norm)]
    caption = ax_text.text(0.02, 0.95, "", va="top", ha="left", fontsize=17, color=deck.TEXT,
                           family="monospace", transform=ax_text.transAxes)

    n_frames = QUICK_FRAMES if args.quick else FULL_FRAMES
    upto = np.linspace(1, steps, n_frames).round().astype(int)

    def update(frame):
        n = upto[frame]
        for key, data in (("lr", "lr"), ("loss", "loss"), ("norm", "grad_norm")):
            lines[f"{key}_off"].set_data(step[:n], col_off[data][:n])
            lines[f"{key}_on"].set_data(step[:n], col[data][:n])
        idx = np.flatnonzero(clipped[:n])
        fired.set_offsets(np.c_[idx, col["grad_norm"][idx]] if len(idx) else np.empty((0, 2)))
        for c in cursor:
            c.set_xdata([n - 1, n - 1])
        phase = "warmup: lr rises" if n <= WARMUP else "cosine: lr decays"
        caption.set_text(
            f"step {n - 1:4d}   ({phase})\n\n"
            f"lr          off {col_off['lr'][n - 1]:.2e}   on {col['lr'][n - 1]:.2e}\n"
            f"loss        off {col_off['loss'][n - 1]:6.3f}     on {col['loss'][n - 1]:6.3f}\n"
            f"grad norm   off {col_off['grad_norm'][n - 1]:6.2f}     on {col['grad_norm'][n - 1]:6.2f}\n"
            f"clipped so far (on): {int(clipped[:n].sum())} of {n} steps\n\n"
            f"largest spike (off): norm {col_off['grad_norm'][spike]:.1f} at step {spike}\n"
            f"peak lr {MAX_LR:g}, clip {CLIP:g}, seed 0, tiny GPT")
        return []

    update(n_frames - 1)
    stills = (0, int(np.searchsorted(upto, WARMUP)), int(np.searchsorted(upto, spike + 1)),
              n_frames - 1)
    deck.save(fig, update, n_frames, args, default_name="scheduler_stability",
              still_frames=tuple(sorted(set(min(s, n_frames - 1) for s in stills))))


if __name__ == "__main__":
    main()
