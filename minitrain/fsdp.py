"""FSDP (ZeRO-3) from first principles: every rank keeps 1/N of each weight, and gathers a
unit's full weights only while that unit computes.

What: the model is cut into units (by default each transformer block, plus the root for the
embeddings, final norm and head). Each trainable parameter is flattened, zero-padded to a
multiple of N and cut into N equal pieces; rank r keeps piece r, and between steps the
parameter's `.data` IS that flat 1-D shard (FSDP2 keeps a dim-0 DTensor shard; the idea is the
same). The optimizer only ever sees shards, so "a plain AdamW over fsdp.parameters()" updates
1/N of every weight on each rank, and its state is 1/N too. One unit's lifecycle per step:
    forward:   all-gather shards -> full weights -> run the unit -> free the full weights
    backward:  all-gather again  -> the unit's backward -> reduce-scatter the weight gradient
               -> free the full weights (and the full gradient)
    the reduce-scatter leaves on rank r the SUM over ranks of piece r of the gradient; / N
    gives this rank's shard of the rank-averaged gradient (data parallelism, like DDP).

What is saved for backward: for y = x @ W.T autograd needs x (for dW = dy.T @ x) and W (for
dx = dy @ W). x is an activation, kept as usual (no recomputation: that is activation
checkpointing, a different trade). W would keep the gathered weights alive from forward to
backward, exactly the memory FSDP exists to save. So while the model runs, a
`saved_tensors_hooks` pack hook replaces every saved tensor that lives in a unit's gathered
buffer by a small tag (which unit, size, stride, offset); the unpack hook in backward
re-gathers that unit once and rebuilds the tensor from the tag. What survives the forward is
the weights' INPUTS (activations), never the weights.

Prefetch: the first step records the order in which units run forward and backward; later
steps start the NEXT unit's all-gather (async_op=True) as soon as the current one starts, so
the network works while the CPU computes. The reduce-scatter is async too (at most one in
flight); `finish_gradient_synchronization()` waits for the last one and also averages the
replicated parameters (those in no unit) with one all-reduce.

Mixed precision (`compute_dtype`): each shard is cast BEFORE the all-gather (half the bytes on
the wire) and the unit computes in that dtype; gradients are cast to `reduce_dtype` for the
reduce-scatter; the shards (master weights), their .grad and the optimizer state stay fp32.

Formula, per rank, with P parameters of b bytes, AdamW (2 state values), N ranks, and the
largest block U_max (b_c bytes per gathered value: the compute dtype's):
    params + grads + state = (b*P + b*P + 2*b*P) / N    (+ each shard's zero padding)
    + gathered weights <= b_c * (root + 2 * U_max)       (the current block + the next one
                                                          prefetched; the root stays gathered)
Communication per step: all-gather (forward) + all-gather (backward) + reduce-scatter, each
moving (N-1)/N * P values per rank; DDP's ring all-reduce is a reduce-scatter + an all-gather,
2 (N-1)/N * P. FSDP sends 3 (N-1)/N * P = 1.5x DDP: the price of not storing the weights is
gathering them twice.

`reshard_after_forward=False` (FSDP2's flag of the same name) keeps each unit's gathered weights
from its forward to its backward: no second all-gather (1x DDP's bytes), full weights alive
during the step; parameters, gradients and optimizer state stay sharded (ZeRO-2-like).
`trace=[]` records (time.perf_counter(), unit index, event) for every gather / free /
reduce-scatter (the animation `fsdp_lifecycle.py` draws one real step from it).

When it helps: the model (+ grads + AdamW state, 16 bytes/param in fp32) does not fit on one
device, but one unit's full weights and the activations do.

Common bug: letting autograd save the gathered weight (e.g. calling `fsdp.module(x)` directly
with grad on, so the pack hook is not installed): it trains correctly but the full weights of
every unit stay alive until backward, and the memory saving silently disappears. Here that call
raises; call the FSDP wrapper.
"""
import math
import time

import torch
import torch.distributed as dist

from minitrain.parallel import SingleProcess


class _Tag:
    """What the pack hook saves instead of a tensor living in a unit's gathered weights."""

    def __init__(self, unit, t):
        self.unit, self.size, self.stride = unit, t.size(), t.stride()
        self.offset = t.storage_offset()


