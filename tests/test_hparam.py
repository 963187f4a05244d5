"""Lesson 15: budget-aware hyperparameter search (minitrain.hparam).

Cheap analytic objectives stand in for training everywhere except one smoke test of the GPT hook:
the properties are about the search, not the model.
"""
import itertools
import json
import math

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
    ln(256) = 5.55; unknown config keys are a ValueError naming them."""
    pytest.importorskip("minitrain.train")
    train_fn = hparam.make_gpt_train_fn(out_root=tmp_path)
    with pytest.raises(ValueError, match="not TrainConfig fields"):
        train_fn({"learning_rate": 1e-3}, 2)
    loss = train_fn({"max_lr": 1e-3, "batch_size": 2, "seq_len": 16, "n_layer": 1}, 3)
    assert math.isfinite(loss) and 3.0 < loss < 7.0


def test_duplicate_configs_are_tried_once():
    """A value repeated on an axis does not cost a second trial, nor a second row in the summary."""
    fn = Counter(bowl)
    result = hparam.search({"lr": [1e-3, 1e-2, 1e-3]}, fn, budget=1, progress=False)
    assert fn.calls == 2 and len(result.summary) == 2 and len(result.trials) == 2
