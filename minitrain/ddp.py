"""Data-parallel training (DDP) in three steps: naive, overlapped, bucketed.

What: every rank holds a full copy of the model and gets a different slice of the batch. After
backward each rank has the gradient of ITS slice; averaging the gradients over ranks gives
exactly the gradient of the whole batch (the mean of means of equal-size slices):
    g = (1/N) * sum_r g_r        (then every rank takes the same optimizer step)
so N ranks train exactly like one process on an N-times bigger batch.

The three steps the lesson walks through (`mode=`):
1. "naive":    after backward, all-reduce every gradient, one at a time. Correct, but the network
               idles during backward and the CPU idles during communication, and every small
               tensor pays the fixed per-message latency.
2. "overlap":  launch an async all-reduce for a parameter the moment its gradient is complete,
               from `param.register_post_accumulate_grad_hook`. Backward of the earlier layers
               runs while the later layers' gradients travel. (The hook receives the PARAMETER,
               not the gradient: reduce `param.grad`, never `param` - the classic bug all-reduces
               the weights.)
3. "bucketed": as 2, but parameters are packed, in reverse registration order (roughly the order
               backward produces their gradients), into flat buckets of `bucket_cap_mb`; one async
               all-reduce per full bucket. Few large messages amortise the latency. A parameter
               larger than the cap gets a bucket of its own; a tiny cap gives one per parameter.
`DDP(module, bucket_cap_mb=25.0, overlap=True)` is step 3; `overlap=False` packs the same buckets
but all-reduces them only after backward, in `finish_gradient_synchronization()`.

Details that make it exact:
- every parameter (frozen ones too) and buffer is broadcast from rank 0 at construction, and
  buffers again before each forward (as torch's DDP does), so ranks start and stay identical;
- tied weights: a parameter shared by two modules appears once (`module.parameters()` dedups)
  and its hook fires once, after both uses have accumulated;
- frozen parameters (requires_grad=False) get no hook and are never communicated;
- `no_sync()`: gradient accumulation - inside it hooks do nothing, `.grad` just accumulates
  locally; the first backward outside it reduces the accumulated sum.
- collectives are launched in the same order on every rank (bucket 0, 1, ...): gloo and NCCL
  match messages by order, so a rank that launched bucket 1 before bucket 0 would corrupt both.

Common bug: forgetting `finish_gradient_synchronization()` (our explicit version of what torch's
DDP does inside backward) before `optimizer.step()`: each rank steps on its own gradient and the
replicas silently drift apart.
"""
import contextlib

import torch
import torch.distributed as dist

MODES = ("naive", "overlap", "bucketed")
_TWICE = ("a gradient arrived twice before synchronisation: call "
          "finish_gradient_synchronization() after every backward, or wrap the accumulation "
          "backwards in no_sync()")


class _Bucket:
    """A flat buffer holding several gradients so they travel as one message."""

    def __init__(self, params):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.offsets = []
        off = 0
        for p in params:
            self.offsets.append(off)
            off += p.numel()
        self.flat = None  # (numel,) allocated when the first gradient arrives
        self.ready = set()  # ids of params whose gradient is packed
        self.work = None  # the async all-reduce handle

    def pack(self, p, i):
        if self.flat is None:
            self.flat = torch.empty(self.numel, dtype=p.grad.dtype, device=p.grad.device)
        self.flat[self.offsets[i]:self.offsets[i] + p.numel()].copy_(p.grad.reshape(-1))
        self.ready.add(id(p))

    def unpack(self):
        for p, off in zip(self.params, self.offsets):
            p.grad.copy_(self.flat[off:off + p.numel()].view_as(p.grad))


