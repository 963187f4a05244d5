"""Activation checkpointing from scratch equals no checkpointing and torch.utils.checkpoint."""
import hypothesis.strategies as st
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from tests.implementation import under_test
from tests.strategies import seeds

checkpoint = under_test("minitrain.recompute", "checkpoint")

pytestmark = pytest.mark.model


def make_net(seed, width, dropout):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(width, 2 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * width, width)
    ).double()


def grads_with(mode, seed, width, dropout, input_requires_grad):
    """Loss, parameter grads, input grad and the next random number after one backward."""
    net = make_net(seed, width, dropout)
    x = torch.randn(3, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x.requires_grad_(input_requires_grad)
    torch.manual_seed(seed + 1)  # the dropout stream
    if mode == "none":
        y = net(x)
    elif mode == "minitrain":
        y = checkpoint(net, x)
    else:
        y = torch_checkpoint(net, x, use_reentrant=False)
    loss = (y**2).sum()
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    return loss.detach(), grads, x.grad, torch.rand(1)


@given(seeds, st.integers(1, 8), st.sampled_from([0.0, 0.3, 0.7]), st.booleans())
def test_gradients_equal_no_checkpoint_and_torch_checkpoint(seed, width, dropout, input_requires_grad):
    """Same loss, parameter and input gradients as running without checkpointing and as
    torch.utils.checkpoint(use_reentrant=False), also with dropout (the RNG state is replayed),
    and the global random stream afterwards is untouched by the recomputation."""
    runs = {m: grads_with(m, seed, width, dropout, input_requires_grad) for m in ("none", "minitrain", "torch")}
    ours = runs["minitrain"]
    for ref in (runs["none"], runs["torch"]):
        torch.testing.assert_close(ours[0], ref[0], atol=0, rtol=0)
        for g, ref_g in zip(ours[1], ref[1]):
            torch.testing.assert_close(g, ref_g, atol=1e-12, rtol=1e-10)
        if input_requires_grad:
            torch.testing.assert_close(ours[2], ref[2], atol=1e-12, rtol=1e-10)
        else:
            assert ours[2] is None
        assert torch.equal(ours[3], ref[3])


def test_parameters_get_gradients_even_when_no_input_requires_grad():
    """The reentrant pitfall: the input is a plain tensor, yet the parameters inside receive the
    same (non-zero) gradients as without checkpointing."""
    net = make_net(0, 4, 0.0)
    x = torch.randn(2, 4, dtype=torch.float64)
    checkpoint(net, x).sum().backward()
    ours = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net(x).sum().backward()
    for g, ref in zip(ours, (p.grad for p in net.parameters())):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, ref)


def test_only_the_inputs_are_saved_for_backward():
    """Checkpointing saves the input tensor only; without it autograd saves the hidden
    activations (here the (3, 64) hidden layer among them)."""
    net = make_net(0, 32, 0.0)
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum()
        return shapes

    plain = saved_shapes(lambda: net(x))
    ours = saved_shapes(lambda: checkpoint(net, x))
    assert (3, 64) in plain
    assert ours == [(3, 32)]


def test_multiple_outputs_non_tensor_args_and_no_grad_mode():
    """Tuple outputs and non-tensor arguments work; under no_grad it just calls the function."""
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, power):
        h = x @ w
        return h**power, h.sin()

    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    a, b = checkpoint(fn, x, 3)
    (a.sum() + b.sum()).backward()
    ours = (x.grad.clone(), w.grad.clone())
    x.grad, w.grad = None, None
    a, b = fn(x, 3)
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(ours, (x.grad, w.grad))
    with torch.no_grad():
        out = checkpoint(fn, x, 2)
    assert not out[0].requires_grad
    with pytest.raises(ValueError, match="callable"):
        checkpoint(None, x)
