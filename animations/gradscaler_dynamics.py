"""GradScaler dynamics: the fp16 number line, its dead zone, and a real scale trajectory.

Top: fp16's number line in powers of two — below 2^-24 every value rounds to 0 (the dead zone),
2^-24..2^-14 are subnormals with few mantissa bits, above 65504 everything is inf. The muted
histogram is the tiny GPT's real parameter gradients at this step (unscaled); the navy one is the
same gradients times the current loss scale: scaling slides them out of the dead zone. (The
overflow that triggers a skip usually happens in fp16 activation gradients inside the backward,
which are not drawn; the scaler sees it as inf/nan in the parameter gradients.)
Bottom: the scale of a real `minitrain.grad_scaler.GradScaler` during fp16 autocast training on
CPU (init 2^24, growth_interval 10): an overflow (red) skips the step and halves the scale; ten
clean steps double it — the saw-tooth that keeps the scale just below overflow.

Run: python animations/gradscaler_dynamics.py [--quick] [--out FILE.gif] [--stills]
"""
import numpy as np
import torch

from minitrain.data import corpus_tokens, get_batch
from minitrain.grad_scaler import GradScaler
from minitrain.model import GPT, GPTConfig
import deck  # animations/deck.py: this script's folder is on sys.path

INIT_SCALE, GROWTH_INTERVAL, LR = 2.0**24, 10, 3e-3
BATCH, SEQ = 16, 32
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)
FULL_STEPS, QUICK_STEPS = 80, 5
EDGES = np.arange(-44, 29, 1.0)                           # log2 bins of |gradient|
FP16_MAX_LOG2 = float(np.log2(65504.0))


def real_trajectory(steps):
    """Per step: scale used, skipped?, histogram of log2|unscaled grad| (finite, non-zero)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    scaler = GradScaler(init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    data = corpus_tokens(max_bytes=300_000)
    rng = np.random.default_rng(1)
    scales, skipped, hists = [], [], []
    for _ in range(steps):
        x, y = get_batch(data, BATCH, SEQ, rng=rng)
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = model(x, y)
        scales.append(scaler.get_scale())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                              # true gradients (inf if overflowed)
        g = torch.cat([p.grad.reshape(-1).float() for p in model.parameters()])
        g = g[torch.isfinite(g) & (g != 0)].abs()
        hists.append(np.histogram(np.log2(g.numpy()), bins=EDGES)[0])
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.last_step_skipped)
        opt.zero_grad(set_to_none=True)
    return np.array(scales), np.array(skipped), np.array(hists)


def main():
    args = deck.parse_args(__doc__)
    torch.set_num_threads(1)
    steps = QUICK_STEPS if args.quick else FULL_STEPS
    scales, skipped, hists = real_trajectory(steps)
    log_s = np.log2(scales)

    fig, (ax_line, ax_scale) = deck.figure(2, 1, title="GradScaler: slide the gradients out of "
                                           "fp16's dead zone, back off on overflow",
                                           wisdom="Scale up until it overflows, then halve: "
                                                  "the loss scale finds the edge by itself.")
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.1, hspace=0.4)
    deck.style_axes(ax_line, "fp16 number line (log2 |value|) and this step's real gradients")
    deck.style_axes(ax_scale, "loss scale of a real fp16 run (log2)")
    ax_line.axvspan(EDGES[0], -24, color=deck.RED, alpha=0.15)
    ax_line.axvspan(-24, -14, color=deck.GOLD, alpha=0.18)
    ax_line.axvspan(FP16_MAX_LOG2, EDGES[-1], color=deck.RED, alpha=0.15)
    top = hists.max() * 1.25
    for x, label in [(-34, "dead zone: rounds to 0"), (-19, "subnormal"),
                     (0, "fp16 normal range"), (21.5, "overflow: inf")]:
        ax_line.text(x, top * 0.92, label, ha="center", color=deck.TEXT, fontsize=13)
    ax_line.set_xlim(EDGES[0], EDGES[-1])
    ax_line.set_ylim(0, top)
    ax_line.set_xlabel("log2 |gradient|")
    ax_line.set_ylabel("elements")
    ghost = ax_line.stairs(hists[0], EDGES, color=deck.MUTED, fill=True, alpha=0.6,
                           label="gradients, unscaled")
    scaled = ax_line.stairs(hists[0], EDGES + log_s[0], color=deck.NAVY, fill=True, alpha=0.7,
                            label="gradients x scale (as the scaled backward makes them)")
    ax_line.legend(loc="upper left", fontsize=12, bbox_to_anchor=(0.0, 0.85))
    ax_line.text(0.99, 0.40, "an overflow can happen anywhere in the fp16 backward\n"
                 "(often activation gradients, not drawn): inf/nan in any .grad skips the step",
                 transform=ax_line.transAxes, ha="right", fontsize=11, color=deck.TEXT)
    status = ax_line.text(0.99, 0.62, "", transform=ax_line.transAxes, ha="right",
                          fontsize=16, color=deck.NAVY, fontweight="bold")

    ax_scale.set_xlim(-0.5, steps - 0.5)
    ax_scale.set_ylim(log_s.min() - 1, log_s.max() + 1)
    ax_scale.set_xlabel("optimizer step")
    ax_scale.set_ylabel("log2 scale")
    trace = ax_scale.step([], [], where="post", color=deck.NAVY, lw=3)[0]
    skips = ax_scale.scatter([], [], color=deck.RED, s=80, zorder=3,
                             label="overflow: step skipped, scale x 0.5")
    ax_scale.legend(loc="upper right", fontsize=12)

    n_frames = min(3, steps) if args.quick else steps
    frame_steps = np.linspace(0, steps - 1, n_frames).round().astype(int)

    def update(frame):
        i = frame_steps[frame]
        ghost.set_data(values=hists[i], edges=EDGES)
        scaled.set_data(values=hists[i], edges=EDGES + log_s[i])
        dead = hists[i][EDGES[:-1] < -24].sum()
        event = ("OVERFLOW: step skipped, scale halves" if skipped[i]
                 else "clean step")
        status.set_text(f"step {i}: scale 2^{log_s[i]:.0f}   {event}\n"
                        f"unscaled grads in the dead zone: {dead}")
        status.set_color(deck.RED if skipped[i] else deck.NAVY)
        trace.set_data(np.arange(i + 1), log_s[:i + 1])
        idx = np.flatnonzero(skipped[:i + 1])
        skips.set_offsets(np.c_[idx, log_s[idx]] if len(idx) else np.empty((0, 2)))
        return []

    first_skip = int(np.flatnonzero(skipped)[0]) if skipped.any() else 0
    clean = int(np.flatnonzero(~skipped)[0]) if (~skipped).any() else 0
    stills = {0, int(np.searchsorted(frame_steps, first_skip)),
              int(np.searchsorted(frame_steps, clean)), n_frames - 1}
    update(n_frames - 1)
    print(f"{steps} steps: {int(skipped.sum())} skipped, scale 2^{log_s[0]:.0f} -> "
          f"2^{np.log2(scales[-1]):.0f}")
    deck.save(fig, update, n_frames, args, default_name="gradscaler_dynamics",
              still_frames=tuple(sorted(min(s, n_frames - 1) for s in stills)))


if __name__ == "__main__":
    main()
