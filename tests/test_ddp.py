"""minitrain's DDP trains to the same parameters as torch's DistributedDataParallel and as one
process on the whole batch, in every mode and bucket size, with no_sync accumulation, ranks that
start from different random weights, a frozen parameter, a buffer and tied weights.

One launch per world size runs every case and returns the largest parameter differences.
"""
import copy

import hypothesis.strategies as st
import pytest
import torch
import torch._dynamo  # noqa: F401  torch DDP imports it lazily (seconds); forked ranks inherit it
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from tests.implementation import under_test
from minitrain.distributed_utils import launch

DDP = under_test("minitrain.ddp", "DDP")

pytestmark = [pytest.mark.distributed, pytest.mark.lesson13]
STEPS, ACCUM, LOCAL_B = 3, 2, 4
TOL = 1e-5


class TiedNet(nn.Module):
    """Linear layers, a frozen layer, a buffer used in forward, and one matrix used by two
    modules (tied weights)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.hidden = nn.Linear(8, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.mix_a = nn.Linear(8, 8, bias=False)
        self.mix_b = nn.Linear(8, 8, bias=False)
        self.mix_b.weight = self.mix_a.weight  # tied: one Parameter, two modules
        self.out = nn.Linear(8, 6)
        self.register_buffer("scale", torch.rand(1) + 0.5)  # differs per rank until broadcast

    def forward(self, x):  # x: (B, 6)
        h = torch.tanh(self.embed(x)) * self.scale  # (B, 8)
        h = torch.tanh(self.hidden(h)) + self.frozen(h)  # (B, 8)
        h = torch.tanh(self.mix_b(torch.tanh(self.mix_a(h))))  # (B, 8)
        return self.out(h)  # (B, 6)


def _data(step, micro, world, seed):
    """Global batch of one micro-step (world * LOCAL_B rows), the same on every rank."""
    gen = torch.Generator().manual_seed(seed * 1000 + step * 10 + micro)
    return torch.randn(world * LOCAL_B, 6, generator=gen), torch.randn(world * LOCAL_B, 6,
                                                                       generator=gen)


def _train(wrapped, sync_fn, rank, world, seed, local=True):
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(ACCUM):
            x, y = _data(step, micro, world, seed)
            if local:  # this rank's slice
                x, y = x[rank * LOCAL_B:(rank + 1) * LOCAL_B], y[rank * LOCAL_B:(rank + 1) * LOCAL_B]
            last = micro == ACCUM - 1
            ctx = wrapped.no_sync() if (not last and hasattr(wrapped, "no_sync")) else _nullctx()
            with ctx:
                (F.mse_loss(wrapped(x), y) / ACCUM).backward()
        sync_fn()
        opt.step()
    return wrapped


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _max_diff(a, b):
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))


def _ddp_cases(rank, world, cases, seed):
    torch.manual_seed(1234 + rank)  # every rank starts from DIFFERENT random weights
    base = TiedNet()
    torch_model = TorchDDP(copy.deepcopy(base))  # broadcasts rank 0's weights and buffers too
    _train(torch_model, lambda: None, rank, world, seed)
    out = []
    for mode, cap_mb, overlap in cases:
        ours = DDP(copy.deepcopy(base), bucket_cap_mb=cap_mb, overlap=overlap, mode=mode)
        single = copy.deepcopy(ours.module)  # rank 0's weights after the broadcast
        _train(ours, ours.finish_gradient_synchronization, rank, world, seed)
        _train(single, lambda: None, rank, world, seed, local=False)  # one process, whole batch
        frozen_same = torch.equal(ours.module.frozen.weight, torch_model.module.frozen.weight)
        out.append(((mode, cap_mb, overlap), _max_diff(ours.module, torch_model.module),
                    _max_diff(ours.module, single), frozen_same, len(ours._buckets),
                    ours.module.scale.item()))
    twice = []  # two synchronised backwards without finish_...(): a loud error, not a race
    for mode in ("bucketed", "overlap"):
        ours = DDP(copy.deepcopy(base), mode=mode)
        x, y = _data(0, 0, world, seed)
        F.mse_loss(ours(x), y).backward()
        try:
            F.mse_loss(ours(x), y).backward()
            twice.append("no error")
        except RuntimeError as e:
            twice.append(str(e))
        for _, work in ours._pending:  # the first backward's all-reduces are still in flight:
            work.wait()  # dropping them unwaited lets the process exit (or destroy its group)
        for bucket in ours._buckets:  # under a peer's collective -> SIGABRT under load
            if bucket.work is not None:
                bucket.work.wait()
        for p in ours.module.parameters():  # restore a consistent state, then drain the group
            p.grad = None
        ours._pending, ours._launched = [], set()
        ours.finish_gradient_synchronization()
    return out, twice


CASES = [("bucketed", 1e-9, True), ("bucketed", 0.0003, True), ("bucketed", 25.0, True),
         ("bucketed", 1e-9, False), ("bucketed", 25.0, False), ("overlap", 25.0, True),
         ("overlap", 25.0, False), ("naive", 25.0, False)]


def _check(results, world):
    n_trainable = 7  # embed w+b, hidden w+b, mix (tied, counted once), out w+b
    for rank, (records, twice) in enumerate(results):
        assert all("no_sync" in msg for msg in twice), twice
        for case, vs_torch, vs_single, frozen_same, n_buckets, scale in records:
            assert vs_torch < TOL, f"rank {rank} {case}: differs from torch DDP by {vs_torch}"
            assert vs_single < TOL, f"rank {rank} {case}: differs from one process by {vs_single}"
            assert frozen_same, f"rank {rank} {case}: frozen parameter not rank 0's"
            assert scale == results[0][0][0][5], "buffer not broadcast from rank 0"
            if case[0] == "bucketed" and case[1] < 1e-6:
                assert n_buckets == n_trainable, "a tiny cap must give one bucket per parameter"
            if case[0] == "bucketed" and case[1] == 25.0:
                assert n_buckets == 1, "a large cap must give one bucket"
            if case[0] == "bucketed" and case[1] == 0.0003:
                assert 1 < n_buckets < n_trainable


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_trains_like_torch_ddp_and_like_one_process(world):
    """In every mode (naive / overlap / bucketed; hooks on and off) and bucket size (one param per
    bucket .. one bucket), 3 SGD-momentum steps with 2-micro-batch no_sync accumulation from
    different per-rank initial weights give the parameters of torch DDP and of one process
    training on the whole batch; frozen weights and the buffer equal rank 0's; a second
    synchronised backward before finish_gradient_synchronization() raises, naming no_sync."""
    _check(launch(_ddp_cases, world, CASES, 0, timeout_s=90), world)


def _gpt_case(rank, world, cap_mb, seed):
    from minitrain.model import GPT, GPTConfig

    torch.manual_seed(seed + rank)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base = GPT(cfg)
    theirs, ours = TorchDDP(copy.deepcopy(base)), DDP(copy.deepcopy(base), bucket_cap_mb=cap_mb)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (world * 2, 16), generator=gen)
    mine = idx[rank * 2:(rank + 1) * 2]
    for model, sync in ((theirs, lambda: None), (ours, ours.finish_gradient_synchronization)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            model(mine[:, :-1], mine[:, 1:])[1].backward()
            sync()
            opt.step()
    return _max_diff(ours.module, theirs.module)


@settings(max_examples=2)
@given(cap_mb=st.sampled_from([1e-9, 0.01, 25.0]), seed=st.integers(0, 1000))
def test_ddp_on_tiny_gpt_with_tied_embedding_equals_torch_ddp(cap_mb, seed):
    """On the tiny GPT (tied token embedding / lm head) with AdamW, two steps of our DDP give the
    same parameters as torch DDP on 2 ranks, for a generated bucket cap and seed."""
    diffs = launch(_gpt_case, 2, cap_mb, seed, timeout_s=90)
    assert max(diffs) < 1e-5, diffs


def test_ddp_rejects_bad_arguments_with_a_named_fix():
    """A non-positive bucket cap, an unknown mode, or no process group give a ValueError that
    names the argument (or the launcher) to fix."""
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        DDP(nn.Linear(2, 2), bucket_cap_mb=0)
    with pytest.raises(ValueError, match="mode"):
        DDP(nn.Linear(2, 2), mode="ring")
    with pytest.raises(ValueError, match="torchrun"):
        DDP(nn.Linear(2, 2))
