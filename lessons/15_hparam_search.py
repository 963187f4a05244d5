"""Lesson 15 — hyperparameter search within a budget.

Objective: see why the classic "try every combination" grid is unaffordable (count it and cost it
from a measured run), then run a right-sized staged search on the tiny GPT instead:
  stage 1  max_lr alone, coarse-to-fine, log-spaced, at the full budget (lr matters most). The
           same coarse lrs after only a third of the budget show why the full budget: short
           trials favour large lrs (they reach the early plateau first), so the best lr moves
           as the budget grows. Successive halving makes exactly this bet, so we do not halve
           over lr.
  stage 2  successive halving over warmup x weight decay at the stage-1 lr (9 configs on a
           small budget, keep the best third, triple the budget: 9 x 10, 3 x 30, 1 x 90 steps).
  stage 3  the two best of stage 2 again over several seeds: the single-seed winner is a
           waypoint, not a verdict, when the seed-to-seed spread is as large as the gap.
Every trial is logged to a JSONL file; rerunning a stage with its log trains nothing.

Serves: Module 8 deck slides 11 (grid search mechanics), 21 / M8-LAB-05 (right-sized, staged
search), 22 / M8-LAB-06 (reading best-so-far results without over-interpreting noise), 23 (coarse
to fine) and 24 (a quality plateau on a stable run: the tuning lever); syllabus: none (Module 16
has no hyperparameter-search topic); workshop guide Section 10 "Critical Hyperparameters".
Prerequisites: lesson 03 (warmup + cosine: what max_lr, warmup_steps and min_lr mean), lesson 07
(fair timing), `minitrain.train` (the trainer this search calls), `minitrain.hparam`.

Run: python lessons/15_hparam_search.py   (figures in outputs/lesson15/; timing: see main())
"""
import math
import statistics
import time

import matplotlib.pyplot as plt  # headless: falls back to Agg (the Makefile sets MPLBACKEND=Agg)
import torch

from minitrain import hparam
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, outputs_dir
from minitrain.train import TrainConfig

# The classic course grid (8 axes): every combination is one full training run.
CLASSIC_GRID = {
    "batch_size": [2, 4, 8, 16],
    "drop_rate": [0.0, 0.1, 0.2],
    "warmup_iters": [10, 20, 30],
    "weight_decay": [0.1, 0.01, 0.0],
    "peak_lr": [1e-4, 5e-4, 1e-3, 5e-3],
    "initial_lr": [5e-5, 1e-4],
    "min_lr": [5e-5, 1e-5, 1e-4],
    "n_epochs": [5, 10, 15, 20, 25],
}

CORPUS_BYTES = 200_000  # the first 200 kB of the default corpus: 90% train, last 10% validation
MAX_BUDGET = 90  # optimizer steps of a full trial; halving rounds use 10 and 30
SEEDS = [0, 1, 2]
TINY = dict(n_layer=2, n_head=2, n_embd=32, seq_len=32, batch_size=8, eval_iters=16,
            warmup_steps=10, min_lr=1e-5, corpus_bytes=CORPUS_BYTES)
COARSE_LRS = [1e-3, 1e-2, 1e-1]  # decades; the fine stage adds the log-midpoints around the best


def fmt_config(config):
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in config.items())


