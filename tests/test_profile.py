"""Lesson 17 exercises: counting FLOPs, the machine's ceilings, MFU, the phase profiler."""
import json
import math
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode as TorchFlopCounterMode

from minitrain import profile
from minitrain.model import GPT, GPTConfig
from minitrain.profile import flops_per_token, mfu, n_params_for_flops
from tests.implementation import under_test
from minitrain.step_profiler import (StepProfiler, export_chrome_trace, top_operators,
                                     trace_names, write_profile_report)
from tests.strategies import gpt_shapes, seeds

count_flops = under_test("minitrain.profile", "count_flops")

pytestmark = pytest.mark.lesson17


def torch_total_flops(fn):
    """The built-in's count of fn()'s FLOPs."""
    with TorchFlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gpt_and_batch(shape, seed, attention):
    """A GPT of the drawn sizes and a (B, T) batch; the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["seq_len"],
                       n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                       attention=attention)
    x = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]))
    return GPT(config), x


def run_step(model, x, backward):
    """fn for the counters: a forward, or forward + backward of the next-token loss."""
    def fn():
        _, loss = model(x, x)
        if backward:
            loss.backward()
        return loss
    return fn


@given(shape=gpt_shapes(), seed=seeds, backward=st.booleans())
def test_count_flops_equals_flop_counter_mode_on_naive_gpt(shape, seed, backward):
    """For every tiny GPT with naive attention, forward or forward + backward, our count of
    matmul FLOPs is exactly FlopCounterMode's total."""
    model, x = gpt_and_batch(shape, seed, "naive")
    _, ours = count_flops(run_step(model, x, backward))
    assert ours == torch_total_flops(run_step(model, x, backward))
    assert ours > 0


@settings(max_examples=15)
@given(shape=gpt_shapes(), seed=seeds, backward=st.booleans())
def test_sdpa_counted_at_least_naive_while_builtin_undercounts(shape, seed, backward):
    """The same GPT with SDPA does the same math as with naive attention: our count for it is
    equal in the forward and larger in training (the fused backward recomputes q k^T). The
    built-in on CPU counts SDPA's fused kernel as 0, so it reports FEWER FLOPs for SDPA than for
    naive attention: asserted, so this test notices when a future torch counts it."""
    naive, x = gpt_and_batch(shape, seed, "naive")
    sdpa, _ = gpt_and_batch(shape, seed, "sdpa")
    _, ours_naive = count_flops(run_step(naive, x, backward))
    _, ours_sdpa = count_flops(run_step(sdpa, x, backward))
    if backward:
        assert ours_sdpa > ours_naive
    else:
        assert ours_sdpa == ours_naive
    builtin_sdpa = torch_total_flops(run_step(sdpa, x, backward))
    assert builtin_sdpa < torch_total_flops(run_step(naive, x, backward)) == ours_naive
    # exactly the attention part is missing: what is left is the weights' matmuls
    L, C, T, B = shape["n_layer"], shape["n_embd"], shape["seq_len"], shape["batch"]
    assert builtin_sdpa == ours_naive - (3 if backward else 1) * 4 * L * B * T * T * C


sides = st.integers(1, 7)


@given(b=sides, m=sides, k=sides, n=sides, seed=seeds)
def test_matmul_forms_counted_including_in_place(b, m, k, n, seed):
    """mm, addmm, bmm, baddbmm and their out= and in-place forms cost 2 m k n per matrix
    product; the built-in agrees on the out-of-place ones and counts 0 for in-place
    baddbmm_/addmm_ (torch 2.13; asserted so a fix is noticed)."""
    g = torch.Generator().manual_seed(seed)
    a2, b2 = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    a3, b3 = torch.randn(b, m, k, generator=g), torch.randn(b, k, n, generator=g)
    c2, c3 = torch.zeros(m, n), torch.zeros(b, m, n)
    cases = {  # fn -> (expected FLOPs, does the built-in count it?)
        lambda: torch.mm(a2, b2): (2 * m * k * n, True),
        lambda: torch.mm(a2, b2, out=c2): (2 * m * k * n, True),
        lambda: torch.addmm(c2, a2, b2): (2 * m * k * n, True),
        lambda: c2.addmm_(a2, b2): (2 * m * k * n, False),
        lambda: torch.bmm(a3, b3): (2 * b * m * k * n, True),
        lambda: torch.bmm(a3, b3, out=c3): (2 * b * m * k * n, True),
        lambda: torch.baddbmm(c3, a3, b3): (2 * b * m * k * n, True),
        lambda: c3.baddbmm_(a3, b3): (2 * b * m * k * n, False),
    }
    for fn, (expected, builtin_counts) in cases.items():
        assert count_flops(fn)[1] == expected
        assert torch_total_flops(fn) == (expected if builtin_counts else 0)