class DDP(torch.nn.Module):
    def __init__(self, module, *, bucket_cap_mb=25.0, overlap=True, mode=None,
                 broadcast_buffers=True):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0 (MB per bucket), got {bucket_cap_mb!r}")
        mode = "bucketed" if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not dist.is_initialized():
            raise ValueError("DDP needs torch.distributed initialised: launch with torchrun "
                             "--nproc_per_node N (or minitrain.distributed_utils.launch)")
        self.module = module
        self.mode, self.overlap, self.broadcast_buffers = mode, overlap, broadcast_buffers
        self.world_size = dist.get_world_size()
        self._sync = True
        with torch.no_grad():  # every rank starts from rank 0's weights and buffers
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)
        # Reverse registration order: backward produces the last layer's gradients first.
        self._params = [p for p in module.parameters() if p.requires_grad][::-1]
        self._pending = []  # "overlap": (param, work) pairs launched by hooks
        self._launched = set()  # "overlap": ids of params whose all-reduce is in flight
        cap_bytes = bucket_cap_mb * 1024 * 1024
        self._buckets, self._where = [], {}  # id(param) -> (bucket index, position in bucket)
        current, size = [], 0
        for p in self._params:  # pack greedily; a parameter over the cap gets its own bucket
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > cap_bytes:
                self._buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self._buckets.append(_Bucket(current))
        for b, bucket in enumerate(self._buckets):
            for i, p in enumerate(bucket.params):
                self._where[id(p)] = (b, i)
        self._next_bucket = 0  # buckets are launched strictly in order on every rank
        self._hooks = []
        if overlap and mode != "naive" and self.world_size > 1:
            hook = self._overlap_hook if mode == "overlap" else self._bucket_hook
            self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self._params]

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self.world_size > 1:
            with torch.no_grad():
                for buf in self.module.buffers():
                    dist.broadcast(buf.data, src=0)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the next backward outside the block synchronises."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # --- step 2: one async all-reduce per parameter, launched by the hook ----------------------
    def _overlap_hook(self, param):  # receives the PARAMETER; its .grad is now complete
        if not self._sync:
            return
        if id(param) in self._launched:
            raise RuntimeError(_TWICE)
        self._launched.add(id(param))
        param.grad.div_(self.world_size)  # sum of (g_r / N) = average
        self._pending.append((param, dist.all_reduce(param.grad, async_op=True)))

    # --- step 3: pack into buckets, launch each full bucket (in bucket order) -----------------
    def _bucket_hook(self, param):
        if not self._sync:
            return
        b, i = self._where[id(param)]
        bucket = self._buckets[b]
        if id(param) in bucket.ready:
            raise RuntimeError(_TWICE)
        bucket.pack(param, i)
        self._launch_ready_buckets()

    def _launch_ready_buckets(self):
        while (self._next_bucket < len(self._buckets)
               and len(self._buckets[self._next_bucket].ready)
               == len(self._buckets[self._next_bucket].params)):
            bucket = self._buckets[self._next_bucket]
            bucket.flat.div_(self.world_size)
            bucket.work = dist.all_reduce(bucket.flat, async_op=True)
            self._next_bucket += 1

    def finish_gradient_synchronization(self):
        """Wait for every all-reduce and write the averaged gradients back into `.grad`."""
        if self.world_size == 1 or not self._sync:
            return
        for p in self._params:  # a trainable parameter unused in this backward: zero gradient,
            if p.grad is None:  # so every rank still takes part in the same collectives
                p.grad = torch.zeros_like(p)
        if self.mode == "naive":  # step 1: everything after backward, one tensor at a time
            for p in self._params:
                p.grad.div_(self.world_size)
                dist.all_reduce(p.grad)
            return
        if self.mode == "overlap":
            done = {id(p) for p, _ in self._pending}
            for p in self._params:  # overlap=False, or hooks that never fired
                if id(p) not in done:
                    self._overlap_hook(p)
            for _, work in self._pending:
                work.wait()
            self._pending, self._launched = [], set()
            return
        for bucket in self._buckets:  # "bucketed": pack whatever the hooks did not
            for i, p in enumerate(bucket.params):
                if id(p) not in bucket.ready:
                    bucket.pack(p, i)
        self._launch_ready_buckets()
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.unpack()
            bucket.ready.clear()
            bucket.work = None
        self._next_bucket = 0

