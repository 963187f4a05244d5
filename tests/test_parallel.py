"""minitrain.parallel: the trainer's parallel modes and its one clip path.

- clip_grad_norm_sharded over gradient parts spread across ranks equals
  torch.nn.utils.clip_grad_norm_ on the whole gradient in one process (norm and clipped grads);
- micro-batch synchronisation is explicit: with accumulate_gradients(..., no_sync=ddp.no_sync)
  DDP all-reduces once per step (the last micro-batch), and the gradient equals the whole batch's;
- choose_parallel_mode picks one class per (world, zero_stage).
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import clip_grad_norm_ as torch_clip_grad_norm_

from minitrain import parallel
from minitrain.accumulate import accumulate_gradients
from minitrain.distributed_utils import launch
from tests.strategies import seeds

pytestmark = pytest.mark.trainer


def _grad_set(seed, n_tensors):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(int(torch.randint(1, 7, (1,), generator=gen)), generator=gen) * 3
            for _ in range(n_tensors)]


def _sharded_clip_cases(rank, world, cases):
    """Each case: the gradient tensors are dealt round-robin to the ranks (a rank may get none)."""
    out = []
    for seed, n_tensors, max_norm, norm_type in cases:
        grads = _grad_set(seed, n_tensors)
        mine = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads[rank::world]]
        for p, g in zip(mine, grads[rank::world]):
            p.grad = g.clone()
        norm = parallel.clip_grad_norm_sharded(mine, max_norm, norm_type, sharded=True)
        parts = [None] * world
        dist.all_gather_object(parts, [p.grad for p in mine])
        clipped = [None] * n_tensors  # put the parts back in the original order
        for r in range(world):
            for k, g in enumerate(parts[r]):
                clipped[r + k * world] = g
        out.append((float(norm), clipped))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_clip_equals_torch_clip_on_the_whole_gradient(world):
    """For gradients split over 2 or 3 ranks (some ranks holding nothing), the sharded norm
    and the clipped gradients equal torch's clip_grad_norm_ on all of them in one process,
    for p = 1, 2 and inf, clipping active or not."""
    cases = [(seed, n, max_norm, p) for seed, n, max_norm, p in
             [(0, 1, 0.5, 2.0), (1, 5, 1.0, 2.0), (2, 7, 100.0, 2.0), (3, 4, 0.3, 1.0),
              (4, 6, 0.2, math.inf), (5, 2, 1e3, math.inf)]]
    results = launch(_sharded_clip_cases, world, cases, timeout_s=60, preload=())
    for seed, n, max_norm, p in cases:
        ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grad_set(seed, n)]
        for q, g in zip(ref, _grad_set(seed, n)):
            q.grad = g.clone()
        expected = torch_clip_grad_norm_(ref, max_norm, norm_type=p)
        for rank_out in results:
            norm, clipped = rank_out[cases.index((seed, n, max_norm, p))]
            assert norm == pytest.approx(float(expected), rel=1e-6)
            for got, q in zip(clipped, ref):
                torch.testing.assert_close(got, q.grad, rtol=1e-6, atol=1e-7)


@settings(max_examples=15)
@given(seed=seeds, n_tensors=st.integers(1, 6), max_norm=st.floats(0.01, 50.0),
       norm_type=st.sampled_from([1.0, 2.0, 3.0, math.inf]), measure_only=st.booleans())
def test_unsharded_clip_path_equals_torch(seed, n_tensors, max_norm, norm_type, measure_only):
    """Without sharding (one process, or DDP/ZeRO-1 where every rank holds the whole gradient),
    clip_grad_norm_sharded returns torch's norm and clips like it; max_norm=None only measures."""
    grads = _grad_set(seed, n_tensors)
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, q, g in zip(ours, ref, grads):
        p.grad, q.grad = g.clone(), g.clone()
    norm = parallel.clip_grad_norm_sharded(ours, None if measure_only else max_norm, norm_type,
                                           sharded=False)
    expected = torch_clip_grad_norm_(ref, math.inf if measure_only else max_norm,
                                     norm_type=norm_type)  # max_norm=inf never clips
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def _count_ddp_all_reduces(rank, world, n_micro, use_no_sync):
    from minitrain import ddp as ddp_module

    calls = []
    real = ddp_module.dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    single = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    single.load_state_dict(base.state_dict())
    model = ddp_module.DDP(base, bucket_cap_mb=25.0)  # one bucket: one all-reduce per sync
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(2 * world, 4, generator=gen) for _ in range(n_micro)]
    ys = [torch.randint(0, 3, (2 * world,), generator=gen) for _ in range(n_micro)]
    micro = [(x[2 * rank:2 * rank + 2], y[2 * rank:2 * rank + 2]) for x, y in zip(xs, ys)]
    ddp_module.dist.all_reduce = counting
    try:
        accumulate_gradients(model, micro, F.cross_entropy,
                             no_sync=model.no_sync if use_no_sync else None)
        model.finish_gradient_synchronization()
    except RuntimeError as err:  # without no_sync DDP refuses a second unsynchronised backward
        return {"error": str(err)}
    finally:
        ddp_module.dist.all_reduce = real
    accumulate_gradients(single, list(zip(xs, ys)), F.cross_entropy)  # the whole batch
    diff = max((p.grad - q.grad).abs().max().item()
               for p, q in zip(base.parameters(), single.parameters()))
    return {"all_reduces": len(calls), "diff": diff}


@pytest.mark.distributed
def test_no_sync_is_entered_for_all_but_the_last_micro_batch():
    """2 ranks, 3 micro-batches through accumulate_gradients(..., no_sync=ddp.no_sync): DDP
    all-reduces exactly once (its one bucket, after the last backward) and every rank holds the
    whole global batch's gradient. Without no_sync the second backward is refused."""
    with_sync = launch(_count_ddp_all_reduces, 2, 3, True, timeout_s=60, preload=())
    for r in with_sync:
        assert r["all_reduces"] == 1, r
        assert r["diff"] < 1e-6, r
    without = launch(_count_ddp_all_reduces, 2, 3, False, timeout_s=60, preload=())
    assert all("no_sync" in r.get("error", "") for r in without), without


def test_choose_parallel_mode_one_class_per_setting():
    """World 1 is SingleProcess whatever the stage; under torchrun zero_stage picks the class.
    Only ZeRO-2 and FSDP (stage 3) hold sharded gradients; every mode can checkpoint (FSDP
    saves the full state dict)."""
    from minitrain.fsdp import FSDPMode

    expected = {0: parallel.DataParallel, 1: parallel.ZeroStage1, 2: parallel.ZeroStage2,
                3: FSDPMode}
    cfg = SimpleNamespace(zero_stage=0, precision="fp32")
    assert type(parallel.choose_parallel_mode(cfg, 0, 1)) is parallel.SingleProcess
    for stage, cls in expected.items():
        mode = parallel.choose_parallel_mode(SimpleNamespace(zero_stage=stage, precision="bf16"),
                                             1, 2)
        assert type(mode) is cls and (mode.rank, mode.world) == (1, 2)
        assert mode.sharded_grads == (stage >= 2) and mode.can_checkpoint