class _GatherWeights(torch.autograd.Function):
    """forward: hand out the unit's full weights (gathered by the unit beforehand);
    backward: receive their gradients and reduce-scatter them (the shards' .grad is written when
    the async reduce-scatter completes, so autograd gets None for the shards)."""

    @staticmethod
    def forward(ctx, unit, *shards):
        ctx.unit = unit
        ctx.set_materialize_grads(False)  # an unused weight's gradient stays None
        return unit.full_views(unit.fsdp._take_gathered(unit, "forward"))

    @staticmethod
    def backward(ctx, *grads):
        ctx.unit.fsdp._reduce_scatter(ctx.unit, grads)
        return (None,) * (1 + len(grads))


class _Unit:
    """One unit's sharded parameters: shapes, shard layout (N, K) and where each param lives."""

    def __init__(self, fsdp, index, module, params, locations):
        self.fsdp, self.index, self.module, self.params = fsdp, index, module, params
        n = fsdp.world_size
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.ks = [math.ceil(m / n) for m in self.numels]  # shard length of each param
        self.offs = [sum(self.ks[:i]) for i in range(len(params))]  # offset in a rank's row
        self.K = sum(self.ks)  # one rank's row: its shards of every param, back to back
        self.locations = locations  # per param: [(submodule, attribute name), ...] (tied: 2+)
        self.flat_shard = torch.zeros(self.K, dtype=params[0].dtype,  # (K,) fp32 master shard
                                      device=params[0].device)
        r = fsdp.rank
        with torch.no_grad():
            for p, k, off in zip(params, self.ks, self.offs):
                full = torch.zeros(k * n, dtype=p.dtype, device=p.device)  # (N*k,) padded
                full[:p.numel()] = p.detach().reshape(-1)
                self.flat_shard[off:off + k] = full[r * k:(r + 1) * k]
                p.data = self.flat_shard[off:off + k]  # the param IS its shard: (k,) view
        self.full, self.work = {}, {}  # phase -> gathered (sum numel,) buffer / pending handle

    def full_views(self, flat):
        outs, o = [], 0
        for shape, m in zip(self.shapes, self.numels):
            outs.append(flat[o:o + m].view(shape))
            o += m
        return tuple(outs)

    def swap_in(self, tensors):
        for locs, t in zip(self.locations, tensors):
            for mod, name in locs:
                mod._parameters[name] = t  # a plain tensor here: module.weight is the full one

    def swap_out(self):
        for locs, p in zip(self.locations, self.params):
            for mod, name in locs:
                mod._parameters[name] = p


