"""The measuring helpers of lessons 23-25 (memory, precision, compile) measure what
they say: the activation meter counts exactly the tensors autograd keeps, the checkpointing
policies keep the gradients of storing, the overflow fixes equal the PyTorch built-ins, and the
compile counter agrees with dynamo's own."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.functional import layer_norm as torch_layer_norm
from torch.nn.functional import softmax as torch_softmax
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from tests.strategies import gpt_shapes, seeds
from tests.lesson_modules import load_lesson

L23 = load_lesson("23_memory_anatomy.py")
L24 = load_lesson("24_precision_in_depth.py")


def _sizes(shape):
    return dict(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                vocab_size=shape["vocab_size"], block_size=shape["seq_len"])


def _batch(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq_len"]), generator=g)
    return x, torch.roll(x, -1, dims=1)


def _graph_saved_bytes(loss, param_ptrs):
    """Independent count: walk the autograd graph from `loss` and sum the distinct storages of
    every `_saved_*` tensor of every node (what the graph itself says it keeps)."""
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            values = getattr(node, name)
            for v in values if isinstance(values, (tuple, list)) else (values,):
                if isinstance(v, torch.Tensor):
                    ptr = v.untyped_storage().data_ptr()
                    if ptr not in param_ptrs and v.untyped_storage().nbytes() > 0:
                        storages[ptr] = v.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


@pytest.mark.lesson23
@settings(max_examples=10)
@given(shape=gpt_shapes(), seed=seeds)
def test_activation_meter_counts_what_the_autograd_graph_saves(shape, seed):
    """For any tiny GPT, the meter's live bytes at the end of the forward equal the distinct
    storages found by walking the autograd graph's saved tensors, the peak of a step without
    checkpointing is that end-of-forward count, and everything is released after backward."""
    model = L23.build("none", seed=seed % 1000, sizes=_sizes(shape))
    x, y = _batch(shape, seed)
    with L23.ActivationMeter(model) as meter:
        loss = L23.lm_loss(model(x), y)
        at_end = meter.live
        walked = _graph_saved_bytes(loss, meter.param_ptrs)
        loss.backward()
    assert at_end == walked
    assert meter.peak == at_end
    assert meter.live == 0 and not meter.refs


@pytest.mark.lesson23
@settings(max_examples=6)
@given(shape=gpt_shapes(max_layer=3), seed=seeds,
       policy=st.sampled_from(["full", "attention only", "MLP only", "every other block"]))
def test_checkpointing_policies_keep_the_gradients_and_fewer_bytes(shape, seed, policy):
    """Every checkpointing policy gives the gradients of storing everything (up to float
    rounding), never keeps more activation bytes at its peak, and the lesson's wrapper with
    minitrain's checkpoint keeps exactly what torch.utils.checkpoint (reentrant) keeps."""
    x, y = _batch(shape, seed)
    peaks, grads = {}, {}
    for name in ("none", policy):
        model = L23.build(name, seed=seed % 1000, sizes=_sizes(shape))
        with L23.ActivationMeter(model) as meter:
            L23.lm_loss(model(x), y).backward()
        peaks[name] = meter.peak
        grads[name] = [p.grad for p in model.parameters()]
    for ours, ref in zip(grads[policy], grads["none"]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert peaks[policy] <= peaks["none"]

    if policy == "MLP only":  # the same wrapping with torch's checkpoint: same bytes kept
        model = L23.build("none", seed=seed % 1000, sizes=_sizes(shape))
        for block in model.transformer.h:
            inner = block.mlp
            block.mlp = TorchCheckpointed(inner)
        with L23.ActivationMeter(model) as meter:
            L23.lm_loss(model(x), y).backward()
        assert meter.peak == peaks[policy]


class TorchCheckpointed(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch_checkpoint(self.inner, x, use_reentrant=True)


@pytest.mark.lesson23
def test_full_checkpointing_peak_is_inputs_plus_one_recomputed_block():
    """With full checkpointing the peak exceeds the end-of-forward bytes: the backward
    recomputes a block while the other blocks' inputs are still kept (the meter must see it)."""
    # A small vocabulary, so the logits (freed first in backward) do not dominate the peak.
    model = L23.build("full", sizes=dict(n_layer=3, n_head=2, n_embd=32, block_size=8,
                                         vocab_size=8))
    x, y = _batch(dict(vocab_size=8, batch=2, seq_len=8), 0)
    with L23.ActivationMeter(model) as meter:
        loss = L23.lm_loss(model(x), y)
        at_end = meter.live
        loss.backward()
    assert meter.peak > at_end


@pytest.mark.lesson24
@settings(max_examples=20)
@given(scale=st.floats(1e-2, 1e4), seed=seeds)
def test_fixed_fp16_layer_norms_equal_torch_at_any_scale(scale, seed):
    """Computing a fp16 LayerNorm's statistics in fp32 (or calling the native kernel) matches
    torch's float64 layer_norm within fp16 rounding at every scale up to 1e4, where the
    hand-written fp16 version has long overflowed."""
    x = scale * torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    ref = torch_layer_norm(x.double(), (64,))
    for how in ("fp16, statistics in fp32", "fp16, native F.layer_norm"):
        out = L24.layer_norm_variant(x, how)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-2)


@pytest.mark.lesson24
def test_hand_written_fp16_layer_norm_overflows_past_sqrt_65504():
    """(x - mean)^2 > 65504 overflows fp16: a row holding +-300 gives var = inf and an output of
    all zeros (the bias), far from torch's layer_norm; the same row at +-100 is fine."""
    for value, broken in ((100.0, False), (300.0, True)):
        x = torch.tensor([[value, -value] * 32])  # mean 0, every |x - mean| = value
        ref = torch_layer_norm(x.double(), (64,))  # +-1
        out = L24.layer_norm_variant(x, "fp16, hand-written").double()
        assert torch.equal(out, torch.zeros_like(out)) is broken
        assert ((out - ref).abs().max() < 1e-2).item() is not broken


@pytest.mark.lesson24
@settings(max_examples=20)
@given(shift=st.floats(-100, 100), seed=seeds)
def test_max_subtracted_fp16_softmax_equals_torch(shift, seed):
    """Subtracting the row max before exp keeps a fp16 softmax finite and equal to torch's
    float64 softmax of the same fp16 logits within fp16 rounding, for logits anywhere in
    [-100, 100] (exp(x) alone overflows fp16 from x ~ 11.1)."""
    z = torch.randn(4, 32, generator=torch.Generator().manual_seed(seed)) + shift
    ref = torch_softmax(z.half().double(), dim=-1)  # of the fp16 logits: the algorithm's error
    out = L24.softmax_variant(z, "fp16, subtract the max first")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-3)
    if shift > 15:  # exp(15 - 4 sigma) > 65504: the naive version overflows
        assert not L24.softmax_variant(z, "fp16, exp(x) / sum exp(x)").isfinite().all()


