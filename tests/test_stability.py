"""Lesson 16: z-loss and the loss-spike detector (minitrain.stability).

There is no PyTorch built-in for either, so each is compared with an independent reference:
z-loss with its formula written out by hand in float64 (max-shifted log-sum-exp, mask by
multiplication) and differentiated by torch.autograd; the spike detector with a second model of
its rule (a plain list of healthy losses and statistics.median).
"""
import math
import statistics

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from minitrain.stability import SpikeDetector
from tests.implementation import under_test
from tests.strategies import seeds, shapes, tensors

z_loss = under_test("minitrain.stability", "z_loss")

pytestmark = pytest.mark.lesson16


def reference_z_loss(logits, weight, keep=None):
    """weight * mean over kept positions of logsumexp(logits)^2, by hand in float64."""
    x = logits.to(torch.float64)
    m = x.max(dim=-1, keepdim=True).values.detach()
    lse = (m + (x - m).exp().sum(dim=-1, keepdim=True).log()).squeeze(-1)  # (...)
    if keep is None:
        return weight * (lse ** 2).sum() / lse.numel()
    keep = keep.to(torch.float64)
    return weight * (lse ** 2 * keep).sum() / keep.sum()


weights = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@st.composite
def logits_and_mask(draw):
    """Logits of shape (..., V) with 1-3 leading dims and an ignore mask with >= 1 kept position."""
    shape = draw(shapes(min_dims=2, max_dims=4, max_side=6))
    logits = draw(tensors(shape=shape, scale=draw(st.sampled_from([0.1, 3.0, 30.0]))))
    n = math.prod(shape[:-1])
    keep = draw(st.lists(st.booleans(), min_size=n, max_size=n).filter(any))
    keep = torch.tensor(keep).reshape(shape[:-1])
    gen = torch.Generator().manual_seed(draw(seeds))
    targets = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    return logits, torch.where(keep, targets, torch.full_like(targets, -100)), keep


@given(logits_and_mask(), weights, st.booleans())
def test_z_loss_and_its_gradient_equal_the_formula(case, weight, use_targets):
    """z_loss(logits, weight, targets) equals weight * mean(logsumexp^2) over the non-ignored
    positions (all positions without targets), and its gradient equals autograd's gradient of
    that formula computed by hand, for any shape and ignore mask."""
    logits, targets, keep = case
    mine_in = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    mine = z_loss(mine_in, weight=weight, targets=targets if use_targets else None)
    ref = reference_z_loss(ref_in, weight, keep if use_targets else None)
    assert mine.dim() == 0
    torch.testing.assert_close(mine, ref)
    (g_mine,) = torch.autograd.grad(mine, mine_in)
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    torch.testing.assert_close(g_mine, g_ref)


@given(tensors(shape=(3, 4, 5)), weights)
def test_z_loss_with_every_target_ignored_is_zero_with_zero_gradient(logits, weight):
    """When every target is -100 no position counts: the z-loss is 0 (not nan) and its gradient
    is exactly 0, even where the ignored logits are inf."""
    logits = logits.clone()
    logits[0, 0, 0] = math.inf
    logits.requires_grad_(True)
    value = z_loss(logits, weight=weight, targets=torch.full((3, 4), -100))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_ignored_inf_logits_do_not_poison_the_gradient():
    """An inf logit at an ignored position leaves the value and gradient finite and equal to the
    formula over the kept positions alone."""
    logits = torch.randn(2, 3, 7, dtype=torch.float64)
    targets = torch.tensor([[1, -100, 2], [0, 4, -100]])
    bad = logits.clone()
    bad[0, 1, 3] = math.inf
    bad.requires_grad_(True)
    value = z_loss(bad, weight=0.5, targets=targets)
    value.backward()
    keep = targets != -100
    torch.testing.assert_close(value, reference_z_loss(logits, 0.5, keep))
    assert torch.isfinite(bad.grad).all() and (bad.grad[0, 1] == 0).all()


def test_z_loss_upcasts_half_logits():
    """fp16 logits around 300 have logsumexp^2 ~ 9e4, above fp16's max (65504): the z-loss is
    computed in fp32 and equals the float64 formula."""
    logits = (300 + torch.randn(4, 16, dtype=torch.float64)).to(torch.float16)
    value = z_loss(logits, weight=1e-4)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    expected = reference_z_loss(logits.double(), 1e-4).float()
    torch.testing.assert_close(value, expected)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=torch.zeros(3, 4), weight=-1.0), "weight must be"),
    (dict(logits=torch.zeros(3, 4), weight=math.nan), "weight must be"),
    (dict(logits=torch.zeros(3, 4), weight=True), "weight must be"),
    (dict(logits=torch.zeros(3, 4, dtype=torch.long)), "logits must be a floating"),
    (dict(logits=[[0.0, 1.0]]), "logits must be a floating"),
    (dict(logits=torch.zeros(3, 4), targets=torch.zeros(4, dtype=torch.long)), "targets must be"),
    (dict(logits=torch.zeros(3, 4), targets=torch.zeros(3)), "targets must be an integer"),
])
def test_z_loss_bad_arguments(kwargs, match):
    """Bad logits, weight or targets are one ValueError naming the argument."""
    logits = kwargs.pop("logits")
    with pytest.raises(ValueError, match=match):
        z_loss(logits, **kwargs)


# --- SpikeDetector -----------------------------------------------------------------------------