class FSDP(torch.nn.Module):
    """FSDP(module, *, units=None, compute_dtype=None, reduce_dtype=torch.float32, prefetch=True,
    reshard_after_forward=True, group=None, trace=None); `.module` is the wrapped model, whose
    trainable parameters keep their names and become flat 1-D shards (see the module doc)."""

    def __init__(self, module, *, units=None, compute_dtype=None, reduce_dtype=torch.float32,
                 prefetch=True, reshard_after_forward=True, group=None, trace=None):
        super().__init__()
        for name, dt in (("compute_dtype", compute_dtype), ("reduce_dtype", reduce_dtype)):
            if (dt is not None or name == "reduce_dtype") and not (
                    isinstance(dt, torch.dtype) and dt.is_floating_point):
                raise ValueError(f"{name} must be a floating torch.dtype (e.g. torch.bfloat16)"
                                 f"{' or None' if name == 'compute_dtype' else ''}, got {dt!r}")
        if not dist.is_initialized():
            raise ValueError("FSDP needs torch.distributed initialised: launch with torchrun "
                             "--nproc_per_node N (or minitrain.distributed_utils.launch)")
        self.module, self.group = module, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.compute_dtype, self.reduce_dtype, self.prefetch = compute_dtype, reduce_dtype, prefetch
        self.reshard_after_forward = reshard_after_forward  # False: ZeRO-2-like, no 2nd gather
        self.trace = trace  # None, or a list receiving (time.perf_counter(), unit index, event)
        self.stats = dict(all_gather_bytes=0, reduce_scatter_bytes=0, all_reduce_bytes=0,
                          gathered_bytes=0, peak_gathered_bytes=0)
        with torch.no_grad():  # every rank shards the same weights
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=dist.get_global_rank(group, 0) if group else 0,
                               group=group)
        if units is None:
            units = [m for lst in module.modules() if isinstance(lst, torch.nn.ModuleList)
                     for m in lst] + [module]
        inside = {id(m) for m in module.modules()}
        locations = {}  # id(param) -> [(submodule, name)] over every place it is registered
        for mod in module.modules():
            for name, p in mod._parameters.items():
                if p is not None:
                    locations.setdefault(id(p), []).append((mod, name))
        plan, claimed = [], set()  # check every unit first: a refused list changes nothing
        for u in units:
            if id(u) not in inside:
                raise ValueError("units must be submodules of the wrapped module (or the module "
                                 f"itself); got a {type(u).__name__} that is not inside it")
            mine = [p for p in u.parameters() if id(p) not in claimed and p.requires_grad
                    and p.numel() > 0]  # frozen params stay replicated, never communicated
            sub = {id(m) for m in u.modules()}
            for p in mine:
                if any(id(mod) not in sub for mod, _ in locations[id(p)]):
                    raise ValueError(f"a parameter of unit {type(u).__name__} is also used "
                                     "outside it (tied weights across units): list a unit that "
                                     "contains every module using it (e.g. the root)")
            claimed.update(id(p) for p in mine)
            if mine:
                plan.append((u, mine))
        self.units = []
        for u, mine in plan:
            unit = _Unit(self, len(self.units), u, mine, [locations[id(p)] for p in mine])
            u.register_forward_pre_hook(lambda m, a, unit=unit: self._pre_forward(unit, a))
            u.register_forward_hook(lambda m, a, o, unit=unit: self._post_forward(unit))
            self.units.append(unit)
        self.replicated = [p for p in module.parameters() if id(p) not in claimed
                           and p.requires_grad]  # gradients averaged by all-reduce
        self._order = {"forward": [], "backward": []}  # recorded in the first step
        self._seen = {"forward": set(), "backward": set()}
        self._live = {}  # storage data_ptr -> unit, for the pack hook
        self._pending = None  # the reduce-scatter in flight: (unit, work, out, send buffer)
        self._inside_forward = False

    # ---- the step -------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        self._seen["forward"], self._seen["backward"] = set(), set()
        self._inside_forward = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return self.module(*args, **kwargs)
        finally:
            self._inside_forward = False

    def _event(self, unit, what):
        if self.trace is not None:
            self.trace.append((time.perf_counter(), unit.index, what))

    def _pre_forward(self, unit, args):
        if torch.is_grad_enabled() and not self._inside_forward:
            raise ValueError("call the FSDP wrapper (fsdp(x)), not fsdp.module(x), when "
                             "training: otherwise the gathered weights are saved for backward")
        self._note_order(unit, "forward")
        fulls = _GatherWeights.apply(unit, *unit.params)
        unit.swap_in(fulls if isinstance(fulls, tuple) else (fulls,))
        self._prefetch_after(unit, "forward")
        if self.compute_dtype is not None:  # inputs in the weights' dtype (FSDP2 does the same)
            return tuple(a.to(self.compute_dtype) if torch.is_tensor(a) and a.is_floating_point()
                         else a for a in args)
        return None

    def _post_forward(self, unit):
        unit.swap_out()
        if not self.reshard_after_forward and torch.is_grad_enabled():
            unit.full["backward"] = unit.full.pop("forward")  # kept: backward needs no gather
            self._event(unit, "kept for backward")
            return
        self._free(unit, "forward")
        self._event(unit, "free (forward)")

    def _note_order(self, unit, phase):
        if unit.index not in self._seen[phase]:
            self._seen[phase].add(unit.index)
            if len(self._order[phase]) < len(self.units) and unit not in self._order[phase]:
                self._order[phase].append(unit)

    def _prefetch_after(self, unit, phase):
        order = self._order[phase]
        if self.prefetch and unit in order and order.index(unit) + 1 < len(order):
            nxt = order[order.index(unit) + 1]
            if phase not in nxt.full and phase not in nxt.work:
                self._start_gather(nxt, phase)

    # ---- all-gather -----------------------------------------------------------------------
    def _start_gather(self, unit, phase):
        self._event(unit, f"all-gather start ({phase})")
        if unit.params[0].data_ptr() != unit.flat_shard.data_ptr():
            raise ValueError("a sharded parameter's .data was replaced (model.to() or a plain "
                             "load_state_dict after wrapping?): move the model before FSDP(...) "
                             "and load weights with load_full_state_dict")
        send = unit.flat_shard.detach()
        if self.compute_dtype is not None:
            send = send.to(self.compute_dtype)  # cast BEFORE the wire: fewer bytes
        gathered = send.new_empty(self.world_size * unit.K)  # (N*K,)
        work = dist.all_gather_single(gathered, send, group=self.group, async_op=True)
        unit.work[phase] = (work, gathered, send)
        self._count_gathered(gathered.numel() * gathered.element_size())
        self.stats["all_gather_bytes"] += gathered.numel() * gathered.element_size() * (
            self.world_size - 1) // self.world_size

    def _take_gathered(self, unit, phase):
        """The unit's full weights for `phase`, as one flat (sum numel,) buffer."""
        if phase in unit.full:
            return unit.full[phase]
        if phase not in unit.work:
            self._start_gather(unit, phase)
        work, gathered, _ = unit.work.pop(phase)
        work.wait()
        rows = gathered.view(self.world_size, unit.K)  # (N, K): row r = rank r's shards
        flat = torch.cat([rows[:, off:off + k].reshape(-1)[:m]  # copy out: (numel,) each
                          for off, k, m in zip(unit.offs, unit.ks, unit.numels)])
        unit.full[phase] = flat
        self._live[flat.untyped_storage().data_ptr()] = unit
        self._count_gathered(flat.numel() * flat.element_size())  # the (N, K) rows die here:
        self._count_gathered(-gathered.numel() * gathered.element_size())
        self._event(unit, f"gathered ({phase})")
        return flat

    def _count_gathered(self, nbytes):
        self.stats["gathered_bytes"] += nbytes
        self.stats["peak_gathered_bytes"] = max(self.stats["peak_gathered_bytes"],
                                                self.stats["gathered_bytes"])

    def _free(self, unit, phase):
        flat = unit.full.pop(phase, None)
        if flat is not None:
            self._live.pop(flat.untyped_storage().data_ptr(), None)
            self.stats["gathered_bytes"] -= flat.numel() * flat.element_size()

    # ---- saved tensors: weights become tags, re-gathered in backward ------------------------
    def _pack(self, t):
        try:
            unit = self._live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            return t
        if unit is None or t.untyped_storage().nbytes() == 0:
            return t
        return _Tag(unit, t)

    def _unpack(self, saved):
        if not isinstance(saved, _Tag):
            return saved
        unit = saved.unit
        if "backward" not in unit.full:
            self._note_order(unit, "backward")
            self._take_gathered(unit, "backward")
            self._prefetch_after(unit, "backward")
        return unit.full["backward"].as_strided(saved.size, saved.stride, saved.offset)

    # ---- reduce-scatter -------------------------------------------------------------------
    def _reduce_scatter(self, unit, grads):
        """Gradients of the unit's full weights -> async reduce-scatter of an (N, K + m) buffer:
        row r holds rank r's pieces; the m extra columns count the ranks that had a gradient."""
        self._event(unit, "reduce-scatter start")
        self._free(unit, "backward")
        n, m = self.world_size, len(unit.params)
        buf = unit.flat_shard.new_zeros(n, unit.K + m, dtype=self.reduce_dtype)  # (N, K + m)
        for i, (g, off, k) in enumerate(zip(grads, unit.offs, unit.ks)):
            if g is None:
                continue
            flat = buf.new_zeros(n * k)
            flat[:g.numel()] = g.reshape(-1)  # cast to reduce_dtype here
            buf[:, off:off + k] = flat.view(n, k)
            buf[:, unit.K + i] = 1.0
        out = buf.new_empty(unit.K + m)
        work = dist.reduce_scatter_single(out, buf.view(-1), group=self.group, async_op=True)
        self.stats["reduce_scatter_bytes"] += buf.numel() * buf.element_size() * (n - 1) // n
        self._wait_reduce_scatter()  # at most one in flight: bounded memory
        self._pending = (unit, work, out, buf)

    def _wait_reduce_scatter(self):
        if self._pending is None:
            return
        unit, work, out, _ = self._pending
        self._pending = None
        work.wait()
        counts = out[unit.K:]
        grad = out[:unit.K].to(unit.flat_shard.dtype).div_(self.world_size)  # (K,) average
        for p, off, k, c in zip(unit.params, unit.offs, unit.ks, counts.tolist()):
            if c == 0:
                continue  # no rank produced a gradient: .grad stays None, like one process
            if p.grad is None:
                p.grad = grad[off:off + k]
            else:
                p.grad.add_(grad[off:off + k])  # accumulation over micro-batches
        self._event(unit, "reduce-scatter done, shard .grad written")

    @torch.no_grad()
    def finish_gradient_synchronization(self):
        """After backward, before optimizer.step(): the last reduce-scatter lands and the
        replicated parameters' gradients are averaged (one all-reduce, with a has-grad count)."""
        self._wait_reduce_scatter()
        for unit in self.units:
            for phase in list(unit.work):
                work, gathered, _ = unit.work.pop(phase)
                work.wait()  # a prefetch nobody used (the graph changed)
                self._count_gathered(-gathered.numel() * gathered.element_size())
            for phase in list(unit.full):
                self._free(unit, phase)
        if self.replicated:
            dev = self.replicated[0].device
            flat = torch.cat([torch.zeros(p.numel(), device=dev) if p.grad is None else
                              p.grad.reshape(-1).float() for p in self.replicated]
                             + [torch.tensor([float(p.grad is not None) for p in self.replicated],
                                             device=dev)]).to(self.reduce_dtype)
            dist.all_reduce(flat, group=self.group)
            self.stats["all_reduce_bytes"] += (flat.numel() * flat.element_size()
                                               * 2 * (self.world_size - 1) // self.world_size)
            counts, o = flat[-len(self.replicated):].tolist(), 0
            for p, c in zip(self.replicated, counts):
                g = flat[o:o + p.numel()].view(p.shape).to(p.dtype).div_(self.world_size)
                o += p.numel()
                if c > 0:
                    p.grad = g

    # ---- full state dict ------------------------------------------------------------------
    def _sharded(self):
        return {id(p): (u, i) for u in self.units for i, p in enumerate(u.params)}

    @torch.no_grad()
    def full_state_dict(self):
        """A collective: every original parameter name (tied names included) -> full fp32."""
        fulls = {}
        for u in self.units:
            rows = u.flat_shard.new_empty(self.world_size * u.K)
            dist.all_gather_single(rows, u.flat_shard, group=self.group)
            rows = rows.view(self.world_size, u.K)  # (N, K)
            for p, off, k, m, shape in zip(u.params, u.offs, u.ks, u.numels, u.shapes):
                fulls[id(p)] = rows[:, off:off + k].reshape(-1)[:m].view(shape).clone()
        return {name: fulls.get(id(p), p.detach().clone()).float()
                for name, p in self.module.named_parameters(remove_duplicate=False)}

    def _my_piece(self, full, k):
        """This rank's (k,) piece of a full tensor, flattened and zero-padded to N*k."""
        padded = full.new_zeros(k * self.world_size)
        padded[:full.numel()] = full.reshape(-1)
        return padded[self.rank * k:(self.rank + 1) * k]

    def full_shape(self, param):
        """The shape a parameter had before sharding (its shard is 1-D)."""
        where = self._sharded().get(id(param))
        return param.shape if where is None else where[0].shapes[where[1]]

    @torch.no_grad()
    def load_full_state_dict(self, state_dict):
        """Inverse of full_state_dict (every rank passes the same full dict; no collective)."""
        sharded = self._sharded()
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if name not in state_dict:
                raise ValueError(f"state_dict has no {name!r}: pass full_state_dict()'s output")
            full = state_dict[name]
            if tuple(full.shape) != tuple(self.full_shape(p)):
                raise ValueError(f"{name}: shape {tuple(full.shape)} != "
                                 f"{tuple(self.full_shape(p))}: a checkpoint of another model?")
            if id(p) in sharded:
                u, i = sharded[id(p)]
                p.copy_(self._my_piece(full, u.ks[i]))
            else:
                p.copy_(full)

    @torch.no_grad()
    def full_optim_state_dict(self, optimizer):
        """optimizer.state_dict() with each shard-shaped state tensor (AdamW's exp_avg,
        exp_avg_sq) gathered to the parameter's full shape. A collective, like full_state_dict."""
        sd, sharded = optimizer.state_dict(), self._sharded()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, p in enumerate(params):  # the same order on every rank: the collectives match
            if i not in sd["state"]:
                continue
            state[i] = {k: v.clone() if torch.is_tensor(v) else v  # a snapshot: AdamW's
                        for k, v in sd["state"][i].items()}       # 'step' grows in place
            if id(p) not in sharded:
                continue
            u, j = sharded[id(p)]
            for key, v in state[i].items():
                if torch.is_tensor(v) and v.shape == p.shape:  # per-element state: gather it
                    full = v.new_empty(self.world_size * v.numel())
                    dist.all_gather_single(full, v.contiguous(), group=self.group)
                    state[i][key] = full[:u.numels[j]].view(u.shapes[j]).clone()
        return {"state": state, "param_groups": sd["param_groups"]}

    def load_full_optim_state_dict(self, optimizer, state_dict):
        """Inverse of full_optim_state_dict: each rank keeps its piece (no collective)."""
        sharded = self._sharded()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            where = sharded.get(id(p))
            state[i] = {k: self._my_piece(v, where[0].ks[where[1]])
                        if where and torch.is_tensor(v) and v.shape == self.full_shape(p) else v
                        for k, v in s.items()}
        optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})


