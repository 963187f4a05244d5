"""minitrain.clip against torch.nn.utils.clip_grad_norm_ / clip_grad_value_."""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, note
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_
from torch.nn.utils import clip_grad_value_ as torch_clip_grad_value_

from strategies import seeds, shapes
from tests.implementation import under_test

clip_grad_norm, clip_grad_value, grad_norm = under_test(
    "minitrain.clip", "clip_grad_norm", "clip_grad_value", "grad_norm")

pytestmark = pytest.mark.lesson04

norm_types = st.sampled_from([1.0, 2.0, math.inf, 3.0, 0.5]) | st.floats(0.25, 8.0)


@st.composite
def grad_sets(draw, allow_nonfinite=False, dtype=torch.float64):
    """A list of parameters of assorted shapes; some have no .grad; gradients of very different
    scales; optionally an inf or nan planted in one gradient."""
    n = draw(st.integers(0, 5))
    gen = torch.Generator().manual_seed(draw(seeds))
    params = []
    for _ in range(n):
        p = torch.nn.Parameter(torch.zeros(draw(shapes(max_dims=2, max_side=6)), dtype=dtype))
        if draw(st.integers(0, 4)) > 0:      # ~1 in 5 parameters has no gradient
            scale = draw(st.sampled_from([1e-4, 1e-1, 1.0, 10.0, 1e3]))
            p.grad = torch.randn(p.shape, generator=gen, dtype=dtype) * scale
        params.append(p)
    if allow_nonfinite and any(p.grad is not None for p in params):
        bad = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
        target = next(p for p in params if p.grad is not None)
        target.grad.view(-1)[0] = bad
    return params


def _note_grads(params):
    """Show the drawn gradients in a failure report (a Parameter's repr shows its zero values)."""
    note(f"gradients: {[None if p.grad is None else p.grad.tolist() for p in params]}")


def _clone(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def _grads_equal(a, b):
    for p, q in zip(a, b, strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, equal_nan=True)


@given(grad_sets(), norm_types, st.floats(1e-3, 1e3))
def test_clip_grad_norm_equals_torch(params, norm_type, max_norm):
    """clip_grad_norm returns the same pre-clip total norm as clip_grad_norm_ and leaves the
    same gradients, for every norm type (1, 2, any p, inf) and params without grads."""
    _note_grads(params)
    ref = _clone(params)
    expected = torch_clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    got = clip_grad_norm(params, max_norm, norm_type=norm_type)
    assert got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    _grads_equal(params, ref)


@given(grad_sets(), norm_types)
def test_grad_norm_is_the_norm_of_the_concatenated_gradients(params, norm_type):
    """grad_norm equals the p-norm of all gradients flattened into one vector (0 when none)."""
    _note_grads(params)
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    got = grad_norm(params, norm_type)
    if not grads:
        assert float(got) == 0.0
        return
    expected = torch.linalg.vector_norm(torch.cat(grads), norm_type)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-300)


@given(grad_sets(), norm_types, st.floats(1e-3, 1e3))
def test_clip_bounds_the_norm_and_keeps_the_direction(params, norm_type, max_norm):
    """After clipping, the norm is at most min(norm before, max_norm) (+rounding), and every
    gradient is the old one times the same factor min(1, max_norm / (norm + 1e-6))."""
    _note_grads(params)
    before = _clone(params)
    norm = float(clip_grad_norm(params, max_norm, norm_type=norm_type))
    after = float(grad_norm(params, norm_type))
    assert after <= min(norm, max_norm) * (1 + 1e-9), (
        f"norm {after} after clipping to max_norm={max_norm} (norm before: {norm})")
    coef = min(1.0, max_norm / (norm + 1e-6))
    for p, q in zip(params, before):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad * coef, rtol=1e-9, atol=1e-300)


@given(grad_sets(allow_nonfinite=True), norm_types, st.floats(1e-3, 1e3))
def test_nonfinite_gradients_match_torch_and_error_if_nonfinite(params, norm_type, max_norm):
    """With an inf/nan gradient: the same (non-finite) norm and gradients as the built-in when
    error_if_nonfinite=False, and a RuntimeError from both when it is True."""
    _note_grads(params)
    ref, ref2, mine2 = _clone(params), _clone(params), _clone(params)
    expected = torch_clip_grad_norm_(ref, max_norm, norm_type=norm_type)
    got = clip_grad_norm(params, max_norm, norm_type=norm_type)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0, equal_nan=True)
    _grads_equal(params, ref)
    expected_raises = not torch.isfinite(expected)
    for fn, ps in ((torch_clip_grad_norm_, ref2), (clip_grad_norm, mine2)):
        if expected_raises:
            with pytest.raises(RuntimeError, match="non-finite"):
                fn(ps, max_norm, norm_type=norm_type, error_if_nonfinite=True)
        else:
            fn(ps, max_norm, norm_type=norm_type, error_if_nonfinite=True)


@given(grad_sets(allow_nonfinite=True, dtype=torch.float32), st.floats(1e-3, 100.0))
def test_clip_grad_value_equals_torch(params, clip_value):
    """clip_grad_value leaves exactly the gradients clip_grad_value_ leaves (nan stays nan).
    (With no gradient at all, torch 2.x's clip_grad_value_ raises an internal RuntimeError;
    ours is a no-op then.)"""
    _note_grads(params)
    ref = _clone(params)
    if any(p.grad is not None for p in params):
        torch_clip_grad_value_(ref, clip_value)
    assert clip_grad_value(params, clip_value) is None
    for p, q in zip(params, ref):
        if p.grad is not None:
            assert torch.equal(p.grad.nan_to_num(), q.grad.nan_to_num())
            assert torch.equal(p.grad.isnan(), q.grad.isnan())


def test_single_tensor_generator_and_empty_inputs():
    """A bare tensor and a generator are accepted like the built-in; no grads gives norm 0."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    q = torch.nn.Parameter(torch.zeros(3))
    q.grad = p.grad.clone()
    norm = float(clip_grad_norm(p, 1.0))
    assert norm == pytest.approx(5.0), f"grad (3, 4, 0), max_norm 1: returned {norm}, the norm before is 5"
    torch_clip_grad_norm_(q, 1.0)
    assert torch.equal(p.grad, q.grad)
    assert float(grad_norm(x for x in [p])) == pytest.approx(1.0, rel=1e-5)
    assert float(clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0
    assert float(grad_norm([])) == 0.0
