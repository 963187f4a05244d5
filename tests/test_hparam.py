"""Lesson 15: budget-aware hyperparameter search (minitrain.hparam).

Cheap analytic objectives stand in for training everywhere except two short runs of the GPT hook
(a smoke test and a forced divergence): the properties are about the search, not the model.
"""
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings

import hypothesis.strategies as st
import pytest
from hypothesis import given

from minitrain import hparam
from tests.strategies import seeds

pytestmark = pytest.mark.lesson15

axis_values = st.one_of(st.integers(-50, 50), st.floats(-1e3, 1e3, allow_nan=False),
                        st.text("abcxyz", min_size=1, max_size=3), st.booleans())


@st.composite
def spaces(draw, max_axes=4, max_values=4):
    """A search space: 1-4 named axes, each a list of 1-4 distinct values of mixed types."""
    names = draw(st.lists(st.text("abcdefgh_", min_size=1, max_size=6), min_size=1,
                          max_size=max_axes, unique=True))
    return {name: draw(st.lists(axis_values, min_size=1, max_size=max_values,
                                unique_by=lambda v: (type(v), v))) for name in names}


def bowl(config, budget):
    """A smooth objective with its minimum at lr=10**-2.5 (~3.2e-3), wd=0.07; longer budgets lower
    every loss by the same amount, so early ranking equals final ranking."""
    return ((math.log10(config["lr"]) + 2.5) ** 2 + 10 * (config.get("wd", 0.07) - 0.07) ** 2
            + 1.0 / budget)


SPACE = {"lr": [1e-4, 1e-3, 1e-2, 1e-1], "wd": [0.0, 0.1, 0.2]}


class Counter:
    """Wraps an objective, counts its calls, optionally raises KeyboardInterrupt on call `stop`."""

    def __init__(self, fn, stop=None):
        self.fn, self.stop, self.calls = fn, stop, 0

    def __call__(self, config, budget):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a trial
        return self.fn(config, budget)


@given(spaces())
def test_grid_order_equals_itertools_product(space):
    """grid(space) lists every combination in itertools.product order over the keys as given."""
    expected = [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    got = hparam.grid(space)
    assert got == expected
    assert [list(c) for c in got] == [list(space)] * len(expected)  # key order kept
    assert hparam.grid_size(space) == len(expected)


@given(spaces(), seeds, st.data())
def test_random_configs_deterministic_distinct_and_inside_space(space, seed, data):
    """The same seed gives the same list; every config takes each key's value from its axis;
    configs are distinct grid points (sampling without replacement)."""
    n = data.draw(st.integers(1, hparam.grid_size(space)))
    first = hparam.random_configs(space, n, seed=seed)
    assert first == hparam.random_configs(space, n, seed=seed)
    assert len(first) == n
    for config in first:
        assert list(config) == list(space)
        for key, value in config.items():
            assert any(type(value) is type(v) and value == v for v in space[key])
    grid_positions = [json.dumps(c, sort_keys=True) for c in first]
    assert len(set(grid_positions)) == n


def test_random_configs_too_many_raises_naming_n():
    """Asking for more distinct configs than the grid holds is a ValueError that names n."""
    with pytest.raises(ValueError, match="n must be"):
        hparam.random_configs({"a": [1, 2]}, 3, seed=0)


@pytest.mark.parametrize("strategy", ["grid", "random", "halving", "coarse_to_fine"])
def test_rerun_with_log_calls_train_fn_zero_times(strategy, tmp_path):
    """A second search with the same log trains nothing and returns the same best config."""
    log = tmp_path / "trials.jsonl"
    n = 6 if strategy in ("random", "halving") else None
    kwargs = dict(strategy=strategy, budget=9, log_path=log, n=n, progress=False)
    first_fn, again_fn = Counter(bowl), Counter(bowl)
    first = hparam.search(SPACE, first_fn, **kwargs)
    again = hparam.search(SPACE, again_fn, **kwargs)
    assert first_fn.calls == first.n_trained > 0
    assert again_fn.calls == 0 and again.n_from_log == first.n_trained
    assert again.best_config == first.best_config and again.best_loss == first.best_loss
    records = hparam.read_log(log)
    assert len(records) == first.n_trained
    assert set(records[0]) >= {"config", "budget", "seed", "val_loss", "wall_s"}


def test_interrupted_search_resumes_losing_only_the_running_trial(tmp_path):
    """Ctrl-C during trial k keeps trials 1..k-1 in the log; the rerun trains only the rest."""
    log = tmp_path / "trials.jsonl"
    total = hparam.grid_size(SPACE)
    interrupted = Counter(bowl, stop=5)
    with pytest.raises(KeyboardInterrupt):
        hparam.search(SPACE, interrupted, log_path=log, budget=3, progress=False)
    assert len(hparam.read_log(log)) == 4
    resumed = Counter(bowl)
    result = hparam.search(SPACE, resumed, log_path=log, budget=3, progress=False)
    assert resumed.calls == total - 4
    assert result.n_from_log == 4 and len(result.trials) == total
    assert result.best_config == hparam.search(SPACE, bowl, budget=3, progress=False).best_config


def test_truncated_last_line_is_ignored_and_cut(tmp_path):
    """A line torn by a kill mid-write is dropped; the next append starts on a clean line."""
    log = tmp_path / "trials.jsonl"
    hparam.search({"lr": [1e-3, 1e-2]}, bowl, budget=1, log_path=log, progress=False)
    with open(log, "a") as f:
        f.write('{"config": {"lr": 0.1}, "bud')  # the process died here
    fn = Counter(bowl)
    hparam.search({"lr": [1e-3, 1e-2, 1e-1]}, fn, budget=1, log_path=log, progress=False)
    assert fn.calls == 1  # only lr=0.1, the torn trial, is trained again
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["budget"] == 1 for line in lines)


