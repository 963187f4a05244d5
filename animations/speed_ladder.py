"""The speed ladder as bars: baseline -> optimized single device -> data parallel.

Storyboard ("hour 16"): one bar per rung of minitrain.ladder, growing in turn, each labelled with
its measured tokens/s and its speedup over the baseline; a rung that slowed the machine down
keeps its bar (outlined in red); then, if benchmarks/bench_distributed.py has run, a last bar for
data parallel (2 processes, minitrain's bucketed DDP).

Numbers: read from outputs/bench/ladder.json (`make bench`) and outputs/bench/distributed.json
when they exist; otherwise a quick measured run of a few rungs (benchmarks.ladder_runner.train_rung on a
tiny GPT, in this process). Never drawn by hand. The data-parallel bar comes from a different
script with its own model size, so its caption says so; compare it with care.

    python animations/speed_ladder.py            # 1920x1080 GIF in outputs/animations/
    python animations/speed_ladder.py --quick    # a few small frames (the test suite)
    python animations/speed_ladder.py --stills   # also PNGs of the key frames
"""
import json
import pathlib
import tempfile
import textwrap

from minitrain.style import outputs_dir
import deck  # animations/deck.py: this script's folder is on sys.path

BENCH = outputs_dir("bench")  # where `make bench` writes ladder.json and distributed.json
GROW_FRAMES = 8  # frames for one bar to grow (default render)
HOLD_FRAMES = 18
SEED = 0
QUICK_RUNGS = ("0", "4")
FULL_RUNGS = ("0", "1", "2", "3", "4", "5", "6")  # no compile: a cold compile takes minutes


def from_bench():
    """Bars from make bench's JSON files, or None when ladder.json is missing or unusable."""
    try:
        report = json.loads((BENCH / "ladder.json").read_text())
        rows = [r for r in report["cpu"]["rows"] if r.get("valid")]
    except (OSError, ValueError, KeyError):
        return None
    if report.get("quick"):  # `bench_ladder.py --quick` is a smoke run, not the ladder
        return None
    from minitrain import ladder

    main = [r for r in rows if not ladder.get_rung(r["key"]).side]
    if not main or main[0]["key"] != "0":
        return None
    bars = [dict(label=f"{r['key']}. {r['name']}", tps=r["tokens_per_s"],
                 group="baseline" if r["key"] == "0" else "single device",
                 slower=bool(r.get("vs_parent") and r["vs_parent"] < 1)) for r in main]
    source = f"outputs/bench/ladder.json (T={report['cpu']['base']['seq_len']}, " \
             f"{report['machine']['cpu']}, {report['machine']['torch_threads']} thread(s))"
    try:
        dist = json.loads((BENCH / "distributed.json").read_text())
        if dist.get("quick"):
            raise ValueError("a --quick smoke run")
        ddp = {r["variant"]: r for r in dist["ddp"]}
        best = ddp.get("bucketed") or max(ddp.values(), key=lambda r: r["tokens_per_s"])
        bars.append(dict(label=f"data parallel: 2 ranks, {best['variant']} DDP",
                         tps=best["tokens_per_s"], group="data parallel", slower=False,
                         other_model=True))
        source += "; DP bar: outputs/bench/distributed.json (its own model: 4 layers, T=128)"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return bars, source


def measured(keys, steps):
    """Bars from a quick run of `keys` in this process (tiny GPT, 1 thread)."""
    import torch

    from benchmarks import ladder_runner as runner
    from minitrain import ladder

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        data = runner.prepare_data(pathlib.Path(tmp) / "tokens.bin", max_bytes=100_000)
        base = ladder.default_base(steps=steps, batch_size=4, seq_len=128, n_layer=1, n_head=2,
                                   n_embd=64, data=data, seed=SEED)
        results = [runner.train_rung(k, base, out_dir=pathlib.Path(tmp) / k, warmup=2)
                   for k in keys]
    valid = runner.validate(results)
    rows = [r for r in runner.ladder_table(results) if valid[r["key"]][0]]
    bars = [dict(label=f"{r['key']}. {r['name']}", tps=r["tokens_per_s"],
                 group="baseline" if r["key"] == "0" else "single device",
                 slower=bool(r["vs_parent"] and r["vs_parent"] < 1)) for r in rows]
    return bars, "a quick measured run (tiny GPT, 1 thread; run `make bench` for the full ladder)"


def main():
    args = deck.parse_args(__doc__)
    found = from_bench()
    bars, source = found if found else measured(QUICK_RUNGS if args.quick else FULL_RUNGS,
                                                steps=3 if args.quick else 8)
    grow = 1 if args.quick else GROW_FRAMES
    hold = 1 if args.quick else HOLD_FRAMES
    n_frames = len(bars) * grow + hold
    base_tps = bars[0]["tps"]
    top = max(b["tps"] for b in bars) * 1.22

    fig, ax = deck.figure(title="The speed ladder: the same training loop, one change at a time",
                          wisdom="Measure every change on your hardware; keep the ones that pay.")
    fig.subplots_adjust(left=0.07, right=0.98, top=0.86, bottom=0.2)
    deck.style_axes(ax)
    ax.set_ylabel("tokens / s (median, measured)", fontsize=14)
    ax.set_ylim(0, top)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([textwrap.fill(b["label"], 13) for b in bars], fontsize=11,
                       color=deck.TEXT)
    ax.grid(axis="y", color=deck.MUTED, alpha=0.4)
    colors = {"baseline": deck.MUTED, "single device": deck.NAVY, "data parallel": deck.GOLD}
    rects = ax.bar(range(len(bars)), [0] * len(bars), width=0.7,
                   color=[colors[b["group"]] for b in bars],
                   edgecolor=[deck.RED if b["slower"] else "none" for b in bars], linewidth=3)
    labels = [ax.text(i, 0, "", ha="center", va="bottom", fontsize=13, color=deck.TEXT,
                      fontweight="bold") for i in range(len(bars))]
    stage = ax.text(0.01, 0.96, "", transform=ax.transAxes, fontsize=17, color=deck.NAVY,
                    va="top", fontweight="bold")
    fig.text(0.07, 0.875, textwrap.fill(f"Source: {source}. Red outline: slower than the rung "
                                        "below.", 160), fontsize=11, color=deck.TEXT)

    def update(frame):
        for i, (rect, label, bar) in enumerate(zip(rects, labels, bars)):
            progress = min(1.0, max(0.0, (frame - i * grow + 1) / grow))
            eased = 1 - (1 - progress) ** 3  # ease-out: fast start, gentle landing
            height = bar["tps"] * eased
            rect.set_height(height)
            label.set_position((i, height))
            ratio = "other model" if bar.get("other_model") else f"{bar['tps'] / base_tps:.2f}x"
            label.set_text(f"{bar['tps']:,.0f}\n{ratio}" if progress >= 1 else "")
        current = bars[min(frame // grow, len(bars) - 1)]
        stage.set_text({"baseline": "Baseline: everything from scratch",
                        "single device": "Optimized single device: one rung at a time",
                        "data parallel": "Data parallel: 2 processes share the work "
                                         "(bench_distributed's own model)"}
                       [current["group"]])
        return [*rects, *labels, stage]

    group_ends = [i * grow + grow - 1 for i in range(len(bars))
                  if i == len(bars) - 1 or bars[i + 1]["group"] != bars[i]["group"]]
    deck.save(fig, update, n_frames, args, default_name="speed_ladder",
              still_frames=tuple(sorted(set(group_ends + [n_frames - 1]))))


if __name__ == "__main__":
    main()
