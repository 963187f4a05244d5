"""The notebook's schedules (step, one-cycle, lambda, plateau) equal their torch schedulers."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import LambdaLR as TorchLambdaLR
from torch.optim.lr_scheduler import OneCycleLR as TorchOneCycleLR
from torch.optim.lr_scheduler import ReduceLROnPlateau as TorchReduceLROnPlateau
from torch.optim.lr_scheduler import StepLR as TorchStepLR

from minitrain.schedule import LambdaSchedule, ReduceOnPlateau, one_cycle, step_decay

pytestmark = pytest.mark.lesson27


def _optimizer(lr):
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)


def _torch_lrs(make_scheduler, lr, steps):
    """The lr torch's scheduler hands the optimizer at steps 0..steps (stepped after opt.step)."""
    opt = _optimizer(lr)
    sched = make_scheduler(opt)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


@given(lr=st.floats(1e-5, 1.0), step_size=st.integers(1, 20), gamma=st.floats(0.05, 0.99),
       steps=st.integers(1, 80))
def test_step_decay_equals_torch_steplr(lr, step_size, gamma, steps):
    """step_decay(s) = lr * gamma ** (s // step_size) is StepLR's lr at every step (torch
    multiplies recursively, so up to float rounding)."""
    ref = _torch_lrs(lambda o: TorchStepLR(o, step_size=step_size, gamma=gamma), lr, steps)
    ours = [step_decay(s, lr=lr, step_size=step_size, gamma=gamma) for s in range(steps + 1)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=0)


@given(max_lr=st.floats(1e-4, 1.0), total=st.integers(4, 120), pct=st.floats(0.05, 0.9),
       div=st.sampled_from([5.0, 25.0]), final_div=st.sampled_from([10.0, 1e4]),
       anneal=st.sampled_from(["cos", "linear"]))
def test_one_cycle_equals_torch_onecyclelr(max_lr, total, pct, div, final_div, anneal):
    """one_cycle(s) equals OneCycleLR's lr for every step 0..total_steps - 1."""
    if float(pct * total) - 1 <= 0:  # torch then divides by zero in phase 1; so would we
        return
    ref = _torch_lrs(lambda o: TorchOneCycleLR(o, max_lr=max_lr, total_steps=total,
                                               pct_start=pct, div_factor=div,
                                               final_div_factor=final_div,
                                               anneal_strategy=anneal, cycle_momentum=False),
                     max_lr, total - 1)
    ours = [one_cycle(s, max_lr=max_lr, total_steps=total, pct_start=pct, div_factor=div,
                      final_div_factor=final_div, anneal=anneal) for s in range(total)]
    assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15)


@given(lr=st.floats(1e-4, 1.0), k=st.floats(0.5, 0.999), steps=st.integers(1, 50))
def test_lambda_schedule_equals_torch_lambdalr(lr, k, steps):
    """LambdaSchedule(opt, fn) hands the optimizer base_lr * fn(step), as LambdaLR does."""
    fn = lambda s: k ** s / (1 + s % 3)  # noqa: E731  (any function of the step)
    ref = _torch_lrs(lambda o: TorchLambdaLR(o, fn), lr, steps)
    opt = _optimizer(lr)
    sched = LambdaSchedule(opt, fn)
    ours = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        sched.step()
        ours.append(opt.param_groups[0]["lr"])
    assert ours == ref


@settings(max_examples=40)
@given(metrics=st.lists(st.floats(0.0, 10.0) | st.sampled_from([1.0, 1.00001, 2.0]),
                        min_size=1, max_size=60),
       mode=st.sampled_from(["min", "max"]), factor=st.sampled_from([0.1, 0.5]),
       patience=st.integers(0, 4), threshold=st.sampled_from([0.0, 1e-4, 0.05]),
       threshold_mode=st.sampled_from(["rel", "abs"]), cooldown=st.integers(0, 3),
       min_lr=st.sampled_from([0.0, 1e-3]))
def test_reduce_on_plateau_equals_torch(metrics, mode, factor, patience, threshold,
                                        threshold_mode, cooldown, min_lr):
    """Fed the same metric sequence, ReduceOnPlateau leaves exactly ReduceLROnPlateau's lr after
    every call (modes, thresholds, patience, cooldown and the min_lr floor)."""
    kw = dict(mode=mode, factor=factor, patience=patience, threshold=threshold,
              threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr)
    ref_opt, our_opt = _optimizer(0.5), _optimizer(0.5)
    ref, ours = TorchReduceLROnPlateau(ref_opt, **kw), ReduceOnPlateau(our_opt, **kw)
    for m in metrics:
        ref.step(m)
        ours.step(m)
        assert our_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_plateau_cuts_after_patience_flat_evaluations():
    """A named example: a metric that stops improving is cut once patience + 1 flat calls pass."""
    opt = _optimizer(1.0)
    sched = ReduceOnPlateau(opt, patience=2, factor=0.5)
    for m in [3.0, 2.0, 2.0, 2.0]:
        sched.step(m)
    assert opt.param_groups[0]["lr"] == 1.0
    sched.step(2.0)
    assert opt.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("kwargs", [dict(step=-1, lr=0.1, step_size=2),
                                    dict(step=0, lr=0.1, step_size=0)])
def test_step_decay_bad_input(kwargs):
    with pytest.raises(ValueError, match="step_size"):
        step_decay(**kwargs)


def test_one_cycle_ends_at_max_lr_over_div_times_final_div():
    last = one_cycle(99, max_lr=1.0, total_steps=100, div_factor=25.0, final_div_factor=1e4)
    assert math.isclose(last, 1.0 / 25.0 / 1e4)