def test_halving_spends_less_than_full_grid_and_finds_the_best():
    """Successive halving (27 configs, eta=3) keeps the grid's best config on an objective whose
    ranking does not change with budget, and spends far less than the grid at the max budget."""
    space = {"lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0], "wd": [0.0, 0.07, 0.2]}
    full = hparam.search(space, bowl, strategy="grid", budget=27, progress=False)
    halving = hparam.search(space, bowl, strategy="halving", budget=27, eta=3, progress=False)
    assert [r["budget"] for r in halving.rounds] == [1, 3, 9, 27]
    assert [len(r["ranked"]) for r in halving.rounds] == [27, 9, 3, 1]
    assert halving.best_config == full.best_config == {"lr": 3e-3, "wd": 0.07}
    assert halving.total_budget == 4 * 27 < full.total_budget == 27 * 27


def test_coarse_to_fine_improves_on_the_coarse_best():
    """On a smooth bowl whose minimum lies between coarse points, the fine stage beats the coarse
    best, the fine lr values are log-spaced and stay inside the given range."""
    space = {"lr": [1e-5, 1e-4, 1e-2, 1e-1], "wd": [0.0, 0.1, 0.4]}
    coarse = hparam.search(space, bowl, strategy="grid", budget=10, progress=False)
    fine = hparam.search(space, bowl, strategy="coarse_to_fine", budget=10, progress=False)
    assert fine.best_loss < coarse.best_loss
    fine_lrs = sorted({r["config"]["lr"] for r in fine.rounds[1]["ranked"]})
    assert 1e-4 <= fine_lrs[0] and fine_lrs[-1] <= 1e-1
    assert math.isclose(hparam.fine_values([1e-4, 1e-2], 1e-4, 1)[0], 1e-3)  # geometric midpoint
    assert hparam.fine_values([0, 10], 0, 1) == [5]  # linear for an axis that includes 0


def test_diverged_trials_rank_worst_and_are_logged(tmp_path):
    """nan/inf losses never win and never crash; the log marks them diverged."""
    log = tmp_path / "trials.jsonl"

    def unstable(config, budget):
        return {1: math.nan, 2: math.inf, 3: 2.5, 4: 3.0}[config["x"]]

    result = hparam.search({"x": [1, 2, 3, 4]}, unstable, budget=1, log_path=log, progress=False)
    assert result.best_config == {"x": 3} and result.best_loss == 2.5
    records = hparam.read_log(log)
    assert [r["diverged"] for r in records] == [True, True, False, False]
    again = hparam.search({"x": [1, 2, 3, 4]}, Counter(unstable), budget=1, log_path=log,
                          strategy="halving", eta=2, progress=False)
    assert again.best_config == {"x": 3}


def test_seeds_report_mean_and_spread():
    """With seeds, each config runs once per seed (given as config['seed']); ranking uses the
    mean, and the spread is the sample std of the seeds' losses."""
    def noisy(config, budget):
        return config["a"] + 0.1 * config["seed"]

    result = hparam.search({"a": [1.0, 0.0]}, noisy, budget=1, seeds=[0, 1, 2], progress=False)
    assert len(result.trials) == 6 and {t.seed for t in result.trials} == {0, 1, 2}
    assert result.best_config == {"a": 0.0}
    assert math.isclose(result.best_loss, 0.1) and math.isclose(result.best_spread, 0.1)


def test_explicit_configs_share_the_log_across_stages(tmp_path):
    """`configs=` searches a given list (e.g. an earlier stage's finalists); trials already in the
    log under the same config, budget and seed are reused, not retrained."""
    log = tmp_path / "trials.jsonl"
    stage1 = hparam.search(SPACE, bowl, budget=5, seeds=[0], log_path=log, progress=False)
    finalists = [row["config"] for row in stage1.summary[:2]]
    fn = Counter(lambda c, b: bowl(c, b) + c["seed"])
    stage2 = hparam.search(SPACE, fn, configs=finalists, budget=5, seeds=[0, 1], log_path=log,
                           progress=False)
    assert fn.calls == 2 and stage2.n_from_log == 2  # only the seed-1 runs are new
    assert stage2.best_config == stage1.best_config


@pytest.mark.parametrize("space, kwargs, match", [
    ({}, {}, "space must be a non-empty dict"),
    ({"lr": []}, {}, r"space\['lr'\] must be a non-empty list"),
    ({"lr": 1e-3}, {}, r"space\['lr'\] must be a non-empty list"),
    ({"lr": (1e-3, 1e-2)}, {}, r"space\['lr'\] must be a non-empty list"),
    ({"lr": [1e-3]}, {"budget": 0}, "budget must be a positive"),
    ({"lr": [1e-3]}, {"budget": -5}, "budget must be a positive"),
    ({"lr": [1e-3]}, {"strategy": "bayes"}, "strategy must be one of"),
    ({"lr": [1e-3]}, {"strategy": "halving"}, "budget is required"),
    ({"lr": [1e-3]}, {"strategy": "random"}, "n is required"),
    ({"lr": [1e-3]}, {"seeds": []}, "seeds must be"),
    ({"lr": [1e-3]}, {"n": 1}, "n is only used"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(space, kwargs, match):
    """Bad spaces, budgets and strategies fail before any training, naming what to fix."""
    fn = Counter(bowl)
    with pytest.raises(ValueError, match=match):
        hparam.search(space, fn, progress=False, **kwargs)
    assert fn.calls == 0


def test_gpt_train_fn_smoke(tmp_path):
    """The trainer hook trains the tiny GPT for `budget` steps and returns a finite val loss near
    ln(256) = 5.55, leaving no trial folder behind; unknown config keys are a ValueError naming
    them."""
    train_fn = hparam.make_gpt_train_fn(out_root=tmp_path)
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        train_fn({"learning_rate": 1e-3}, 2)
    loss = train_fn({"max_lr": 1e-3, "batch_size": 2, "seq_len": 16, "n_layer": 1}, 3)
    assert math.isfinite(loss) and 3.0 < loss < 7.0
    assert not list(tmp_path.glob(hparam.TRIAL_PREFIX + "*"))


def test_duplicate_configs_are_tried_once():
    """A value repeated on an axis does not cost a second trial, nor a second row in the summary."""
    fn = Counter(bowl)
    result = hparam.search({"lr": [1e-3, 1e-2, 1e-3]}, fn, budget=1, progress=False)
    assert fn.calls == 2 and len(result.summary) == 2 and len(result.trials) == 2


# --- Robustness: failed and diverged trials, budgets, trial folders ----------

def flaky(config, budget):
    """x=2 is an invalid trial (raises), x=3 diverges, the others train."""
    if config["x"] == 2:
        raise ValueError("n_embd must be divisible by n_head")
    return math.nan if config["x"] == 3 else float(config["x"])


def test_failed_trial_is_logged_and_the_search_goes_on(tmp_path):
    """A trial whose train_fn raises is logged as failed (val_loss null, the reason), ranks
    worst, and the search finishes; a rerun skips it; retry_failed=True trains it again."""
    log = tmp_path / "trials.jsonl"
    with pytest.warns(UserWarning, match="failed: ValueError: n_embd must be divisible"):
        result = hparam.search({"x": [2, 1, 3, 4]}, flaky, budget=1, log_path=log, progress=False)
    assert result.best_config == {"x": 1} and result.n_failed == 2
    records = {r["config"]["x"]: r for r in hparam.read_log(log)}
    assert records[2]["status"] == "failed" and records[2]["val_loss"] is None
    assert "n_embd must be divisible" in records[2]["reason"]
    assert records[3]["status"] == "diverged" and records[3]["val_loss"] is None
    assert records[1]["status"] == "ok" and records[1]["val_loss"] == 1.0
    again = Counter(flaky)
    hparam.search({"x": [2, 1, 3, 4]}, again, budget=1, log_path=log, progress=False)
    assert again.calls == 0
    retry = Counter(lambda c, b: float(c["x"]))  # the bug is fixed
    fixed = hparam.search({"x": [2, 1, 3, 4]}, retry, budget=1, log_path=log, progress=False,
                          retry_failed=True)
    assert retry.calls == 1 and fixed.n_failed == 1  # only x=2 retrained; x=3 stays diverged
    assert hparam.read_log(log)[-1]["status"] == "ok"


def test_every_trial_failing_raises_with_the_first_reason():
    """When no trial could run at all, search raises RuntimeError quoting the first reason
    instead of returning an arbitrary 'best' config."""
    def broken(config, budget):
        raise KeyError("oops")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="every trial failed.*KeyError"):
            hparam.search({"x": [1, 2]}, broken, budget=1, progress=False)


def test_setup_errors_stop_the_search_and_are_not_logged(tmp_path):
    """A SearchSetupError (a mistake every trial would repeat) propagates at the first trial and
    leaves nothing in the log."""
    log = tmp_path / "trials.jsonl"

    def wrong_keys(config, budget):
        raise hparam.SearchSetupError("config has keys that are not TrainConfig fields")

    with pytest.raises(hparam.SearchSetupError):
        hparam.search({"x": [1, 2]}, wrong_keys, budget=1, log_path=log, progress=False)
    assert hparam.read_log(log) == []


def steps_fn(config, budget):
    return bowl(config, budget)


steps_fn.integer_budget = True  # like make_gpt_train_fn: budgets are steps


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=2.5), "budget must be an int"), (dict(budget=3.0), "budget must be an int"),
    (dict(budget=True), "budget must be a positive"),
    (dict(budget=math.inf), "budget must be a positive"),
    (dict(budget=math.nan), "budget must be a positive"),
    (dict(budget="9"), "budget must be a positive"),
    (dict(budget=9, strategy="halving", min_budget=0.5), "min_budget must be an int"),
])
def test_bad_budgets_are_refused_before_training(kwargs, match, tmp_path):
    """A budget that is not a positive finite number, or not an int for a train_fn counting
    steps, is a ValueError before any trial runs and before anything is logged."""
    log = tmp_path / "trials.jsonl"
    fn = Counter(steps_fn)
    fn.integer_budget = True
    with pytest.raises(ValueError, match=match):
        hparam.search(SPACE, fn, log_path=log, progress=False, **kwargs)
    assert fn.calls == 0 and not log.exists()


