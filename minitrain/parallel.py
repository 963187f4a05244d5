"""Parallel modes: how one optimizer step is shared between processes, chosen once at start-up.

What. The trainer's loop is the same whatever the parallelism; what differs is a handful of
decisions, and each mode is one small class that makes them:

    mode = choose_parallel_mode(cfg, rank, world)     # once, at start-up
    model = mode.prepare_model(model)                 # FSDP: keep 1/N of each unit's weights
    optimizer = mode.build_optimizer(groups, **adamw) # ZeRO-1/2: shard the optimizer state
    train_model = mode.wrap_model(model)              # DDP: average gradients in backward
    with mode.no_sync(): backward ...                 # every micro-batch but the last
    mode.after_backward(optimizer)                    # finish the gradient exchange
    norm = mode.clip(params, clip_norm)               # one clip path, sharded or not
    mode.mean(loss); mode.max(seconds)                # statistics every rank agrees on
    mode.state_dict(model, optimizer)                 # collectives included; rank 0 writes

| mode          | world | model                      | gradients after backward           |
|---------------|-------|----------------------------|------------------------------------|
| SingleProcess | 1     | as is                      | local                              |
| DataParallel  | >1    | `minitrain.ddp.DDP`        | averaged on every rank             |
| ZeroStage1    | >1    | DDP + ZeroOptimizer(1)     | averaged on every rank             |
| ZeroStage2    | >1    | as is + ZeroOptimizer(2)   | averaged, only at each owner       |
| FSDPMode      | >1    | `minitrain.fsdp.FSDP`      | this rank's shard, averaged        |

A new mode (FSDP, tensor or pipeline parallel) is a new class here plus one line in
`choose_parallel_mode`; the loop does not change.

Why one clip path. Clipping needs the norm of the WHOLE averaged gradient. When every rank holds
the whole gradient (single, DDP, ZeRO-1) that is `minitrain.clip.clip_grad_norm`. When each rank
holds a disjoint part (ZeRO-2 owners, FSDP shards) the squares add up across ranks:

    ||g||_p = (sum over ranks r of sum_i ||g_{r,i}||_p^p) ** (1/p)    (p = inf: max over ranks)
    every rank scales its part by the same c = min(1, max_norm / (||g|| + 1e-6))

`clip_grad_norm_sharded` does both (`sharded=False` calls `minitrain.clip.clip_grad_norm`).

When it helps: reading the loop once teaches every mode; a bug in one mode stays in its class.

Common bug: a rank that skips a collective its peers enter (e.g. `if rank == 0:
optimizer.state_dict()` with ZeRO, whose state_dict gathers from every rank) hangs the job.
Every method here is called by every rank, in the same order.
"""
import contextlib
import math

import torch
import torch.distributed as dist

from minitrain.clip import clip_grad_norm, grad_norm

__all__ = ["SingleProcess", "DataParallel", "ZeroStage1", "ZeroStage2",
           "choose_parallel_mode", "clip_grad_norm_sharded"]


@torch.no_grad()
def clip_grad_norm_sharded(parameters, max_norm, norm_type=2.0, *, sharded=True):
    """The norm of the whole gradient BEFORE clipping (0-dim tensor); scales `.grad` in place by
    min(1, max_norm / (norm + 1e-6)) unless max_norm is None (then it only measures).

    sharded=False: every rank holds the whole gradient -> `minitrain.clip.clip_grad_norm`.
    sharded=True: each rank holds a disjoint part; local sums of |g|^p (float64) are all-reduced
    (max for p = inf) before the root, so every rank gets the same norm and coefficient."""
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    if not sharded or not dist.is_initialized():
        if max_norm is None:
            return grad_norm(params, norm_type)
        return clip_grad_norm(params, max_norm, norm_type)
    per_tensor = [torch.linalg.vector_norm(p.grad, norm_type).double() for p in params]
    if norm_type == math.inf:
        zero = torch.zeros((), dtype=torch.float64)
        local = (torch.stack(per_tensor).max() if per_tensor else zero).reshape(1)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        total = local[0]
    else:
        local = sum((n ** norm_type for n in per_tensor), torch.zeros((), dtype=torch.float64))
        local = local.reshape(1)
        dist.all_reduce(local)  # sum over ranks of the local sums of |g|^p
        total = local[0] ** (1.0 / norm_type)
    if max_norm is not None:
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return total.float()


