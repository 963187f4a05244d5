"""Ring all-reduce built from nothing but point-to-point sends and receives.

What: three collectives written with point-to-point sends and receives only: the process
group's own `send` / `recv`, which is all `dist.isend(t, dst, group=g, tag=k)` does after checking
its arguments (`g.send([t], dst's index in g, k)`). Those checks cost ~20-30 us a call on these
2-core machines (measured: dist.isend 40 us, g.send 13-20 us), so the ring calls the group.
- `ring_reduce_scatter(output, input)`: every rank ends with the SUM over ranks of one slice
  (rank r gets slice r) - the shape contract of `dist.reduce_scatter_tensor`.
- `ring_all_gather(output, input)`: every rank ends with all ranks' inputs concatenated in rank
  order - the shape contract of `dist.all_gather_into_tensor`.
- `ring_all_reduce(tensor)`: in-place sum over ranks = reduce-scatter, then all-gather.

Why a ring: data-parallel training sums every gradient over N workers each step. The naive way
(everyone sends everything to rank 0, rank 0 sends the sum back) makes rank 0's link carry
2(N-1) full copies. In the ring every rank talks only to its two neighbours and all links are
busy at once. Cut the data (D bytes) into N chunks:
  reduce-scatter: N-1 steps; at each step every rank sends one chunk (D/N) to its right
                  neighbour and adds the chunk arriving from its left. After N-1 steps rank r
                  holds the complete sum of chunk r.
  all-gather:     N-1 more steps passing the finished chunks around the ring.
Each rank sends 2(N-1) * D/N = 2(N-1)/N * D bytes in total. That is optimal: every rank's D bytes
must leave it at least once ((N-1)/N * D as reduce input) and the sum must come back
((N-1)/N * D). So the time barely grows with N: "bus bandwidth" = algbw * 2(N-1)/N.

Chunking (for any numel): the flat tensor of n elements is cut like `torch.tensor_split`:
chunk i has n // N + (1 if i < n % N else 0) elements. Chunks may be empty (n < N, or n = 0);
an empty chunk is simply not sent, and every rank knows that, so the ring never deadlocks.
`ring_reduce_scatter` / `ring_all_gather` keep the built-ins' stricter contract: the big tensor has
exactly N times the elements of the small one (ValueError otherwise); slice r is the r-th run of
numel(small) elements of the flattened big tensor.

Overlap (pipelining): each chunk travels as segments of about `segment_bytes` (default 4 MiB;
both neighbours compute the same cut, from sizes every rank knows). A segment is passed on to
the right neighbour the moment it has been added, while later segments are still on the wire,
and the two phases overlap too: a segment of the rank's own chunk starts its all-gather trip as
soon as its sum is complete, not after the whole reduce-scatter.

Post receives early. gloo's point-to-point transport is a rendezvous: a send moves no data
until the receiver has posted the matching receive and told the sender so (one more trip over
the link). So every all-gather receive (it lands in place, in memory nothing else writes) is
posted before the reduce-scatter starts, and the reduce-scatter keeps STAGING receives posted
ahead. Safe because of causality: the all-gather data for a chunk can only arrive after that
chunk's sum was finished elsewhere, which needed this rank's last send of it.

Run on a communication thread (minitrain.comm_thread), as gloo runs its own collectives on a
worker thread of the process group: the caller checks its arguments, hands the ring to that
thread and waits. Measured, same code, same rounds: 1 MB on 2 ranks 1.27x gloo's time from the
caller's thread, 1.16x from the communication thread (two runs); 4 MB 1.23x -> 1.05x (one run).

Reuse the staging memory. The reduce-scatter receives into a buffer kept from call to call
(one per thread, in practice the communication thread's; at most STAGING x segment bytes).
Fresh memory costs a page fault per 4 KiB page when the kernel first writes into it, inside
the transfer: measured +50 us on a 0.5 MB receive, +400 us on a 2 MB one.

Why 4 MiB and not smaller: every message pays that rendezvous and a wake-up of the waiting
thread, so on one machine (loopback TCP) small segments lose more than the overlap wins.
(gloo's own ring cuts each chunk in >= 2 segments of <= 1 MiB and still wins at 1 MB, so its
messages cost less than ours, issued from Python: ~50-60 us a message, measured by posting
1-8 small messages at once.)
Measured (bench_collectives, paired rounds, 2 and 3 ranks): 256 KiB segments 1.4-1.8x gloo's
time, 1 MiB 1.0-1.35x, 4 MiB 0.8-1.25x. Now (three runs, ring and gloo taking turns to go
first): 1 MB 1.13-1.16x gloo's time on 2 ranks and 1.06-1.14x on 3, 4 MB 0.97-1.14x and
1.10-1.13x, 16-64 MB 0.89-1.04x. What is left is a fixed cost per call, largest when the call
starts cold (in the rounds the ring went first it read up to 1.22x at 1 MB on 2 ranks, 1.35x
on 3; a 1 KB all-reduce takes ~0.40 ms on the ring against ~0.28 ms for gloo): Python issues
every send, receive and wait, each a call into C++ and back, and right after a barrier that
Python ran several times slower than on a warm core (measured on the caller's thread: ~15 us
of set-up, timed alone, took 50-90 us).

Integers are summed exactly; floats are summed in ring order, so they can differ from gloo's
result in the last bits (a different order of additions), never by more.

Common bug: posting blocking `send` on every rank before `recv` - every rank waits for its
neighbour to receive first and, for large messages, the ring deadlocks. Post the receive and the
send without blocking (`dist.irecv` + `dist.isend`, or the group's `recv` / `send`, which return
a work handle at once), then wait for both.
"""
import threading
from collections import namedtuple

