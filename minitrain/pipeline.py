"""Pipeline parallelism from send/recv: GPipe and 1F1B over consecutive slices of the GPT.

What: cut the model into p consecutive *stages* (`split_gpt`), one per process. Split the batch
into m micro-batches. Stage s runs its blocks on micro-batch i as soon as stage s-1 has sent the
activation (forward F_i), and sends the gradient of that activation back once stage s+1 has sent
its own (backward B_i). Only neighbours talk, with point-to-point send/recv.
    gpipe  F_0 F_1 ... F_{m-1}  B_0 B_1 ... B_{m-1}          (fill, then drain)
    1f1b   w = min(p-s-1, m) warm-up forwards, then (F, B) pairs, then the remaining B's

Why: when the model does not fit in one device, layers go to different devices. Feeding the
whole batch through stage after stage leaves p-1 of the p devices idle at every moment; feeding
micro-batches fills the pipe so stages work on different micro-batches at once.

Formula (the bubble): let one micro-batch's forward + backward on one stage take t. A step
takes (m + p - 1) t: the last stage cannot start F_0 before p-1 stages ran it, and stage 0
cannot run B_{m-1} before it came back through p-1 stages. Each stage is busy m t of it, so
    bubble_fraction = idle / step = (p - 1) t / ((m + p - 1) t) = (p - 1) / (m + p - 1).
Both schedules have the same bubble (same dependencies, same amount of work); they differ in
memory. An activation must be kept from F_i until B_i. GPipe runs all m forwards first, so each
stage holds m micro-batches of activations; 1F1B starts B_0 right after its w warm-ups, so
stage s holds at most w + 1 = min(p - s, m) <= p. More micro-batches shrink the bubble; under
1F1B they do not cost memory (under GPipe they do, linearly).

How this file does it:
- Shapes: every activation of a step has the same shape (micro-batches are equal: an uneven
  split is refused with a ValueError). Stage s sends stage s+1 a small header once per step
  (dtype code and shape, 10 int64) before the first activation; gradients have the shape of
  the activation they belong to, so they need no header.
- Sends are `isend` (never wait for the receiver: no send/send deadlock between neighbours that
  both have something to send); receives wait with the timeout (the process group's own, or
  `timeout_s`), so a peer that dies or never sends ends with a clear error, never a hang.
  After a timeout gloo has closed that link: the step is lost, restart from a checkpoint.
- Loss scaling: `loss_fn` returns the *mean* over one micro-batch; the last stage back-propagates
  loss_i / m, so the gradients of the step are the mean over the whole batch, exactly one
  process on the whole batch (up to rounding). torch.distributed.pipelining does the same maths
  the other way round: it back-propagates loss_i and divides every .grad by m at the end
  (`scale_grads=True`), which also divides any gradient that was there before the step.
  (With dropout > 0 the masks differ from one process's, as with any micro-batching.)
- The tie: the GPT uses one matrix as token embedding (stage 0) and output head (last stage).
  On two processes there are two copies; each gets only its own part of the gradient. After the
  last backward, stage 0 and stage p-1 exchange their gradients and both add them (an all-reduce
  between exactly two ranks is one exchange; Megatron does it over its "embedding group"). Same
  start, same summed gradient, same optimizer: the copies stay equal. `run_schedule` does it
  (finish_tied=True); `stage.finish_tied_gradients()` does it alone (e.g. after torch's schedule).

When it helps: a model too big for one device, with cheap point-to-point links (only activations
of one micro-batch cross a link, B * T * C numbers, far fewer than all-reducing the weights); and
m >> p, or the bubble eats the gain. On one CPU's cores there is no memory to win: see lesson 20.

Common bug: averaging the loss over micro-batches twice (dividing by m in loss_fn *and* in the
schedule) or not at all: gradients off by a factor m that a plain "loss goes down" test misses.
Another: forgetting the tie, so the embedding and the head drift apart after the first step.
"""
import datetime
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

from minitrain.recompute import checkpoint

SCHEDULES = ("gpipe", "1f1b")
_TAG_HEADER, _TAG_ACT, _TAG_GRAD, _TAG_TIED = 100, 101, 102, 103
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_HEADER_LEN = 10  # dtype code, ndim, up to 8 sizes