@pytest.mark.lesson24
def test_dtype_recorder_sees_autocast_lower_matmuls_only():
    """Under CPU bf16 autocast the recorder logs the dtype each op really returned: a linear
    layer's addmm in bf16, a layer_norm fed fp32 in fp32 (CPU autocast has no rule for it), and
    bf16 + fp32 promoted to fp32 (the residual stream), whatever the inputs' dtypes were."""
    w, b = torch.randn(8, 16), torch.randn(8)
    x = torch.randn(4, 16)
    with L24.DtypeRecorder() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.linear(x, w, b)
        normed = F.layer_norm(x, (16,))
        residual = out + torch.zeros(4, 8)
    assert dict(rec.ops["forward"]["addmm"]) == {"bf16": 1} and out.dtype == torch.bfloat16
    assert dict(rec.ops["forward"]["native_layer_norm"]) == {"fp32": 1}
    assert normed.dtype == torch.float32
    assert dict(rec.ops["forward"]["add"]) == {"fp32": 1} and residual.dtype == torch.float32


@pytest.mark.lesson25
def test_compile_counter_agrees_with_dynamo():
    """The lesson's counting backend sees as many graphs as dynamo's own unique_graphs counter:
    static shapes recompile for every new sequence length, automatic dynamic only once."""
    from torch._dynamo.utils import counters

    l25 = load_lesson("25_compile_modes.py")
    l25.SEQ_LENS = (4, 8, 12)
    torch.manual_seed(0)
    gpt = l25.GPT(l25.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=12)).eval()
    for dynamic, expected in ((False, [1, 1, 1]), (None, [1, 1, 0])):
        counters.clear()
        with torch.no_grad():
            per_call = l25.count_compiles(gpt, dynamic)
        assert per_call == expected
        assert counters["stats"]["unique_graphs"] == sum(per_call)
