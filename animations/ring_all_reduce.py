"""Ring all-reduce: chunks travel the ring, first summed (reduce-scatter), then shared (all-gather).

Every number drawn comes from a real run of `minitrain.collectives.ring_all_reduce` on N gloo
CPU processes: each rank records its chunks after every ring step (`trace=`), and the final
values are asserted equal to `dist.all_reduce` before anything is drawn.

    python animations/ring_all_reduce.py            # 4 ranks, 1920x1080 GIF
    python animations/ring_all_reduce.py --quick    # 3 ranks, a few small frames (tests)
    python animations/ring_all_reduce.py --stills   # also PNGs of key frames
"""
import math

import torch
import torch.distributed as dist
from matplotlib.patches import Rectangle

from minitrain.collectives import ring_all_reduce
from minitrain.distributed_utils import launch
import deck  # animations/deck.py: this script's folder is on sys.path

SEED = 0
MOVE_FRAMES, HOLD_FRAMES = 7, 5  # per ring step (default render)


def record_ring(rank, world, seed):
    """One value per chunk: rank r starts with small integers; returns the trace and a check."""
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    x = torch.randint(1, 10, (world,), generator=gen, dtype=torch.int64)  # (N,) one per chunk
    ref = x.clone()
    dist.all_reduce(ref)
    trace = []
    ring_all_reduce(x, trace=trace)
    assert torch.equal(x, ref), "ring_all_reduce must equal dist.all_reduce"
    return [{"phase": t["phase"], "send": t["send"], "recv": t["recv"],
             "values": [int(c.item()) for c in t["chunks"]]} for t in trace]


def main():
    args = deck.parse_args(__doc__)
    world = 3 if args.quick else 4
    traces = launch(record_ring, world, SEED, timeout_s=60, preload=())  # traces[rank][state]
    n_states = len(traces[0])  # start + 2(N-1) steps
    assert n_states == 1 + 2 * (world - 1)
    totals = [sum(traces[r][0]["values"][c] for r in range(world)) for c in range(world)]
    assert all(traces[r][-1]["values"] == totals for r in range(world))

    move, hold = (1, 1) if args.quick else (MOVE_FRAMES, HOLD_FRAMES)
    fig, ax = deck.figure(title="Ring all-reduce: reduce-scatter, then all-gather",
                          wisdom="Every rank sends 2(N-1)/N of the data - no rank is a hotspot.")
    ax.set_xlim(-1.9, 1.9)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")
    centers = [(1.05 * math.cos(math.pi / 2 - 2 * math.pi * r / world),
                0.95 * math.sin(math.pi / 2 - 2 * math.pi * r / world)) for r in range(world)]
    cell_w, cell_h = 0.22, 0.2
    cells, texts = {}, {}
    for r, (cx, cy) in enumerate(centers):
        ax.text(cx, cy + 0.2, f"rank {r}", ha="center", va="bottom", color=deck.NAVY,
                fontsize=18, fontweight="bold")
        for c in range(world):
            x0 = cx - world * cell_w / 2 + c * cell_w
            rect = ax.add_patch(Rectangle(
                (x0, cy - cell_h / 2), cell_w * 0.94, cell_h, facecolor=deck.PANEL,
                edgecolor=deck.MUTED, lw=1.5))
            cells[r, c] = rect
            texts[r, c] = ax.text(x0 + cell_w * 0.47, cy, "", ha="center", va="center",
                                  fontsize=16, color=deck.TEXT)
            ax.text(x0 + cell_w * 0.47, cy - cell_h / 2 - 0.03, f"c{c}", ha="center", va="top",
                    fontsize=10, color=deck.MUTED)
    for r in range(world):  # the ring: rank r sends to rank r+1
        (x0, y0), (x1, y1) = centers[r], centers[(r + 1) % world]
        ax.annotate("", xy=(x0 + 0.8 * (x1 - x0), y0 + 0.8 * (y1 - y0)),
                    xytext=(x0 + 0.2 * (x1 - x0), y0 + 0.2 * (y1 - y0)),
                    arrowprops=dict(arrowstyle="->", color=deck.MUTED, lw=1.5))
    packets = [ax.text(0, 0, "", ha="center", va="center", fontsize=15, color="white",
                       bbox=dict(boxstyle="round", facecolor=deck.GOLD, edgecolor="none"))
               for _ in range(world)]
    status = fig.text(0.03, 0.07, "", fontsize=16, color=deck.TEXT, va="bottom")
    phase_text = fig.text(0.03, 0.89, "", fontsize=18, color=deck.NAVY, va="top")
    fig.text(0.97, 0.5, "gold = complete sum", ha="right", fontsize=14, color=deck.GOLD)

    timeline = []  # (state index shown in the cells, moving step or None, progress 0..1)
    timeline += [(0, None, 0.0)] * hold
    for s in range(1, n_states):
        timeline += [(s - 1, s, (i + 1) / (move + 1)) for i in range(move)]
        timeline += [(s, None, 0.0)] * hold

    def is_complete(r, c, state):
        """Values start at >= 1, so a partial sum is below the total until every rank added."""
        return traces[r][state]["values"][c] == totals[c]

    def update(frame):
        state, moving, progress = timeline[frame]
        for r in range(world):
            for c in range(world):
                value = traces[r][state]["values"][c]
                texts[r, c].set_text(str(value))
                final = is_complete(r, c, state)
                cells[r, c].set_facecolor(deck.GOLD if final else deck.PANEL)
                texts[r, c].set_color("white" if final else deck.TEXT)
        for r, packet in enumerate(packets):
            if moving is None:
                packet.set_visible(False)
                continue
            send = traces[r][moving]["send"]
            value = traces[r][moving - 1]["values"][send]  # what leaves rank r this step
            (x0, y0), (x1, y1) = centers[r], centers[(r + 1) % world]
            packet.set_position((x0 + progress * (x1 - x0), y0 + progress * (y1 - y0)))
            packet.set_text(f"c{send}={value}")
            packet.set_visible(True)
        phase = traces[0][moving if moving is not None else state]["phase"]
        steps_done = state if moving is None else moving - 1
        phase_text.set_text({"start": "Each rank holds its own gradient, cut into N chunks",
                             "reduce-scatter": "Reduce-scatter: send a chunk right, ADD the one "
                                               "arriving from the left",
                             "all-gather": "All-gather: pass the finished sums around the ring"}
                            [phase])
        status.set_text(f"N = {world} ranks | steps done: {steps_done} of {2 * (world - 1)} | "
                        f"sent per rank: {steps_done}/{world} of the data "
                        f"(total 2(N-1)/N = {2 * (world - 1)}/{world})")
        return []

    n_frames = len(timeline)
    if args.quick:
        timeline[:] = timeline[:: max(1, n_frames // 4)][:4]
        n_frames = len(timeline)
    key = [i for i, t in enumerate(timeline) if t[1] is None and t[0] in (0, world - 1,
                                                                           n_states - 1)]
    deck.save(fig, update, n_frames, args, default_name=f"ring_all_reduce_n{world}",
              still_frames=sorted({key[0], key[len(key) // 2], key[-1]}) if key else ())


if __name__ == "__main__":
    main()
