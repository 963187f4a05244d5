"""Budget-aware hyperparameter search: grid, random, successive halving, coarse-to-fine.

What: `search(space, train_fn, strategy=..., budget=...)` tries configurations drawn from `space`
(a dict: name -> list of values), calls `train_fn(config, budget) -> validation loss` for each,
and returns the best. `budget` is whatever unit `train_fn` understands (training steps for the
tiny GPT, see `make_gpt_train_fn`). That ready train_fn for the tiny GPT (`make_gpt_train_fn`,
`TINY_GPT`, `TRIAL_PREFIX`, `remove_stale_trial_dirs`) lives in minitrain/hparam_gpt.py and is
re-exported here: `from minitrain.hparam import make_gpt_train_fn` works as before.
The runner that calls train_fn and keeps the resumable log (`Trial`, `read_log`,
`SearchSetupError`) lives in minitrain/hparam_trials.py, re-exported here too.

Why a budget matters: the full grid is a product. 8 axes of 2-5 values each is already 12,960
runs (lesson 15 counts and costs it). Cheaper strategies spend the budget where it pays:
- "grid": every combination, `itertools.product` order. Honest but exponential in the axes.
- "random": `n` distinct grid points. When only a few axes matter, n random points try n values
  of each important axis; a grid with the same n tries only n ** (1 / n_axes) of them.
- "halving" (successive halving): train n configs on a small budget, keep the best 1/eta,
  multiply the budget by eta, repeat until one is left. The last round trains with `budget`;
  each earlier round with 1/eta of the next.
  Formula: n_{i+1} = max(1, n_i // eta),  budget_{i+1} = eta * budget_i. Every round costs
  n_i * budget_i = n * budget_0, so R rounds cost R * n * budget_0 where the grid at the final
  budget costs n * budget = n * budget_0 * eta**(R-1): 27 configs, eta=3, budget 27 -> 4 rounds
  of 27 steps = 108 steps instead of 729.
  Its bet: an early loss ranks configurations the way the final loss would. Too small a first
  budget breaks that bet (a high lr looks best after 5 steps and diverges after 500).
- "coarse_to_fine": the grid of the values you gave (the coarse sweep), then, on each numeric
  axis, `fine_points` new values between the best value's neighbours (other axes fixed at their
  best). Values are log-spaced when the axis spans a factor >= 10 (learning rates, weight decay),
  linear otherwise; integer axes stay integers. It never leaves the range you gave: a best value
  at the edge of its axis means the range is wrong (a warning says so) — widen it and rerun.
  The fine grid has (2 * fine_points + 1) ** n_numeric_axes points: zoom on few axes at a time.

Noise: `seeds=[0, 1, 2]` runs every configuration once per seed (passed as `config["seed"]`)
and ranks by the mean; `SearchResult.summary` holds mean and spread (sample std). If two
configurations' spreads overlap, the ranking between them is noise, not evidence.

Resumable: with `log_path`, every finished trial is appended as one JSON line
`{"config", "budget", "seed", "val_loss", "status", "reason", "diverged", "wall_s", ...}`, flushed
and fsynced. A rerun with the same log skips every trial already there (key: config + budget +
seed), so Ctrl-C or a kill loses at most the trial that was running. A truncated last line (a kill
mid-write) is cut off on load; any other unreadable line is skipped with a warning.

Failed trials never stop the search. `status` is "ok", "diverged" (train_fn returned nan/inf) or
"failed" (train_fn raised an Exception: an invalid combination, a trainer that stopped on a
non-finite loss); both rank as worst and are logged with `"val_loss": null` and the `reason`, so a
rerun skips them instead of crashing at the same point again (`retry_failed=True` retrains them).
Two things still stop the search: Ctrl-C (KeyboardInterrupt is never swallowed) and a
`SearchSetupError` (a mistake that every trial would repeat, e.g. a config key the trainer does not
have). If every trial failed, `search` raises RuntimeError quoting the first reason.

Budgets: any positive finite number, in `train_fn`'s unit. A train_fn whose budget is a count of
steps says so with `train_fn.integer_budget = True` (`make_gpt_train_fn` does); then `budget` and
`min_budget` must be ints, so budget=2.5 is refused before training instead of training 2 steps
and logging 2.5. Halving rounds of an int budget are rounded to ints, and the log holds exactly the
budget each trial was given.

Common bug: comparing losses measured at different budgets. A config trained 9x longer wins
because it trained longer; halving only ranks configurations within one round.
"""
import itertools
import math
import random
import warnings
from dataclasses import dataclass, field

