"""minitrain.accumulate: accumulated micro-batch gradients equal the full-batch gradient."""
import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from tests.implementation import under_test
from minitrain.grad_scaler import GradScaler
from strategies import seeds

accumulate_gradients = under_test("minitrain.accumulate", "accumulate_gradients")

pytestmark = pytest.mark.lesson06

VOCAB, SEQ = 11, 5


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> logits: enough nonlinearity that wrong weights show."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = torch.nn.Embedding(VOCAB, 8, dtype=torch.float64)
        self.fc = torch.nn.Linear(8, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, VOCAB, dtype=torch.float64)

    def forward(self, x):                                     # x: (B, T) -> (B, T, V)
        return self.head(torch.tanh(self.fc(self.emb(x))))


def lm_loss(logits, y):                                     # mean over targets != -100
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100)


@st.composite
def micro_batch_sets(draw):
    """1-4 micro-batches of unequal sizes (1-4 sequences), with a random share of -100 targets
    (sometimes a whole micro-batch ignored), at least one counted target overall."""
    gen = torch.Generator().manual_seed(draw(seeds))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    ignore_p = draw(st.sampled_from([0.0, 0.3, 0.7]))
    mbs = []
    for b in sizes:
        x = torch.randint(0, VOCAB, (b, SEQ), generator=gen)
        y = torch.randint(0, VOCAB, (b, SEQ), generator=gen)
        y[torch.rand(b, SEQ, generator=gen) < ignore_p] = -100
        mbs.append((x, y))
    if draw(st.booleans()) and len(mbs) > 1:
        mbs[0][1][:] = -100                                   # a micro-batch with nothing counted
    if all((y != -100).sum() == 0 for _, y in mbs):
        mbs[-1][1][0, 0] = 3
    return mbs


def full_batch_grads(model, mbs):
    model.zero_grad()
    x = torch.cat([x for x, _ in mbs])
    y = torch.cat([y for _, y in mbs])
    loss = lm_loss(model(x), y)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@given(micro_batch_sets(), seeds)
def test_accumulated_gradient_equals_full_batch_gradient(mbs, seed):
    """For unequal micro-batch sizes and unequal numbers of ignored (-100) targets, the
    accumulated .grad and the returned loss equal those of one backward on the concatenation."""
    model = TinyLM(seed % 1000)
    loss_full, grads_full = full_batch_grads(model, mbs)
    model.zero_grad()
    loss = accumulate_gradients(model, iter(mbs), lm_loss)     # any iterable, even one-shot
    assert loss == pytest.approx(loss_full, rel=1e-12)
    for p, g in zip(model.parameters(), grads_full):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


@given(micro_batch_sets(), seeds)
def test_accumulation_adds_to_existing_grads_and_scales_with_scaler(mbs, seed):
    """accumulate_gradients never zeroes: it adds to .grad; with a GradScaler the gradients are
    the full-batch gradients times the scale."""
    model = TinyLM(seed % 1000)
    _, grads_full = full_batch_grads(model, mbs)
    model.zero_grad()
    scaler = GradScaler(init_scale=1024.0)
    accumulate_gradients(model, mbs, lm_loss, scaler=scaler)
    accumulate_gradients(model, mbs, lm_loss)
    for p, g in zip(model.parameters(), grads_full):
        torch.testing.assert_close(p.grad, g * 1025.0, rtol=1e-10, atol=1e-12)


def test_dividing_by_accum_steps_is_wrong_for_unequal_micro_batches():
    """The common recipe loss_k / K gives a different gradient than the full batch when the
    micro-batches have different numbers of counted targets; the weighted version does not."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
    y = torch.randint(0, VOCAB, (4, SEQ), generator=gen)
    mbs = [(x[:3], y[:3]), (x[3:], y[3:])]                    # 15 vs 5 counted targets
    model = TinyLM(0)
    _, grads_full = full_batch_grads(model, mbs)
    model.zero_grad()
    for xb, yb in mbs:
        (lm_loss(model(xb), yb) / len(mbs)).backward()
    naive_err = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), grads_full))
    model.zero_grad()
    accumulate_gradients(model, mbs, lm_loss)
    err = max(float((p.grad - g).abs().max()) for p, g in zip(model.parameters(), grads_full))
    assert err < 1e-12 < 1e-4 < naive_err


def test_bad_inputs_raise_value_error():
    """No micro-batches, or no counted target at all, is a ValueError naming micro_batches."""
    model = TinyLM(0)
    with pytest.raises(ValueError, match="micro_batches"):
        accumulate_gradients(model, [], lm_loss)
    x = torch.zeros(1, SEQ, dtype=torch.long)
    with pytest.raises(ValueError, match="micro_batches"):
        accumulate_gradients(model, [(x, torch.full((1, SEQ), -100))], lm_loss)


@given(micro_batch_sets(), seeds)
def test_no_sync_wraps_every_micro_batch_but_the_last_counted_one(mbs, seed):
    """With no_sync=..., the context is entered once per counted micro-batch except the last
    counted one (that backward synchronises), forward and backward inside it; the gradient is
    unchanged by it."""
    model = TinyLM(seed)
    inside = []
    state = {"in": False}

    class Ctx:
        def __enter__(self):
            state["in"] = True
            inside.append(0)

        def __exit__(self, *exc):
            state["in"] = False
            return False

    def forward(x):
        if state["in"]:
            inside[-1] += 1  # forwards seen inside the context
        return model(x)

    counted = [k for k, (_, y) in enumerate(mbs) if int((y != -100).sum()) > 0]
    loss = accumulate_gradients(forward, mbs, lm_loss, no_sync=Ctx)
    assert inside == [1] * (len(counted) - 1)
    assert not state["in"]
    expected_loss, expected = full_batch_grads(TinyLM(seed), mbs)
    assert loss == pytest.approx(expected_loss, rel=1e-9, abs=1e-12)
    for p, g in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, g, rtol=1e-9, atol=1e-12)
