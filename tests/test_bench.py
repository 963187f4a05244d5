"""minitrain.bench.measure: warm-up is excluded, statistics come from the timed calls only."""
import statistics
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minitrain.bench import machine_metadata, measure


@pytest.mark.lesson07
@given(warmup=st.integers(0, 4), iters=st.integers(1, 6))
def test_measure_calls_warmup_plus_iters_and_times_only_iters(warmup, iters):
    """step_fn runs warmup + iters times; exactly `iters` durations are reported."""
    calls = []
    result = measure(lambda: calls.append(1), tokens_per_step=10, warmup=warmup, iters=iters)
    assert len(calls) == warmup + iters
    assert len(result["times_s"]) == iters
    assert result["warmup"] == warmup and result["iters"] == iters


@pytest.mark.lesson07
def test_slow_warmup_calls_do_not_reach_the_statistics():
    """A first call 50x slower than the rest (compilation, allocator growth) is excluded."""
    durations = iter([0.25] + [0.005] * 7)

    def step():
        time.sleep(next(durations))

    result = measure(step, tokens_per_step=1000, warmup=1, iters=7)
    assert result["max_s"] < 0.2
    assert result["median_s"] == statistics.median(result["times_s"])


@pytest.mark.lesson07
def test_tokens_per_s_is_tokens_over_the_median_and_percentiles_are_ordered():
    """tokens_per_s = tokens_per_step / median_s; min <= p10 <= median <= p90 <= max."""
    result = measure(lambda: time.sleep(0.001), tokens_per_step=4096, warmup=0, iters=9)
    assert result["tokens_per_s"] == pytest.approx(4096 / result["median_s"])
    assert (result["min_s"] <= result["p10_s"] <= result["median_s"] <= result["p90_s"]
            <= result["max_s"])


@pytest.mark.lesson07
@pytest.mark.parametrize("kwargs, name", [
    ({"tokens_per_step": 0}, "tokens_per_step"),
    ({"tokens_per_step": 1, "warmup": -1}, "warmup"),
    ({"tokens_per_step": 1, "iters": 0}, "iters"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    """Nonsense settings fail before anything is timed, naming the argument."""
    with pytest.raises(ValueError, match=name):
        measure(lambda: None, **kwargs)


def test_machine_metadata_names_the_machine_and_versions():
    """A result table must say where it was measured."""
    meta = machine_metadata(dtype="bfloat16")
    assert meta["dtype"] == "bfloat16"
    assert meta["torch"] and meta["cpu"] and meta["cpu_count"] >= 1
