"""The speed ladder as bars: baseline -> optimized single device -> data parallel (DDP) scaling.

Serves: Module 8 deck slide 19 (the hour-2 "throughput optimization ladder" animation:
baseline -> optimized single-GPU -> DDP scaling and metric tracking), slides 8-10 and M8-LAB-03
/ M8-LAB-04; syllabus 16-08 (scaling efficiency) and 16-10 (one optimization at a time).

Storyboard: one bar per rung of minitrain.ladder, growing in turn, each labelled with its
measured tokens/s and its speedup over the baseline; a rung that slowed the machine down keeps
its bar (outlined in red). Then the DDP stage: the best rung's exact model and shape trained on
1 process and on 2 (minitrain's bucketed DDP, gloo), on the same global batch, with the scaling
numbers (tokens/s, per process, efficiency = T_2 / (2 T_1)) and a note on what 2 CPU cores can
and cannot show.

Numbers, never drawn by hand:
- ladder bars: outputs/bench/ladder.json (`make bench`) when it holds a full run; otherwise a
  quick measured run of a few rungs (benchmarks.ladder_runner.train_rung on a tiny GPT, in this
  process, 1 thread). --quick always measures a tiny shape (a few seconds).
- DDP stage: ALWAYS measured here, by benchmarks.ddp_stage.measure_scaling on the best ladder
  bar's config: 1 process with batch 2B vs 2 processes with B each (the rung's own shape), 1
  thread per process, both runs' losses checked equal step for step before any speed is shown.

    python animations/speed_ladder.py            # 1920x1080 GIF in outputs/animations/
    python animations/speed_ladder.py --quick    # a few small frames (the test suite)
    python animations/speed_ladder.py --stills   # also PNGs of the key frames
"""
import json
import os
import pathlib
import tempfile
import textwrap

from minitrain.style import outputs_dir
import deck  # animations/deck.py: this script's folder is on sys.path

BENCH = outputs_dir("bench")  # where `make bench` writes ladder.json
GROW_FRAMES = 8  # frames for one bar to grow (default render)
HOLD_FRAMES = 18
SEED = 0
QUICK_RUNGS = ("0", "4")
FULL_RUNGS = ("0", "1", "2", "3", "4", "5", "6")  # no compile: a cold compile takes minutes
TINY = dict(batch_size=4, seq_len=128, n_layer=1, n_head=2, n_embd=64)  # the measured fallback
STAGE_STEPS, STAGE_WARMUP = 8, 3  # DDP stage on the bench's shape (T=1024: keep it short)
QUICK_STAGE_STEPS, QUICK_STAGE_WARMUP = 4, 2


def _bar(key, name, tps, vs_parent):
    return dict(label=f"{key}. {name}", tps=tps, key=key,
                group="baseline" if key == "0" else "single device",
                slower=bool(vs_parent and vs_parent < 1))


def _is_smoke_run(base):
    """bench_ladder.py --quick writes no "quick" flag (yet): recognise its tiny model."""
    from benchmarks.bench_ladder import QUICK

    return all(base.get(k) == QUICK[k] for k in ("batch_size", "n_layer", "n_embd", "steps"))


def from_bench():
    """(bars, source, best config, ladder threads) from make bench's ladder.json, or None when
    it is missing, a --quick smoke run, or unusable."""
    try:
        report = json.loads((BENCH / "ladder.json").read_text())
        rows = [r for r in report["cpu"]["rows"] if r.get("valid")]
        base = report["cpu"]["base"]
        if report.get("quick") or _is_smoke_run(base):
            return None
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None
    from minitrain import ladder

    main = [r for r in rows if not ladder.get_rung(r["key"]).side]
    if not main or main[0]["key"] != "0" or not all("config" in r for r in main):
        return None
    bars = [_bar(r["key"], r["name"], r["tokens_per_s"], r.get("vs_parent")) for r in main]
    best = max(main, key=lambda r: r["tokens_per_s"])
    threads = report["machine"].get("torch_threads", "?")
    source = (f"ladder bars: outputs/bench/ladder.json (T={base['seq_len']}, "
              f"{report['machine']['cpu']}, {threads} thread(s) per rung)")
    return bars, source, dict(best["config"], key=best["key"]), threads


