"""The tiny GPT: every variant is the same function, GPT-2 init, validation, generation."""
import itertools
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from minitrain.model import GPT, ExactGELU, GPTConfig, TanhGELU
from tests.strategies import seeds

pytestmark = pytest.mark.model

SMALL = dict(vocab_size=256, block_size=96, n_layer=2, n_head=4, n_embd=32)
VARIANTS = list(itertools.product(["sdpa", "naive", "flash"], [True, False]))


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**SMALL, **overrides}))


def random_tokens(seed, B, T, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_do_not_depend_on_the_variant():
    """Parameter names and shapes are the same for every attention x native_layers variant."""
    reference = {k: v.shape for k, v in small_model().state_dict().items()}
    for attention, native in VARIANTS:
        sd = small_model(attention=attention, native_layers=native).state_dict()
        assert {k: v.shape for k, v in sd.items()} == reference


@settings(max_examples=4)
@given(seeds, st.sampled_from(["tanh", "exact"]))
def test_all_variants_compute_the_same_function(seed, gelu):
    """One state_dict loaded into sdpa/naive/flash x native/from-scratch layers gives the same
    logits, loss and gradients (T=80 > flash's 64 block, so flash really tiles), for either
    GELU form."""
    base = small_model(seed)
    idx, targets = random_tokens(seed, 2, 80), random_tokens(seed + 1, 2, 80)
    results = []
    for attention, native in VARIANTS:
        model = small_model(attention=attention, native_layers=native, gelu=gelu)
        model.load_state_dict(base.state_dict())
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    ref_logits, ref_loss, ref_grads = results[0]
    for logits, loss, grads in results[1:]:
        torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(loss, ref_loss, atol=2e-5, rtol=1e-5)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-3)


@given(seeds, st.floats(0.1, 20.0))
def test_from_scratch_gelus_equal_torch_gelu(seed, spread):
    """ExactGELU = F.gelu (erf), TanhGELU = F.gelu(approximate="tanh"), values and gradients."""
    x = (torch.randn(64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
         * spread).requires_grad_()
    for ours, kind in ((ExactGELU(), "none"), (TanhGELU(), "tanh")):
        y, ref = ours(x), F.gelu(x, approximate=kind)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0],
                                   torch.autograd.grad(ref.sum(), x)[0])


def test_the_two_gelu_forms_are_different_functions_close_together():
    """gelu="exact" really switches the activation: same weights, logits differ, but by little
    (the two GELUs are at most ~5e-4 apart)."""
    idx = random_tokens(0, 2, 40)
    tanh_logits, _ = small_model(gelu="tanh")(idx)
    exact_logits, _ = small_model(gelu="exact")(idx)  # same seed: the same weights
    gap = (tanh_logits - exact_logits).abs().max().item()
    assert 0 < gap < 1e-2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_loss_is_near_ln_vocab(seed):
    """GPT-2 init gives nearly uniform predictions: loss on random targets ~= ln(256) = 5.545."""
    model = small_model(seed)
    _, loss = model(random_tokens(seed, 4, 64), random_tokens(seed + 100, 4, 64))
    assert abs(loss.item() - math.log(256)) < 0.15


def test_gpt2_initialization_and_weight_tying():
    """Weights ~ N(0, 0.02), residual projections N(0, 0.02/sqrt(2 n_layer)), biases zero, and the
    lm head IS the token embedding (one tensor, counted once by num_params)."""
    model = small_model(n_layer=4, n_embd=64, n_head=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 0.002
    c_proj = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert all(b.attn.c_attn.bias.abs().max() == 0 for b in model.transformer.h)
    n_listed = sum(p.numel() for p in model.state_dict().values())
    assert model.num_params() < n_listed  # the state_dict lists the tied matrix twice


@pytest.mark.parametrize("cfg", [dict(), dict(n_layer=3, n_embd=48, n_head=3, block_size=40),
                                 dict(vocab_size=97, n_layer=1, n_embd=16, n_head=2)])
def test_num_params_equals_the_gpt2_formula(cfg):
    """num_params counts what the architecture has, by a formula written independently of the
    code: V*C (wte, tied with the head, counted once) + block_size*C (wpe) + n_layer *
    (12 C^2 + 13 C) (two LayerNorms 2C each, qkv 3C^2+3C, proj C^2+C, MLP 4C^2+4C and 4C^2+C)
    + 2C (final LayerNorm); non_embedding leaves out wpe."""
    config = {**SMALL, **cfg}
    V, Tb, L, C = (config[k] for k in ("vocab_size", "block_size", "n_layer", "n_embd"))
    expected = V * C + Tb * C + L * (12 * C * C + 13 * C) + 2 * C
    model = small_model(**cfg)
    assert model.num_params() == expected
    assert model.num_params(non_embedding=True) == expected - Tb * C


def test_ignore_index_targets_do_not_count():
    """Targets equal to -100 are left out of the mean loss (cross_entropy ignore_index)."""
    model = small_model()
    idx, targets = random_tokens(0, 2, 16), random_tokens(1, 2, 16)
    masked = targets.clone()
    masked[:, 8:] = -100
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 256), targets[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert model(idx)[1] is None


def test_bad_config_and_inputs_raise_value_error():
    """Invalid configs and a sequence longer than block_size fail with a ValueError naming it."""
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attention"):
        GPTConfig(attention="linear")
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="gelu"):
        GPTConfig(gelu="relu")
    with pytest.raises(ValueError, match="block_size"):
        small_model(block_size=8)(random_tokens(0, 1, 9))
    model = small_model()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(random_tokens(0, 1, 3), 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(random_tokens(0, 1, 3), 2, top_k=0)


def test_generate_shape_crop_and_determinism():
    """generate appends exactly max_new_tokens valid ids, crops context beyond block_size, is
    reproducible under the same seed, and with top_k=1 it is greedy decoding."""
    model = small_model(block_size=8).eval()
    prompt = random_tokens(0, 2, 5)
    torch.manual_seed(3)
    a = model.generate(prompt, 12, temperature=0.8, top_k=10)
    torch.manual_seed(3)
    b = model.generate(prompt, 12, temperature=0.8, top_k=10)
    assert a.shape == (2, 17) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    assert a.min() >= 0 and a.max() < 256
    greedy = model.generate(prompt, 4, top_k=1)
    idx = prompt
    for _ in range(4):
        idx = torch.cat([idx, model(idx[:, -8:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, idx)


@pytest.mark.parametrize("attention", ["sdpa", "flash"])
def test_activation_checkpointing_gives_equal_gradients(attention):
    """With dropout on, a model that recomputes every Block in backward gets exactly the loss and
    gradients of the same model storing all activations (same seed)."""
    grads = []
    for recompute in (False, True):
        model = small_model(dropout=0.1, attention=attention, activation_checkpointing=recompute)
        model.train()
        torch.manual_seed(7)
        _, loss = model(random_tokens(0, 2, 32), random_tokens(1, 2, 32))
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)
