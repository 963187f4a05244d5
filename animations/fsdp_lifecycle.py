"""FSDP's unit lifecycle, from a real traced training step on 2 gloo ranks.

Each row is one FSDP unit of the tiny GPT (every block, and the root: embeddings, final norm,
head). The bars are rank 0's real events, recorded with `FSDP(..., trace=[...])` during the
third step (the first step records the order prefetch follows): an all-gather in flight (gold),
the unit's full weights alive (navy), the reduce-scatter of its gradient in flight (slate). The
lower panel is the bytes of gathered weights alive on the rank, replayed from the same events.
Read it as: gather -> compute -> free in forward; gather again -> backward -> reduce-scatter ->
free; with prefetch the next unit's gather starts while the current one computes.

    python animations/fsdp_lifecycle.py            # 4 blocks, 1920x1080 GIF
    python animations/fsdp_lifecycle.py --quick    # 2 blocks, a few small frames (tests)
    python animations/fsdp_lifecycle.py --stills   # also PNGs of the forward and the end
"""
import time

import torch
from matplotlib.patches import Rectangle

from minitrain.distributed_utils import launch
from minitrain.fsdp import FSDP
from minitrain.model import GPT, GPTConfig
import deck  # animations/deck.py: this script's folder is on sys.path

STEPS, TRACED = 3, 2  # trace the third step: prefetch follows the order recorded in step 1
COLORS = {"gather": deck.GOLD, "alive": deck.NAVY, "reduce": deck.MUTED}


def traced_step(rank, world, n_layer, n_embd):
    """Train STEPS steps; return rank 0's events of the last one and each unit's bytes."""
    torch.manual_seed(0)
    model = FSDP(GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=4,
                               n_embd=n_embd)), trace=[])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    marks = {}
    for step in range(STEPS):
        idx = torch.randint(0, 256, (world * 4, 65), generator=gen)[rank * 4:(rank + 1) * 4]
        if step == TRACED:
            model.trace.clear()
            marks["forward"] = time.perf_counter()
        opt.zero_grad()
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        if step == TRACED:
            marks["backward"] = time.perf_counter()
        loss.backward()
        model.finish_gradient_synchronization()
        if step == TRACED:
            marks["end"] = time.perf_counter()
        opt.step()
    names = [f"block {i}" for i in range(n_layer)] + ["root: wte/wpe,\nln_f, head"]
    return {"trace": list(model.trace), "marks": marks, "names": names,
            "bytes": [4 * sum(u.numels) for u in model.units]}


def intervals(trace):
    """(unit, kind, start, end) from the event list: gather in flight, weights alive, reduce."""
    out, open_ = [], {}
    for t, unit, what in trace:
        if what.startswith("all-gather start"):
            open_[(unit, "gather")] = t
        elif what.startswith("gathered"):
            out.append((unit, "gather", open_.pop((unit, "gather"), t), t))
            open_[(unit, "alive")] = t
        elif what.startswith("free") or what.startswith("reduce-scatter start"):
            if (unit, "alive") in open_:
                out.append((unit, "alive", open_.pop((unit, "alive")), t))
            if what.startswith("reduce-scatter start"):
                open_[(unit, "reduce")] = t
        elif what.startswith("reduce-scatter done"):
            out.append((unit, "reduce", open_.pop((unit, "reduce")), t))
    return out


