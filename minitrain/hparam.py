"""Budget-aware hyperparameter search: grid, random, successive halving, coarse-to-fine.

What: `search(space, train_fn, strategy=..., budget=...)` tries configurations drawn from `space`
(a dict: name -> list of values), calls `train_fn(config, budget) -> validation loss` for each,
and returns the best. `budget` is whatever unit `train_fn` understands (training steps for the
tiny GPT, see `make_gpt_train_fn`).

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
import json
import math
import os
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from minitrain.files import append_jsonl, read_jsonl

STRATEGIES = ("grid", "random", "halving", "coarse_to_fine")


class SearchSetupError(ValueError):
    """A mistake every trial would repeat (bad config keys, a budget train_fn cannot take): it
    stops the search at once instead of being logged as one failed trial after another."""


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
class Trial:
    """One call of train_fn: a configuration, trained with `budget`, under `seed`."""
    config: dict
    budget: object
    seed: object
    val_loss: float  # nan/inf kept as returned; ranked as worst
    wall_s: float
    round: int = 0
    from_log: bool = False  # True: read from the log, train_fn was not called
    status: str = "ok"  # "ok" | "diverged" (nan/inf loss) | "failed" (train_fn raised)
    reason: str = None  # why a trial diverged or failed (None when ok)


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


def _key(config, budget, seed):
    return json.dumps([config, budget, seed], sort_keys=True)


def _rank_loss(x):
    return x if math.isfinite(x) else math.inf


def read_log(path):
    """The trial records of a JSONL log (a list of dicts); tolerant of a kill mid-write.

    A truncated last line (no newline: the process died while writing it) is cut off the file, so
    the next append starts on a clean line. Any other unreadable line is skipped with a warning.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):  # the torn tail of a killed write: cut it, or the next append
        with open(path, "r+b") as f:  # would be glued onto it and lost with it
            f.truncate(complete)
            f.flush()
            os.fsync(f.fileno())
    records = [r for r in read_jsonl(path) if isinstance(r, dict) and "config" in r
               and "budget" in r]  # must be trial records
    lines = sum(1 for line in data[:complete].splitlines() if line.strip())
    if len(records) < lines:
        warnings.warn(f"{path}: skipped {lines - len(records)} unreadable line(s)", stacklevel=2)
    return records


def _status(record):
    """A logged trial's status; logs written before `status` existed only had `diverged`."""
    if record.get("status") in ("ok", "diverged", "failed"):
        return record["status"]
    return "diverged" if record.get("val_loss") is None else "ok"


class _Runner:
    """Runs (config, budget) over every seed, reusing the log and results already in memory."""

    def __init__(self, train_fn, seeds, log_path, hide_bar, total, strategy, retry_failed):
        self.train_fn, self.seeds, self.log_path, self.strategy = train_fn, seeds, log_path, strategy
        self.done = {}  # key -> Trial, from the log and from this search
        self.used = set()  # keys of the trials this search has used (each counted once)
        self.trials, self.n_trained, self.n_from_log = [], 0, 0
        self.best = math.inf
        if log_path is not None:
            for r in read_log(log_path):
                status = _status(r)
                if retry_failed and status == "failed":
                    continue  # train it again; the new record is appended after the old one
                loss = math.nan if r.get("val_loss") is None else float(r["val_loss"])
                trial = Trial(r["config"], r["budget"], r.get("seed"), loss,
                              float(r.get("wall_s", 0.0)), int(r.get("round", 0)), True,
                              status, r.get("reason"))
                self.done[_key(trial.config, trial.budget, trial.seed)] = trial
        self.bar = tqdm(total=total, desc=f"search:{strategy}", disable=hide_bar, leave=False)

    def evaluate(self, config, budget, round_index):
        """Mean and spread of the loss of `config` at `budget` over the seeds."""
        losses = []
        for seed in self.seeds:
            key = _key(config, budget, seed)
            trial = self.done.get(key)
            if trial is not None and trial.from_log and key not in self.used:
                self.n_from_log += 1
            if trial is None:
                trial = self._train(config, budget, seed, round_index)
                self.n_trained += 1
                self.done[key] = trial
                if self.log_path is not None:
                    append_jsonl(self.log_path, {
                        "config": config, "budget": budget, "seed": seed,
                        "val_loss": trial.val_loss if trial.status == "ok" else None,
                        "status": trial.status, "reason": trial.reason,
                        "diverged": trial.status == "diverged", "wall_s": round(trial.wall_s, 4),
                        "round": round_index, "strategy": self.strategy}, fsync=True)
            if key not in self.used:
                self.used.add(key)
                self.trials.append(trial)
            self.bar.update(1)
            losses.append(_rank_loss(trial.val_loss))
            self.best = min(self.best, losses[-1])
            self.bar.set_postfix(best=f"{self.best:.4f}")
        mean = statistics.fmean(losses) if all(map(math.isfinite, losses)) else math.inf
        spread = statistics.stdev(losses) if len(losses) > 1 and math.isfinite(mean) else 0.0
        return {"config": dict(config), "budget": budget, "mean": mean, "std": spread,
                "losses": losses, "round": round_index}

    def _train(self, config, budget, seed, round_index):
        """One train_fn call; an Exception (not Ctrl-C, not a setup error) is a failed trial."""
        run_config = config if seed is None else {**config, "seed": seed}
        start = time.perf_counter()
        status, reason = "ok", None
        try:
            loss = self.train_fn(dict(run_config), budget)
            loss = float(loss)
        except SearchSetupError:
            raise
        except Exception as error:  # noqa: BLE001 — one bad trial must not end the search
            loss, status, reason = math.nan, "failed", f"{type(error).__name__}: {error}"
            warnings.warn(f"trial {config} (budget {budget}, seed {seed}) failed: {reason}; "
                          "logged as failed, the search goes on", stacklevel=4)
        if status == "ok" and not math.isfinite(loss):
            status, reason = "diverged", f"non-finite validation loss ({loss})"
        return Trial(dict(config), budget, seed, loss, time.perf_counter() - start, round_index,
                     status=status, reason=reason)

    def sweep(self, configs, budget, round_index):
        """Evaluate every config; return the summaries sorted best first (stable on ties)."""
        rows = [self.evaluate(c, budget, round_index) for c in configs]
        return sorted(rows, key=lambda row: row["mean"])


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


