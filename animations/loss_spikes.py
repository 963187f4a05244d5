"""Loss spikes: a corrupted shard hits a run; the spike detector skips it, the other run pays.

Two real runs of the tiny GPT on the same batches, at an aggressive lr (3e-2, as lesson 16's shard
runs): a shard of corrupted batches (one repeated byte, then random ids) arrives mid-run.
Top: the loss of each run, and the detector's line, threshold x the median of the last healthy
losses (`minitrain.stability.SpikeDetector`); a loss above it is flagged (red) and its batch gets
no optimizer step. The unprotected run (red) takes every step and is still worse at the end.
Bottom: the gradient norm before clipping (the unprotected run's jumps by two orders of
magnitude at the shard's first batch).

Run: python animations/loss_spikes.py [--quick] [--out FILE.gif] [--stills]
"""
import math

import numpy as np
import torch

from minitrain.clip import clip_grad_norm, grad_norm
from minitrain.data import corpus_tokens, get_batch, split_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.schedule import set_lr, warmup_cosine
from minitrain.stability import SpikeDetector
import deck  # animations/deck.py: this script's folder is on sys.path

LR, WARMUP, THRESHOLD, WINDOW = 3e-2, 5, 1.5, 10
FULL = dict(steps=30, shard=(14, 19), batch=8, seq=64, n_embd=64)
QUICK = dict(steps=8, shard=(5, 6), batch=4, seq=16, n_embd=16)


def batches(p):
    train, _ = split_tokens(corpus_tokens(max_bytes=200_000))
    rng = np.random.default_rng(0)
    out = [get_batch(train, p["batch"], p["seq"], rng=rng) for _ in range(p["steps"])]
    gen = torch.Generator().manual_seed(1)
    for step in range(*p["shard"]):
        first = step < (p["shard"][0] + p["shard"][1] + 1) // 2  # first half: one repeated byte
        w = (torch.full((p["batch"], p["seq"] + 1), 255, dtype=torch.long) if first
             else torch.randint(0, 256, (p["batch"], p["seq"] + 1), generator=gen))
        out[step] = (w[:, :-1], w[:, 1:])
    return out


def real_run(p, data, protect):
    """Loss, grad norm, detector line and flags per step (flagged steps: no backward, no step)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=p["seq"], n_layer=2, n_head=2, n_embd=p["n_embd"]))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    detector = SpikeDetector(window=WINDOW, threshold=THRESHOLD)
    loss_t, norm_t, line_t, flag_t = [], [], [], []
    for step, (x, y) in enumerate(data):
        set_lr(opt, warmup_cosine(step, max_lr=LR, total_steps=p["steps"], warmup_steps=WARMUP,
                                  min_lr=LR / 10))
        _, loss = model(x, y)
        line_t.append(THRESHOLD * detector.median if detector.median is not None else math.nan)
        flagged = detector.update(loss.item()) if protect else False
        loss_t.append(loss.item())
        flag_t.append(flagged)
        if flagged:
            norm_t.append(math.nan)
            continue
        loss.backward()
        norm_t.append((clip_grad_norm(model.parameters(), 1.0) if protect
                       else grad_norm(model.parameters())).item())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: np.array(v) for k, v in
            dict(loss=loss_t, norm=norm_t, line=line_t, flag=flag_t).items()}


def main():
    args = deck.parse_args(__doc__)
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds synchronization
    p = QUICK if args.quick else FULL
    data = batches(p)
    bare, safe = real_run(p, data, protect=False), real_run(p, data, protect=True)
    steps = np.arange(p["steps"])

    fig, (ax_loss, ax_norm) = deck.figure(2, 1, title="A corrupted shard: skip the spike, "
                                          "or pay for it later",
                                          wisdom="A spike is judged against healthy history: "
                                                 "never let the spike into the baseline.")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.1, hspace=0.35)
    deck.style_axes(ax_loss, "training loss (log) and the detector's line: "
                             f"{THRESHOLD} x median of the last {WINDOW} healthy losses")
    deck.style_axes(ax_norm, "gradient norm before clipping (log)")
    for ax in (ax_loss, ax_norm):
        ax.axvspan(p["shard"][0] - 0.5, p["shard"][1] - 0.5, color=deck.RED, alpha=0.08)
        ax.set_xlim(-0.5, p["steps"] - 0.5)
        ax.set_yscale("log")
    ax_loss.set_ylim(np.nanmin(np.r_[bare["loss"], safe["loss"]]) * 0.8,
                     np.nanmax(np.r_[bare["loss"], safe["loss"]]) * 1.5)
    norms = np.r_[bare["norm"], safe["norm"]]
    ax_norm.set_ylim(np.nanmin(norms) * 0.5, np.nanmax(norms) * 2)
    ax_norm.set_xlabel("step")
    l_bare = ax_loss.plot([], [], color=deck.RED, lw=2.5, label="unprotected (every step taken)")[0]
    l_safe = ax_loss.plot([], [], color=deck.NAVY, lw=2.5,
                          label="SpikeDetector: skip + clip 1.0")[0]
    l_line = ax_loss.plot([], [], color=deck.GOLD, lw=2, ls="--", label="spike line")[0]
    flags = ax_loss.scatter([], [], color=deck.RED, s=90, zorder=4, label="flagged: batch skipped")
    n_bare = ax_norm.plot([], [], color=deck.RED, lw=2.5)[0]
    n_safe = ax_norm.plot([], [], color=deck.NAVY, lw=2.5)[0]
    ax_loss.legend(loc="upper right", fontsize=12)
    status = ax_loss.text(0.01, 0.06, "", transform=ax_loss.transAxes, fontsize=15,
                          color=deck.TEXT, fontweight="bold")

    n_frames = 3 if args.quick else p["steps"]
    frame_steps = np.linspace(0, p["steps"] - 1, n_frames).round().astype(int)

    def update(frame):
        i = frame_steps[frame]
        s = steps[:i + 1]
        l_bare.set_data(s, bare["loss"][:i + 1])
        l_safe.set_data(s, safe["loss"][:i + 1])
        l_line.set_data(s, safe["line"][:i + 1])
        idx = np.flatnonzero(safe["flag"][:i + 1])
        flags.set_offsets(np.c_[idx, safe["loss"][idx]] if len(idx) else np.empty((0, 2)))
        n_bare.set_data(s, bare["norm"][:i + 1])
        n_safe.set_data(s, safe["norm"][:i + 1])
        status.set_text(f"step {i}: loss {bare['loss'][i]:.2f} unprotected, "
                        f"{safe['loss'][i]:.2f} protected; {len(idx)} batches skipped")
        return []

    update(n_frames - 1)
    print(f"{p['steps']} steps, shard {p['shard']}: final loss unprotected "
          f"{bare['loss'][-1]:.3f}, protected {safe['loss'][-1]:.3f}; "
          f"{int(safe['flag'].sum())} skipped")
    deck.save(fig, update, n_frames, args, default_name="loss_spikes",
              still_frames=(0, int(np.searchsorted(frame_steps, p["shard"][0])), n_frames - 1))


if __name__ == "__main__":
    main()
