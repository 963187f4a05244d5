"""minitrain.bench.measure: warm-up is excluded, statistics come from the timed calls only, and
they equal numpy's over durations known in advance.

The exact tests replace the clock: each step advances a fake `time.perf_counter` by a duration
the test chose (multiples of 1/1024 s, so every sum and difference is exact in floating point),
so the median, the percentiles and tokens/s have known answers computed by numpy, not by the
code under test. One test keeps the real clock to show measure() really times the call.
"""
import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks.harness import machine_metadata
from minitrain import bench
from minitrain.bench import measure

TICK = 1 / 1024  # seconds; durations are whole ticks, exact in binary floating point
durations = st.lists(st.integers(1, 4096).map(lambda n: n * TICK), min_size=1, max_size=15)


class FakeClock:
    """perf_counter() that only moves when a step says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def steps(self, seconds):
        """A step_fn that takes seconds[0], then seconds[1], ... of fake time."""
        it = iter(seconds)

        def step():
            self.now += next(it)
        return step


def _measure_fake(all_durations, **kwargs):
    clock = FakeClock()
    with mock.patch.object(bench.time, "perf_counter", clock):
        return measure(clock.steps(all_durations), **kwargs)


@pytest.mark.lesson07
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30),
       q=st.floats(0, 100))
def test_percentile_equals_numpy_linear_percentile(values, q):
    """_percentile(sorted values, q) is numpy.percentile(values, q, method="linear") (numpy's
    default: linear interpolation between the two nearest ranks), for any list and any q."""
    ours = bench._percentile(sorted(values), q)
    assert ours == pytest.approx(np.percentile(values, q, method="linear"), rel=1e-9, abs=1e-9)


@pytest.mark.lesson07
@given(warmup=st.integers(0, 4), timed=durations, tokens=st.integers(1, 10**6))
def test_statistics_equal_numpy_over_known_durations(warmup, timed, tokens):
    """With known step durations (the warm-up ones 100x slower), median/p10/p90/min/max/mean
    equal numpy's over the TIMED durations only, times_s lists them in call order, and
    tokens_per_s = tokens / that median."""
    slow = [100.0] * warmup  # warm-up calls: compilation, allocator growth
    result = _measure_fake(slow + timed, tokens_per_step=tokens, warmup=warmup, iters=len(timed))
    assert result["times_s"] == timed
    assert result["median_s"] == np.median(timed)
    assert result["p10_s"] == pytest.approx(np.percentile(timed, 10), rel=1e-12)
    assert result["p90_s"] == pytest.approx(np.percentile(timed, 90), rel=1e-12)
    assert (result["min_s"], result["max_s"]) == (min(timed), max(timed))
    assert result["mean_s"] == pytest.approx(np.mean(timed), rel=1e-12)
    assert result["tokens_per_s"] == pytest.approx(tokens / np.median(timed), rel=1e-12)
    assert result["warmup"] == warmup and result["iters"] == len(timed)


@pytest.mark.lesson07
def test_known_distinct_durations_give_the_middle_one():
    """Five calls of 3, 1, 5, 2, 4 ticks: the median is the 3-tick call, p10 lies between the 1-
    and 2-tick calls (numpy: 1.4 ticks), tokens/s = tokens / 3 ticks."""
    result = _measure_fake([50 * TICK] + [n * TICK for n in (3, 1, 5, 2, 4)],
                           tokens_per_step=3, warmup=1, iters=5)
    assert result["median_s"] == 3 * TICK
    assert result["p10_s"] == pytest.approx(1.4 * TICK)
    assert result["tokens_per_s"] == pytest.approx(1 / TICK)


@pytest.mark.lesson07
def test_before_each_runs_untimed_before_every_call():
    """before_each runs before every call (warm-up included) and its time is not counted."""
    clock = FakeClock()
    calls = []

    def before():
        calls.append("before")
        clock.now += 7.0  # an expensive set-up, e.g. evicting the page cache

    def step():
        calls.append("step")
        clock.now += TICK

    with mock.patch.object(bench.time, "perf_counter", clock):
        result = measure(step, tokens_per_step=1, warmup=1, iters=3, before_each=before)
    assert calls == ["before", "step"] * 4
    assert result["times_s"] == [TICK] * 3


@pytest.mark.lesson07
def test_real_clock_excludes_a_slow_warmup_call():
    """With the real clock: a first call 0.25 s long (sleep) does not reach the statistics, and
    every timed call lasts at least the 5 ms it sleeps."""
    durations_s = iter([0.25] + [0.005] * 5)
    result = measure(lambda: time.sleep(next(durations_s)), tokens_per_step=1000, warmup=1,
                     iters=5)
    assert result["max_s"] < 0.25
    assert min(result["times_s"]) >= 0.005


@pytest.mark.lesson07
@pytest.mark.parametrize("kwargs, name", [
    ({"tokens_per_step": 0}, "tokens_per_step"),
    ({"tokens_per_step": 1, "warmup": -1}, "warmup"),
    ({"tokens_per_step": 1, "iters": 0}, "iters"),
    ({"tokens_per_step": 1, "before_each": 3}, "before_each"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    """Nonsense settings fail before anything is timed, naming the argument."""
    calls = []
    with pytest.raises(ValueError, match=name):
        measure(lambda: calls.append(1), **kwargs)
    assert calls == []


def test_machine_metadata_names_the_machine_and_versions():
    """A result table must say where it was measured: the dtype asked for, this torch, the
    core count the OS reports."""
    import os

    import torch

    meta = machine_metadata(dtype="bfloat16")
    assert meta["dtype"] == "bfloat16"
    assert meta["torch"] == torch.__version__ and meta["cpu_count"] == os.cpu_count()
    assert meta["cpu"]


@pytest.mark.lesson07
@pytest.mark.parametrize("fast", [1, 2])
def test_fastest_thread_count_picks_the_faster_count_and_restores_torch(fast):
    """With a probe whose (fake-clock) time depends on the thread count -- 1 tick on `fast`
    threads, 10 ticks on the other -- the faster count wins, and torch's own thread count is
    left as it was."""
    import torch

    before = torch.get_num_threads()
    clock = FakeClock()

    def probe():
        clock.now += TICK if torch.get_num_threads() == fast else 10 * TICK

    with mock.patch.object(bench.time, "perf_counter", clock):
        assert bench.fastest_thread_count((1, 2), probe=probe, iters=3) == fast
    assert torch.get_num_threads() == before


def test_fastest_thread_count_prefers_all_cores_unless_another_is_10_percent_faster():
    """A tie, or 1 thread only 5% faster: the widest count (all cores, the default) wins;
    1 thread 20% faster: 1 wins."""
    import torch

    for one, wide, expected in ((20, 20, 3), (19, 20, 3), (16, 20, 1)):
        clock = FakeClock()

        def probe(one=one, wide=wide):
            clock.now += (one if torch.get_num_threads() == 1 else wide) * TICK

        with mock.patch.object(bench.time, "perf_counter", clock):
            assert bench.fastest_thread_count((1, 3), probe=probe, iters=3) == expected


@pytest.mark.lesson08
def test_peak_extra_bytes_counts_this_call_only():
    """After this process touched and freed 256 MiB (the high-water mark stays there), a step
    that touches 32 MiB reports about 32 MiB -- not 0 (nothing measured) and far below 256 MiB
    (the earlier peak is reset away, not counted). The lower bound is 3/4 of 32 MiB: pages
    resident before the call can be released during it (allocator trims), which the
    VmHWM - VmRSS(before) difference then subtracts."""
    import torch

    big = torch.ones(64 * 2**20)  # 256 MiB of float32, resident
    del big  # freed (large blocks go back to the OS); the high-water mark does not move
    extra, how = bench.peak_extra_bytes(lambda: torch.ones(8 * 2**20).sum())  # 32 MiB
    assert 24 * 2**20 <= extra < 128 * 2**20, (extra / 2**20, how)