def test_halving_logs_exactly_the_int_budget_each_trial_got(tmp_path):
    """With an int budget every round's budget is an int, and the logged budget is exactly the
    one train_fn received (no 2.5 logged for 2 steps trained)."""
    log = tmp_path / "trials.jsonl"
    received = []

    def recording(config, budget):
        received.append(budget)
        return bowl(config, budget)

    recording.integer_budget = True
    hparam.search(SPACE, recording, strategy="halving", budget=10, eta=3, log_path=log,
                  progress=False)
    logged = [r["budget"] for r in hparam.read_log(log)]
    assert logged == received and all(type(b) is int for b in logged)


def test_gpt_hook_refuses_a_non_int_budget(tmp_path):
    """Called directly, the GPT hook refuses budget=2.5 instead of training int(2.5) steps."""
    train_fn = hparam.make_gpt_train_fn(out_root=tmp_path)
    assert train_fn.integer_budget is True
    with pytest.raises(ValueError, match="budget must be an int"):
        train_fn({"max_lr": 1e-3}, 2.5)


class _NoValLoss:
    final_val_loss = None  # what RunResult holds when no evaluation was finite


@pytest.mark.parametrize("outcome, status", [
    ("diverged", "diverged"), ("invalid", "failed"), ("exit", "failed")])
