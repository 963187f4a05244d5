"""The trial runner of minitrain.hparam: one train_fn call per trial, and the resumable log.

What: `_Runner` evaluates a configuration at a budget over every seed; each call of train_fn is
one `Trial` (config, budget, seed, val_loss, status "ok" | "diverged" | "failed", reason). With a
log path, every finished trial is appended to a JSONL file (flushed and fsynced), and a runner
made with the same log reuses the trials already there (key: config + budget + seed).
`read_log(path)` reads that log back, cutting off a line torn by a kill mid-write.

Why a separate file: minitrain/hparam.py teaches the strategies (grid, random, halving,
coarse-to-fine) and decides WHICH trials to run; this file only runs them and remembers them.
Every public name here (`Trial`, `read_log`, `SearchSetupError`) still imports from
`minitrain.hparam`, whose docstring explains the log format and the failure rules.

Common bug: swallowing every exception in a trial. An Exception is one failed trial (logged,
the search goes on), but Ctrl-C (KeyboardInterrupt) and a `SearchSetupError` (a mistake every
trial would repeat) must stop the search at once.
"""
import json
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass

from tqdm.auto import tqdm

from minitrain.files import append_jsonl, read_jsonl


class SearchSetupError(ValueError):
    """A mistake every trial would repeat (bad config keys, a budget train_fn cannot take): it
    stops the search at once instead of being logged as one failed trial after another."""


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