# ---- the trainer's mode (minitrain.parallel): --zero-stage 3 -----------------------------------
@torch.no_grad()
def agree_on_found_inf(optimizer, *, group=None):
    """fp16 with sharded gradients (FSDP shards, ZeRO-2 owners): a GradScaler sees this rank's
    part only. If ANY rank has an inf/nan gradient, put an inf into this rank's gradients too,
    so every rank's scaler skips the step together (call after the gradient exchange, before
    scaler.unscale_). One tiny all-reduce."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    bad = torch.tensor([float(any(not torch.isfinite(g).all() for g in grads))],
                       device=grads[0].device if grads else None)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    if bad.item() > 0 and grads:
        grads[0].view(-1)[0] = float("inf")  # its step is dropped anyway



class FSDPMode(SingleProcess):
    """`--zero-stage 3`: the model wrapped in FSDP (compute dtype from --precision), every rank
    holding its shards only; checkpoints hold the FULL model and optimizer state (original
    names, loadable by a plain GPT), so a killed run resumes exactly."""

    sharded_grads = True  # default units: every trainable param is sharded, none replicated
    can_checkpoint = True

    def __init__(self, rank, world, *, precision="fp32"):
        super().__init__(rank, world)
        dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
        if precision not in dtypes:
            raise ValueError(f"precision must be one of {tuple(dtypes)}, got {precision!r}")
        self.compute_dtype = dtypes[precision]
        self.fp16 = precision == "fp16"
        self.fsdp = None

    def prepare_model(self, model):
        self.fsdp = FSDP(model, compute_dtype=self.compute_dtype)
        return self.fsdp

    def build_optimizer(self, groups, **adamw_kwargs):
        """train.param_groups splits decay / no-decay by p.dim(), but every shard is 1-D: split
        the same parameters again by their FULL shape (group 0 is the decay group)."""
        params = [p for g in groups for p in g["params"]]
        big = [len(self.fsdp.full_shape(p)) >= 2 for p in params]
        return torch.optim.AdamW(
            [{"params": [p for p, b in zip(params, big) if b],
              "weight_decay": groups[0]["weight_decay"]},
             {"params": [p for p, b in zip(params, big) if not b],
              "weight_decay": groups[-1]["weight_decay"]}],
            **adamw_kwargs)

    def after_backward(self, optimizer):
        self.fsdp.finish_gradient_synchronization()
        if self.fp16:
            self.agree_on_found_inf(optimizer)

    def agree_on_found_inf(self, optimizer):
        agree_on_found_inf(optimizer, group=self.fsdp.group)

    def state_dict(self, model, optimizer):
        return {"model": self.fsdp.full_state_dict(),
                "optimizer": self.fsdp.full_optim_state_dict(optimizer)}

    def load_state_dict(self, model, optimizer, state):
        self.fsdp.load_full_state_dict(state["model"])
        self.fsdp.load_full_optim_state_dict(optimizer, state["optimizer"])