def test_gpt_hook_logs_diverged_and_invalid_trials(outcome, status, tmp_path, monkeypatch):
    """The GPT hook never crashes the search: a run without a finite val loss is logged as
    diverged (it used to crash on float(None)); a trainer that raises or exits is logged as
    failed; the trial folder is deleted in every case."""
    def fake_train(cfg):
        assert os.path.isdir(cfg.out_dir)
        if outcome == "invalid":
            raise ValueError("n_head must divide n_embd")
        if outcome == "exit":
            raise SystemExit(1)
        return _NoValLoss()

    monkeypatch.setattr("minitrain.train.train", fake_train)
    train_fn = hparam.make_gpt_train_fn(out_root=tmp_path / "trials")
    log = tmp_path / "trials.jsonl"
    good = {"max_lr": 1e-3}
    space = {"max_lr": [1e3, 1e-3]}

    def two(config, budget):  # max_lr=1e3 goes to the (faked) trainer; 1e-3 is a healthy trial
        return 1.0 if config == good else train_fn(config, budget)

    two.integer_budget = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = hparam.search(space, two, budget=3, log_path=log, progress=False)
    assert result.best_config == good
    record = hparam.read_log(log)[0]
    assert record["config"] == {"max_lr": 1e3} and record["status"] == status
    assert record["val_loss"] is None and record["reason"]
    assert not list((tmp_path / "trials").glob(hparam.TRIAL_PREFIX + "*"))