def measured(keys, steps):
    """(bars, source, best config, threads) from a quick run of `keys` in this process."""
    import torch

    from benchmarks import ladder_runner as runner
    from minitrain import ladder

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        data = runner.prepare_data(pathlib.Path(tmp) / "tokens.bin", max_bytes=100_000)
        base = ladder.default_base(steps=steps, data=data, seed=SEED, **TINY)
        results = [runner.train_rung(k, base, out_dir=pathlib.Path(tmp) / k, warmup=2)
                   for k in keys]
    valid = runner.validate(results)
    rows = [r for r in runner.ladder_table(results) if valid[r["key"]][0]]
    bars = [_bar(r["key"], r["name"], r["tokens_per_s"], r["vs_parent"]) for r in rows]
    best = max(rows, key=lambda r: r["tokens_per_s"])
    return (bars, "ladder bars: a quick measured run (tiny GPT, 1 thread; `make bench` for the "
            "full ladder)", dict(best["config"], key=best["key"]), 1)


def ddp_stage(config, *, quick):
    """Two bars measured now: the best rung's config on 1 process (batch 2B) and on 2 (B each)."""
    from benchmarks import ladder_runner as runner
    from benchmarks.ddp_stage import measure_scaling
    from minitrain import ladder

    key = config.pop("key")
    steps, warmup = (QUICK_STAGE_STEPS, QUICK_STAGE_WARMUP) if quick else (STAGE_STEPS,
                                                                           STAGE_WARMUP)
    with tempfile.TemporaryDirectory() as tmp:
        data = runner.prepare_data(pathlib.Path(tmp) / "tokens.bin", max_bytes=200_000)
        scaling = measure_scaling({**config, "data": data, "steps": steps},
                                  out_dir=pathlib.Path(tmp) / "stage", warmup=warmup,
                                  tolerance=ladder.get_rung(key).tolerance,
                                  timeout_s=120 if quick else 900)
    name = ladder.get_rung(key).name
    g, b = scaling["global_batch"], scaling["per_rank_batch"]
    bars = [dict(label=f"rung {key} on 1 process (B={g})", tps=scaling["tokens_per_s_1"],
                 group="data parallel", slower=False, ddp="one"),
            dict(label=f"rung {key} on 2 processes (B={b} each, DDP)",
                 tps=scaling["tokens_per_s_n"], group="data parallel",
                 slower=scaling["efficiency"] < 0.5, ddp="many")]
    return bars, dict(scaling, key=key, name=name)


def honest_note(s, ladder_threads):
    load = f"1-min load {s['load_avg_1min']:.1f}" if s["load_avg_1min"] is not None else "load ?"
    return (f"Same work: rung {s['key']} ({s['name']}; {s['n_layer']} layer(s), width "
            f"{s['n_embd']}, T={s['seq_len']}) on a global batch of {s['global_batch']} sequences "
            f"per step; 1 process does all of it, 2 processes do {s['per_rank_batch']} each and "
            f"all-reduce the gradients (minitrain DDP, gloo over loopback). Both logged the same "
            f"losses (max rel. diff {s['max_rel_loss_diff']:.0e}) before any timing. "
            f"Efficiency T_2 / (2 T_1) = {s['efficiency']:.2f} (1.0 = linear); per process "
            f"{s['per_process_tokens_per_s']:,.0f} tok/s. What 2 cores can show: 1 thread per "
            f"process, so each process gets one of {os.cpu_count()} cores (the ladder bars used "
            f"{ladder_threads} thread(s)); the other work on this box shares them ({load}). On a "
            "GPU node each rank owns a GPU and NCCL links: measure there before you buy.")