def main():
    args = deck.parse_args(__doc__)
    n_layer, n_embd = (2, 32) if args.quick else (4, 96)
    run = launch(traced_step, 2, n_layer, n_embd, timeout_s=120)[0]
    t0, marks = run["marks"]["forward"], run["marks"]
    bars = [(u, k, (a - t0) * 1e3, (b - t0) * 1e3) for u, k, a, b in intervals(run["trace"])]
    end_ms = (marks["end"] - t0) * 1e3
    # The lifecycle the docstring claims, checked on the trace: every unit is gathered twice
    # (forward, backward) and reduce-scattered once per step, and nothing stays gathered.
    for u in range(len(run["names"])):
        assert sum(1 for b in bars if b[0] == u and b[1] == "alive") == 2, run["names"][u]
        assert sum(1 for b in bars if b[0] == u and b[1] == "reduce") == 1, run["names"][u]
    alive = sorted([(a, run["bytes"][u]) for u, k, a, _ in bars if k == "alive"]
                   + [(b, -run["bytes"][u]) for u, k, _, b in bars if k == "alive"])
    level, steps_t, steps_y = 0, [0.0], [0.0]
    for t, delta in alive:
        steps_t += [t, t]
        steps_y += [level / 1024, (level + delta) / 1024]
        level += delta
    assert level == 0, "every gathered buffer is freed by the end of the step"

    fig, (ax, ax_mem) = deck.figure(2, 1, title="FSDP: a unit's weights exist only while it works",
                                    wisdom="Gather, compute, free - and gather again for "
                                           "backward: activations are kept, weights are not.",
                                    gridspec_kw={"height_ratios": [3, 1.3]})
    rows = len(run["names"])
    ax.set_xlim(0, end_ms * 1.02)
    ax.set_ylim(-0.6, rows - 0.4)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(run["names"], fontsize=14)
    ax.invert_yaxis()
    ax.axvline((marks["backward"] - t0) * 1e3, color=deck.RED, ls="--", lw=1.5)
    ax.text((marks["backward"] - t0) * 1e3, -0.55, " backward starts", color=deck.RED,
            fontsize=13, va="top")
    height = {"gather": 0.25, "alive": 0.5, "reduce": 0.25}
    offset = {"gather": -0.3, "alive": -0.25, "reduce": 0.3}
    rects = []
    for u, k, a, b in bars:
        r = Rectangle((a, u + offset[k] - (height[k] / 2 if k != "alive" else 0)), 0,
                      height[k], color=COLORS[k])
        ax.add_patch(r)
        rects.append((r, a, b))
    for k, label in (("gather", "all-gather in flight"), ("alive", "full weights alive"),
                     ("reduce", "reduce-scatter in flight")):
        ax.add_patch(Rectangle((0, 0), 0, 0, color=COLORS[k], label=label))
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=13,
              frameon=False)
    ax_mem.set_xlabel("ms into the third training step (rank 0 of 2)", fontsize=14)
    cursor = ax.axvline(0, color=deck.TEXT, lw=1)
    ax_mem.set_xlim(0, end_ms * 1.02)
    ax_mem.set_ylim(0, max(steps_y) * 1.45 + 1e-9)
    ax_mem.set_ylabel("gathered KiB", fontsize=13)
    full_kib = sum(run["bytes"]) / 1024
    ax_mem.text(0.01, 0.95, f"full weights alive: peak {max(steps_y):,.0f} KiB; the whole "
                f"model is {full_kib:,.0f} KiB, each rank stores 1/2 of it", fontsize=14,
                color=deck.NAVY, transform=ax_mem.transAxes, va="top")
    line = ax_mem.plot([], [], color=deck.NAVY, lw=2)[0]

    fig.subplots_adjust(left=0.12, right=0.97, top=0.86, bottom=0.12, hspace=0.25)
    n_frames = 4 if args.quick else 72

    def update(frame):
        now = end_ms * (frame + 1) / n_frames
        cursor.set_xdata([now, now])
        for r, a, b in rects:
            r.set_width(max(0.0, min(now, b) - a))
        shown = [(t, y) for t, y in zip(steps_t, steps_y) if t <= now]
        line.set_data([t for t, _ in shown] + [now], [y for _, y in shown] + [shown[-1][1]])
        return []

    backward_frame = int(n_frames * (marks["backward"] - t0) * 1e3 / end_ms)
    deck.save(fig, update, n_frames, args, default_name=f"fsdp_lifecycle_{n_layer}blocks",
              still_frames=[max(0, backward_frame - 1), n_frames - 1])


if __name__ == "__main__":
    main()