@settings(max_examples=15)
@given(shape=gpt_shapes(), seed=seeds, training=st.booleans())
def test_flops_per_token_is_the_count_plus_the_documented_overcount(shape, seed, training):
    """flops_per_token x tokens = the counted FLOPs + exactly the documented overcount
    (6 or 2 x the 13 L C + 2 C bias/LayerNorm parameters in N, per token), which is under
    1.25 / C of the total; N is GPT.num_params(non_embedding=True)."""
    model, x = gpt_and_batch(shape, seed, "naive")
    tokens = x.numel()
    _, counted = count_flops(run_step(model, x, training))
    L, C = shape["n_layer"], shape["n_embd"]
    per_weight = 6 if training else 2
    analytic = flops_per_token(model.config, training=training) * tokens
    assert analytic - counted == per_weight * (13 * L * C + 2 * C) * tokens
    assert (analytic - counted) / analytic < 1.25 / C
    assert n_params_for_flops(model.config) == model.num_params(non_embedding=True)
    assert flops_per_token(model.config, training=False) * 3 == flops_per_token(model.config)


def test_flops_per_token_accepts_a_ladder_dict_and_checks_seq_len():
    """The ladder's config dicts (seq_len, no vocab_size) give the GPTConfig's number."""
    config = GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=64)
    assert flops_per_token(dict(n_layer=2, n_embd=32, seq_len=64)) == flops_per_token(config)
    assert flops_per_token(config, seq_len=128) > flops_per_token(config)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(config, seq_len=0)


@given(tokens_per_s=st.floats(0, 1e7), fpt=st.integers(0, 10**10), peak=st.floats(1e6, 1e16))
def test_mfu_is_achieved_over_peak(tokens_per_s, fpt, peak):
    """MFU = tokens/s x FLOPs/token / peak; running exactly at the peak rate gives 1."""
    assert mfu(tokens_per_s, fpt, peak) == pytest.approx(tokens_per_s * fpt / peak, rel=1e-12)
    if fpt > 0:
        assert mfu(peak / fpt, fpt, peak) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("peak", [0.0, -1.0, float("nan"), float("inf"), None])
def test_mfu_rejects_a_bad_peak(peak):
    with pytest.raises(ValueError, match="peak"):
        mfu(1000.0, 10, peak)


def test_peaks_are_measured_positive_and_cached(tmp_path, monkeypatch):
    """Tiny measurements are positive finite numbers; a second call reads the cache (it does not
    measure: measuring is made to fail), refresh=True measures again, another dtype is another
    entry, and each entry records its metadata."""
    cache = tmp_path / "peaks.json"
    flops = profile.peak_flops(torch.float32, size=32, reps=1, cache_path=cache)
    bandwidth = profile.peak_bandwidth(size_bytes=2**16, reps=1, cache_path=cache)
    assert math.isfinite(flops) and flops > 0 and math.isfinite(bandwidth) and bandwidth > 0

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although the value was cached")
    monkeypatch.setattr(profile, "_best_seconds", no_measuring)
    assert profile.peak_flops(torch.float32, size=32, reps=1, cache_path=cache) == flops
    assert profile.peak_bandwidth(size_bytes=2**16, reps=1, cache_path=cache) == bandwidth
    monkeypatch.setattr(profile, "_best_seconds", lambda fn, device, reps: 0.5)
    assert profile.peak_flops(torch.float32, size=32, cache_path=cache, refresh=True) == 2 * 32**3 / 0.5
    assert profile.peak_flops(torch.float64, size=32, cache_path=cache) == 2 * 32**3 / 0.5
    entries = json.loads(cache.read_text())
    assert len(entries) == 3
    for entry in entries.values():
        meta = entry["metadata"]
        assert meta["threads"] == torch.get_num_threads() and meta["torch"] == torch.__version__
        assert meta["device"] and meta["host"] is not None


def test_vendor_peaks_match_the_device_name_not_a_default():
    """Each device gets its own datasheet number; an unknown device gets None, not an A100's."""
    assert profile.vendor_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert profile.vendor_peak_flops("NVIDIA A10") == 125e12
    assert profile.vendor_peak_flops("NVIDIA L40S") == 362e12
    assert profile.vendor_peak_flops("NVIDIA L4") == 121e12
    assert profile.vendor_peak_flops("NVIDIA H100 PCIe") < profile.vendor_peak_flops("NVIDIA H100 80GB HBM3")
    assert profile.vendor_peak_flops("Some Future GPU") is None


def sleepy_step(profiler, data_s=0.02, fwd_s=0.01, bwd_s=0.01, comm_s=0.01):
    with profiler.phase("data"):
        time.sleep(data_s)
    with profiler.phase("forward"):
        time.sleep(fwd_s)
    with profiler.phase("backward"):
        time.sleep(bwd_s)
        with profiler.phase("comm"):
            time.sleep(comm_s)
    profiler.step()


