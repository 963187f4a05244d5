"""minitrain.schedule against torch's SequentialLR(LinearLR, CosineAnnealingLR)."""
import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from torch.optim.lr_scheduler import CosineAnnealingLR as TorchCosineAnnealingLR
from torch.optim.lr_scheduler import LinearLR as TorchLinearLR
from torch.optim.lr_scheduler import SequentialLR as TorchSequentialLR

from tests.implementation import under_test

WarmupCosine, set_lr, warmup_cosine = under_test(
    "minitrain.schedule", "WarmupCosine", "set_lr", "warmup_cosine")

pytestmark = pytest.mark.lesson03


@st.composite
def schedules(draw):
    """(max_lr, total_steps, warmup_steps, min_lr) with 0 <= W <= T and 0 <= min_lr <= max_lr."""
    total = draw(st.integers(1, 120))
    warmup = draw(st.integers(0, total))
    max_lr = draw(st.floats(1e-6, 10.0, allow_nan=False, allow_infinity=False))
    min_frac = draw(st.sampled_from([0.0, 0.1, 1.0]) | st.floats(0.0, 1.0))
    return max_lr, total, warmup, max_lr * min_frac


def _optimizer(lrs):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in lrs]
    return torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])


def torch_warmup_cosine(optimizer, total, warmup, min_lr):
    """The built-in composition whose lrs the contract says warmup_cosine equals."""
    cosine = TorchCosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=min_lr)
    if warmup == 0:   # milestone 0: the cosine runs from step 0; the warmup scheduler never runs
        linear = TorchLinearLR(optimizer, start_factor=1.0, end_factor=1.0, total_iters=1)
    else:             # factor (s+1)/W at step s  <=>  start 1/W, reaching 1 at total_iters W-1
        linear = TorchLinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0,
                               total_iters=warmup - 1)
    # recreate the cosine after the linear one, as users write it (order of construction)
    return TorchSequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def _close(a, b, scale):
    # the built-in cosine is recursive (lr_t from lr_{t-1}): ~1e-16 relative error per step
    return abs(a - b) <= 1e-12 * max(scale, 1e-30) + 1e-300


@given(schedules())
def test_warmup_cosine_equals_torch_sequential_lr_at_every_step(cfg):
    """For every step in [0, total_steps], warmup_cosine equals the lr that
    SequentialLR(LinearLR, CosineAnnealingLR) (milestone warmup_steps) hands the optimizer."""
    max_lr, total, warmup, min_lr = cfg
    opt = _optimizer([max_lr])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = torch_warmup_cosine(opt, total, warmup, min_lr)
        for step in range(total + 1):
            expected = opt.param_groups[0]["lr"]
            got = warmup_cosine(step, max_lr=max_lr, total_steps=total, warmup_steps=warmup,
                                min_lr=min_lr)
            assert _close(got, expected, max_lr), (
                f"step {step}: yours {got!r}, built-in SequentialLR {expected!r}")
            opt.step()
            sched.step()


