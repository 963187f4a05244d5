"""ZeRO: remove the redundant copies that plain data parallelism keeps on every rank.

What: with plain DDP every one of N ranks holds the full parameters (P bytes), full gradients
(G bytes) and the full optimizer state (S bytes; AdamW keeps exp_avg and exp_avg_sq = 2 floats
per parameter, so S = 2P in fp32). Only the per-rank DATA differs. ZeRO shards the copies:
    stage 1: optimizer state      per rank: P + G + S/N
    stage 2: + gradients          per rank: P + G/N + S/N
    stage 3: + parameters         per rank: (P + G + S)/N   (+ one gathered unit at a time)
- Stage 1 (`ZeroOptimizer(..., stage=1)`): parameters are partitioned over ranks (sorted-greedy:
  largest first, each to the least-loaded rank). Each rank's inner optimizer holds state only
  for the parameters it owns and steps only those; then every parameter is broadcast from its
  owner. Gradients must already be averaged (e.g. by DDP).
- Stage 2 (`stage=2`, no DDP): each gradient is summed only at its owner (`dist.reduce`, the
  reduce-scatter of the gradient set by ownership), divided by N there, and freed everywhere
  else. Here the reduction runs in `step()`, after backward, so the full gradient still exists
  during backward; production ZeRO-2 reduces each bucket from a backward hook to cut that peak.
- Stage 3 is `minitrain.fsdp.FSDP` (lesson 18): each unit's parameters are flattened and cut
  into N shards; a rank keeps only its shard. Before a unit's forward the shards are
  all-gathered, after it the full weights are freed; backward gathers them again (the
  activations were saved, nothing is recomputed) and reduce-scatters the weight gradient back
  into shard gradients. This module keeps its memory accounting (`predicted_bytes`, stage 3).
Clipping a sharded gradient needs the norm over all ranks: `minitrain.parallel.
clip_grad_norm_sharded` (the one clip path of the trainer) sums the local squares over ranks.
Every stage does the same arithmetic as the unsharded optimizer: AdamW is elementwise, so the
owner's update of a parameter is exactly what every rank would have computed.

Communication: stage 1 and 2 send about what DDP sends (reduce + broadcast = all-reduce);
stage 3 (FSDP) adds one all-gather of the parameters per forward and per backward (1.5x DDP).

`memory_report(...)` predicts the per-rank bytes from the formulas above and measures them from
the tensors actually alive on this rank.

Common bug: giving stage 1 gradients that were NOT averaged across ranks - each owner then
steps with its own local gradient and the ranks silently train different models.
"""

import torch
import torch.distributed as dist


def partition_parameters(sizes, world_size):
    """Owner rank of each parameter: sorted-greedy (largest first -> least-loaded rank)."""
    owners, loads = [0] * len(sizes), [0] * world_size
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += sizes[i]
    return owners


