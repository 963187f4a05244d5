"""minitrain.grad_scaler.GradScaler against torch.amp.GradScaler("cpu"), step sequence by step
sequence (a Hypothesis state machine), including inf / nan / overflowing gradients and misuse."""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from torch.amp import GradScaler as TorchGradScaler

from tests.implementation import under_test

GradScaler = under_test("minitrain.grad_scaler", "GradScaler")

pytestmark = pytest.mark.lesson05

GRAD_KINDS = ["finite", "finite", "finite", "tiny", "inf", "-inf", "nan", "overflow"]


def _outcome(fn):
    """('ok', return value) or (exception type, message)."""
    try:
        return ("ok", fn())
    except Exception as exc:                                  # noqa: BLE001 - compared below
        return (type(exc), str(exc))


class MarkedSGD(torch.optim.SGD):
    """SGD whose step() returns a marker, so a test can see whether the scaler really called it
    and handed its return value back (plain SGD.step() returns None, like a skipped step)."""

    def step(self, closure=None):
        super().step(closure)
        return "stepped"


class Side:
    """One scaler with its own copy of two parameter tensors and two SGD optimizers."""

    def __init__(self, scaler, seed):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(4, generator=gen)),
                       torch.nn.Parameter(torch.randn(2, 3, generator=gen))]
        self.opts = [MarkedSGD([self.params[0]], lr=0.1, momentum=0.9),
                     MarkedSGD([self.params[1]], lr=0.05)]
        self.scaler = scaler


class GradScalerMachine(RuleBasedStateMachine):
    """Drive both scalers with the same calls; after every call they must agree."""

    @initialize(seed=st.integers(0, 2**16),
                init_scale=st.sampled_from([65536.0, 1.0, 3.3, 2.0**126, 2.0**127 * 1.5]),
                growth_factor=st.sampled_from([2.0, 1.5, 4.0]),
                backoff_factor=st.sampled_from([0.5, 0.25, 0.3]),
                growth_interval=st.integers(1, 4))
    def setup(self, seed, init_scale, growth_factor, backoff_factor, growth_interval):
        kw = dict(init_scale=init_scale, growth_factor=growth_factor,
                  backoff_factor=backoff_factor, growth_interval=growth_interval)
        self.ref = Side(TorchGradScaler("cpu", **kw), seed)
        self.mine = Side(GradScaler(**kw), seed)
        self.ref_skipped = 0
        self.gen = torch.Generator().manual_seed(seed + 1)

    def _both(self, fn):
        a = _outcome(lambda: fn(self.ref))
        b = _outcome(lambda: fn(self.mine))
        assert a[0] == b[0] and (a[0] == "ok" or a[1] == b[1]), (
            f"built-in: {a[0]} {a[1]!r}; yours: {b[0]} {b[1]!r}")
        return a, b

    @rule(kind=st.sampled_from(GRAD_KINDS), which=st.sampled_from([0, 1, None]))
    def backward(self, kind, which):
        """scale(loss).backward() on both; the loss makes finite, tiny, inf, nan or overflowing
        gradients (overflow: scale * x exceeds fp32) in parameter `which` (None: both)."""
        xs = [torch.randn(p.shape, generator=self.gen) for p in self.ref.params]
        scale_now = self.mine.scaler.get_scale()
        for i, x in enumerate(xs):
            if which is not None and i != which:
                continue
            if kind == "tiny":
                x.div_(max(scale_now, 1.0))           # scaled grads ~N(0,1): always a clean step
            elif kind in ("inf", "-inf", "nan"):
                x.view(-1)[0] = float(kind)
            elif kind == "overflow":
                x.view(-1)[0] = min(3.0e38, 4.0 * 3.4e38 / scale_now)  # scale * x > fp32 max

        def run(side):
            loss = sum((p * x).sum() for p, x in zip(side.params, xs))
            side.scaler.scale(loss).backward()
        self._both(run)

    @rule(i=st.sampled_from([0, 1]))
    def unscale_(self, i):
        """Explicit unscale_ (the clipping pattern): same grads, same errors when repeated."""
        self._both(lambda s: s.scaler.unscale_(s.opts[i]))

    @rule(i=st.sampled_from([0, 1]))
    def step(self, i):
        """step: skipped (returns None, params untouched) exactly when the built-in skips;
        otherwise it returns what optimizer.step() returned."""
        ref, mine = self._both(lambda s: s.scaler.step(s.opts[i]))
        if ref[0] == "ok":
            found = self.ref.scaler._found_inf_per_device(self.ref.opts[i])
            skipped = sum(v.item() for v in found.values()) > 0
            self.ref_skipped += int(skipped)
            assert ref[1] == (None if skipped else "stepped")       # the built-in's behaviour
            assert mine[1] == ref[1], f"step returned {mine[1]!r}, the built-in {ref[1]!r}"
            assert self.mine.scaler.last_step_skipped == skipped

    @rule()
    def update(self):
        """update(): back-off / growth / growth dropped on fp32 overflow, same as built-in."""
        self._both(lambda s: s.scaler.update())

    @rule(new_scale=st.sampled_from([1.0, 1024.0, 3.3, 2.0**100]))
    def update_with_new_scale(self, new_scale):
        """update(new_scale) sets the scale (rounded to fp32) and keeps the tracker."""
        self._both(lambda s: s.scaler.update(new_scale))

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        """Zeroing the grads (set_to_none: no grads, so step has no inf check: an error)."""
        for side in (self.ref, self.mine):
            for opt in side.opts:
                opt.zero_grad(set_to_none=set_to_none)

    @rule()
    def checkpoint_roundtrip(self):
        """Fresh scalers loaded from the BUILT-IN's state_dict continue identically."""
        sd = self.ref.scaler.state_dict()
        kw = dict(init_scale=1.0, growth_factor=8.0, backoff_factor=0.125, growth_interval=99)
        self.ref.scaler, self.mine.scaler = TorchGradScaler("cpu", **kw), GradScaler(**kw)
        self._both(lambda s: s.scaler.load_state_dict(dict(sd)))
        self.ref_skipped = 0                      # the fresh scaler's counter starts at 0

    @invariant()
    def same_scale_tracker_state_dict_params_and_grads(self):
        r, m = self.ref.scaler, self.mine.scaler
        assert m.get_scale() == r.get_scale()
        assert m._get_growth_tracker() == r._get_growth_tracker()
        assert m.state_dict() == r.state_dict()
        assert list(m.state_dict()) == list(r.state_dict())
        for p, q in zip(self.ref.params, self.mine.params):
            torch.testing.assert_close(q, p, rtol=0, atol=0, equal_nan=True)
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, equal_nan=True)

    @invariant()
    def same_skipped_steps(self):
        """Our skipped-step counter counts exactly the built-in's skipped steps."""
        assert self.mine.scaler.skipped_steps == self.ref_skipped


