"""ZeRO stages 1-2 do the arithmetic of the unsharded optimizer, while each rank keeps only its
share of the optimizer state (1) and gradients (2); stage 3 is FSDP (tests/test_fsdp.py).

References: plain `torch.optim.AdamW` in one process on the whole batch, and
`torch.distributed.optim.ZeroRedundancyOptimizer`. One launch per world size runs every case.
"""
import copy

import hypothesis.strategies as st
import pytest
import torch
import torch._dynamo  # noqa: F401  torch's DDP/ZeRO import it lazily (seconds); ranks inherit it
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZeroRedundancyOptimizer
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_

from minitrain.distributed_utils import launch
from minitrain.parallel import clip_grad_norm_sharded
from minitrain.zero import measured_bytes, predicted_bytes
from tests.implementation import under_test

ZeroOptimizer, partition_parameters = under_test("minitrain.zero", "ZeroOptimizer",
                                                   "partition_parameters")

pytestmark = [pytest.mark.distributed, pytest.mark.lesson14]
STEPS, LOCAL_B, TOL, CLIP = 3, 4, 1e-5, 0.05


class Net(nn.Module):
    """Three Linear layers and a parameter that never gets a gradient (unused in forward)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.unused = nn.Parameter(torch.randn(5))  # .grad stays None

    def forward(self, x):  # x: (B, 6)
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))  # (B, 3)


def _groups(model, lr):
    """Two param groups with different hyperparameters (biases without weight decay)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") or n == "unused"]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "lr": lr * 0.5}]


def _batch(step, rank, world, seed, local=True):
    gen = torch.Generator().manual_seed(seed * 100 + step)
    x, y = torch.randn(world * LOCAL_B, 6, generator=gen), torch.randn(world * LOCAL_B, 3,
                                                                       generator=gen)
    return (x[rank * LOCAL_B:(rank + 1) * LOCAL_B], y[rank * LOCAL_B:(rank + 1) * LOCAL_B]) \
        if local else (x, y)


