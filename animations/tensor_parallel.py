"""Tensor parallelism: an MLP's weights split into column and row shards, and the one all-reduce.

Every cell is a real number: a small MLP (C=6 -> H=16 -> C) runs on 2 gloo processes with
minitrain.tensor_parallel's ColumnParallelLinear -> GELU -> RowParallelLinear; each rank returns
its weight shards, its hidden activations h_r, its partial output z_r and the all-reduced z. The
script asserts that z equals the unsharded MLP's output and that each rank ran exactly one
all-reduce, before it draws.

    python animations/tensor_parallel.py            # 1920x1080 GIF
    python animations/tensor_parallel.py --quick    # a few small frames (tests)
    python animations/tensor_parallel.py --stills   # also a PNG per phase
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.colors import LinearSegmentedColormap

from minitrain.distributed_utils import launch
from minitrain.tensor_parallel import ColumnParallelLinear, RowParallelLinear
import deck  # animations/deck.py: this script's folder is on sys.path

C, H, T, WORLD, SEED = 6, 16, 5, 2, 0
RANK_COLORS = (deck.NAVY, deck.GOLD)
PHASES = [
    "One MLP on one device:  z = GELU(x W1ᵀ + b1) W2ᵀ + b2",
    "Column-parallel: rank r keeps columns r of W1ᵀ (output rows of nn.Linear.weight)",
    "Each rank: h_r = GELU(x W1_rᵀ + b1_r). GELU is elementwise: no message needed",
    "Row-parallel: rank r keeps rows r of W2ᵀ; z_r = h_r W2_rᵀ is only a partial sum",
    "g = all-reduce: z = z_0 + z_1 + b2, on every rank: exactly the unsharded output",
    "Backward mirrors it: f all-reduces dL/dx once; g passes dL/dz through",
]
MOVE, HOLD = 4, 10


def base_mlp():
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(C, H), nn.GELU(approximate="tanh"), nn.Linear(H, C))


def split_run(rank, world):
    """Run the split MLP on this rank; return every intermediate the frames show."""
    full = base_mlp()
    col, row = ColumnParallelLinear.from_linear(full[0]), RowParallelLinear.from_linear(full[2])
    x = torch.randn(T, C, generator=torch.Generator().manual_seed(SEED + 1))
    calls, original = [], dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), original(t, *a, **k))[1]
    with torch.no_grad():
        h = F.gelu(col(x), approximate="tanh")  # (T, H/N)
        partial = F.linear(h, row.weight)  # (T, C): what this rank adds into the all-reduce
        z = row(h)  # (T, C): all-reduced, + b2
    dist.all_reduce = original
    return {"x": x, "w1": col.weight.t().clone(), "h": h, "w2": row.weight.t().clone(),
            "partial": partial, "z": z, "calls": calls}


def main():
    args = deck.parse_args(__doc__)
    ranks = launch(split_run, WORLD, timeout_s=60)
    full = base_mlp()
    with torch.no_grad():
        z_full = full(ranks[0]["x"])
    diff = max((r["z"] - z_full).abs().max().item() for r in ranks)
    assert diff < 1e-5, f"the split MLP must equal the unsharded one, max diff {diff}"
    assert all(r["calls"] == [T * C] for r in ranks), "one all-reduce of (T, C) per rank"
    w1_full, w2_full = full[0].weight.detach().t(), full[2].weight.detach().t()  # (C,H) (H,C)

    cmap = LinearSegmentedColormap.from_list("deck", [deck.NAVY, "#FFFFFF", deck.GOLD])
    fig, ax = deck.figure(title="Tensor parallelism: split the matmul, sum the pieces",
                          wisdom="Split W1 by columns and W2 by rows: one all-reduce each way.")
    ax.set_axis_off()
    caption = fig.text(0.03, 0.885, "", fontsize=19, color=deck.TEXT)

    def panel(rect, data, label, color=deck.MUTED):
        a = fig.add_axes(rect)
        lim = data.abs().max().item()  # each panel on its own symmetric scale: 0 is white
        im = a.imshow(data.detach().numpy(), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
        a.set_xticks([])
        a.set_yticks([])
        for s in a.spines.values():
            s.set_color(color)
            s.set_linewidth(3)
        a.set_title(label, fontsize=13, color=color)
        return a, [im, a.title, *a.spines.values()]

    top, rows_y, hgt = 0.66, (0.40, 0.135), 0.18
    cols = {"x": (0.03, 0.07), "w1": (0.15, 0.15), "h": (0.35, 0.12), "w2": (0.52, 0.07),
            "partial": (0.64, 0.07), "z": (0.84, 0.07)}
    groups = {0: [], 1: [], 2: [], 3: [], 4: []}  # phase -> artists that appear in it
    for key, data, label in (("x", ranks[0]["x"], "x (T, C) replicated"),
                             ("w1", w1_full, "W1ᵀ (C, H) unsharded"),
                             ("w2", w2_full, "W2ᵀ (H, C)"), ("z", z_full, "MLP(x) one device")):
        left, width = cols[key]
        a, artists = panel([left if key != "w2" else 0.40, top, width if key != "w2" else 0.07,
                            hgt], data, label)
        groups[0] += artists
        if key == "w1":  # the column split: dashed line between the two ranks' halves
            groups[1].append(a.axvline(H / 2 - 0.5, color=deck.RED, ls="--", lw=3))
        if key == "w2":  # the row split
            groups[3].append(a.axhline(H / 2 - 0.5, color=deck.RED, ls="--", lw=3))
    for r, y in enumerate(rows_y):
        color, d = RANK_COLORS[r], ranks[r]
        for key, phase, label in (("w1", 1, f"rank {r}: W1_{r}ᵀ (C, H/2)"),
                                  ("h", 2, f"h_{r} = GELU(x W1_{r}ᵀ) (T, H/2)"),
                                  ("w2", 3, f"W2_{r}ᵀ (H/2, C)"),
                                  ("partial", 3, f"z_{r} partial (T, C)"),
                                  ("z", 4, "z after all-reduce")):
            left, width = cols[key]
            groups[phase] += panel([left, y, width, hgt], d[key], label, color)[1]
    arrow = fig.text(0.755, 0.33, "all-reduce\n(sum)  ⟶", fontsize=17, color=deck.RED,
                     ha="center", fontweight="bold")
    groups[4].append(arrow)
    stats = fig.text(0.03, 0.065, "", fontsize=14, color=deck.TEXT)
    groups[5] = [stats]
    sent = 2 * (WORLD - 1) / WORLD * T * C * 4
    stats.set_text(f"measured: each rank ran 1 all-reduce of (T, C) = {T * C * 4} bytes "
                   f"(ring: {sent:.0f} bytes sent) | max |z - MLP(x)| = {diff:.1e} | each rank "
                   f"holds {(C * H + H + H * C) // WORLD + C} of {2 * C * H + H + C} weights")

    timeline = []  # (phase, fade-in progress of that phase's artists)
    for p in range(len(PHASES)):
        timeline += ([(p, 1.0)] if args.quick else
                     [(p, (i + 1) / MOVE) for i in range(MOVE)] + [(p, 1.0)] * HOLD)

    def update(frame):
        phase, t = timeline[frame]
        caption.set_text(f"{phase + 1}/{len(PHASES)}  {PHASES[phase]}")
        for p, artists in groups.items():
            alpha = 1.0 if p < phase else (t if p == phase else (0.12 if p < 5 else 0.0))
            for a in artists:
                a.set_alpha(alpha)
        return []

    deck.save(fig, update, len(timeline), args, default_name="tensor_parallel",
              still_frames=[i for i, (p, t) in enumerate(timeline)
                            if t == 1.0 and (i + 1 == len(timeline) or timeline[i + 1][0] != p)])


if __name__ == "__main__":
    main()
