"""The roofline: a real training step's operators climbing toward the ceiling as the model grows.

Storyboard (syllabus 16-07, the roofline model): the measured roofline of this machine (memory
slope, then the flat matmul ceiling, the ridge point between them). For a tiny GPT at growing
width C and context T, each operator of one real training step (forward + backward + AdamW) is
a dot at (FLOPs / bytes it moved, FLOP/s it reached). As C and T grow, the matmuls move right
and up along the slope toward the ceiling (compute-bound), while LayerNorm, GELU, softmax and
the adds stay on the far left (memory-bound, whatever the size): that is why big models reach a
high MFU and small ones do not, and why fusing elementwise ops (torch.compile) pays.

Every number comes from minitrain: the ceilings from minitrain.profile.peak_flops /
peak_bandwidth (measured, cached), each dot from minitrain.profile.FlopCounter(time_ops=True)
on a real step (matmul FLOPs counted exactly; other ops at a nominal 1 FLOP per output element).

Run: python animations/roofline.py [--quick] [--out FILE.gif] [--stills]
"""
import numpy as np
import torch

from minitrain import profile as mp
from minitrain.model import GPT, GPTConfig
import deck  # animations/deck.py: this script's folder is on sys.path

FULL_SIZES = [(32, 32), (64, 64), (128, 128), (256, 256)]  # (width C, context T)
QUICK_SIZES = [(16, 16), (32, 32)]
FULL_SUBFRAMES, QUICK_SUBFRAMES = 18, 2
OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention_for_cpu", "native_layer_norm",
       "gelu", "add", "mul", "_log_softmax", "_fused_adamw_", "_foreach_mul_")
SEED, BATCH = 0, 4


def profile_step(width, seq):
    """{op: (intensity, FLOP/s)} for one measured training step of a 2-layer GPT."""
    torch.manual_seed(SEED)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=width, block_size=seq))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (BATCH, seq), generator=torch.Generator().manual_seed(SEED))

    def step():
        model(x, x)[1].backward()  # x: (B, T) next-token targets are x itself: fine for timing
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # warm-up: allocations and AdamW state are not what we measure
    with mp.FlopCounter(time_ops=True) as counter:
        step()
    out = {}
    for name, s in counter.by_op.items():
        flops = s.flops if name in mp.FLOP_RULES else s.elements
        if s.seconds > 0 and s.bytes > 0 and flops > 0:
            out[name] = (flops / s.bytes, flops / s.seconds)
    return out


def main():
    args = deck.parse_args(__doc__)
    torch.set_num_threads(1)  # one thread: the same ceiling for every size, no thrashing
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sub = QUICK_SUBFRAMES if args.quick else FULL_SUBFRAMES
    if args.quick:  # small ceilings measurement: seconds, not minutes (own cache entry)
        peak, bw = mp.peak_flops(size=256, reps=2), mp.peak_bandwidth(size_bytes=2**22, reps=2)
    else:
        peak, bw = mp.peak_flops(), mp.peak_bandwidth()
    runs = [profile_step(c, t) for c, t in sizes]
    ops = [o for o in OPS if all(o in r for r in runs)]
    if not ops:
        raise RuntimeError("no operator ran at every size: check OPS against this torch version")
    pos = np.log10([[runs[i][o] for o in ops] for i in range(len(sizes))])  # (S, ops, 2)
    ridge = mp.ridge_point(peak, bw)

    fig, ax = deck.figure(title="The roofline: where a training step's operators sit",
                          wisdom="Left of the ridge, buy bandwidth (fuse, shrink bytes); "
                                 "right of it, buy FLOPs.")
    fig.subplots_adjust(left=0.08, right=0.97, top=0.86, bottom=0.14)
    xs = np.logspace(-2.5, 3, 300)
    ax.loglog(xs, [mp.roofline(x, peak, bw) for x in xs], color=deck.TEXT, lw=3)
    ax.axvline(ridge, color=deck.MUTED, ls="--", lw=1.5)
    ax.text(ridge * 1.1, peak * 1.15, f"ridge {ridge:.1f} FLOP/byte", color=deck.TEXT, fontsize=13)
    ax.text(xs[0] * 1.3, peak * 1.15, f"peak {peak / 1e9:.1f} GFLOP/s, {bw / 1e9:.1f} GB/s "
            "(measured, 1 thread)", color=deck.TEXT, fontsize=13)
    lo = min(pos[..., 1].min(), np.log10(mp.roofline(xs[0], peak, bw)))
    ax.set_ylim(10 ** (lo - 0.3), peak * 3)
    ax.set_xlim(xs[0], xs[-1])
    ax.set_xlabel("arithmetic intensity (FLOPs per byte moved)", fontsize=14)
    ax.set_ylabel("FLOP/s reached", fontsize=14)
    colours = [deck.GOLD if o in mp.FLOP_RULES else deck.NAVY for o in ops]
    dots = ax.scatter(10 ** pos[0, :, 0], 10 ** pos[0, :, 1], s=140, c=colours, zorder=3,
                      edgecolors=deck.TEXT)
    short = {"_scaled_dot_product_flash_attention_for_cpu": "sdpa (fused, CPU)"}
    labels = [ax.text(0, 0, short.get(o, o.strip("_")), fontsize=12, color=deck.TEXT) for o in ops]
    ax.text(0.01, 0.04, "gold: matmuls (FLOPs counted)   navy: elementwise (1 FLOP/element)\n"
            "above the slope = served from cache (the slope is a DRAM copy)",
            transform=ax.transAxes, fontsize=12, color=deck.TEXT)
    caption = ax.text(0.99, 0.04, "", transform=ax.transAxes, ha="right", fontsize=18,
                      color=deck.NAVY, fontweight="bold")
    n_frames = (len(sizes) - 1) * sub + 1 + sub // 2  # a short hold on the last size

    def update(frame):
        f = min(frame / sub, len(sizes) - 1)
        i = min(int(f), len(sizes) - 2)
        w = f - i
        cur = (1 - w) * pos[i] + w * pos[i + 1]  # (ops, 2): log-space interpolation
        dots.set_offsets(10 ** cur)
        for label, (x, y) in zip(labels, cur):
            label.set_position((10 ** x * 1.15, 10 ** y))
        c, t = sizes[round(f)]
        caption.set_text(f"2-layer GPT, width C = {c}, context T = {t}")
        return []

    update(n_frames - 1)
    deck.save(fig, update, n_frames, args, default_name="roofline",
              still_frames=tuple(i * sub for i in range(len(sizes))))


if __name__ == "__main__":
    main()
