"""Successive halving, round by round: configurations as bars of validation loss.

A real search first: `minitrain.hparam.search(strategy="halving")` trains the tiny GPT once per
learning rate on a small budget, keeps the best 1/eta, multiplies the budget by eta, and repeats.
Every trial lands in a JSONL log; the frames are drawn from that log alone (rerunning the script
reuses it and trains nothing). Left: one bar per configuration, its val loss at the current
round's budget; eliminated bars fade. Right: optimizer steps spent so far by halving against the
full grid trained at the final budget.

Default: 9 learning rates of the tiny GPT trained by `minitrain.train` (AdamW), eta=3, budgets
10 -> 30 -> 90 steps. --quick (the test suite's run, < 10 s): a real but tiny search — 4 learning
rates of a 1-layer, 16-wide GPT trained by plain SGD written out (p -= lr * grad, which skips
torch.optim's one-off import of torch._dynamo, seconds on a loaded machine), eta=2, budgets
1 -> 2 -> 4 steps.
"""
import json

from minitrain import hparam
import deck  # animations/deck.py: this script's folder is on sys.path

FULL = dict(lrs=[1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2], eta=3, budget=90,
            model=dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=8, eval_iters=8,
                       warmup_steps=5, min_lr=1e-5, corpus_bytes=200_000))
QUICK = dict(lrs=[0.01, 0.03, 0.1, 0.3], eta=2, budget=4, model=None)
GROW_FRAMES, CUT_FRAMES, HOLD_FRAMES = 10, 8, 10  # per round (default mode): 56 frames


def make_sgd_train_fn(cache_dir):
    """--quick's train_fn: a 1-layer GPT, `budget` plain-SGD steps, val loss on fixed batches."""
    import numpy as np
    import torch

    from minitrain.data import corpus_tokens, get_batch, split_tokens
    from minitrain.model import GPT, GPTConfig

    train_tokens, val_tokens = split_tokens(corpus_tokens(cache_dir, max_bytes=20_000))

    def train_fn(config, budget):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16))
        rng = np.random.default_rng(0)
        for _ in range(budget):
            _, loss = model(*get_batch(train_tokens, 4, 16, rng=rng))
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= config["max_lr"] * p.grad  # SGD, written out
        with torch.no_grad():
            return model(*get_batch(val_tokens, 8, 16, rng=np.random.default_rng(1)))[1].item()

    return train_fn