class GPTStage(nn.Module):
    """A consecutive slice of a minitrain GPT: [embeddings] + blocks[lo:hi] + [ln_f, lm_head].

    It shares the model's parameter objects (no copy). Stage 0 takes token ids (B, T) and every
    other stage takes the residual stream (B, T, C); the last stage returns logits (B, T, V)."""

    def __init__(self, model, lo, hi, *, first, last):
        super().__init__()
        self.first, self.last = first, last
        self.config = model.config  # read in forward: activation_checkpointing may change
        t = model.transformer
        if first:
            self.wte, self.wpe, self.drop = t.wte, t.wpe, t.drop
        self.h = nn.ModuleList(t.h[i] for i in range(lo, hi))
        if last:
            self.ln_f, self.lm_head = t.ln_f, model.lm_head

    def tied_weight(self):
        """The copy of the tied embedding/head matrix this stage holds (None in the middle)."""
        return self.wte.weight if self.first else self.lm_head.weight if self.last else None

    def forward(self, x):  # x: (B, T) int64 on stage 0, else (B, T, C)
        if self.first:
            if x.dim() != 2 or x.size(1) > self.wpe.num_embeddings:
                raise ValueError(f"stage 0 takes token ids (B, T) with T <= block_size "
                                 f"{self.wpe.num_embeddings}, got shape {tuple(x.shape)}")
            pos = torch.arange(x.size(1), device=x.device)  # (T,)
            x = self.drop(self.wte(x) + self.wpe(pos))  # (B, T, C)
        recompute = self.config.activation_checkpointing and self.training  # keep block inputs
        for block in self.h:
            x = checkpoint(block, x) if recompute else block(x)  # (B, T, C)
        if self.last:
            x = self.lm_head(self.ln_f(x))  # (B, T, V)
        return x