# --- The trainer hook: a ready train_fn that trains the tiny GPT -------------------------------

# A model that trains in seconds on one CPU core, on the first 200 kB of the default corpus.
TINY_GPT = dict(n_layer=2, n_head=2, n_embd=64, seq_len=64, batch_size=8, eval_iters=4,
                warmup_steps=5, corpus_bytes=200_000)
TRIAL_PREFIX = "hparam_trial_"  # trial folders: <out_root>/hparam_trial_<pid>_<random>


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_trial_dirs(root):
    """Delete trial folders in `root` left by a process that was killed mid-trial (its pid, in
    the folder's name, no longer runs); folders of live processes (a search running beside this
    one) are left alone. Returns the paths removed."""
    import pathlib
    import shutil

    removed = []
    root = pathlib.Path(root)
    if not root.is_dir():
        return removed
    for path in root.glob(TRIAL_PREFIX + "*_*"):
        pid = path.name[len(TRIAL_PREFIX):].split("_", 1)[0]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def make_gpt_train_fn(base=None, *, out_root=None, quiet=True):
    """A `train_fn(config, budget) -> val loss` that trains the tiny GPT with `minitrain.train`.

    `config` keys are `TrainConfig` field names (max_lr, batch_size, warmup_steps, weight_decay,
    min_lr, seed, ...); unknown keys are a SearchSetupError (a ValueError). `budget` is the number
    of optimizer steps, an int (None: `base.steps`); `train_fn.integer_budget` is True, so
    `search` refuses a non-int budget before training. `base` is the TrainConfig the config
    overrides (default: TINY_GPT). Each trial runs in a fresh folder `out_root/hparam_trial_<pid>_*`
    (default out_root: the system temp dir), deleted after the trial, even when it fails; folders
    of killed searches are deleted when the next hook is made. It evaluates once at its last step
    and returns `final_val_loss`, or nan when the run diverged (no finite val loss): the search
    logs it as diverged. A trial the trainer refuses (an invalid combination) raises, and the
    search logs it as failed. warmup_steps is clamped to the budget, so a short halving round
    warms up over its whole length instead of failing. `quiet` hides the trainer's step lines.
    """
    import contextlib
    import dataclasses
    import io
    import shutil
    import tempfile

    from minitrain.train import TrainConfig, TrainingStopped, train  # lazy: only this hook needs it

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    base = base if base is not None else TrainConfig(**{k: v for k, v in TINY_GPT.items()
                                                        if k in names})
    reserved = {"steps", "out_dir", "resume"}
    root = out_root if out_root is not None else tempfile.gettempdir()
    remove_stale_trial_dirs(root)

    def train_fn(config, budget=None):
        unknown = sorted(set(config) - names)
        if unknown:
            raise SearchSetupError(f"config has keys that are not TrainConfig fields: {unknown}; "
                                   "use field names such as max_lr, batch_size, warmup_steps")
        if reserved & set(config):
            raise SearchSetupError(f"config must not set {sorted(reserved & set(config))}: the "
                                   "search owns them (steps = budget; a fresh out_dir per trial)")
        if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool)):
            raise SearchSetupError(f"budget must be an int number of training steps, got "
                                   f"{budget!r}; pass an int, e.g. budget=30")
        steps = base.steps if budget is None else budget
        if steps < 1:
            raise SearchSetupError(f"budget must be >= 1 training step, got {budget!r}")
        overrides = {**config, "steps": steps, "eval_every": steps, "checkpoint_every": steps}
        if "on_nonfinite" in names and "on_nonfinite" not in config:
            # A search wants to SEE divergence: the trainer's default (rollback) would hand back
            # the rolled-back model's finite but meaningless loss.
            overrides["on_nonfinite"] = "stop"
        if quiet and "log_every" in names and "log_every" not in config:
            overrides["log_every"] = 0
        overrides["warmup_steps"] = min(int(overrides.get("warmup_steps", base.warmup_steps)), steps)
        os.makedirs(root, exist_ok=True)
        out_dir = tempfile.mkdtemp(dir=root, prefix=f"{TRIAL_PREFIX}{os.getpid()}_")
        try:
            cfg = dataclasses.replace(base, **overrides, out_dir=out_dir, resume=False)
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
                result = train(cfg)
        except SystemExit as stop:  # a trainer that exits must not end the whole search
            raise RuntimeError(f"the trainer stopped the trial: {stop.code}") from None
        except TrainingStopped as stop:
            if "(--on-nonfinite " in str(stop):  # the stop policy fired: the trial diverged
                return math.nan  # logged as "diverged" by search(); anything else propagates
            raise
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        loss = result.final_val_loss
        return math.nan if loss is None else float(loss)  # None: no finite val loss (diverged)

    train_fn.integer_budget = True  # budgets are steps: search() refuses 2.5
    return train_fn