GradScalerMachine.TestCase.settings = settings(settings.default, stateful_step_count=30)
TestGradScalerEqualsTorch = GradScalerMachine.TestCase
TestGradScalerEqualsTorch.__doc__ = (
    "Driven by the same random sequence of calls (backward with finite, tiny, inf, nan or "
    "overflowing gradients, unscale_, step, update, update(new_scale), zero_grad, a checkpoint "
    "round trip), your GradScaler and torch.amp.GradScaler('cpu') agree after every call: same "
    "scale, growth tracker, state_dict, parameters, gradients, skipped steps and errors.")


@pytest.mark.parametrize("setup, calls", [
    # growth that would overflow fp32 is dropped (scale stays, tracker resets)
    (dict(init_scale=2.0**127 * 1.5, growth_factor=2.0, backoff_factor=0.5, growth_interval=1),
     ["tiny", "step0", "update", "tiny", "step1", "update"]),
    # back-off is computed in double and rounded to fp32, like the built-in kernel
    (dict(init_scale=3.3, growth_factor=1.5, backoff_factor=0.3, growth_interval=2),
     ["inf", "step0", "step1", "update", "tiny", "step0", "update", "tiny", "step0", "update"]),
    (dict(init_scale=65536.0, growth_factor=4.0, backoff_factor=0.3, growth_interval=3),
     ["nan", "unscale0", "step0", "update", "overflow", "step1", "update", "new_scale"]),
])
def test_edge_sequences_equal_builtin(setup, calls):
    """Fixed sequences that hit fp32 overflow of growth, fp32 rounding of back-off and
    update(new_scale): every intermediate state equals the built-in's."""
    m = GradScalerMachine()
    m.setup(seed=0, **setup)
    for call in calls:
        if call.startswith("step"):
            m.step(int(call[-1]))
        elif call.startswith("unscale"):
            m.unscale_(int(call[-1]))
        elif call == "update":
            m.update()
        elif call == "new_scale":
            m.update_with_new_scale(3.3)
        else:
            m.backward(call, None)
        m.same_scale_tracker_state_dict_params_and_grads()
        m.same_skipped_steps()
    m.teardown()