def split_gpt(model, num_stages):
    """Cut a minitrain GPT into `num_stages` GPTStage modules of consecutive blocks (the first
    stages get one block more when n_layer does not divide). They share the model's parameters:
    build the same model (same seed) on every rank and keep `split_gpt(model, p)[rank]`."""
    from minitrain.model import GPT

    if not isinstance(model, GPT):
        raise ValueError(f"model must be a minitrain.model.GPT, got {type(model).__name__}")
    n = model.config.n_layer
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 1 <= num_stages <= n:
        raise ValueError(f"num_stages must be an int in [1, n_layer={n}], got {num_stages!r}: "
                         "each stage needs at least one block")
    sizes = [n // num_stages + (1 if s < n % num_stages else 0) for s in range(num_stages)]
    bounds = [sum(sizes[:s]) for s in range(num_stages + 1)]
    return [GPTStage(model, bounds[s], bounds[s + 1], first=s == 0, last=s == num_stages - 1)
            for s in range(num_stages)]


def bubble_fraction(num_stages, n_micro):
    """Idle share of each stage in one step: (p - 1) / (m + p - 1)."""
    for name, v in (("num_stages", num_stages), ("n_micro", n_micro)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    return (num_stages - 1) / (n_micro + num_stages - 1)


def schedule_order(schedule, stage_index, num_stages, n_micro):
    """The actions of one stage in one step, e.g. [("F", 0), ("F", 1), ("B", 0), ...]."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    m = n_micro
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    warm = min(num_stages - stage_index - 1, m)  # forwards in flight before the first backward
    order = [("F", i) for i in range(warm)]
    for i in range(m - warm):  # steady state: one forward, one backward
        order += [("F", warm + i), ("B", i)]
    return order + [("B", i) for i in range(m - warm, m)]  # cool-down


class PipelineStage:
    """One stage of a pipeline: `module`, its place, and the neighbours' ranks in `group`.

    Stage i is rank i of `group` (default: the world, which must have num_stages ranks).
    After `run_schedule`, `events` lists this stage's actions of the step as dicts
    {kind "F"/"B", micro, start, end (time.perf_counter, shared by the processes of one
    machine), held, held_bytes (activations kept after the action; bytes only with
    run_schedule(count_bytes=True): the tensors autograd saved, parameters left out)};
    `peak_held` and `peak_held_bytes` are their maxima over the step.
    """

    def __init__(self, module, stage_index, num_stages, *, group=None, timeout_s=None):
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
        if (isinstance(stage_index, bool) or not isinstance(stage_index, int)
                or not 0 <= stage_index < num_stages):
            raise ValueError(f"stage_index must be an int in [0, {num_stages}), got "
                             f"{stage_index!r}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None (the group's timeout), got "
                             f"{timeout_s!r}")
        self.module, self.stage_index, self.num_stages, self.group = (module, stage_index,
                                                                      num_stages, group)
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        # Receive buffers live where the stage computes (nccl needs CUDA tensors, gloo CPU ones).
        self.device = next(module.parameters(), torch.empty(0)).device
        if num_stages > 1:
            if not dist.is_initialized():
                raise ValueError("num_stages > 1 needs torch.distributed initialised: start "
                                 "one process per stage (torchrun or distributed_utils.launch)")
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            if size != num_stages or rank != stage_index:
                raise ValueError(f"stage i must be rank i of a group of num_stages ranks: got "
                                 f"rank {rank} of {size} for stage {stage_index} of {num_stages}")
        self.events, self.peak_held, self.peak_held_bytes = [], 0, 0

    def _rank(self, stage):  # global rank of a stage, as send/recv want it
        return stage if self.group is None else dist.get_global_rank(self.group, stage)

    def _send(self, tensor, stage, tag):
        return dist.isend(tensor.contiguous(), self._rank(stage), group=self.group, tag=tag)

    def _wait(self, work, what, stage):
        try:
            work.wait() if self.timeout is None else work.wait(self.timeout)
        except RuntimeError as e:
            raise RuntimeError(f"pipeline stage {self.stage_index}: no {what} stage {stage} "
                               f"(it died, or is stuck past the timeout): {e}") from e

    def _recv(self, buf, stage, tag, what):
        work = dist.irecv(buf, self._rank(stage), group=self.group, tag=tag)
        self._wait(work, f"{what} from", stage)
        return buf

    def finish_tied_gradients(self):
        """Sum the tied embedding/head gradient of stage 0 and stage p-1 (both get the sum).
        Call after the step's last backward; a no-op for middle stages and for p = 1."""
        tied = getattr(self.module, "tied_weight", None)  # a GPTStage has one; others: no tie
        if tied is None or self.num_stages == 1 or not (self.is_first or self.is_last):
            return
        weight = tied()
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        peer = self.num_stages - 1 if self.is_first else 0
        mine = weight.grad.detach().clone()
        work = self._send(mine, peer, _TAG_TIED)
        theirs = self._recv(torch.empty_like(mine), peer, _TAG_TIED, "tied gradient")
        self._wait(work, "tied gradient taken by", peer)
        weight.grad.add_(theirs)  # a + b == b + a exactly (IEEE): the copies stay bit-equal


def _check_batch(name, tensor, n_micro):
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1:
        raise ValueError(f"{name} must be a tensor with the batch as its first dim")
    if tensor.size(0) % n_micro != 0:
        raise ValueError(f"{name} has batch {tensor.size(0)}, not divisible by n_micro={n_micro}:"
                         " pick n_micro dividing the batch (uneven micro-batches are refused)")
    return list(tensor.split(tensor.size(0) // n_micro))


def run_schedule(stage, *, inputs=None, targets=None, n_micro, schedule="1f1b", loss_fn,
                 finish_tied=True, count_bytes=False):
    """One training step's forward and backward over `n_micro` micro-batches on this stage.

    `inputs` (B, ...) on the first stage, `targets` (B, ...) on the last; `loss_fn(output,
    target)` is the mean loss of one micro-batch. Returns the mean loss on the last stage, None
    elsewhere. Afterwards every .grad holds (added to what was there) the gradient of the mean
    loss over the whole batch; with finish_tied the tied copies hold the full tied gradient.
    count_bytes: also count the bytes autograd saves per micro-batch (a Python hook on every
    saved tensor: slower, so off when timing)."""
    if not isinstance(stage, PipelineStage):
        raise ValueError(f"stage must be a PipelineStage, got {type(stage).__name__}")
    if isinstance(n_micro, bool) or not isinstance(n_micro, int) or n_micro < 1:
        raise ValueError(f"n_micro must be an int >= 1, got {n_micro!r}")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable: loss_fn(output, target) -> mean loss")
    order = schedule_order(schedule, stage.stage_index, stage.num_stages, n_micro)
    s, m = stage.stage_index, n_micro
    if stage.is_first:
        micro_inputs = _check_batch("inputs", inputs, m)
    if stage.is_last:
        micro_targets = _check_batch("targets", targets, m)
    param_storages = ({p.untyped_storage().data_ptr() for p in stage.module.parameters()}
                      if count_bytes else set())
    held, losses, header = {}, [], None  # held: micro -> (input, output, bytes)
    sends = []  # (work, tensor kept alive until sent, peer)
    stage.events, stage.peak_held, stage.peak_held_bytes = [], 0, 0
    for kind, i in order:
        if kind == "F":
            if stage.is_first:
                x = micro_inputs[i]
            else:
                if header is None:
                    buf = torch.empty(_HEADER_LEN, dtype=torch.int64, device=stage.device)
                    header = stage._recv(buf, s - 1, _TAG_HEADER, "shape header").tolist()
                shape, dtype = header[2:2 + header[1]], _DTYPES[header[0]]
                buf = torch.empty(shape, dtype=dtype, device=stage.device)
                x = stage._recv(buf, s - 1, _TAG_ACT, f"activation of micro-batch {i}")
                x.requires_grad_(True)
            start, seen, nbytes = time.perf_counter(), set(), [0]

            def pack(t, seen=seen, nbytes=nbytes):  # count what autograd keeps for backward
                ptr = t.untyped_storage().data_ptr()
                if ptr not in param_storages and ptr not in seen:
                    seen.add(ptr)
                    nbytes[0] += t.untyped_storage().nbytes()
                return t

            counting = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
            with counting if count_bytes else nullcontext():
                out = stage.module(x)  # (b, T, C), or logits on the last stage
                if stage.is_last:
                    out = loss_fn(out, micro_targets[i])
                    losses.append(out.detach())
            end = time.perf_counter()
            held[i] = (x, out, nbytes[0])
            if not stage.is_last:
                if i == 0:  # once per step: the shape every activation of this step has
                    head = [_DTYPES.index(out.dtype), out.dim(), *out.shape]
                    head = torch.tensor(head + [0] * (_HEADER_LEN - len(head)), device=out.device)
                    sends.append((stage._send(head, s + 1, _TAG_HEADER), head, s + 1))
                act = out.detach().contiguous()
                sends.append((stage._send(act, s + 1, _TAG_ACT), act, s + 1))
        else:
            x, out, _ = held[i]
            if stage.is_last:
                start = time.perf_counter()
                (out / m).backward()  # the mean over m equal micro-batches
            else:
                grad = stage._recv(torch.empty_like(out), s + 1, _TAG_GRAD,
                                   f"gradient of micro-batch {i}")
                start = time.perf_counter()
                torch.autograd.backward(out, grad)
            end = time.perf_counter()
            del held[i]
            if not stage.is_first:
                sends.append((stage._send(x.grad, s - 1, _TAG_GRAD), x.grad, s - 1))
        held_bytes = sum(v[2] for v in held.values())
        stage.events.append(dict(kind=kind, micro=i, start=start, end=end, held=len(held),
                                 held_bytes=held_bytes))
        stage.peak_held = max(stage.peak_held, len(held))
        stage.peak_held_bytes = max(stage.peak_held_bytes, held_bytes)
    for work, _, peer in sends:  # every send must have been taken before the step ends
        stage._wait(work, "message taken by", peer)
    if finish_tied:
        stage.finish_tied_gradients()
    return torch.stack(losses).mean().item() if stage.is_last else None


def measured_bubble(events_per_stage):
    """From every stage's `events` of one step: (step seconds, [idle fraction per stage]).

    The step spans the first compute start to the last compute end over all stages; a stage is
    busy while it computes (F or B) and idle otherwise (waiting, sending, the bubble)."""
    t0 = min(e["start"] for ev in events_per_stage for e in ev)
    t1 = max(e["end"] for ev in events_per_stage for e in ev)
    busy = [sum(e["end"] - e["start"] for e in ev) for ev in events_per_stage]
    return t1 - t0, [1.0 - b / (t1 - t0) for b in busy]
