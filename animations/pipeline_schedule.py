"""GPipe vs 1F1B: the Gantt chart of one real, traced pipeline step, side by side.

Every box is a forward (navy) or backward (gold) of one micro-batch on one stage, placed where
`minitrain.pipeline.run_schedule` recorded it (time.perf_counter on each rank) during a step of
the tiny GPT on p gloo processes (`benchmarks.bench_pipeline.traced_steps`, which first checks
the step's gradients against one process). The gaps are the bubble: a stage waiting for its
neighbour. A cursor sweeps the step; beside each stage, the micro-batches whose activations it
holds at that moment (GPipe climbs to m, 1F1B stops at p - s). The fastest of the traced steps
is drawn (the least disturbed by other processes on the machine).

    python animations/pipeline_schedule.py            # 2 stages, m = 8, 1920x1080 GIF
    python animations/pipeline_schedule.py --quick    # 2 stages, m = 4, a few small frames
Two stages because the course machine has two cores: with more processes than cores the chart
would show the operating system taking turns, not a pipeline.
    python animations/pipeline_schedule.py --stills   # also PNGs: mid-step and the end
"""
from matplotlib.patches import Rectangle

import deck  # animations/deck.py: this script's folder is on sys.path
from benchmarks.bench_pipeline import traced_steps
from minitrain.distributed_utils import launch
from minitrain.pipeline import bubble_fraction, measured_bubble

SCHEDULES = ("gpipe", "1f1b")
TITLES = {"gpipe": "GPipe: all forwards, then all backwards",
          "1f1b": "1F1B: one forward, one backward"}
SWEEP_FRAMES, HOLD_FRAMES = 48, 12


def trace(p, m, size, iters):
    """One traced step per schedule: {schedule: (events per stage, measured idle, step s)}."""
    ranks = launch(traced_steps, p, runs=[(s, m) for s in SCHEDULES], size=size, warmup=1,
                   iters=iters, timeout_s=240, preload=())
    out = {}
    for k, schedule in enumerate(SCHEDULES):
        assert max(r[k]["max_diff"] for r in ranks) < 1e-5, "the traced step must be right"
        steps = range(len(ranks[0][k]["events"]))
        best = min(steps, key=lambda j: measured_bubble([r[k]["events"][j] for r in ranks])[0])
        events = [r[k]["events"][best] for r in ranks]
        step_s, idle = measured_bubble(events)
        out[schedule] = (events, idle, step_s)
    return out


def main():
    args = deck.parse_args(__doc__)
    p, m = (2, 4) if args.quick else (2, 8)
    size = (dict(n_layer=2, n_head=2, n_embd=32, batch=8, seq_len=16) if args.quick else
            dict(n_layer=4, n_head=4, n_embd=128, batch=16, seq_len=64))
    traces = trace(p, m, size, iters=2 if args.quick else 6)
    t_end = max(1e3 * step for _, _, step in traces.values())  # ms, the slower schedule

    fig, axes = deck.figure(1, 2, title=f"One pipeline step, {p} stages, {m} micro-batches "
                            "(measured)", wisdom="Same bubble, different memory: 1F1B frees "
                            "each activation as soon as it can.")
    boxes, held_texts, cursors = [], [], []
    for ax, schedule in zip(axes, SCHEDULES):
        events, idle, step_s = traces[schedule]
        t0 = min(e["start"] for ev in events for e in ev)
        deck.style_axes(ax, TITLES[schedule])
        ax.set_xlim(0, t_end * 1.02)
        ax.set_ylim(p - 0.5, -0.9)
        ax.set_yticks(range(p), [f"stage {s}" for s in range(p)], fontsize=14)
        ax.set_xlabel("ms since the step's first forward", fontsize=13)
        for s, ev in enumerate(events):
            for e in ev:
                start, dur = 1e3 * (e["start"] - t0), 1e3 * (e["end"] - e["start"])
                box = Rectangle((start, s - 0.38), 0.0, 0.76, edgecolor=deck.BACKGROUND,
                                facecolor=deck.NAVY if e["kind"] == "F" else deck.GOLD,
                                visible=False)
                ax.add_patch(box)
                wide = dur > t_end / 40  # name only the boxes wide enough to carry it
                label = ax.text(start + dur / 2, s, f"{e['kind']}{e['micro']}" if wide else "",
                                ha="center", va="center", fontsize=9 if args.quick else 12,
                                color="white" if e["kind"] == "F" else deck.TEXT, alpha=0.0)
                boxes.append((box, label, start, dur))
            held_texts.append((ax.text(t_end * 1.01, s - 0.42, "", ha="right", fontsize=12,
                                       color=deck.TEXT), s, ev, t0))
        ax.text(0.0, -0.62, f"step {1e3 * step_s:.0f} ms; idle share per stage, measured: "
                + ", ".join(f"{x:.2f}" for x in idle)
                + f"\nformula (p-1)/(m+p-1) = {bubble_fraction(p, m):.2f} (equal stages, "
                "free messages)", fontsize=12, color=deck.NAVY)
        cursors.append(ax.axvline(0.0, color=deck.RED, lw=2))

    sweep, hold = (3, 1) if args.quick else (SWEEP_FRAMES, HOLD_FRAMES)
    times = [t_end * (i + 1) / sweep for i in range(sweep)] + [t_end] * hold

    def update(frame):
        now = times[frame]
        for box, label, start, dur in boxes:
            box.set_width(min(max(now - start, 0.0), dur))
            box.set_visible(now > start)
            label.set_alpha(1.0 if now >= start + dur else 0.0)
        for text, s, ev, t0 in held_texts:  # activations held: forwards done, backwards not
            held, peak = 0, 0
            for e in ev:
                if 1e3 * (e["end"] - t0) <= now:
                    held += 1 if e["kind"] == "F" else -1
                    peak = max(peak, held)
            text.set_text(f"holds {held} micro-batches (peak {peak})")
        for c in cursors:
            c.set_xdata([now, now])
        return []

    deck.save(fig, update, len(times), args, default_name=f"pipeline_schedule_p{p}_m{m}",
              still_frames=(sweep // 2, len(times) - 1))


if __name__ == "__main__":
    main()
