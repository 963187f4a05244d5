"""Attention from scratch (lesson 08): naive and flash equal PyTorch's SDPA, forward and backward.

The reference is torch.nn.functional.scaled_dot_product_attention, imported as `torch_sdpa`.
"""
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from torch.nn.functional import scaled_dot_product_attention as torch_sdpa
from torch.utils._python_dispatch import TorchDispatchMode

from tests.implementation import under_test
from tests.strategies import seeds

flash_attention, flash_attention_traced, naive_attention = under_test(
    "minitrain.attention", "flash_attention", "flash_attention_traced", "naive_attention")

pytestmark = pytest.mark.lesson08

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-8), torch.float32: dict(atol=2e-4, rtol=2e-3)}


@st.composite
def attention_problems(draw, max_t=40):
    """Random q, k, v with awkward sizes: Tq != Tk, blocks that do not divide T, odd head dims."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    Tq, Tk = draw(st.integers(1, max_t)), draw(st.integers(1, max_t))
    D, Dv = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    gen = torch.Generator().manual_seed(draw(seeds))

    def make(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    q, k, v = make(*batch, Tq, D), make(*batch, Tk, D), make(*batch, Tk, Dv)
    grad_out = torch.randn(*batch, Tq, Dv, generator=gen, dtype=dtype)
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return q, k, v, grad_out, scale, draw(st.booleans())


def output_and_grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def assert_matches_sdpa(fn, q, k, v, grad_out, **sdpa_kwargs):
    ref_out, ref_grads = output_and_grads(lambda a, b, c: torch_sdpa(a, b, c, **sdpa_kwargs), q, k, v, grad_out)
    out, grads = output_and_grads(fn, q, k, v, grad_out)
    tol = TOL[q.dtype]
    torch.testing.assert_close(out, ref_out, **tol)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, ref_g, **tol, msg=lambda m: f"d{name}: {m}")


@given(attention_problems(), st.integers(1, 24))
def test_flash_equals_sdpa(problem, block_size):
    """flash_attention's output and dq, dk, dv equal SDPA's for any shape, block size (dividing T
    or not), Tq != Tk with top-left causal alignment, and custom scale."""
    q, k, v, grad_out, scale, causal = problem
    fn = lambda a, b, c: flash_attention(a, b, c, causal=causal, scale=scale, block_size=block_size)
    assert_matches_sdpa(fn, q, k, v, grad_out, is_causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_is_stable_when_scores_are_huge(causal):
    """Scores in the thousands overflow exp() unless every tile subtracts its running max (the
    first tile included): flash must stay finite and equal SDPA, which is stable."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 8, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(2, 37, 8, generator=gen, dtype=torch.float64)
    scale = 1e3  # |q . k| ~ 3, times 1e3: exp(3000) = inf even in float64
    fn = lambda a, b, c: flash_attention(a, b, c, causal=causal, scale=scale, block_size=8)
    out, grads = output_and_grads(fn, q, k, v, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_matches_sdpa(fn, q, k, v, grad_out, is_causal=causal, scale=scale)


@given(attention_problems())
def test_naive_equals_sdpa(problem):
    """naive_attention's output and gradients equal SDPA's, causal or not, any scale."""
    q, k, v, grad_out, scale, causal = problem
    fn = lambda a, b, c: naive_attention(a, b, c, causal=causal, scale=scale)
    assert_matches_sdpa(fn, q, k, v, grad_out, is_causal=causal, scale=scale)


@given(attention_problems(max_t=16), seeds, st.booleans(), st.booleans(), st.booleans())
def test_naive_with_mask_equals_sdpa(problem, mask_seed, additive, broadcast, combine_causal):
    """With a boolean (True = attend) or additive mask, broadcastable, even with fully masked rows
    (zeros, as SDPA returns) and combined with causal, naive_attention equals SDPA."""
    q, k, v, grad_out, scale, _ = problem
    Tq, Tk = q.size(-2), k.size(-2)
    gen = torch.Generator().manual_seed(mask_seed)
    shape = (Tq, Tk) if broadcast else (*q.shape[:-2], Tq, Tk)
    keep = torch.rand(shape, generator=gen) < 0.7
    keep[..., 0, :] = False  # one fully masked row, always
    if combine_causal:
        keep_total = keep & torch.ones(Tq, Tk, dtype=torch.bool).tril()
    else:
        keep_total = keep
    if additive:
        bias = torch.randn(shape, generator=gen, dtype=q.dtype)
        mask = bias.masked_fill(~keep, float("-inf"))
        ref_mask = bias.masked_fill(~keep_total, float("-inf"))
    else:
        mask, ref_mask = keep, keep_total
    fn = lambda a, b, c: naive_attention(a, b, c, causal=combine_causal, attn_mask=mask, scale=scale)
    assert_matches_sdpa(fn, q, k, v, grad_out, attn_mask=ref_mask, scale=scale)
    out = fn(q, k, v)
    assert torch.all(out[..., 0, :] == 0), "a fully masked row must give zeros"


@pytest.mark.parametrize("Tq, Tk", [(5, 0), (0, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_empty_sequences_give_zeros_like_sdpa(Tq, Tk, causal):
    """No keys at all (every row fully masked) or no queries: flash returns what SDPA returns."""
    q, k, v = torch.randn(2, Tq, 4), torch.randn(2, Tk, 4), torch.randn(2, Tk, 3)
    ref = torch_sdpa(q, k, v, is_causal=causal)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal, block_size=3), ref)


@pytest.mark.parametrize("Tq, Tk", [(5, 0), (0, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_empty_sequences_give_zeros_like_sdpa(Tq, Tk, causal):
    """No keys at all (every row fully masked) or no queries: naive returns what SDPA returns."""
    q, k, v = torch.randn(2, Tq, 4), torch.randn(2, Tk, 4), torch.randn(2, Tk, 3)
    ref = torch_sdpa(q, k, v, is_causal=causal)
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_reduced_precision_close_to_float32_sdpa(dtype):
    """bf16/fp16 inputs are computed in float32 inside flash: the result is the float32 SDPA
    output rounded to the input dtype (within one rounding step)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 16, generator=gen).to(dtype) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, block_size=8)
    assert out.dtype == dtype
    ref = torch_sdpa(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def run_recorded(fn, Tq, Tk, D, Dv, causal):
    q = torch.randn(2, Tq, D, requires_grad=True)
    k = torch.randn(2, Tk, D, requires_grad=True)
    v = torch.randn(2, Tk, Dv, requires_grad=True)
    recorder = ShapeRecorder()
    with recorder:
        out = fn(q, k, v, causal=causal)
        out.backward(torch.ones_like(out))
    return recorder.shapes


@pytest.mark.parametrize("causal", [False, True])
def test_flash_never_allocates_a_score_matrix(causal):
    """No op inside flash_attention (forward or backward) produces a tensor whose last two dims are
    (Tq, Tk). Tq=40, Tk=24, block 16: tiles are at most 16x16, so none can match by accident;
    the same recorder does catch naive_attention's matrix, so the check can fail."""
    Tq, Tk, D, Dv = 40, 24, 8, 12
    flash = lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, block_size=16)
    flash_shapes = run_recorded(flash, Tq, Tk, D, Dv, causal)
    assert len(flash_shapes) > 50  # the recorder saw the tile loop
    assert not [s for s in flash_shapes if s[-2:] == (Tq, Tk) or s[-2:] == (Tk, Tq)]
    biggest = max(math.prod(s[-2:]) for s in flash_shapes if len(s) >= 2)
    assert biggest <= max(Tq, Tk) * max(D, Dv, 16)  # O(T * block), never O(Tq * Tk)
    naive_shapes = run_recorded(naive_attention, Tq, Tk, D, Dv, causal)
    assert any(s[-2:] == (Tq, Tk) for s in naive_shapes)


@pytest.mark.parametrize("T, block", [(64, 16), (50, 16), (7, 3)])
def test_causal_skips_tiles_above_the_diagonal(T, block):
    """Causal flash visits only the key tiles at or left of the diagonal: n(n+1)/2 of n^2 tiles,
    while the non-causal pass visits all n^2."""
    n = math.ceil(T / block)
    q, k, v = (torch.randn(1, T, 8) for _ in range(3))
    for causal, expected in ((True, n * (n + 1) // 2), (False, n * n)):
        tiles = []
        out = flash_attention_traced(q, k, v, lambda *a: tiles.append(a[:4]), causal=causal, block_size=block)
        assert len(tiles) == expected
        torch.testing.assert_close(out, torch_sdpa(q, k, v, is_causal=causal))


def test_trace_reports_the_final_log_sum_exp():
    """After the last key tile, running max + log(running sum) is each row's log-sum-exp of the
    scaled scores: the only statistic flash saves for backward."""
    q, k, v = (torch.randn(1, 20, 4, dtype=torch.float64) for _ in range(3))
    last = {}

    def trace(q_start, q_end, k_start, k_end, m, l):
        last[q_start] = (m, l)

    flash_attention_traced(q, k, v, trace, block_size=8)
    lse = torch.cat([m + torch.log(l) for _, (m, l) in sorted(last.items())], dim=-1)
    ref = torch.logsumexp(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    torch.testing.assert_close(lse, ref)


def test_flash_bad_arguments_raise_value_error():
    """flash_attention: mismatched head dims, mismatched k/v lengths or a bad block size raise a
    ValueError naming the problem."""
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="last dim"):
        flash_attention(q, torch.randn(1, 5, 7), v)
    with pytest.raises(ValueError, match="Tk"):
        flash_attention(q, k, torch.randn(1, 6, 3))
    with pytest.raises(ValueError, match="block_size"):
        flash_attention(q, k, v, block_size=0)


def test_naive_bad_arguments_raise_value_error():
    """naive_attention: mismatched head dims or mismatched k/v lengths raise a ValueError naming
    the problem."""
    q, k, v = torch.randn(1, 4, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 3)
    with pytest.raises(ValueError, match="last dim"):
        naive_attention(q, torch.randn(1, 5, 7), v)
    with pytest.raises(ValueError, match="Tk"):
        naive_attention(q, k, torch.randn(1, 6, 3))


class MatmulCounter(TorchDispatchMode):
    """Counts batched matmuls (bmm, baddbmm): one group of them per visited tile."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "bmm" in func.__name__:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_causal_backward_skips_tiles_above_the_diagonal():
    """The backward pass, too, only visits the n(n+1)/2 tiles at or below the diagonal: it runs
    exactly that fraction of the non-causal pass's tile matmuls."""
    T, block = 50, 16
    n = math.ceil(T / block)
    counts = {}
    for causal in (False, True):
        q, k, v = (torch.randn(1, T, 8, requires_grad=True) for _ in range(3))
        out = flash_attention(q, k, v, causal=causal, block_size=block)
        counter = MatmulCounter()
        with counter:
            out.backward(torch.ones_like(out))
        counts[causal] = counter.count
    assert counts[False] % (n * n) == 0
    per_tile = counts[False] // (n * n)
    assert per_tile >= 4  # scores, dV, dP, dQ, dK
    assert counts[True] == per_tile * n * (n + 1) // 2
