"""ZeRO stages 0-3: per-rank memory of parameters, gradients and optimizer state.

Every bar is a byte count measured on a real rank by `minitrain.zero.memory_report` after the tiny
GPT trained with that stage (`benchmarks.experiments.train_with_stage` on N gloo processes); the
dashed marks are the formula's prediction. The script asserts that all stages reached the same
loss and that measured bytes are within 10% of the prediction before it draws.

    python animations/zero_sharding.py            # 4 ranks, 1920x1080 GIF
    python animations/zero_sharding.py --quick    # 2 ranks, a few small frames (tests)
    python animations/zero_sharding.py --stills   # also PNGs, one per stage
"""
from benchmarks.experiments import train_with_stage
from minitrain.distributed_utils import launch
import deck  # animations/deck.py: this script's folder is on sys.path

KINDS = ("params", "grads", "optimizer_state")
LABELS = {"params": "parameters", "grads": "gradients", "optimizer_state": "AdamW state"}
COLORS = {"params": deck.NAVY, "grads": deck.MUTED, "optimizer_state": deck.GOLD}
STAGE_TEXT = ["Stage 0 - plain DDP: every rank holds everything",
              "Stage 1 - shard the optimizer state",
              "Stage 2 - also shard the gradients",
              "Stage 3 - also shard the parameters (FSDP)"]
SEED = 0
MOVE_FRAMES, HOLD_FRAMES = 8, 10


def all_stages(rank, world):
    """Stages 0-3 one after another in the same process group; this rank's reports."""
    return [train_with_stage(rank, world, stage, n_layer=2, n_embd=32, steps=1, seed=SEED)
            for stage in range(4)]


def main():
    args = deck.parse_args(__doc__)
    world = 2 if args.quick else 4
    per_rank = launch(all_stages, world, timeout_s=120)  # one process group for all stages
    runs = [[per_rank[r][stage] for r in range(world)] for stage in range(4)]  # [stage][rank]
    losses = [r["loss"] for stage in runs for r in stage]
    assert max(losses) - min(losses) < 1e-4, "all stages must compute the same training step"
    for stage in runs:
        for r in stage:
            for k in KINDS:
                assert abs(r["measured"][k] - r["predicted"][k]) <= 0.1 * r["predicted"][k]
    kib = [[{k: r["measured"][k] / 1024 for k in KINDS} for r in stage] for stage in runs]
    pred = [[sum(r["predicted"][k] for k in KINDS) / 1024 for r in stage] for stage in runs]
    top = max(sum(v.values()) for stage in kib for v in stage) * 1.18

    fig, ax = deck.figure(title="ZeRO: shard what every rank used to copy",
                          wisdom="Data parallelism needs different data, not N copies of "
                                 "the optimizer.")
    ax.set_xlim(-0.6, world - 0.4)
    ax.set_ylim(0, top)
    ax.set_xticks(range(world))
    ax.set_xticklabels([f"rank {r}" for r in range(world)], fontsize=16)
    ax.set_ylabel("KiB on this rank (measured)", fontsize=16)
    bars = {k: ax.bar(range(world), [0] * world, width=0.55, color=COLORS[k], label=LABELS[k])
            for k in KINDS}
    marks = ax.plot(range(world), [0] * world, linestyle="none", marker="_", markersize=70,
                    markeredgewidth=3, color=deck.RED, label="predicted total")[0]
    totals = [ax.text(r, 0, "", ha="center", va="bottom", fontsize=15, color=deck.TEXT)
              for r in range(world)]
    ax.legend(loc="upper right", fontsize=14, frameon=False, markerscale=0.3)
    heading = ax.text(0.01, 0.97, "", transform=ax.transAxes, fontsize=20, color=deck.NAVY,
                      va="top", fontweight="bold")
    detail = ax.text(0.01, 0.89, "", transform=ax.transAxes, fontsize=15, color=deck.TEXT,
                     va="top")

    move, hold = (1, 1) if args.quick else (MOVE_FRAMES, HOLD_FRAMES)
    timeline = [(0, 0, 1.0)] * hold  # (from stage, to stage, progress)
    for s in range(1, 4):
        timeline += [(s - 1, s, (i + 1) / move) for i in range(move)]
        timeline += [(s, s, 1.0)] * hold
    if args.quick:
        timeline = [(s, s, 1.0) for s in range(4)]

    def update(frame):
        a, b, t = timeline[frame]
        for r in range(world):
            bottom = 0.0
            for k in KINDS:
                value = (1 - t) * kib[a][r][k] + t * kib[b][r][k]  # glide between two real bars
                bars[k][r].set_y(bottom)
                bars[k][r].set_height(value)
                bottom += value
            totals[r].set_position((r, bottom + top * 0.01))
            totals[r].set_text(f"{bottom:,.0f} KiB" if t == 1.0 else "")
        marks.set_ydata(pred[b] if t == 1.0 else [float("nan")] * world)
        heading.set_text(STAGE_TEXT[b])
        stage0 = sum(kib[0][0].values())
        now = sum(kib[b][0].values())
        detail.set_text(f"N = {world} ranks, tiny GPT ({runs[0][0]['num_params']:,} fp32 params)"
                        f" | rank 0: {now:,.0f} KiB = {now / stage0:.0%} of stage 0")
        return []

    deck.save(fig, update, len(timeline), args, default_name=f"zero_sharding_n{world}",
              still_frames=[i for i, x in enumerate(timeline) if x[2] == 1.0 and
                            (i + 1 == len(timeline) or timeline[i + 1][0] != x[0])])


if __name__ == "__main__":
    main()