@given(schedules(), st.integers(0, 300))
def test_schedule_shape_invariants(cfg, extra):
    """lr is in [0, max_lr]; step 0 is max_lr/W (never 0 when max_lr > 0); the last warmup step
    and step W are max_lr; step T and every later step are exactly min_lr (no second cycle)."""
    max_lr, total, warmup, min_lr = cfg
    kw = dict(max_lr=max_lr, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
    lrs = [warmup_cosine(s, **kw) for s in range(total + 1)]
    assert all(0.0 <= lr <= max_lr * (1 + 1e-12) for lr in lrs), f"lrs outside [0, max_lr]: {lrs}"
    if warmup > 0:
        assert lrs[0] == pytest.approx(max_lr / warmup) and lrs[0] > 0, (
            f"step 0: lr {lrs[0]!r}, expected max_lr / W = {max_lr / warmup!r}")
        assert lrs[warmup - 1] == pytest.approx(max_lr), f"last warmup step: {lrs[warmup - 1]!r}"
    if warmup < total:
        assert lrs[warmup] == pytest.approx(max_lr), f"step W: {lrs[warmup]!r}, expected max_lr"
        assert lrs[total] == pytest.approx(min_lr, abs=1e-15 * max_lr), f"step T: {lrs[total]!r}"
    late = warmup_cosine(total + 1 + extra, **kw)
    assert late == pytest.approx(min_lr, abs=1e-15 * max_lr), f"step {total + 1 + extra}: {late!r}"
    decay = lrs[warmup:]
    assert all(a >= b - 1e-15 * max_lr for a, b in zip(decay, decay[1:])), f"not decaying: {decay}"


@given(schedules(), st.integers(0, 40), st.lists(st.floats(1e-5, 5.0), min_size=1, max_size=3))
def test_warmup_cosine_object_equals_torch_scheduler_with_state_dict_roundtrip(cfg, cut, lr_mult):
    """WarmupCosine writes the same lrs into every param group as the built-in SequentialLR,
    with get_last_lr agreeing; saving its state_dict at step `cut`, loading it into a fresh
    optimizer + scheduler and continuing gives the same lrs as never stopping."""
    max_lr, total, warmup, min_lr = cfg
    lrs0 = [max_lr * (1.0 + m) for m in lr_mult]          # every group's peak >= shared min_lr
    cut = min(cut, total)
    ref_opt, opt = _optimizer(lrs0), _optimizer(lrs0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_warmup_cosine(ref_opt, total, warmup, min_lr)
        sched = WarmupCosine(opt, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
        for step in range(total + 3):
            if step == cut:
                saved = sched.state_dict()
                opt = _optimizer([123.0] * len(lrs0))  # a fresh run: wrong lr until loaded
                sched = WarmupCosine(opt, total_steps=7, warmup_steps=2)
                sched.load_state_dict(saved)
            got = [g["lr"] for g in opt.param_groups]
            assert got == sched.get_last_lr()
            if step <= total:   # the contract covers [0, total]; past it, the built-in recurses on
                for g, e, peak in zip(got, ref.get_last_lr(), lrs0):
                    assert _close(g, e, peak), (step, g, e)
            else:
                assert got == pytest.approx([min_lr] * len(lrs0), abs=1e-15 * max(lrs0))
            opt.step()
            ref_opt.step()
            sched.step()
            ref.step()


def test_state_dict_loads_with_weights_only():
    """The scheduler state survives torch.save / torch.load(weights_only=True) unchanged."""
    import io
    opt = _optimizer([1e-3])
    sched = WarmupCosine(opt, total_steps=10, warmup_steps=3, min_lr=1e-4)
    for _ in range(4):
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == sched.state_dict()


@pytest.mark.parametrize("kwargs, name", [
    (dict(step=-1), "step"),
    (dict(max_lr=-1.0), "max_lr"),
    (dict(min_lr=-1e-4), "min_lr"),
    (dict(min_lr=2.0, max_lr=1.0), "min_lr"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(total_steps=0, warmup_steps=0), "total_steps"),
    (dict(warmup_steps=11, total_steps=10), "warmup_steps"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, name):
    """Each invalid argument of warmup_cosine raises ValueError whose message names it."""
    args = dict(step=0, max_lr=1.0, total_steps=10, warmup_steps=2, min_lr=0.0)
    args.update(kwargs)
    step = args.pop("step")
    with pytest.raises(ValueError, match=name):
        warmup_cosine(step, **args)
    if name not in ("step", "max_lr"):  # SGD itself rejects a negative lr
        opt = _optimizer([args["max_lr"]])
        with pytest.raises(ValueError, match=name):
            WarmupCosine(opt, total_steps=args["total_steps"],
                         warmup_steps=args["warmup_steps"], min_lr=args["min_lr"])


def test_set_lr_sets_every_group_and_miscounted_total_bug_is_visible():
    """set_lr writes every param group; a total counted in micro-batches (x4) leaves the lr far
    above min_lr at the real last step, the bug lesson 03 shows."""
    opt = _optimizer([1.0, 2.0, 3.0])
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25, 0.25]
    right = warmup_cosine(100, max_lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.1)
    wrong = warmup_cosine(100, max_lr=1.0, total_steps=400, warmup_steps=10, min_lr=0.1)
    assert right == pytest.approx(0.1) and wrong > 0.8, (right, wrong)
    first = warmup_cosine(0, max_lr=1.0, total_steps=100, warmup_steps=10)
    assert math.isclose(first, 0.1), f"step 0 of a 10-step warmup to 1.0: {first!r}, expected 0.1"