def _sgd(seed=0):
    p = torch.nn.Parameter(torch.randn(3, generator=torch.Generator().manual_seed(seed)))
    return p, torch.optim.SGD([p], lr=0.1)


@pytest.mark.parametrize("make", [lambda: TorchGradScaler("cpu"), GradScaler])
def test_misuse_errors(make):
    """Both scalers: unscale_ before scale() -> AssertionError; unscale_ twice -> RuntimeError;
    unscale_ after step -> RuntimeError; step twice -> RuntimeError; closure -> RuntimeError;
    update with no inf check -> AssertionError; fp16 grads -> ValueError."""
    p, opt = _sgd()
    s = make()
    with pytest.raises(AssertionError, match="_scale is None"):
        s.unscale_(opt)
    s.scale(p.sum()).backward()
    s.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called on this optimizer"):
        s.unscale_(opt)
    s.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        s.unscale_(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        s.step(opt)
    s.update()
    with pytest.raises(AssertionError, match="No inf checks"):
        s.update()
    with pytest.raises(RuntimeError, match="Closure"):
        s.step(opt, closure=lambda: 0.0)
    s.update(1.0)
    half = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    opt16 = torch.optim.SGD([half], lr=0.1)
    s.scale(half.float().sum()).backward()                    # fp16 params get fp16 grads
    with pytest.raises(ValueError, match="FP16"):
        s.unscale_(opt16)


def test_disabled_is_a_passthrough_and_state_dict_keys_match():
    """enabled=False: scale returns its input, step just steps, get_scale is 1.0, state_dict is
    {} (like the built-in); enabled: the state_dict has exactly the built-in's keys."""
    p, _ = _sgd()
    opt = MarkedSGD([p], lr=0.1)
    s = GradScaler(enabled=False)
    loss = p.sum()
    assert s.scale(loss) is loss
    loss.backward()
    before = p.detach().clone()
    s.unscale_(opt)
    assert s.step(opt) == "stepped" and not torch.equal(p, before)
    s.update()
    assert s.get_scale() == 1.0 and s.state_dict() == {}
    assert set(GradScaler().state_dict()) == set(TorchGradScaler("cpu").state_dict())


def test_scale_of_nested_outputs_and_fp16_loss_like_builtin():
    """scale() handles lists/tuples like the built-in, also fp16 outputs (scaled in fp32 math)."""
    outs = [torch.tensor([1.0, 2.0]), (torch.tensor([3.0], dtype=torch.float16),)]
    ref, mine = TorchGradScaler("cpu").scale(outs), GradScaler().scale(outs)
    assert torch.equal(ref[0], mine[0]) and torch.equal(ref[1][0], mine[1][0])
    assert isinstance(mine[1], tuple) and mine[1][0].dtype == torch.float16
    with pytest.raises(ValueError):
        GradScaler().scale(3.0)


def test_bad_constructor_arguments():
    """growth_factor <= 1, backoff_factor >= 1, growth_interval < 1 are ValueErrors naming them."""
    for kw, name in [({"growth_factor": 1.0}, "growth_factor"),
                     ({"backoff_factor": 1.0}, "backoff_factor"),
                     ({"growth_interval": 0}, "growth_interval")]:
        with pytest.raises(ValueError, match=name):
            GradScaler(**kw)


def test_scale_sawtooth_on_a_fixed_schedule():
    """Doubling after growth_interval clean steps, halving on every overflow: a known path."""
    p, opt = _sgd()
    s = GradScaler(init_scale=8.0, growth_interval=2)
    seen = []
    for bad in [False, False, False, False, True, False, True, True, False, False]:
        opt.zero_grad()
        s.scale(p.sum()).backward()
        if bad:
            p.grad[0] = math.inf
        s.step(opt)
        s.update()
        seen.append(s.get_scale())
    assert seen == [8.0, 16.0, 16.0, 32.0, 16.0, 16.0, 8.0, 4.0, 4.0, 8.0]
    assert s.skipped_steps == 3