def test_phases_nest_are_named_and_add_up_to_the_step():
    """Nested phases are named outer/inner and lie inside their parent; each phase lasts at
    least its sleep; the top-level phases add up to the step time up to the small gaps
    between them, which '(other)' reports."""
    profiler = StepProfiler("cpu")
    for _ in range(3):
        sleepy_step(profiler)
    summary = profiler.summary()
    assert set(summary) == {"data", "forward", "backward", "backward/comm", "(other)", "(step)"}
    per_step = {name: v["per_step_s"] for name, v in summary.items()}
    assert per_step["data"] >= 0.02 and per_step["backward/comm"] >= 0.01
    assert per_step["backward"] >= per_step["backward/comm"] + 0.01
    top = per_step["data"] + per_step["forward"] + per_step["backward"]
    assert top <= per_step["(step)"] + 1e-9
    assert per_step["(other)"] == pytest.approx(per_step["(step)"] - top, abs=1e-9)
    assert per_step["(other)"] < 0.1 * per_step["(step)"]
    assert "&nbsp;&nbsp;comm" in profiler.table()


def test_disabled_profiler_records_nothing_and_bad_use_is_refused():
    """A disabled profiler records no step and leaves no mark in a trace (so the trainer can
    always wrap its phases); a '/' in a name or step() inside a phase is refused."""
    profiler = StepProfiler("cpu", enabled=False)
    with torch.profiler.profile() as prof:
        sleepy_step(profiler, 0, 0, 0, 0)
    assert profiler.steps == []
    assert not {"data", "forward", "backward"} & {e.key for e in prof.key_averages()}
    profiler = StepProfiler("cpu")
    with pytest.raises(ValueError, match="phase name"):
        with profiler.phase("a/b"):
            pass
    with pytest.raises(ValueError, match="inside phase"):
        with profiler.phase("data"):
            profiler.step()


def test_chrome_trace_loads_with_the_phase_names_and_the_report_is_written(tmp_path):
    """The trace of a real tiny training step is JSON holding every phase name and the matmul
    ops; the report holds the phase table, the top operators and the MFU line."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    profiler = StepProfiler("cpu")
    x = torch.randint(0, 256, (2, 8))

    def step():
        with profiler.phase("data"):
            batch = x.clone()
        with profiler.phase("forward"):
            _, loss = model(batch, batch)
        with profiler.phase("backward"):
            loss.backward()
            with profiler.phase("comm"):
                pass
        with profiler.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        profiler.step()

    prof = export_chrome_trace(step, tmp_path / "trace.json", steps=2)
    names = trace_names(tmp_path / "trace.json")
    assert {"data", "forward", "backward", "backward/comm", "optimizer", "aten::mm"} <= names
    top = top_operators(prof, 5, exclude=("data", "forward", "backward", "optimizer"))
    assert len(top) == 5 and top[0]["self_s"] >= top[-1]["self_s"] > 0
    numbers = write_profile_report(tmp_path / "profile.md", profiler, top_ops=top,
                                   tokens_per_step=16, flops_per_token=1000, peak_flops=1e9,
                                   peak_bandwidth=1e8, bytes_per_step=1e4, skip=1)
    text = (tmp_path / "profile.md").read_text()
    assert "| optimizer |" in text and top[0]["name"] in text and "MFU" in text
    assert numbers["mfu"] == pytest.approx(numbers["tokens_per_s"] * 1000 / 1e9)


def test_profile_window_in_a_loop_writes_trace_and_report(tmp_path):
    """The trainer's hook: in a plain loop, begin(step)/end(step) profile exactly the window's
    steps (the profiler keeps only them), then trace.json (with the phase names) and
    profile.md (phases, top ops, MFU, roofline position from the counted pre-step) exist."""
    from minitrain.step_profiler import ProfileWindow

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    x = torch.randint(0, 256, (2, 8))
    profiler = StepProfiler("cpu")
    fpt = flops_per_token(model.config)
    window = ProfileWindow(tmp_path, profiler, start=2, steps=2, tokens_per_step=16,
                           flops_per_token=fpt, peak_flops=1e10, peak_bandwidth=1e9)
    for step in range(5):
        window.begin(step)
        with profiler.phase("forward"):
            _, loss = model(x, x)
        with profiler.phase("backward"):
            loss.backward()
        profiler.step()
        window.end(step)
        assert window.done == (step >= 3)
    assert len(profiler.steps) == 3  # the window's 2 steps + step 4 after it
    assert {"forward", "backward", "aten::mm"} <= trace_names(tmp_path / "trace.json")
    text = (tmp_path / "profile.md").read_text()
    assert "| backward |" in text and "MFU" in text and "FLOP/byte" in text
    assert window.bytes_per_step > 0 and window.report["intensity"] > 0


def test_table_lists_a_parent_before_its_nested_phases():
    """A nested phase closes before its parent, yet the table shows the parent first and the
    child indented under it, in the order the phases were opened."""
    profiler = StepProfiler("cpu")
    sleepy_step(profiler, 0, 0, 0, 0)
    rows = [line.split("|")[1].strip() for line in profiler.table().splitlines()[2:]]
    assert rows[:4] == ["data", "forward", "backward", "&nbsp;&nbsp;comm"]
