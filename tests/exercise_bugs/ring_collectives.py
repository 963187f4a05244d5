"""A learner's ring all-reduce with a classic bug: the all-gather forgets the last chunk.

It runs N-2 all-gather steps instead of N-1, so the chunk that would arrive last is never
received: with 2 ranks each rank keeps its own partial sum for the other half of the tensor.
chunk_sizes, ring_reduce_scatter and ring_all_gather are still minitrain's.
"""
import torch
import torch.distributed as dist

from minitrain.collectives import chunk_sizes, ring_all_gather, ring_reduce_scatter  # noqa: F401


def _exchange(send, recv, right, left):
    works = [dist.isend(send, right)] if send.numel() else []
    works += [dist.irecv(recv, left)] if recv.numel() else []
    for w in works:
        w.wait()


def ring_all_reduce(tensor, group=None):
    """In-place sum over ranks: reduce-scatter, then all-gather, around the ring."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1 or tensor.numel() == 0:
        return
    flat = tensor.contiguous().view(-1)
    chunks = list(torch.split(flat, chunk_sizes(flat.numel(), world)))
    right, left = (rank + 1) % world, (rank - 1) % world
    for step in range(world - 1):                      # reduce-scatter: correct
        send, recv = (rank - step - 1) % world, (rank - step - 2) % world
        incoming = torch.empty_like(chunks[recv])
        _exchange(chunks[send], incoming, right, left)
        chunks[recv].add_(incoming)
    for step in range(world - 2):                      # BUG: N-2 steps, the last chunk never arrives
        send, recv = (rank - step) % world, (rank - step - 1) % world
        _exchange(chunks[send], chunks[recv], right, left)
    if not tensor.is_contiguous():
        tensor.copy_(flat.view(tensor.shape))