def test_gpt_hook_survives_a_real_divergence(tmp_path):
    """max_lr=1e3 on the real trainer: the search does not crash, and the logged trial is
    consistent (val_loss null exactly when it is not ok)."""
    train_fn = hparam.make_gpt_train_fn(out_root=tmp_path)
    tiny = {"batch_size": 2, "seq_len": 16, "n_layer": 1, "warmup_steps": 0}
    log = tmp_path / "trials.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hparam.search({"max_lr": [1e3]}, lambda c, b: train_fn({**c, **tiny}, b), budget=4,
                          log_path=log, progress=False)
        except RuntimeError as error:  # a trainer that stops on divergence: every trial failed
            assert "every trial failed" in str(error)
    (record,) = hparam.read_log(log)
    assert record["status"] in ("ok", "diverged", "failed")
    assert (record["val_loss"] is None) == (record["status"] != "ok")
    assert not list(tmp_path.glob(hparam.TRIAL_PREFIX + "*"))


KILLED_TRIAL = """
import pathlib, sys, time
import minitrain.train
def fake_train(cfg):
    pathlib.Path(cfg.out_dir, "started").write_text("x")
    time.sleep(120)
minitrain.train.train = fake_train
from minitrain import hparam
hparam.make_gpt_train_fn(out_root=sys.argv[1])({"max_lr": 1e-3}, 3)
"""


def test_a_killed_trials_folder_is_removed_at_the_next_start(tmp_path):
    """SIGKILL during a trial leaves its folder behind; the next make_gpt_train_fn on the same
    out_root deletes it, but keeps the folder of a process that is still alive."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_TRIAL, str(tmp_path)])
    try:
        for _ in range(600):  # up to 60 s for the child to import torch and start its trial
            if list(tmp_path.glob(hparam.TRIAL_PREFIX + "*/started")) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert list(tmp_path.glob(hparam.TRIAL_PREFIX + "*/started")), "the trial never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    (left,) = tmp_path.glob(hparam.TRIAL_PREFIX + "*")
    assert left.name.startswith(f"{hparam.TRIAL_PREFIX}{proc.pid}_")
    alive = tmp_path / f"{hparam.TRIAL_PREFIX}{os.getppid()}_running"  # a live search's trial
    alive.mkdir()
    hparam.make_gpt_train_fn(out_root=tmp_path)
    assert not left.exists() and alive.exists()


def test_unreadable_middle_line_is_skipped_with_a_warning(tmp_path):
    """A corrupt line inside the log is skipped with a warning; the trials around it are kept."""
    log = tmp_path / "trials.jsonl"
    hparam.search({"lr": [1e-3]}, bowl, budget=1, log_path=log, progress=False)
    with open(log, "a") as f:
        f.write("not json\n")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        hparam.search({"lr": [1e-3, 1e-2]}, bowl, budget=1, log_path=log, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        records = hparam.read_log(log)
    assert [r["config"]["lr"] for r in records] == [1e-3, 1e-2]
