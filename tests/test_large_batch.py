"""LARS and LAMB reduce exactly to SGD and AdamW without the trust ratio; the ratio is per layer."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import SGD as TorchSGD
from torch.optim import AdamW as TorchAdamW

from minitrain.large_batch import scaled_lr
from tests.implementation import under_test
from strategies import seeds

LARS, LAMB = under_test("minitrain.large_batch", "LARS", "LAMB")

pytestmark = pytest.mark.lesson26


def _params(seed, shapes=((3, 4), (4,), (2, 3, 2))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float32).requires_grad_() for s in shapes]


def _run(make_opt, seed, steps):
    """`steps` optimizer steps on a fixed random quadratic-ish loss; returns the parameters."""
    params = _params(seed)
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((p - t) ** 2 * (1 + k)).sum() + p.sum() ** 3 * 1e-3
                   for k, (p, t) in enumerate(zip(params, targets)))
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


@given(seed=seeds, lr=st.floats(1e-4, 0.3), wd=st.sampled_from([0.0, 0.01, 0.3]),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), steps=st.integers(1, 6))
def test_lars_without_trust_ratio_is_torch_sgd_bit_for_bit(seed, lr, wd, momentum, steps):
    """LARS(trust_ratio=False) takes exactly torch.optim.SGD(momentum, weight_decay)'s steps."""
    ours = _run(lambda ps: LARS(ps, lr, momentum=momentum, weight_decay=wd, trust_ratio=False),
                seed, steps)
    ref = _run(lambda ps: TorchSGD(ps, lr=lr, momentum=momentum, weight_decay=wd, foreach=False),
               seed, steps)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@given(seed=seeds, lr=st.floats(1e-4, 0.1), wd=st.sampled_from([0.0, 0.01, 0.1]),
       betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]), eps=st.sampled_from([1e-8, 1e-6]),
       steps=st.integers(1, 6))
def test_lamb_without_trust_ratio_is_torch_adamw_bit_for_bit(seed, lr, wd, betas, eps, steps):
    """LAMB(trust_ratio=False) takes exactly torch.optim.AdamW's steps (same betas, eps, decay)."""
    ours = _run(lambda ps: LAMB(ps, lr, betas=betas, eps=eps, weight_decay=wd,
                                trust_ratio=False), seed, steps)
    ref = _run(lambda ps: TorchAdamW(ps, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                     foreach=False), seed, steps)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


@settings(max_examples=15)
@given(seed=seeds, lr=st.floats(1e-3, 0.1), wd=st.sampled_from([0.0, 0.05]))
def test_lamb_first_step_scales_each_layer_by_its_own_trust_ratio(seed, lr, wd):
    """One LAMB step moves each tensor by lr * ||w|| / ||u|| * u, u = m_hat/(sqrt(v_hat)+eps) +
    wd*w, computed here in float64 from the formula (at step 1, m_hat = g and v_hat = g^2)."""
    params = _params(seed)
    before = [p.detach().double().clone() for p in params]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i))
             for i, p in enumerate(params)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    LAMB(params, lr, weight_decay=wd, eps=1e-6).step()
    for p, w, g in zip(params, before, grads):
        g = g.double()
        u = g / (g.abs() + 1e-6) + wd * w
        expected = w - lr * (w.norm() / u.norm()) * u
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_lars_trust_ratio_matches_its_formula_per_layer():
    """LARS's first step is lr * eta*||w||/(||g|| + wd||w|| + eps) * (g + wd w), per tensor."""
    params = _params(3)
    grads = [torch.full(p.shape, 0.5) * (i + 1) for i, p in enumerate(params)]
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    lr, wd, eta, eps = 0.1, 0.01, 0.02, 1e-8
    LARS(params, lr, momentum=0.9, weight_decay=wd, trust_coefficient=eta, eps=eps).step()
    for p, w, g in zip(params, before, grads):
        trust = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
        torch.testing.assert_close(p.detach(), w - lr * trust * (g + wd * w))


@pytest.mark.parametrize("opt_cls", [LARS, LAMB])
def test_zero_weights_or_zero_gradients_never_divide_by_zero(opt_cls):
    """A zero-initialized tensor (||w|| = 0) and a zero gradient (||g|| = 0) give finite steps:
    the trust ratio falls back to 1 instead of 0/0."""
    w0 = torch.zeros(5, requires_grad=True)  # ||w|| = 0 (a fresh bias)
    w1 = torch.ones(3, requires_grad=True)  # gets a zero gradient
    w0.grad, w1.grad = torch.ones(5), torch.zeros(3)
    opt = opt_cls([w0, w1], 0.1, weight_decay=0.0)
    opt.step()
    assert torch.isfinite(w0).all() and torch.isfinite(w1).all()
    assert w0.abs().sum() > 0  # the zero tensor still moved (ratio 1, not 0)
    assert torch.equal(w1.detach(), torch.ones(3))


@given(base=st.floats(1e-5, 1.0), b0=st.integers(1, 512), b=st.integers(1, 8192))
def test_scaled_lr_rules(base, b0, b):
    """linear: lr grows like batch; sqrt: like sqrt(batch); both equal base_lr at base_batch."""
    assert math.isclose(scaled_lr(base, b0, b, rule="linear"), base * b / b0, rel_tol=1e-12)
    assert math.isclose(scaled_lr(base, b0, b, rule="sqrt"), base * math.sqrt(b / b0),
                        rel_tol=1e-12)
    assert scaled_lr(base, b0, b0, rule="sqrt") == pytest.approx(base)


@pytest.mark.parametrize("args, kwargs, name", [
    ((0.1, 0, 8), {}, "base_batch"), ((0.1, 8, -1), {}, "batch"),
    ((-1.0, 8, 8), {}, "base_lr"), ((0.1, 8, 8), {"rule": "cubic"}, "rule")])
def test_scaled_lr_bad_input_names_the_argument(args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        scaled_lr(*args, **kwargs)