def _train(model, opt, rank, world, seed, *, local, average, clip=None):
    norms = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _batch(step, rank, world, seed, local=local)
        F.mse_loss(model(x), y).backward()
        if average:  # what DDP would do: average gradients across ranks
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
        if clip == "zero":
            opt.reduce_gradients()  # stage 2: each gradient summed at its owner first
            norms.append(clip_grad_norm_sharded(opt.owned_parameters(), CLIP,
                                                sharded=opt.stage == 2).item())
        elif clip == "torch":
            norms.append(torch_clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
    return norms


def _diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def _optimizer_cases(rank, world, seed, lr, wd):
    torch.manual_seed(seed)  # same start on every rank (stage 1/2 do not broadcast at start)
    base = Net()
    kw = dict(lr=lr, weight_decay=wd)
    single = copy.deepcopy(base)
    _train(single, torch.optim.AdamW(_groups(single, lr), **kw), rank, world, seed,
           local=False, average=False)
    theirs = copy.deepcopy(base)
    _train(theirs, TorchZeroRedundancyOptimizer(_groups(theirs, lr)[0]["params"] +
                                                _groups(theirs, lr)[1]["params"],
                                                optimizer_class=torch.optim.AdamW, **kw),
           rank, world, seed, local=True, average=True)
    theirs_single = copy.deepcopy(base)  # the same single-group set-up without ZeRO
    _train(theirs_single, torch.optim.AdamW(theirs_single.parameters(), **kw), rank, world, seed,
           local=False, average=False)
    out = {"torch_zero_vs_single": _diff(theirs, theirs_single)}
    for stage in (1, 2):
        ours = copy.deepcopy(base)
        opt = ZeroOptimizer(_groups(ours, lr), torch.optim.AdamW, stage=stage, **kw)
        _train(ours, opt, rank, world, seed, local=True, average=(stage == 1))
        flat = copy.deepcopy(base)
        flat_opt = ZeroOptimizer(flat.parameters(), torch.optim.AdamW, stage=stage, **kw)
        _train(flat, flat_opt, rank, world, seed, local=True, average=(stage == 1))
        sgd = copy.deepcopy(base)  # SGD is not scale-invariant like Adam: catches a missing 1/N
        _train(sgd, ZeroOptimizer(sgd.parameters(), torch.optim.SGD, stage=stage, lr=lr * 10,
                                  momentum=0.9), rank, world, seed, local=True, average=(stage == 1))
        sgd_single = copy.deepcopy(base)
        _train(sgd_single, torch.optim.SGD(sgd_single.parameters(), lr=lr * 10, momentum=0.9),
               rank, world, seed, local=False, average=False)
        clipped, clipped_single = copy.deepcopy(base), copy.deepcopy(base)
        norms = _train(clipped, ZeroOptimizer(clipped.parameters(), torch.optim.SGD, stage=stage,
                                              lr=lr * 10), rank, world, seed, local=True,
                       average=(stage == 1), clip="zero")
        norms_single = _train(clipped_single, torch.optim.SGD(clipped_single.parameters(),
                                                              lr=lr * 10), rank, world, seed,
                              local=False, average=False, clip="torch")
        sd = opt.state_dict()  # a collective: every rank calls it
        ref_opt = torch.optim.AdamW(_groups(copy.deepcopy(base), lr), **kw)
        ref_opt.load_state_dict(sd)  # the unsharded format loads into plain AdamW
        reloaded = ZeroOptimizer(_groups(copy.deepcopy(base), lr), torch.optim.AdamW,
                                 stage=stage, **kw)
        reloaded.load_state_dict(sd)
        out[stage] = {
            "vs_single": _diff(ours, single),
            "vs_torch_zero": _diff(flat, theirs),
            "sgd_vs_single": _diff(sgd, sgd_single),
            "clip_vs_single": _diff(clipped, clipped_single),
            "norms": (norms, norms_single),
            "unused_untouched": torch.equal(ours.unused, base.unused),
            "grads_kept": sum(p.grad is not None for p in ours.parameters()),
            "state_entries": len(sd["state"]),
            "reloaded_state_equal": all(
                torch.equal(a, b) for k, s in reloaded.state_dict()["state"].items()
                for a, b in zip(s.values(), sd["state"][k].values())),
            "opt_bytes": measured_bytes(ours, opt)["optimizer_state"],
        }
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_zero_stage1_and_stage2_equal_adamw_and_torch_zero(world):
    """Stage 1 (grads averaged first) and stage 2 (grads reduced to owners) give, after 3 AdamW
    steps with two param groups (and 3 SGD-momentum steps, also with clip_grad_norm_), the
    parameters of plain AdamW (SGD, torch's clip_grad_norm_ with the same norms) on the whole batch and of torch's
    ZeroRedundancyOptimizer; a parameter without .grad is left untouched; stage 2 keeps only owned
    gradients; the gathered state dict loads into AdamW and back; state bytes add up."""
    results = launch(_optimizer_cases, world, 7, 1e-2, 0.1, timeout_s=90)
    total_state = 2 * 4 * sum(p.numel() for p in Net().a.parameters()) + 2 * 4 * (
        sum(p.numel() for p in Net().b.parameters()) + sum(p.numel() for p in Net().c.parameters()))
    for rank, out in enumerate(results):
        assert out["torch_zero_vs_single"] < TOL
        for stage in (1, 2):
            r = out[stage]
            assert r["vs_single"] < TOL, (rank, stage, r)
            assert r["vs_torch_zero"] < TOL, (rank, stage, r)
            assert r["sgd_vs_single"] < TOL, (rank, stage, r)
            assert r["clip_vs_single"] < TOL, (rank, stage, r)
            assert max(abs(a - b) for a, b in zip(*r["norms"])) < 1e-5, r["norms"]
            assert max(r["norms"][1]) > CLIP  # the clip really acted
            assert r["unused_untouched"] and r["reloaded_state_equal"], (rank, stage, r)
            assert r["state_entries"] == 6  # every param with a gradient, none for `unused`
        assert out[2]["grads_kept"] < 6  # stage 2 freed the gradients this rank does not own
    for stage in (1, 2):  # the shards partition the state: bytes add up to the unsharded total
        assert sum(out[stage]["opt_bytes"] for out in results) == total_state


@settings(max_examples=2)
@given(seed=st.integers(0, 10_000), lr=st.sampled_from([1e-3, 3e-2]),
       wd=st.sampled_from([0.0, 0.1]))
def test_zero_equals_adamw_for_generated_hyperparameters(seed, lr, wd):
    """The stage 1/2 equalities hold for generated seeds, learning rates and weight decays."""
    for out in launch(_optimizer_cases, 2, seed, lr, wd, timeout_s=90):
        assert max(out[1]["vs_single"], out[2]["vs_single"]) < TOL


def _zero1_accounting(rank, world):
    """ZeRO-1 on the tiny GPT: this rank's optimizer state, measured and predicted."""
    from minitrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    n_params = sum(p.numel() for p in plain.parameters())
    zero1 = ZeroOptimizer(plain.parameters(), torch.optim.AdamW, stage=1, lr=1e-3)
    for p in plain.parameters():
        p.grad = torch.zeros_like(p)
    zero1.step()
    return {"n_params": n_params,
            "zero1_state": measured_bytes(plain, zero1)["optimizer_state"],
            "predicted1": predicted_bytes(n_params, world, 1)["optimizer_state"]}


@pytest.mark.parametrize("world", [2, 3])
def test_zero1_state_per_rank_is_about_total_over_n(world):
    """ZeRO-1 on the tiny GPT: each rank's AdamW state is within 10% of total/N (the sorted-greedy
    partition is not perfectly even) and the ranks' states add up to the whole (2 floats per
    parameter). Stage 3 (FSDP) is tested in tests/test_fsdp.py."""
    results = launch(_zero1_accounting, world, timeout_s=90)
    n = results[0]["n_params"]
    for rank, r in enumerate(results):
        assert abs(r["zero1_state"] - r["predicted1"]) <= 0.10 * r["predicted1"], (rank, r)
    assert sum(r["zero1_state"] for r in results) == 8 * n


def test_partition_is_sorted_greedy():
    """Largest first, each to the least-loaded rank (ties: lowest rank)."""
    assert partition_parameters([1, 10, 3, 7], 2) == [0, 0, 1, 1]
    assert partition_parameters([5, 5, 5], 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="stage"):
        predicted_bytes(10, 2, 4)


def test_zero_rejects_bad_stage():
    """stage must be 1 or 2 for ZeroOptimizer (stage 3 is minitrain.fsdp.FSDP); the error says
    so."""
    with pytest.raises(ValueError, match="fsdp"):
        ZeroOptimizer([nn.Parameter(torch.zeros(2))], torch.optim.AdamW, stage=3)


def _shard_model_step(rank, world):
    from minitrain.fsdp import FSDP
    from minitrain.model import GPT, GPTConfig
    from minitrain.zero import shard_model

    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=8, n_layer=2, n_head=2, n_embd=16))
    sharded = shard_model(copy.deepcopy(plain))
    x = torch.randint(0, 256, (2 * world, 8), generator=torch.Generator().manual_seed(1))
    mine = x[rank * 2:(rank + 1) * 2]
    _, loss = sharded(mine, mine)
    loss.backward()
    sharded.finish_gradient_synchronization()
    with torch.no_grad():
        _, full_loss = plain(x, x)
    gathered = sharded.full_state_dict()  # the parameters, gathered under their own names
    return (isinstance(sharded, FSDP), sorted(gathered) == sorted(plain.state_dict()),
            float(loss), float(full_loss))


def test_shard_model_is_fsdp_and_keeps_every_parameter_name():
    """zero.shard_model (ZeRO-3) is minitrain.fsdp.FSDP: the wrapper gathers into the original
    parameter names (full_state_dict has exactly the plain model's keys), and the two ranks'
    half-batch losses average to the whole batch's loss."""
    out = launch(_shard_model_step, 2, timeout_s=120, preload=())
    assert all(is_fsdp and same_names for is_fsdp, same_names, *_ in out)
    mean_half = sum(r[2] for r in out) / 2
    assert abs(mean_half - out[0][3]) < 1e-5, (mean_half, out[0][3])
