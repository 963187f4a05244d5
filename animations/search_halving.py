"""Successive halving, round by round: configurations as bars of validation loss.

A real search first: `minitrain.hparam.search(strategy="halving")` trains the tiny GPT once per
learning rate on a small budget, keeps the best 1/eta, multiplies the budget by eta, and repeats.
Every trial lands in a JSONL log; the frames are drawn from that log alone (rerunning the script
reuses it and trains nothing). Left: one bar per configuration, its val loss at the current
round's budget; eliminated bars fade. Right: optimizer steps spent so far by halving against the
full grid trained at the final budget.

Default: 9 learning rates, eta=3, budgets 10 -> 30 -> 90 steps. --quick: 4 learning rates on a
much smaller GPT, eta=2, budgets 1 -> 2 -> 4 steps (a real search, just a tiny one).
"""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deck  # noqa: E402

from minitrain import hparam  # noqa: E402
from minitrain.train import TrainConfig  # noqa: E402

FULL = dict(lrs=[1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2], eta=3, budget=90,
            model=dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=8, eval_iters=8,
                       warmup_steps=5, min_lr=1e-5, corpus_bytes=200_000))
QUICK = dict(lrs=[1e-4, 1e-3, 1e-2, 1e-1], eta=2, budget=4,
             model=dict(n_layer=1, n_head=1, n_embd=16, seq_len=16, batch_size=4, eval_iters=2,
                        warmup_steps=0, min_lr=1e-5, corpus_bytes=20_000))
GROW_FRAMES, CUT_FRAMES, HOLD_FRAMES = 14, 10, 12  # per round (default mode)


def run_search(params, log_path):
    """The real search; returns its rounds rebuilt from the log file."""
    train_fn = hparam.make_gpt_train_fn(TrainConfig(**params["model"]),
                                        out_root=log_path.parent)
    hparam.search({"max_lr": params["lrs"]}, train_fn, strategy="halving", eta=params["eta"],
                  budget=params["budget"], log_path=log_path, progress=False)
    rounds = {}
    for record in hparam.read_log(log_path):
        loss = record["val_loss"] if record["val_loss"] is not None else float("inf")
        rounds.setdefault(record["round"], {"budget": record["budget"], "loss": {}})
        rounds[record["round"]]["loss"][record["config"]["max_lr"]] = loss
    return [rounds[i] for i in sorted(rounds)]


def main():
    args = deck.parse_args(__doc__)
    params = QUICK if args.quick else FULL
    out = deck.output_path(args, "search_halving")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = "quick" if args.quick else "full"
    log_path = out.parent / f"search_halving_{tag}.jsonl"
    if log_path.exists() and json.loads(log_path.read_text().splitlines()[0])["config"]["max_lr"] \
            not in params["lrs"]:
        log_path.unlink()  # a log from other settings: start over
    rounds = run_search(params, log_path)
    lrs = params["lrs"]
    grid_steps = len(lrs) * params["budget"]
    spent = []  # cumulative steps after each round
    for rnd in rounds:
        spent.append((spent[-1] if spent else 0) + rnd["budget"] * len(rnd["loss"]))
    finite = [v for rnd in rounds for v in rnd["loss"].values() if v != float("inf")]
    top = max(finite) * 1.08

    fig, (ax, bx) = deck.figure(1, 2, title="Successive halving: train many briefly, keep the best",
                                wisdom="Spend the budget on the configurations that earn it.",
                                gridspec_kw={"width_ratios": [3, 1]})
    deck.style_axes(ax, "val loss per learning rate (lower is better)")
    deck.style_axes(bx, "optimizer steps spent")
    xs = range(len(lrs))
    bars = ax.bar(xs, [0] * len(lrs), color=deck.NAVY, width=0.7)
    ax.set_xticks(list(xs), [f"{lr:.0e}" for lr in lrs], fontsize=12)
    ax.set_xlabel("max_lr", fontsize=14)
    ax.set_ylim(0, top)
    labels = [ax.text(i, 0, "", ha="center", va="bottom", color=deck.TEXT, fontsize=11)
              for i in xs]
    status = ax.text(0.02, 0.97, "", transform=ax.transAxes, va="top", color=deck.NAVY,
                     fontsize=16, fontweight="bold")
    spent_bar = bx.bar([0], [0], color=deck.GOLD, width=0.6)[0]
    bx.bar([1], [grid_steps], color=deck.MUTED, width=0.6)
    bx.set_xticks([0, 1], ["halving", f"grid @ {params['budget']}"], fontsize=12)
    bx.set_ylim(0, grid_steps * 1.15)
    spent_text = bx.text(0, 0, "", ha="center", va="bottom", color=deck.TEXT, fontsize=13)
    bx.text(1, grid_steps, f"{grid_steps}", ha="center", va="bottom", color=deck.TEXT, fontsize=13)

    grow, cut, hold = (1, 1, 1) if args.quick else (GROW_FRAMES, CUT_FRAMES, HOLD_FRAMES)
    frames = []  # (round, phase, t in [0, 1])
    for r in range(len(rounds)):
        frames += [(r, "grow", (k + 1) / grow) for k in range(grow)]
        if r + 1 < len(rounds):
            frames += [(r, "cut", (k + 1) / cut) for k in range(cut)]
    frames += [(len(rounds) - 1, "hold", 1.0)] * hold

    def update(frame):
        r, phase, t = frames[frame]
        rnd = rounds[r]
        prev = rounds[r - 1]["loss"] if r else {}
        survivors = rounds[r + 1]["loss"] if r + 1 < len(rounds) else rnd["loss"]
        for i, lr in enumerate(lrs):
            bar, label = bars[i], labels[i]
            if lr in rnd["loss"]:
                loss = min(rnd["loss"][lr], top)
                start = min(prev.get(lr, 0.0), top)
                height = start + (loss - start) * t if phase == "grow" else loss
                eliminated = phase in ("cut", "hold") and lr not in survivors
                bar.set_height(height)
                bar.set_color(deck.RED if eliminated else deck.GOLD if phase == "hold" else deck.NAVY)
                bar.set_alpha(1 - 0.75 * t if eliminated else 1.0)
                label.set_text(f"{rnd['loss'][lr]:.3f}" if phase != "grow" or t == 1 else "")
                label.set_y(height)
            elif bar.get_alpha() is None or bar.get_alpha() > 0.25:
                bar.set_color(deck.MUTED)
                bar.set_alpha(0.25)
                label.set_text("")
        status.set_text(f"round {r + 1}/{len(rounds)}: {len(rnd['loss'])} configs x "
                        f"{rnd['budget']} steps" + (" — eliminate the worst" if phase == "cut" else "")
                        + (" — winner" if phase == "hold" else ""))
        before = spent[r - 1] if r else 0
        now = before + (spent[r] - before) * t if phase == "grow" else spent[r]
        spent_bar.set_height(now)
        spent_text.set_text(f"{now:.0f}")
        spent_text.set_y(now)
        return []

    still = [i for i, f in enumerate(frames) if f[1] != "grow" and f[2] == 1.0]
    deck.save(fig, update, len(frames), args, default_name="search_halving", still_frames=still)
    best_lr = min(rounds[-1]["loss"], key=rounds[-1]["loss"].get)
    print(f"halving: rounds {[len(r['loss']) for r in rounds]} configs at budgets "
          f"{[r['budget'] for r in rounds]}; spent {spent[-1]} steps vs grid {grid_steps}; "
          f"best max_lr={best_lr:g} (val loss {rounds[-1]['loss'][best_lr]:.4f}); log {log_path}")


if __name__ == "__main__":
    main()
