"""Named Hypothesis strategies reused across the suite (the minitorch habit).

Each strategy makes awkward cases on purpose: sizes that do not divide a block or a world size,
empty and single-element tensors, non-contiguous views.
"""
import hypothesis.strategies as st
import torch

seeds = st.integers(min_value=0, max_value=2**31 - 1)
small_floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
positive_floats = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def shapes(draw, min_dims=1, max_dims=3, min_side=1, max_side=8):
    """A tensor shape, e.g. (3,), (5, 1, 7)."""
    n = draw(st.integers(min_dims, max_dims))
    return tuple(draw(st.integers(min_side, max_side)) for _ in range(n))


@st.composite
def tensors(draw, shape=None, dtype=torch.float64, scale=10.0, noncontiguous=None):
    """A seeded random tensor; sometimes a non-contiguous (transposed) view of the same values."""
    shape = shape if shape is not None else draw(shapes())
    gen = torch.Generator().manual_seed(draw(seeds))
    if noncontiguous is None:
        noncontiguous = draw(st.booleans())
    if noncontiguous and len(shape) >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return (torch.randn(*swapped, generator=gen, dtype=dtype) * scale).transpose(-1, -2)
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


@st.composite
def gpt_shapes(draw, max_layer=2, max_head=3, max_head_size=8, max_seq=9, max_batch=3):
    """A tiny GPT's sizes: dict(n_layer, n_head, n_embd, vocab_size, batch, seq_len); the
    vocab and context are often odd (not a multiple of anything), seq_len 1 included."""
    n_head = draw(st.integers(1, max_head))
    return dict(n_layer=draw(st.integers(1, max_layer)), n_head=n_head,
                n_embd=n_head * draw(st.integers(1, max_head_size)),
                vocab_size=draw(st.integers(2, 300)), batch=draw(st.integers(1, max_batch)),
                seq_len=draw(st.integers(1, max_seq)))
