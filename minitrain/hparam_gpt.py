"""The trainer hook for minitrain.hparam: a ready `train_fn` that trains the tiny GPT.

What: `make_gpt_train_fn(base)` returns `train_fn(config, budget) -> validation loss` for
`minitrain.hparam.search`: each trial overrides `TrainConfig` fields with `config`, trains
`budget` optimizer steps with `minitrain.train`, and returns the final validation loss (nan when
it diverged). `TINY_GPT` is a model that trains in seconds on one CPU core.

Why a separate file: the search (minitrain/hparam.py) knows nothing about models; it only calls
`train_fn`. This hook is the one place the search meets the trainer, so it lives on its own and
imports the trainer only when a hook is made. Every name here is still importable from
`minitrain.hparam` (`from minitrain.hparam import make_gpt_train_fn` keeps working).

Trial folders: each trial trains in a fresh `<out_root>/hparam_trial_<pid>_<random>` folder that
is deleted afterwards, even when the trial fails; `remove_stale_trial_dirs` deletes the folders
of a search that was killed mid-trial (its pid no longer runs), never those of a live one.

Common bug: letting the trainer's non-finite-loss policy roll back and hand the search a finite,
meaningless loss: the hook asks the trainer to STOP on a non-finite loss, so divergence is seen
and logged as "diverged".
"""
import contextlib
import dataclasses
import io
import math
import os
import pathlib
import shutil
import tempfile

from minitrain.hparam_trials import SearchSetupError

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