import torch
import torch.distributed as dist

from minitrain.comm_thread import run_on_comm_thread


Ring = namedtuple("Ring", "group rank world right left")  # neighbours as indices in the group


def _ring(group):
    """This rank's place in the ring of `group` (None: the default group). The neighbours are
    indices in the group, which is what the group's own send / recv take."""
    pg = dist.group.WORLD if group is None else group
    rank, world = pg.rank(), pg.size()
    return Ring(pg, rank, world, (rank + 1) % world, (rank - 1) % world)


def chunk_sizes(numel, world_size):
    """Sizes of the N ring chunks of a flat tensor: like torch.tensor_split (first ones bigger)."""
    base, extra = divmod(numel, world_size)
    return [base + (1 if i < extra else 0) for i in range(world_size)]


SEGMENT_BYTES = 4 << 20  # pipelining grain: each message pays a rendezvous (see above)
STAGING = 4  # receive buffers in flight in the reduce-scatter


def segments(numel, element_size, segment_bytes=None):
    """[(start, stop)] cutting a chunk of `numel` elements into pieces of ~segment_bytes
    (None: the module's SEGMENT_BYTES, read at call time)."""
    if segment_bytes is None:
        segment_bytes = SEGMENT_BYTES
    if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int) or segment_bytes < 1:
        raise ValueError("segment_bytes must be a positive int (bytes per message), "
                         f"got {segment_bytes!r}")
    step = max(1, segment_bytes // element_size)
    return [(i, min(i + step, numel)) for i in range(0, numel, step)]


_REUSED = threading.local()  # this thread's staging memory, kept between calls


def _staging_buffer(slots, numel, like):
    """(slots, numel) receive buffers for the reduce-scatter, reused from call to call. Fresh
    memory costs a page fault per 4 KiB page the first time the kernel writes into it, inside
    the timed transfer (measured: +400 us on a 2 MB receive, a third of its time)."""
    buf = getattr(_REUSED, "staging", None)
    if buf is None or buf.numel() < slots * numel or buf.dtype != like.dtype \
            or buf.device != like.device:
        buf = _REUSED.staging = torch.empty(slots * numel, dtype=like.dtype, device=like.device)
    return buf[:slots * numel].view(slots, numel)


def _record(trace, phase, step, send_idx, recv_idx, chunks):
    if trace is not None:  # for the animation: what every chunk holds after this step
        trace.append({"phase": phase, "step": step, "send": send_idx, "recv": recv_idx,
                      "chunks": [c.clone() for c in chunks]})


def _send_all(ring, chunk, tag, segment_bytes, sends):
    """Post a send to the right neighbour per segment of `chunk` (all of it is ready now)."""
    for start, stop in segments(chunk.numel(), chunk.element_size(), segment_bytes):
        sends.append(ring.group.send([chunk[start:stop]], ring.right, tag))


def _post_recvs(ring, buffer, tag, segment_bytes):
    """Post a receive from the left neighbour per segment of `buffer`: [(work, start, stop)]."""
    return [(ring.group.recv([buffer[start:stop]], ring.left, tag), start, stop)
            for start, stop in segments(buffer.numel(), buffer.element_size(), segment_bytes)]


def _reduce_scatter_chunks(ring, chunks, trace=None, segment_bytes=None, then_gather=False):
    """In place on `chunks` (views of one flat buffer): afterwards chunks[rank] holds the sum.
    `then_gather`: each finished segment of chunks[rank] is sent on at once as the all-gather's
    first message (tag N-1), so the two phases overlap instead of meeting at a barrier.

    Step s: send chunk (rank - s - 1), receive chunk (rank - s - 2) from the left and add it.
    The chunk received at step s is the one sent at step s + 1, so each added segment is
    forwarded at once. Incoming segments land in a small ring of STAGING staging buffers: the
    next receives are always posted while the current segment is being added, and the extra
    memory stays STAGING * segment_bytes whatever the tensor's size."""
    pg, rank, world, right, left = ring
    recv_idx = [(rank - s - 2) % world for s in range(world - 1)]
    schedule = [(s, start, stop) for s in range(world - 1)  # every receive, in ring order
                for start, stop in segments(chunks[recv_idx[s]].numel(),
                                            chunks[0].element_size(), segment_bytes)]
    seg_numel = max((stop - start for _, start, stop in schedule), default=0)
    n_slots = min(STAGING, len(schedule))
    staging = _staging_buffer(n_slots, seg_numel, chunks[0])  # (STAGING, segment)

    def post(j):  # receive schedule[j] into staging slot j % n_slots
        s, start, stop = schedule[j]
        return pg.recv([staging[j % n_slots, :stop - start]], left, s)

    pending = [post(j) for j in range(n_slots)]  # receives first: the left can send at once
    sends = []
    _send_all(ring, chunks[(rank - 1) % world], 0, segment_bytes, sends)
    for j, (s, start, stop) in enumerate(schedule):
        pending[j % n_slots].wait()
        target = chunks[recv_idx[s]][start:stop]
        target.add_(staging[j % n_slots, :stop - start])  # the last step completes a sum
        if j + n_slots < len(schedule):  # the slot is free again: post a later receive
            pending[j % n_slots] = post(j + n_slots)
        if s < world - 2:  # this partial sum is what the right neighbour needs next: pass it on
            sends.append(pg.send([target], right, s + 1))
        elif then_gather:  # a finished sum: it starts its all-gather trip right now
            sends.append(pg.send([target], right, world - 1))
        if trace is not None and (j + 1 == len(schedule) or schedule[j + 1][0] != s):
            _record(trace, "reduce-scatter", s, (rank - s - 1) % world, recv_idx[s], chunks)
    for work in sends:
        work.wait()


def _post_all_gather_recvs(ring, chunks, segment_bytes):
    """Post every all-gather receive now: step s receives chunk (rank - s - 1) straight into
    place, distinct memory for every step. Returns [[(work, start, stop)] per step]. Tags start
    after the reduce-scatter's (0 .. N-2) so the two phases can be in flight together."""
    rank, world = ring.rank, ring.world
    return [_post_recvs(ring, chunks[(rank - s - 1) % world], world - 1 + s, segment_bytes)
            for s in range(world - 1)]


def _all_gather_chunks(ring, chunks, trace=None, segment_bytes=None, recvs=None):
    """In place on `chunks`: chunks[rank] is complete; afterwards every chunk is.

    `recvs`: the receives `_post_all_gather_recvs` posted, with chunks[rank] already sent by the
    reduce-scatter (None: post them and send chunks[rank] now). Each arriving segment is
    forwarded to the right neighbour immediately."""
    pg, rank, world, right, left = ring
    sends = []
    if recvs is None:
        recvs = _post_all_gather_recvs(ring, chunks, segment_bytes)
        _send_all(ring, chunks[rank], world - 1, segment_bytes, sends)
    for s in range(world - 1):
        target = chunks[(rank - s - 1) % world]
        for work, start, stop in recvs[s]:
            work.wait()
            if s < world - 2:  # the right neighbour needs this chunk at step s + 1
                sends.append(pg.send([target[start:stop]], right, world + s))
        _record(trace, "all-gather", s, (rank - s) % world, (rank - s - 1) % world, chunks)
    for work in sends:
        work.wait()


def _check_pair(output, input, world, name):
    if output.dtype != input.dtype:
        raise ValueError(f"{name}: output dtype {output.dtype} != input dtype {input.dtype}; "
                         "allocate output with input's dtype")


def ring_all_reduce(tensor, group=None, *, trace=None, segment_bytes=None):
    """In-place sum of `tensor` over all ranks of `group` (reduce-scatter + all-gather ring).

    `trace`: an optional list; every ring step appends a dict (phase, step, send, recv, chunks)
    with copies of this rank's chunks after the step (the animation draws these).
    `segment_bytes`: the pipelining grain (None: SEGMENT_BYTES); every rank must pass the same.
    `group`: a process group (None: the default one), or any object with its rank(), size(),
    send(tensors, dst, tag) and recv(tensors, src, tag): lesson 12 hands in one that counts."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    ring = _ring(group)
    if ring.world == 1 or tensor.numel() == 0:
        return
    run_on_comm_thread(_all_reduce_on_ring, ring, tensor, trace, segment_bytes)


def _all_reduce_on_ring(ring, tensor, trace, segment_bytes):
    """The ring itself; ring_all_reduce runs it on the communication thread."""
    world = ring.world
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)  # (n,)
    chunks = flat.split_with_sizes(chunk_sizes(flat.numel(), world))  # N views of flat
    _record(trace, "start", -1, None, None, chunks)
    # The all-gather's receives are posted before the reduce-scatter starts (see the docstring)
    gather_recvs = _post_all_gather_recvs(ring, chunks, segment_bytes)
    _reduce_scatter_chunks(ring, chunks, trace, segment_bytes, then_gather=True)
    _all_gather_chunks(ring, chunks, trace, segment_bytes, recvs=gather_recvs)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))  # non-contiguous input: write the result back


def ring_reduce_scatter(output, input, group=None, *, segment_bytes=None):
    """output (k elements) = sum over ranks of slice `rank` of input (N*k elements)."""
    ring = _ring(group)
    world = ring.world
    _check_pair(output, input, world, "ring_reduce_scatter")
    if input.numel() != output.numel() * world:
        raise ValueError(f"ring_reduce_scatter: input has {input.numel()} elements but must have "
                         f"world_size * output.numel() = {world} * {output.numel()}; size output "
                         "as input.numel() // world_size (pad input if it does not divide)")
    work = input.detach().reshape(-1).clone()  # (N*k,) never modify the caller's input
    chunks = list(torch.split(work, [output.numel()] * world))
    if world > 1 and output.numel() > 0:
        run_on_comm_thread(_reduce_scatter_chunks, ring, chunks, segment_bytes=segment_bytes)
    output.copy_(chunks[ring.rank].view(output.shape))


def ring_all_gather(output, input, group=None, *, segment_bytes=None):
    """output (N*k elements) = concatenation over ranks, in rank order, of input (k elements)."""
    ring = _ring(group)
    world = ring.world
    _check_pair(output, input, world, "ring_all_gather")
    if output.numel() != input.numel() * world:
        raise ValueError(f"ring_all_gather: output has {output.numel()} elements but must have "
                         f"world_size * input.numel() = {world} * {input.numel()}; allocate "
                         "output with world_size times input's elements")
    work = torch.empty(output.numel(), dtype=output.dtype, device=output.device)  # (N*k,)
    chunks = list(torch.split(work, [input.numel()] * world))
    chunks[ring.rank].copy_(input.reshape(-1))
    if world > 1 and input.numel() > 0:
        run_on_comm_thread(_all_gather_chunks, ring, chunks, segment_bytes=segment_bytes)
    output.copy_(work.view(output.shape))