def reference_flags(losses, window, threshold, min_history):
    """The rule, modelled independently: a list of every healthy loss, the median of its tail."""
    healthy, flags = [], []
    for x in losses:
        recent = healthy[-window:]
        if not math.isfinite(x):
            flag = True
        elif len(recent) < min_history:
            flag = False
        else:
            flag = x > threshold * statistics.median(recent)
        if not flag:
            healthy.append(x)
        flags.append(flag)
    return flags, healthy[-window:]


loss_values = st.one_of(
    st.floats(min_value=0.5, max_value=5.0),  # ordinary losses
    st.floats(min_value=5.0, max_value=1e6),  # jumps
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
)


@settings(max_examples=60)
@given(st.lists(loss_values, max_size=80), st.integers(1, 12),
       st.floats(min_value=1.01, max_value=10.0), st.data())
def test_spike_detector_matches_reference_model(losses, window, threshold, data):
    """On any sequence of losses (jumps, zeros, nan/inf), SpikeDetector flags exactly the losses
    the reference model flags, keeps the same window of healthy losses, and counts the spikes."""
    min_history = data.draw(st.integers(1, window))
    detector = SpikeDetector(window=window, threshold=threshold, min_history=min_history)
    flags = [detector.update(x) for x in losses]
    expected, window_tail = reference_flags(losses, window, threshold, min_history)
    assert flags == expected
    assert list(detector.losses) == window_tail
    assert detector.n_spikes == sum(expected)
    run = 0
    for f in expected:
        run = run + 1 if f else 0
    assert detector.consecutive == run


@given(st.lists(st.floats(min_value=0.5, max_value=1e3), min_size=1, max_size=60),
       st.integers(1, 60))
def test_state_dict_resume_equals_uninterrupted(losses, cut):
    """A detector rebuilt from state_dict() after step `cut` flags the rest exactly as the
    detector that never stopped (a resumed run judges spikes like the original)."""
    cut = min(cut, len(losses))
    whole = SpikeDetector(window=7, threshold=2.0)
    flags_whole = [whole.update(x) for x in losses]
    first = SpikeDetector(window=7, threshold=2.0)
    flags = [first.update(x) for x in losses[:cut]]
    resumed = SpikeDetector(window=7, threshold=2.0)
    resumed.load_state_dict(first.state_dict())
    flags += [resumed.update(x) for x in losses[cut:]]
    assert flags == flags_whole and resumed.state_dict() == whole.state_dict()


def test_single_10x_spike_after_a_flat_run_is_caught():
    """After 30 steps at loss 2.0, a 20.0 is a spike; the next 2.0 is not, and the spike did not
    enter the window (the median stays 2.0)."""
    detector = SpikeDetector(window=50, threshold=3.0)
    assert not any(detector.update(2.0) for _ in range(30))
    assert detector.update(20.0) is True
    assert detector.update(2.0) is False
    assert detector.median == 2.0 and detector.n_spikes == 1


def test_slowly_rising_loss_is_never_a_spike():
    """A loss that rises 2% per step for 300 steps (a slow drift, not a spike) is never flagged:
    the median of the last 50 follows it."""
    detector = SpikeDetector(window=50, threshold=3.0)
    assert not any(detector.update(1.0 * 1.02 ** i) for i in range(300))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_losses_are_spikes_even_first(bad):
    """nan, inf and -inf are spikes at any time, also before any baseline exists, and never enter
    the window."""
    detector = SpikeDetector()
    assert detector.update(bad) is True
    assert detector.median is None
    detector.update(1.0)
    assert detector.update(torch.tensor(bad)) is True and detector.median == 1.0


def test_no_baseline_means_no_finite_spike():
    """The first finite loss (the largest of a run: ln 256 at step 0) only sets the baseline; with
    min_history=3 the first three finite losses are never spikes."""
    assert SpikeDetector().update(1e9) is False
    detector = SpikeDetector(window=10, min_history=3)
    assert [detector.update(x) for x in (1.0, 100.0, 1e4, 1e9)] == [False, False, False, True]


def test_threshold_is_strict_and_a_lasting_shift_keeps_flagging():
    """A loss of exactly threshold x median is not a spike (strict '>'); a lasting jump is flagged
    at every step, and `consecutive` counts the run so a caller can stop."""
    detector = SpikeDetector(window=5, threshold=3.0)
    for _ in range(5):
        detector.update(1.0)
    assert detector.update(3.0) is False
    assert [detector.update(10.0) for _ in range(4)] == [True] * 4
    assert detector.consecutive == 4


def test_update_accepts_numpy_and_tensor_losses():
    """A numpy scalar and a one-element tensor are losses like a float."""
    detector = SpikeDetector(window=3)
    assert detector.update(np.float32(2.0)) is False
    assert detector.update(torch.tensor([2.0])) is False
    assert detector.update(np.float64(7.0)) is True


@pytest.mark.parametrize("kwargs, match", [
    (dict(window=0), "window must be"), (dict(window=2.5), "window must be"),
    (dict(window=True), "window must be"), (dict(threshold=1.0), "threshold must be"),
    (dict(threshold=math.inf), "threshold must be"), (dict(threshold="3"), "threshold must be"),
    (dict(window=5, min_history=6), "min_history must be"),
])
def test_spike_detector_bad_arguments(kwargs, match):
    """Bad window, threshold or min_history are one ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        SpikeDetector(**kwargs)


@pytest.mark.parametrize("loss", ["2.0", None, torch.ones(2)])
def test_spike_detector_bad_loss(loss):
    """A loss that is not a number or a one-element tensor is a ValueError naming `loss`."""
    with pytest.raises(ValueError, match="loss must be"):
        SpikeDetector().update(loss)