def run_search(params, log_path):
    """The real search; returns its rounds rebuilt from the log file."""
    if params["model"] is None:
        train_fn = make_sgd_train_fn(log_path.parent / "cache")
    else:
        from minitrain.train import TrainConfig
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
    import torch
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin on a shared machine
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
    span = max(finite) - min(finite) or 1.0
    floor, top = min(finite) - 0.4 * span, max(finite) + 0.12 * span  # zoom on the differences
    last_seen = []  # per round: {lr: loss in the last round that lr took part in, up to here}
    for rnd in rounds:
        last_seen.append({**(last_seen[-1] if last_seen else {}), **rnd["loss"]})

    fig, (ax, bx) = deck.figure(1, 2, title="Successive halving: train many briefly, keep the best",
                                wisdom="Spend the budget on the configurations that earn it.",
                                gridspec_kw={"width_ratios": [3, 1]})
    deck.style_axes(ax, "val loss per learning rate (lower is better)")
    deck.style_axes(bx, "optimizer steps spent")
    xs = range(len(lrs))
    bars = ax.bar(xs, [0] * len(lrs), bottom=floor, color=deck.NAVY, width=0.7)
    ax.set_xticks(list(xs), [f"{lr:.0e}" for lr in lrs], fontsize=12)
    ax.set_xlabel("max_lr", fontsize=14)
    ax.set_ylim(floor, top)
    labels = [ax.text(i, floor, "", ha="center", va="bottom", color=deck.TEXT, fontsize=11)
              for i in xs]
    fig.subplots_adjust(top=0.80, bottom=0.12)
    status = fig.text(0.03, 0.90, "", va="top", color=deck.NAVY, fontsize=16, fontweight="bold")
    spent_bar = bx.bar([0], [0], color=deck.GOLD, width=0.6)[0]
    bx.bar([1], [grid_steps], color=deck.MUTED, width=0.6)
    bx.set_xticks([0, 1], ["halving", f"grid @ {params['budget']}"], fontsize=12)
    bx.set_ylim(0, grid_steps * 1.15)
    spent_text = bx.text(0, 0, "", ha="center", va="bottom", color=deck.TEXT, fontsize=13)
    bx.text(1, grid_steps, f"{grid_steps}", ha="center", va="bottom", color=deck.TEXT, fontsize=13)

    frames = []  # (round, phase, t in [0, 1])
    if args.quick:  # one frame per round: the bars after elimination; then the winner
        frames = [(r, "cut", 1.0) for r in range(len(rounds) - 1)] + [(len(rounds) - 1, "hold", 1.0)]
    for r in range(0 if args.quick else len(rounds)):
        frames += [(r, "grow", (k + 1) / GROW_FRAMES) for k in range(GROW_FRAMES)]
        if r + 1 < len(rounds):
            frames += [(r, "cut", (k + 1) / CUT_FRAMES) for k in range(CUT_FRAMES)]
    frames += [(len(rounds) - 1, "hold", 1.0)] * (0 if args.quick else HOLD_FRAMES)

    def update(frame):
        r, phase, t = frames[frame]
        rnd = rounds[r]
        prev = rounds[r - 1]["loss"] if r else {}
        survivors = rounds[r + 1]["loss"] if r + 1 < len(rounds) else rnd["loss"]
        for i, lr in enumerate(lrs):
            bar, label = bars[i], labels[i]
            if lr in rnd["loss"]:
                loss = min(rnd["loss"][lr], top)
                start = min(prev.get(lr, floor), top)
                level = start + (loss - start) * t if phase == "grow" else loss
                eliminated = phase in ("cut", "hold") and lr not in survivors
                color, alpha = (deck.RED, 1 - 0.6 * t) if eliminated else (
                    deck.GOLD if phase == "hold" else deck.NAVY, 1.0)
                text = f"{rnd['loss'][lr]:.3f}" if phase != "grow" or t == 1 else ""
            else:  # out of the race: a faint bar at its last loss
                level = min(last_seen[r].get(lr, floor), top) if r else floor
                color, alpha, text = deck.MUTED, 0.35, ""
            bar.set_height(level - floor)
            bar.set_color(color)
            bar.set_alpha(alpha)
            label.set_text(text)
            label.set_y(level)
        count = len(rnd["loss"])
        status.set_text(f"round {r + 1}/{len(rounds)}: {count} config{'s' * (count > 1)} x "
                        f"{rnd['budget']} steps" + (" — eliminate the worst" if phase == "cut" else "")
                        + (" — winner" if phase == "hold" else ""))
        before = spent[r - 1] if r else 0
        now = before + (spent[r] - before) * t if phase == "grow" else spent[r]
        spent_bar.set_height(now)
        spent_text.set_text(f"{now:.0f}")
        spent_text.set_y(now)
        return []

    still = sorted({i for i, f in enumerate(frames) if f[1] == "cut" and f[2] == 1.0}
                   | {len(frames) - 1})  # the end of each round, and the winner
    deck.save(fig, update, len(frames), args, default_name="search_halving", still_frames=still)
    best_lr = min(rounds[-1]["loss"], key=rounds[-1]["loss"].get)
    print(f"halving: rounds {[len(r['loss']) for r in rounds]} configs at budgets "
          f"{[r['budget'] for r in rounds]}; spent {spent[-1]} steps vs grid {grid_steps}; "
          f"best max_lr={best_lr:g} (val loss {rounds[-1]['loss'][best_lr]:.4f}); log {log_path}")


if __name__ == "__main__":
    main()