class SingleProcess:
    """One process: nothing to wrap, shard or exchange."""

    sharded_grads = False  # does each rank hold only a part of the gradient after backward?
    can_checkpoint = True

    def __init__(self, rank=0, world=1):
        self.rank, self.world = rank, world

    def prepare_model(self, model):
        """Before the optimizer is built (ZeRO-3 shards the parameters here)."""
        return model

    def build_optimizer(self, groups, optimizer_cls=torch.optim.AdamW, **kwargs):
        """The optimizer over `groups` (default AdamW; minitrain.large_batch.LAMB/LARS too)."""
        return optimizer_cls(groups, **kwargs)

    def wrap_model(self, model):
        """After torch.compile: what the loop calls for the forward (DDP wraps here)."""
        return model

    def no_sync(self):
        """Entered for every micro-batch but the last: gradients only accumulate locally."""
        return contextlib.nullcontext()

    def after_backward(self, optimizer):
        """After the last backward, before measuring the gradient: finish synchronising it."""

    def clip(self, params, clip_norm):
        """Norm of the whole averaged gradient before clipping (a float); clips in place."""
        return float(clip_grad_norm_sharded(params, clip_norm, sharded=self.sharded_grads))

    def mean(self, value):
        """The mean of `value` over ranks (float64 sum of value / world)."""
        return self._reduce(value / self.world, None)

    def max(self, value):
        return self._reduce(value, dist.ReduceOp.MAX if self.world > 1 else None)

    def gather(self, value):
        """[value of rank 0, value of rank 1, ...] on every rank (float64 all-gather)."""
        if self.world == 1:
            return [float(value)]
        t = torch.tensor([value], dtype=torch.float64)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [float(x[0]) for x in out]

    def _reduce(self, value, op):
        if self.world == 1:
            return float(value)
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t) if op is None else dist.all_reduce(t, op=op)
        return float(t[0])

    def state_dict(self, model, optimizer):
        """{"model": ..., "optimizer": ...} as plain tensors; a collective for ZeRO."""
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, model, optimizer, state):
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])


class DataParallel(SingleProcess):
    """Every rank holds the whole model; `minitrain.ddp.DDP` averages the gradients."""

    def __init__(self, rank, world):
        super().__init__(rank, world)
        self.ddp = None

    def wrap_model(self, model):
        from minitrain.ddp import DDP
        self.ddp = DDP(model)  # broadcasts rank 0's weights: every replica starts equal
        return self.ddp

    def no_sync(self):
        return self.ddp.no_sync()

    def after_backward(self, optimizer):
        self.ddp.finish_gradient_synchronization()  # every rank now holds the average


class ZeroStage1(DataParallel):
    """DDP gradients; each rank keeps and steps the optimizer state of the parameters it owns."""

    def build_optimizer(self, groups, optimizer_cls=torch.optim.AdamW, **kwargs):
        from minitrain.zero import ZeroOptimizer  # whole parameters per owner: layer-wise
        return ZeroOptimizer(groups, optimizer_cls, stage=1, **kwargs)  # LAMB/LARS stay exact


class ZeroStage2(SingleProcess):
    """No DDP: after backward each gradient is summed at its owner only (ZeroOptimizer stage 2)."""

    sharded_grads = True

    def __init__(self, rank, world, *, fp16=False):
        super().__init__(rank, world)
        self.fp16 = fp16

    def build_optimizer(self, groups, optimizer_cls=torch.optim.AdamW, **kwargs):
        from minitrain.zero import ZeroOptimizer
        return ZeroOptimizer(groups, optimizer_cls, stage=2, **kwargs)

    def after_backward(self, optimizer):
        optimizer.reduce_gradients()  # owners hold the averaged gradient, others none
        if self.fp16:  # each GradScaler sees only its owned gradients: agree on inf/nan
            from minitrain.fsdp import agree_on_found_inf
            agree_on_found_inf(optimizer)


def choose_parallel_mode(cfg, rank, world):
    """The mode for a TrainConfig under `world` processes: one line per mode."""
    if world == 1:
        return SingleProcess(rank, world)
    from minitrain.fsdp import FSDPMode  # minitrain.fsdp imports this module: import it here
    modes = {0: DataParallel, 1: ZeroStage1,
             2: lambda rank, world: ZeroStage2(rank, world, fp16=cfg.precision == "fp16"),
             3: lambda rank, world: FSDPMode(rank, world, precision=cfg.precision)}
    return modes[cfg.zero_stage](rank, world)