def main():
    args = deck.parse_args(__doc__)
    found = None if args.quick else from_bench()  # --quick: a tiny shape for both stages
    bars, source, best_config, ladder_threads = found if found else measured(
        QUICK_RUNGS if args.quick else FULL_RUNGS, steps=3 if args.quick else 8)
    stage_bars, scaling = ddp_stage(best_config, quick=args.quick)
    bars = bars + stage_bars
    source += "; DDP bars: measured now (benchmarks/ddp_stage.py, 1 thread per process)"
    grow = 1 if args.quick else GROW_FRAMES
    hold = 1 if args.quick else HOLD_FRAMES
    n_frames = len(bars) * grow + hold
    base_tps = bars[0]["tps"]
    top = max(b["tps"] for b in bars) * 1.3

    fig, ax = deck.figure(title="The speed ladder: the same training loop, one change at a time",
                          wisdom="Scale optimization only after local optimization.")
    fig.subplots_adjust(left=0.07, right=0.68, top=0.86, bottom=0.2)  # right: the notes
    deck.style_axes(ax)
    ax.set_ylabel("tokens / s (median, measured)", fontsize=14)
    ax.set_ylim(0, top)
    ax.set_xlim(-0.6, len(bars) - 0.4)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([textwrap.fill(b["label"], 12) for b in bars], fontsize=11,
                       color=deck.TEXT)
    ax.grid(axis="y", color=deck.MUTED, alpha=0.4)
    colors = {"baseline": deck.MUTED, "single device": deck.NAVY, "data parallel": deck.GOLD}
    rects = ax.bar(range(len(bars)), [0] * len(bars), width=0.7,
                   color=[colors[b["group"]] for b in bars],
                   edgecolor=[deck.RED if b["slower"] else "none" for b in bars], linewidth=3)
    labels = [ax.text(i, 0, "", ha="center", va="bottom", fontsize=12, color=deck.TEXT,
                      fontweight="bold") for i in range(len(bars))]
    stage = ax.text(0.01, 0.97, "", transform=ax.transAxes, fontsize=17, color=deck.NAVY,
                    va="top", fontweight="bold")
    reading = textwrap.fill(
        "How to read it: every bar is one measured run of the same training loop; a rung adds "
        "exactly one change to the rung before it and is shown only after its step-0 loss "
        "matched the baseline's. Speedups are ratios of tokens/s measured in this run. The DDP "
        "stage comes last: scale out only what is already fast on one device.", 50)
    ddp_note = textwrap.fill(honest_note(scaling, ladder_threads), 50)
    note = fig.text(0.70, 0.80, reading, fontsize=12, color=deck.TEXT, va="top",
                    bbox=dict(facecolor=deck.PANEL, edgecolor=deck.GOLD, pad=8))
    fig.text(0.07, 0.87, textwrap.fill(f"Source: {source}. Red outline: slower than the rung "
                                        "below (DDP: efficiency under 0.5).", 115),
             fontsize=11, color=deck.TEXT, va="bottom")

    def label_text(bar):
        if bar.get("ddp") == "one":
            return f"{bar['tps']:,.0f}\n1 process"
        if bar.get("ddp") == "many":
            return (f"{bar['tps']:,.0f}\n{scaling['speedup']:.2f}x vs 1 proc.\n"
                    f"efficiency {scaling['efficiency']:.2f}")
        return f"{bar['tps']:,.0f}\n{bar['tps'] / base_tps:.2f}x"

    def update(frame):
        for i, (rect, label, bar) in enumerate(zip(rects, labels, bars)):
            progress = min(1.0, max(0.0, (frame - i * grow + 1) / grow))
            eased = 1 - (1 - progress) ** 3  # ease-out: fast start, gentle landing
            height = bar["tps"] * eased
            rect.set_height(height)
            label.set_position((i, height))
            label.set_text(label_text(bar) if progress >= 1 else "")
        current = bars[min(frame // grow, len(bars) - 1)]
        stage.set_text({"baseline": "Baseline: everything from scratch",
                        "single device": "Optimized single device: one rung at a time",
                        "data parallel": f"Data parallel: rung {scaling['key']} on 1 vs 2 "
                                         "processes, the same work"}[current["group"]])
        note.set_text(ddp_note if current["group"] == "data parallel" else reading)
        return [*rects, *labels, stage, note]

    group_ends = [i * grow + grow - 1 for i in range(len(bars))
                  if i == len(bars) - 1 or bars[i + 1]["group"] != bars[i]["group"]]
    print(f"DDP stage (rung {scaling['key']}, T={scaling['seq_len']}): T_1 "
          f"{scaling['tokens_per_s_1']:,.0f} tok/s, T_2 {scaling['tokens_per_s_n']:,.0f} tok/s, "
          f"efficiency {scaling['efficiency']:.2f}")
    deck.save(fig, update, n_frames, args, default_name="speed_ladder",
              still_frames=tuple(sorted(set(group_ends + [n_frames - 1]))))


if __name__ == "__main__":
    main()
