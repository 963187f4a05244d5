"""Distributed experiments shared by lessons 13-14, the animations and bench_distributed.py.

What: launch targets for `minitrain.distributed_utils.launch` that run one experiment per rank:
- `train_with_stage(rank, world, stage)`: the tiny GPT trained a few AdamW steps with ZeRO
  `stage` (0 = DDP + AdamW, 1, 2, 3) on this rank's slice of a seeded batch; returns the rank's
  memory report (`minitrain.zero.memory_report`) and the all-reduced last loss;
- `compare_ddp_modes(rank, world)`: every DDP variant in `VARIANTS` (minitrain's naive /
  overlapped / bucketed, torch's DistributedDataParallel) from the same weights: the largest
  parameter difference to torch's DDP, the all-reduce calls of one step, and step times measured
  round-robin (fair on a noisy machine).

Why here and not in `minitrain/`: these are experiment drivers (set up a model, loop, time,
count), not techniques. The techniques they exercise -- `minitrain.ddp.DDP`,
`minitrain.zero.ZeroOptimizer`, `minitrain.fsdp.FSDP` (stage 3) -- stay short and teach only the
algorithm.

    from minitrain.distributed_utils import launch
    from benchmarks.experiments import train_with_stage
    reports = launch(train_with_stage, 2, 1)   # ZeRO-1 on 2 gloo ranks

Common bug: timing DDP variants one after the other (all of A, then all of B): the machine's load
drifts between them. Round-robin (A, B, A, B, ...) with a barrier before each step spreads the
drift over every variant.
"""
import copy
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as TorchDDP

from minitrain.data import rank_rows
from minitrain.ddp import DDP
from minitrain.fsdp import FSDP
from minitrain.model import GPT, GPTConfig
from minitrain.zero import ZeroOptimizer, memory_report


def train_with_stage(rank, world, stage, *, n_layer=2, n_embd=32, steps=2, seed=0, batch=2,
                     seq_len=32, lr=1e-3):
    """Train the tiny GPT `steps` AdamW steps with ZeRO `stage` (0 = DDP + AdamW, 1-2 =
    ZeroOptimizer, 3 = FSDP + AdamW over the shards) on this rank's
    slice of a seeded batch; return this rank's memory report and the last loss (all-reduced).
    Run it under `minitrain.distributed_utils.launch`."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=n_layer, n_head=2,
                          n_embd=n_embd))
    num_params = sum(p.numel() for p in model.parameters())
    sync = None
    if stage in (0, 1):
        model = DDP(model)
        sync = model.finish_gradient_synchronization
    if stage == 3:  # ZeRO-3: every rank keeps 1/N of each weight (minitrain.fsdp.FSDP)
        model = FSDP(model)
        sync = model.finish_gradient_synchronization
    inner = model.module if stage in (0, 1, 3) else model  # stage 3: its parameters are shards
    opt = (ZeroOptimizer(inner.parameters(), torch.optim.AdamW, stage=stage, lr=lr)
           if stage in (1, 2) else torch.optim.AdamW(inner.parameters(), lr=lr))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 256, (world * batch, seq_len + 1), generator=gen)
        mine = rank_rows(idx, rank, batch)  # (batch, seq_len + 1)
        opt.zero_grad()
        loss = model(mine[:, :-1], mine[:, 1:])[1]
        loss.backward()
        if sync is not None:
            sync()
        opt.step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return {"stage": stage, "rank": rank, "loss": loss.item() / world,
            **memory_report(inner, opt, stage=stage, num_params=num_params),
            "num_params": num_params}


VARIANTS = {  # label -> DDP keyword arguments (None = torch's DistributedDataParallel)
    "naive": dict(mode="naive", overlap=False),
    "overlap": dict(mode="overlap", overlap=True),
    "bucketed": dict(mode="bucketed", overlap=True),
    "bucketed_no_overlap": dict(mode="bucketed", overlap=False),
    "torch_ddp": None,
}


def compare_ddp_modes(rank, world, *, variants=tuple(VARIANTS), n_layer=2, n_head=2, n_embd=32,
                      batch=4, seq_len=64, check_steps=3, warmup=2, iters=10, seed=0,
                      bucket_cap_mb=25.0):
    """Run under `distributed_utils.launch`: for each variant, train the tiny GPT `check_steps`
    AdamW steps from the same weights (max |param - torch DDP's|), count the all-reduce calls of
    one step, then time steps round-robin over the variants (fair under a noisy machine).
    Returns {label: {"max_diff", "all_reduces_per_step", "times_s"}} for this rank."""
    torch.manual_seed(seed)
    base = GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd))
    calls = {"n": 0}
    original_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return original_all_reduce(*args, **kwargs)

    gen = torch.Generator().manual_seed(seed + 1)
    data = torch.randint(0, 256, (check_steps + 1, world * batch, seq_len + 1), generator=gen)
    runs = {}
    for label in ("torch_ddp",) + tuple(v for v in variants if v != "torch_ddp"):
        kwargs = VARIANTS[label]
        model = (TorchDDP(copy.deepcopy(base)) if kwargs is None
                 else DDP(copy.deepcopy(base), bucket_cap_mb=bucket_cap_mb, **kwargs))
        sync = getattr(model, "finish_gradient_synchronization", lambda: None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(i, model=model, sync=sync, opt=opt):
            mine = rank_rows(data[i % len(data)], rank, batch)  # (batch, seq_len + 1)
            opt.zero_grad(set_to_none=True)
            model(mine[:, :-1], mine[:, 1:])[1].backward()
            sync()
            opt.step()

        for i in range(check_steps):
            step(i)
        dist.all_reduce = counting_all_reduce
        calls["n"] = 0
        step(check_steps)
        dist.all_reduce = original_all_reduce
        inner = model.module
        runs[label] = {"step": step, "params": [p.detach().clone() for p in inner.parameters()],
                       "all_reduces_per_step": calls["n"], "times_s": []}
    ref = runs["torch_ddp"]["params"]
    for run in runs.values():
        run["max_diff"] = max((a - b).abs().max().item() for a, b in zip(run["params"], ref))
    for i in range(warmup + iters):
        for run in runs.values():
            dist.barrier()
            t0 = time.perf_counter()
            run["step"](i)
            if i >= warmup:
                run["times_s"].append(time.perf_counter() - t0)
    return {label: {k: run[k] for k in ("max_diff", "all_reduces_per_step", "times_s")}
            for label, run in runs.items() if label in variants}