class ZeroOptimizer(torch.optim.Optimizer):
    def __init__(self, params, optimizer_cls, *, stage=1, **defaults):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 is minitrain.fsdp.FSDP(model)), "
                             f"got {stage!r}")
        if not dist.is_initialized():
            raise ValueError("ZeroOptimizer needs torch.distributed initialised: launch with "
                             "torchrun --nproc_per_node N")
        super().__init__(params, defaults)
        self.optimizer_cls, self.stage = optimizer_cls, stage
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.owners = partition_parameters([p.numel() for p in self._params], self.world_size)
        owner_of = {id(p): r for p, r in zip(self._params, self.owners)}
        local_groups, self._group_index = [], []  # local group -> index in self.param_groups
        for gi, group in enumerate(self.param_groups):
            mine = [p for p in group["params"] if owner_of[id(p)] == self.rank]
            if mine:
                local_groups.append({**self._hyper(group), "params": mine})
                self._group_index.append(gi)
        self.local_optimizer = optimizer_cls(local_groups, **defaults) if local_groups else None
        self._reduced = False  # stage 2: gradients already reduced this step (to measure them)

    @staticmethod
    def _hyper(group):
        return {k: v for k, v in group.items() if k != "params"}

    def _sync_hyperparameters(self):  # an LR scheduler changes self.param_groups
        if self.local_optimizer is not None:
            for local, gi in zip(self.local_optimizer.param_groups, self._group_index):
                local.update(self._hyper(self.param_groups[gi]))

    def reduce_gradients(self):
        """Stage 2: reduce now (e.g. to measure or clip the averaged gradient); step() then
        does not reduce again. Idempotent until the next step()."""
        if self.stage == 2 and not self._reduced:
            self._reduce_gradients_to_owners()

    def _reduce_gradients_to_owners(self):
        """Stage 2: sum each gradient at its owner only, average there, free it elsewhere."""
        self._reduced = True
        has_grad = torch.tensor([p.grad is not None for p in self._params], dtype=torch.int32)
        dist.all_reduce(has_grad)  # a param with no grad on ANY rank is skipped, like AdamW does
        works = []
        for p, owner, n in zip(self._params, self.owners, has_grad.tolist()):
            if n == 0:
                continue
            if p.grad is None:  # no grad here but some elsewhere: contribute zeros
                p.grad = torch.zeros_like(p)
            works.append((p, owner, dist.reduce(p.grad, dst=owner, async_op=True)))
        for p, owner, work in works:
            work.wait()
            if owner == self.rank:
                p.grad.div_(self.world_size)
            else:
                p.grad = None  # the point of stage 2: non-owners keep no gradient

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none=set_to_none)
        self._reduced = False  # new gradients (also after a step the GradScaler skipped)

    def owned_parameters(self):
        """The parameters whose gradient this rank holds after `reduce_gradients()`: all of them
        for stage 1 (DDP averaged them everywhere), the owned ones for stage 2. Measure and clip
        them with `minitrain.parallel.clip_grad_norm_sharded(..., sharded=(stage == 2))`."""
        return [p for p, o in zip(self._params, self.owners) if self.stage == 1 or o == self.rank]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        self._reduced = False
        self._sync_hyperparameters()
        if self.local_optimizer is not None:
            self.local_optimizer.step()  # only the parameters this rank owns
        works = [dist.broadcast(p.data, src=owner, async_op=True)  # owners share the result
                 for p, owner in zip(self._params, self.owners)]
        for work in works:
            work.wait()
        return loss

    def _full_group(self, gi):
        """Group gi with every hyperparameter optimizer_cls fills in (for a plain state dict)."""
        probe = self.optimizer_cls([torch.zeros(1, requires_grad=True)], **self.defaults)
        return {**self._hyper(probe.param_groups[0]), **self._hyper(self.param_groups[gi])}

    def state_dict(self):
        """The UNSHARDED state dict of `optimizer_cls` (loadable by it). A collective: every
        rank must call it (rank 0 then writes it)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        mine = {}
        if self.local_optimizer is not None:
            local = self.local_optimizer.state_dict()
            local_params = [p for g in self.local_optimizer.param_groups for p in g["params"]]
            mine = {index[id(local_params[k])]: v for k, v in local["state"].items()}
        shards = [None] * self.world_size
        dist.all_gather_object(shards, mine)
        state = {k: v for shard in shards for k, v in shard.items()}
        groups = [{**self._full_group(gi), "params": [index[id(p)] for p in g["params"]]}
                  for gi, g in enumerate(self.param_groups)]
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Load an unsharded state dict; each rank keeps the entries of the params it owns."""
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError("state_dict has a different number of param groups than this "
                             "optimizer; build the optimizer from the same parameter groups")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        if self.local_optimizer is None:
            return
        index = {id(p): i for i, p in enumerate(self._params)}
        local_params = [p for g in self.local_optimizer.param_groups for p in g["params"]]
        state = {k: state_dict["state"][index[id(p)]] for k, p in enumerate(local_params)
                 if index[id(p)] in state_dict["state"]}
        groups, k = [], 0
        for local, gi in zip(self.local_optimizer.param_groups, self._group_index):
            groups.append({**self._hyper(state_dict["param_groups"][gi]),
                           "params": list(range(k, k + len(local["params"])))})
            k += len(local["params"])
        self.local_optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- memory accounting ----------------------------------------------------------------------
def shard_model(model, *, units=None):
    """ZeRO stage 3: the model's parameters sharded over the ranks, each unit (by default every
    block of every nn.ModuleList, plus the root) all-gathered just before its forward and again
    before its backward, and freed after each. It is `minitrain.fsdp.FSDP(model, units=units)`:
    call the returned wrapper (not `model`), and call its `finish_gradient_synchronization()`
    after backward. Lesson 18 teaches it."""
    from minitrain.fsdp import FSDP  # lazy: minitrain.fsdp builds on minitrain.parallel

    return FSDP(model, units=units)


def predicted_bytes(num_params, world_size, stage, *, bytes_per_value=4, state_values=2):
    """Per-rank bytes of parameters, gradients, optimizer state (AdamW: 2 values/param)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    full = num_params * bytes_per_value
    return {"params": full / (world_size if stage >= 3 else 1),
            "grads": full / (world_size if stage >= 2 else 1),
            "optimizer_state": state_values * full / (world_size if stage >= 1 else 1)}


def measured_bytes(model, optimizer):
    """Bytes alive on this rank: parameters, their .grad, and the optimizer's state tensors."""
    params = list(model.parameters())  # dedups tied weights
    inner = getattr(optimizer, "local_optimizer", optimizer)
    state = 0
    if inner is not None:
        for s in inner.state.values():
            state += sum(v.numel() * v.element_size() for v in s.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)  # 'step' scalars skipped
    return {"params": sum(p.numel() * p.element_size() for p in params),
            "grads": sum(p.grad.numel() * p.grad.element_size() for p in params
                         if p.grad is not None),
            "optimizer_state": state}


def memory_report(model, optimizer, *, stage, num_params):
    """{"predicted": {...}, "measured": {...}} for this rank, after at least one step."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return {"predicted": predicted_bytes(num_params, world, stage),
            "measured": measured_bytes(model, optimizer)}

