"""Ring all-reduce built from nothing but point-to-point sends and receives.

What: three collectives written with `dist.isend` / `dist.irecv` only.
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

Integers are summed exactly; floats are summed in ring order, so they can differ from gloo's
result in the last bits (a different order of additions), never by more.

Common bug: posting blocking `send` on every rank before `recv` - every rank waits for its
neighbour to receive first and, for large messages, the ring deadlocks. `isend` + `irecv`, then
wait for both.
"""
import torch
import torch.distributed as dist


def _ring(group):
    """(my index, world size, global rank of right neighbour, of left neighbour)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    to_global = (lambda i: i) if group is None else (lambda i: dist.get_global_rank(group, i))
    return rank, world, to_global((rank + 1) % world), to_global((rank - 1) % world)


def chunk_sizes(numel, world_size):
    """Sizes of the N ring chunks of a flat tensor: like torch.tensor_split (first ones bigger)."""
    base, extra = divmod(numel, world_size)
    return [base + (1 if i < extra else 0) for i in range(world_size)]


def _exchange(send_buf, recv_buf, right, left, group):
    """Send to the right neighbour while receiving from the left; wait for both."""
    works = []
    if send_buf.numel() > 0:
        works.append(dist.isend(send_buf, right, group=group))
    if recv_buf.numel() > 0:
        works.append(dist.irecv(recv_buf, left, group=group))
    for w in works:
        w.wait()


def _record(trace, phase, step, send_idx, recv_idx, chunks):
    if trace is not None:  # for the animation: what every chunk holds after this step
        trace.append({"phase": phase, "step": step, "send": send_idx, "recv": recv_idx,
                      "chunks": [c.clone() for c in chunks]})


def _reduce_scatter_chunks(chunks, group, trace=None):
    """In place on `chunks` (views of one flat buffer): afterwards chunks[rank] holds the sum."""
    rank, world, right, left = _ring(group)
    for step in range(world - 1):
        send_idx = (rank - step - 1) % world  # the partial sum I finished last step
        recv_idx = (rank - step - 2) % world  # the chunk my left neighbour finished
        incoming = torch.empty_like(chunks[recv_idx])
        _exchange(chunks[send_idx], incoming, right, left, group)
        chunks[recv_idx].add_(incoming)  # after the last step recv_idx == rank: complete
        _record(trace, "reduce-scatter", step, send_idx, recv_idx, chunks)


def _all_gather_chunks(chunks, group, trace=None):
    """In place on `chunks`: chunks[rank] is complete; afterwards every chunk is."""
    rank, world, right, left = _ring(group)
    for step in range(world - 1):
        send_idx = (rank - step) % world  # start with my own chunk, then forward what arrived
        recv_idx = (rank - step - 1) % world
        _exchange(chunks[send_idx], chunks[recv_idx], right, left, group)
        _record(trace, "all-gather", step, send_idx, recv_idx, chunks)


def _check_pair(output, input, world, name):
    if output.dtype != input.dtype:
        raise ValueError(f"{name}: output dtype {output.dtype} != input dtype {input.dtype}; "
                         "allocate output with input's dtype")


def ring_all_reduce(tensor, group=None, *, trace=None):
    """In-place sum of `tensor` over all ranks of `group` (reduce-scatter + all-gather ring).

    `trace`: an optional list; every ring step appends a dict (phase, step, send, recv, chunks)
    with copies of this rank's chunks after the step (the animation draws these)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    world = dist.get_world_size(group)
    if world == 1 or tensor.numel() == 0:
        return
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)  # (n,)
    chunks = list(torch.split(flat, chunk_sizes(flat.numel(), world)))  # N views of flat
    _record(trace, "start", -1, None, None, chunks)
    _reduce_scatter_chunks(chunks, group, trace)
    _all_gather_chunks(chunks, group, trace)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))  # non-contiguous input: write the result back


def ring_reduce_scatter(output, input, group=None):
    """output (k elements) = sum over ranks of slice `rank` of input (N*k elements)."""
    world = dist.get_world_size(group)
    _check_pair(output, input, world, "ring_reduce_scatter")
    if input.numel() != output.numel() * world:
        raise ValueError(f"ring_reduce_scatter: input has {input.numel()} elements but must have "
                         f"world_size * output.numel() = {world} * {output.numel()}; size output "
                         "as input.numel() // world_size (pad input if it does not divide)")
    work = input.detach().reshape(-1).clone()  # (N*k,) never modify the caller's input
    chunks = list(torch.split(work, [output.numel()] * world))
    if world > 1 and output.numel() > 0:
        _reduce_scatter_chunks(chunks, group)
    output.copy_(chunks[dist.get_rank(group)].view(output.shape))


def ring_all_gather(output, input, group=None):
    """output (N*k elements) = concatenation over ranks, in rank order, of input (k elements)."""
    world = dist.get_world_size(group)
    _check_pair(output, input, world, "ring_all_gather")
    if output.numel() != input.numel() * world:
        raise ValueError(f"ring_all_gather: output has {output.numel()} elements but must have "
                         f"world_size * input.numel() = {world} * {input.numel()}; allocate "
                         "output with world_size times input's elements")
    work = torch.empty(output.numel(), dtype=output.dtype, device=output.device)  # (N*k,)
    chunks = list(torch.split(work, [input.numel()] * world))
    chunks[dist.get_rank(group)].copy_(input.reshape(-1))
    if world > 1 and input.numel() > 0:
        _all_gather_chunks(chunks, group)
    output.copy_(work.view(output.shape))