from minitrain.hparam_gpt import (TINY_GPT, TRIAL_PREFIX, make_gpt_train_fn,
                                  remove_stale_trial_dirs)
from minitrain.hparam_trials import SearchSetupError, Trial, _key, _Runner, read_log

__all__ = ["STRATEGIES", "SearchSetupError", "grid", "grid_size", "random_configs", "Trial",
           "SearchResult", "read_log", "fine_values", "search",
           # re-exported: Trial, read_log, SearchSetupError from minitrain.hparam_trials, and
           # the GPT trial hook from minitrain.hparam_gpt:
           "TINY_GPT", "TRIAL_PREFIX", "make_gpt_train_fn", "remove_stale_trial_dirs"]

STRATEGIES = ("grid", "random", "halving", "coarse_to_fine")


def _check_space(space):
    if not isinstance(space, dict) or not space:
        raise ValueError(f"space must be a non-empty dict of name -> list of values, got {space!r}; "
                         "e.g. space={'max_lr': [1e-4, 1e-3], 'batch_size': [8, 16]}")
    for name, values in space.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"space[{name!r}] must be a non-empty list of values, got {values!r}; "
                             f"wrap a fixed value in a list: space[{name!r}] = [value]")


def grid(space):
    """Every combination, in `itertools.product` order over the keys as given (last key fastest)."""
    _check_space(space)
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def grid_size(space):
    """How many configurations `grid(space)` has, without building them: the product of lengths."""
    _check_space(space)
    return math.prod(len(v) for v in space.values())


def random_configs(space, n, *, seed):
    """`n` distinct grid points, sampled uniformly WITHOUT replacement; deterministic for a seed.

    Sampling indexes the grid (mixed radix, last key fastest), so it never builds the whole grid
    and never wastes a trial on a duplicate. `n` larger than the grid is a ValueError.
    """
    total = grid_size(space)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= total:
        raise ValueError(f"n must be an int in [1, {total}] (the grid size), got {n!r}; "
                         "use strategy='grid' to try every configuration")
    keys = list(space)
    configs = []
    for index in random.Random(seed).sample(range(total), n):
        config = {}
        for key in reversed(keys):  # mixed-radix decode: the last key varies fastest
            index, digit = divmod(index, len(space[key]))
            config[key] = space[key][digit]
        configs.append({k: config[k] for k in keys})
    return configs


@dataclass
class SearchResult:
    best_config: dict
    best_loss: float  # mean over seeds, at best_budget
    trials: list  # every Trial, in the order they were run (or read from the log)
    best_budget: object = None
    best_spread: float = 0.0  # sample std over seeds (0.0 with one seed)
    summary: list = field(default_factory=list)  # one row per (config, budget): mean, std, losses
    rounds: list = field(default_factory=list)  # per round/stage: budget and the configs it ranked
    total_budget: float = 0  # sum of budget over every trial (each seed counts)
    n_trained: int = 0  # train_fn calls made by this search
    n_from_log: int = 0  # trials skipped because the log already had them
    strategy: str = "grid"
    n_failed: int = 0  # trials used by this search whose status is not "ok"