def plot_lr_and_seeds(short, sweep, finalists, path):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.8), facecolor=BACKGROUND)
    for axis in (ax, bx):
        axis.set_facecolor(PANEL)
    for res, color, label in ((short, MUTED, f"after {short.best_budget} steps"),
                              (sweep, NAVY, f"after {sweep.best_budget} steps (coarse + fine)")):
        pts = sorted((r["config"]["max_lr"], r["mean"]) for r in res.summary
                     if math.isfinite(r["mean"]))
        ax.plot(*zip(*pts), "o-", color=color, label=label, zorder=3)
        best = min(pts, key=lambda p: p[1])
        ax.scatter(*best, s=220, marker="*", color=GOLD, zorder=4)
    ax.set_xscale("log")
    ax.set(xlabel="max_lr", ylabel="val loss", title="Stage 1: val loss vs learning rate (* = best)")
    ax.legend(frameon=False)
    for i, row in enumerate(finalists):
        bx.scatter([i] * len(row["losses"]), row["losses"], color=MUTED, zorder=3)
        bx.errorbar([i], [row["mean"]], yerr=[row["std"]], fmt="o", color=NAVY, capsize=8,
                    zorder=4)
    bx.set_xticks(range(len(finalists)),
                  [fmt_config(r["config"]).replace(", ", "\n") for r in finalists], fontsize=8)
    bx.set_xlim(-0.5, len(finalists) - 0.5)
    bx.set(ylabel=f"val loss after {MAX_BUDGET} steps",
           title=f"Stage 3: finalists over seeds {SEEDS} (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_halving(result, path):
    """One panel per round: its configs' val loss, best first; gold = promoted to the next round."""
    rounds = result.rounds
    fig, axes = plt.subplots(1, len(rounds), figsize=(13, 4.8), facecolor=BACKGROUND,
                             gridspec_kw={"width_ratios": [len(r["ranked"]) + 1 for r in rounds]})
    for i, (ax, rnd) in enumerate(zip(axes, rounds)):
        ax.set_facecolor(PANEL)
        rows = rnd["ranked"]
        kept = len(rounds[i + 1]["ranked"]) if i + 1 < len(rounds) else 1
        losses = [r["mean"] for r in rows]
        ax.bar(range(len(rows)), losses, color=[GOLD] * kept + [MUTED] * (len(rows) - kept))
        lo, hi = min(losses), max(losses)
        pad = max(hi - lo, 0.01)
        ax.set_ylim(lo - 0.5 * pad, hi + 0.3 * pad)  # zoom: the differences are small
        ax.set_xticks(range(len(rows)), [f"wu{r['config']['warmup_steps']}\nwd{r['config']['weight_decay']}"
                                         for r in rows], fontsize=8)
        ax.set_title(f"round {i + 1}: {len(rows)} x {rnd['budget']} steps", fontsize=11)
    axes[0].set_ylabel("val loss")
    fig.suptitle(f"Stage 2: successive halving, eta=3 (gold = kept; wu = warmup_steps, "
                 f"wd = weight_decay); spent {result.total_budget} steps", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    start = time.perf_counter()
    # One thread: the fastest for these tiny models (each trial is a few ms of matmuls, too small
    # to split across cores). Measured on the shared 2-core course machine: 52 s with 1 thread,
    # 24 min with 2 (idle OpenMP threads spin on busy cores). Same losses either way.
    torch.set_num_threads(1)
    out = outputs_dir("lesson15")  # <repo>/outputs/lesson15, wherever the script is started
    train_fn = hparam.make_gpt_train_fn(TrainConfig(**TINY), out_root=out)
    logs = {name: out / f"{name}.jsonl" for name in ("lr_sweep", "halving")}
    for log in logs.values():  # a fresh search each run; the resume demo is below
        log.unlink(missing_ok=True)

    # 1. The classic grid, counted.
    n_classic = hparam.grid_size(CLASSIC_GRID)
    assert n_classic == len(hparam.grid(CLASSIC_GRID)) == 12_960

    # 2. Stage 1: lr alone at the full budget; the same coarse lrs at a third of it for contrast.
    short = hparam.search({"max_lr": COARSE_LRS}, train_fn, budget=MAX_BUDGET // 3,
                          log_path=logs["lr_sweep"], progress=False)
    sweep = hparam.search({"max_lr": COARSE_LRS}, train_fn, strategy="coarse_to_fine",
                          budget=MAX_BUDGET, fine_points=1, log_path=logs["lr_sweep"],
                          progress=False)
    best_lr = sweep.best_config["max_lr"]

    # Stage 2: successive halving over warmup x weight decay at that lr.
    space = {"max_lr": [best_lr], "warmup_steps": [0, 5, 15], "weight_decay": [0.0, 0.1, 0.3]}
    halving = hparam.search(space, train_fn, strategy="halving", budget=MAX_BUDGET, eta=3,
                            seeds=[0], log_path=logs["halving"], progress=True)

    # Stage 3: the two best of the last-but-one round, at the full budget, over SEEDS. It shares
    # the halving log, so the finalist's seed-0 run at MAX_BUDGET is reused, not retrained.
    top = [row["config"] for row in halving.rounds[-2]["ranked"][:2]]
    seeded = hparam.search(space, train_fn, configs=top, budget=MAX_BUDGET, seeds=SEEDS,
                           log_path=logs["halving"], progress=False)
    finalists = seeded.rounds[0]["ranked"]
    full_runs = [t.wall_s for t in seeded.trials + sweep.trials if t.budget == MAX_BUDGET]
    per_run_s = statistics.median(full_runs)

    # Resume: the same halving search with its log trains nothing.
    calls = []
    again = hparam.search(space, lambda c, b: calls.append(c) or train_fn(c, b),
                          strategy="halving", budget=MAX_BUDGET, eta=3, seeds=[0],
                          log_path=logs["halving"], progress=False)
    assert not calls and again.best_config == halving.best_config

    grid_cost = hparam.grid_size(space) * MAX_BUDGET
    print("\nThe classic course grid")
    print(f"  axes: {', '.join(f'{k}[{len(v)}]' for k, v in CLASSIC_GRID.items())}")
    print(f"  runs: {n_classic:,}")
    print(f"  measured per-run time (tiny GPT, {MAX_BUDGET} steps, median of {len(full_runs)}): "
          f"{per_run_s:.2f} s")
    print(f"  cost: {n_classic:,} x {per_run_s:.2f} s = {n_classic * per_run_s / 3600:.1f} h "
          f"= {n_classic * per_run_s / 86400:.2f} days on this machine — a lower bound: the "
          "course's runs train 5-25 epochs of a bigger model each")
    print("\nStaged search on the tiny GPT (val loss, lower is better)")
    print(f"  {'stage':<28}{'runs':>5}{'steps':>7}{'@steps':>7}  {'best loss':<10}best config")
    for name, res in (("0 coarse lrs, short budget", short), ("1 lr coarse->fine", sweep),
                      ("2 halving eta=3", halving), (f"3 seeds {SEEDS} (mean)", seeded)):
        print(f"  {name:<28}{len(res.trials):>5}{res.total_budget:>7}{res.best_budget:>7}  "
              f"{res.best_loss:<10.4f}{fmt_config(res.best_config)}")
    print(f"  (runs and steps count every trial used; {seeded.n_from_log} stage-3 run came from "
          "the halving log instead of being retrained)")
    print(f"  best lr after {short.best_budget} steps: {short.best_config['max_lr']:.3g}; after "
          f"{MAX_BUDGET} steps: {best_lr:.3g} — the budget moves the optimum")
    print(f"  halving spent {halving.total_budget} steps; the full {hparam.grid_size(space)}-config"
          f" grid at {MAX_BUDGET} steps would spend {grid_cost}")
    print(f"\nFinalists at {MAX_BUDGET} steps over seeds {SEEDS}")
    for row in finalists:
        losses = ", ".join(f"{x:.4f}" for x in row["losses"])
        print(f"  {row['mean']:.4f} ± {row['std']:.4f}  [{losses}]  {fmt_config(row['config'])}")
    gap = finalists[1]["mean"] - finalists[0]["mean"]
    spread = max(r["std"] for r in finalists)
    print(f"  gap between the two means: {gap:.4f}; largest seed std: {spread:.4f} -> "
          f"{'within noise: the winner is a waypoint' if gap < 2 * spread else 'a clear winner'}")
    same = halving.best_config == finalists[0]["config"]
    print(f"  single-seed winner (halving, seed 0): {fmt_config(halving.best_config)}\n"
          f"  winner on the mean of {len(SEEDS)} seeds:   {fmt_config(finalists[0]['config'])}"
          f"  -> {'the same' if same else 'a different config'}")
    print(f"\nBest configuration (staged search): {fmt_config(finalists[0]['config'])}  "
          f"val loss {finalists[0]['mean']:.4f} ± {finalists[0]['std']:.4f}")

    plot_lr_and_seeds(short, sweep, finalists, out / "val_loss_vs_lr.png")
    plot_halving(halving, out / "halving_rounds.png")
    print(f"figures: {out / 'val_loss_vs_lr.png'}, {out / 'halving_rounds.png'}  "
          f"({time.perf_counter() - start:.1f} s)")

    # The lesson's claims, asserted.
    assert halving.total_budget < grid_cost, "halving must spend less than the full grid"
    assert sweep.best_loss <= min(r["mean"] for r in sweep.rounds[0]["ranked"]), "fine >= coarse"
    assert finalists[0]["mean"] < math.log(256) - 0.5, "the best config must have learned something"
    assert all(r["std"] > 0 for r in finalists), "different seeds must give different losses"


if __name__ == "__main__":
    main()