def _halving_plan(n, eta, budget, min_budget):
    """Survivor counts and budgets per round: n, n//eta, ... 1; the last round gets `budget`."""
    sizes = [n]
    while sizes[-1] > 1:
        sizes.append(max(1, sizes[-1] // eta))
    budgets = []
    for i in range(len(sizes)):
        b = budget / eta ** (len(sizes) - 1 - i)
        b = max(min_budget, round(b) if isinstance(budget, int) else b)
        budgets.append(b)
    return sizes, budgets


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fine_values(values, best, points):
    """`points` new values strictly between `best`'s neighbours in the sorted axis `values`.

    Log-spaced when the axis is positive and spans a factor >= 10, linear otherwise; an axis of
    ints stays ints. Values already on the axis are left out (they were tried in the coarse sweep).
    """
    axis = sorted(set(values))
    i = axis.index(best)
    lo, hi = axis[max(0, i - 1)], axis[min(len(axis) - 1, i + 1)]
    log = axis[0] > 0 and axis[-1] / axis[0] >= 10
    new = []
    for a, b in ((lo, best), (best, hi)):
        if a == b:
            continue
        for j in range(1, points + 1):  # `points` values strictly inside (a, b)
            t = j / (points + 1)
            v = math.exp(math.log(a) + t * (math.log(b) - math.log(a))) if log else a + t * (b - a)
            new.append(round(v) if all(isinstance(x, int) for x in axis) else v)
    return sorted({v for v in new if v not in axis})


def search(space, train_fn, *, strategy="grid", budget=None, log_path=None, n=None, seed=0,
           seeds=None, eta=3, min_budget=1, fine_points=2, configs=None, progress=True,
           retry_failed=False):
    """Search `space` for the config with the lowest `train_fn(config, budget)`.

    strategy: "grid" | "random" (needs `n`; sampled with `seed`) | "halving" (needs `budget`, the
    last round's; starts from `n` random configs, or the whole grid when n is None; `eta` keeps
    the best 1/eta each round; no round trains with less than `min_budget`) | "coarse_to_fine"
    (the grid, then `fine_points` new values on each side of the best on every numeric axis).
    seeds: list of seeds; each config runs once per seed with `config["seed"] = s`, ranked by mean.
    configs: an explicit list of configs to try instead of the grid of `space` (e.g. the finalists
    of an earlier stage); grid and halving use it as their pool, random samples n of it.
    progress: show a tqdm bar with the best loss so far (False hides it).
    retry_failed: trials logged as "failed" (train_fn raised) are trained again instead of being
    skipped (e.g. after fixing the bug that made them fail); diverged trials are never retried.
    """
    _check_space(space)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if budget is not None and (not _is_number(budget) or not 0 < budget < math.inf):
        raise ValueError(f"budget must be a positive number (e.g. training steps), got {budget!r}")
    if getattr(train_fn, "integer_budget", False):
        for name, value in (("budget", budget), ("min_budget", min_budget)):
            if value is not None and not isinstance(value, int):
                raise ValueError(f"{name} must be an int: this train_fn's budget is a number of "
                                 f"training steps, got {value!r}; e.g. {name}={max(1, int(value))}")
    if strategy == "halving" and budget is None:
        raise ValueError("budget is required for strategy='halving': pass the last round's "
                         "budget, e.g. budget=81 (training steps)")
    if strategy == "random" and n is None:
        raise ValueError("n is required for strategy='random': pass how many configs to try")
    if strategy in ("grid", "coarse_to_fine") and n is not None:
        raise ValueError(f"n is only used by strategy='random' or 'halving'; drop n for "
                         f"strategy={strategy!r} (it tries the whole grid)")
    if not isinstance(eta, int) or eta < 2:
        raise ValueError(f"eta must be an int >= 2 (keep the best 1/eta each round), got {eta!r}")
    if not _is_number(min_budget) or not 0 < min_budget < math.inf:
        raise ValueError(f"min_budget must be a positive number, got {min_budget!r}")
    if not isinstance(fine_points, int) or fine_points < 1:
        raise ValueError(f"fine_points must be an int >= 1, got {fine_points!r}")
    if seeds is not None and (not isinstance(seeds, (list, tuple)) or not seeds):
        raise ValueError(f"seeds must be a non-empty list of ints, e.g. [0, 1, 2], got {seeds!r}")
    seeds = list(seeds) if seeds is not None else [None]

    if configs is not None:
        if not isinstance(configs, list) or not configs or not all(isinstance(c, dict) for c in configs):
            raise ValueError(f"configs must be a non-empty list of dicts, got {configs!r}")
        if strategy == "coarse_to_fine":
            raise ValueError("configs cannot be used with strategy='coarse_to_fine' (it zooms "
                             "on the axes of space); drop configs")
        pool = [dict(c) for c in configs]
        if n is not None:
            pool = [pool[i] for i in random.Random(seed).sample(range(len(pool)), min(n, len(pool)))]
        configs = pool
    else:
        configs = random_configs(space, n, seed=seed) if n is not None else grid(space)
    unique = {}  # a config listed twice (a repeated axis value) is tried once
    for config in configs:
        unique.setdefault(_key(config, None, None), config)
    configs = list(unique.values())
    if strategy == "halving":
        sizes, budgets = _halving_plan(len(configs), eta, budget, min_budget)
        total = sum(sizes) * len(seeds)
    else:
        total = len(configs) * len(seeds)
    runner = _Runner(train_fn, seeds, log_path, not progress, total, strategy, retry_failed)
    rounds = []
    try:
        if strategy == "halving":
            for i, b in enumerate(budgets):
                ranked = runner.sweep(configs, b, i)
                rounds.append({"round": i, "budget": b, "ranked": ranked})
                configs = [row["config"] for row in ranked[:sizes[i + 1]]] if i + 1 < len(sizes) else []
            final = rounds[-1]["ranked"]
        else:
            final = runner.sweep(configs, budget, 0)
            rounds.append({"round": 0, "budget": budget, "ranked": final})
            if strategy == "coarse_to_fine":
                final = _fine_stage(space, final, runner, budget, fine_points, rounds)
    finally:
        runner.bar.close()
    failed = [t for t in runner.trials if t.status == "failed"]
    if runner.trials and len(failed) == len(runner.trials):
        raise RuntimeError(f"every trial failed ({len(failed)}); the first: {failed[0].reason}. "
                           "Fix train_fn or the space, then rerun with retry_failed=True "
                           "(or delete the log)")
    best = final[0]
    summary = list({_key(row["config"], row["budget"], None): row
                    for r in rounds for row in r["ranked"]}.values())  # each (config, budget) once
    spent = sum(t.budget for t in runner.trials if t.budget is not None)
    n_bad = sum(t.status != "ok" for t in runner.trials)
    return SearchResult(best["config"], best["mean"], runner.trials, best["budget"], best["std"],
                        summary, rounds, spent, runner.n_trained, runner.n_from_log, strategy,
                        n_bad)


def _fine_stage(space, coarse, runner, budget, fine_points, rounds):
    """Zoom in: a grid of new values around the coarse best on every numeric axis."""
    best = coarse[0]["config"]
    fine_space = {}
    for name, values in space.items():
        if len(values) > 1 and all(_is_number(v) for v in values):
            axis = sorted(set(values))
            if best[name] in (axis[0], axis[-1]):
                warnings.warn(f"coarse_to_fine: best {name}={best[name]} is at the edge of "
                              f"{axis}; the optimum may lie outside — widen space[{name!r}]",
                              stacklevel=3)
            fine_space[name] = sorted({best[name], *fine_values(values, best[name], fine_points)})
        else:
            fine_space[name] = [best[name]]
    fine = runner.sweep(grid(fine_space), budget, 1)
    rounds.append({"round": 1, "budget": budget, "ranked": fine})
    return sorted(coarse + [r for r in fine if r["config"] != best], key=lambda r: r["mean"])
