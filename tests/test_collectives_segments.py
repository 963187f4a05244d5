"""minitrain's pipelined ring: results do not depend on the segment size it sends in.

The ring collectives cut each chunk into `segment_bytes` pieces (4 MiB by default) so that the
next send starts while the previous piece is still being added. The exercise tests
(tests/test_collectives.py) use sizes that fit in one default segment, so this file forces tiny
segments (4 to 40 bytes: many segments, a partial last one, staging buffers reused) and checks
every result against torch.distributed bit for bit on integers and on 2-rank floats, for sizes
that do not divide the world size. This is minitrain's own keyword, not part of the exercise.
"""
import pytest
import torch
from torch.distributed import all_gather_into_tensor as torch_all_gather_into_tensor
from torch.distributed import all_reduce as torch_all_reduce
from torch.distributed import reduce_scatter_tensor as torch_reduce_scatter_tensor

from minitrain.collectives import ring_all_gather, ring_all_reduce, ring_reduce_scatter, segments
from minitrain.distributed_utils import launch

pytestmark = [pytest.mark.distributed, pytest.mark.lesson12]


def _mismatches(rank, world):
    bad = []
    for seg in (4, 8, 12, 40):
        for numel in (0, 1, world, 7, 33, 1001):
            for dtype in (torch.int64, torch.float32):
                gen = torch.Generator().manual_seed(rank * 7 + numel)
                x = torch.randint(-9, 9, (numel,), generator=gen).to(dtype)
                ours, ref = x.clone(), x.clone()
                ring_all_reduce(ours, segment_bytes=seg)
                torch_all_reduce(ref)
                if not torch.equal(ours, ref):
                    bad.append(("all_reduce", seg, numel, str(dtype)))
                k = numel // world
                full = x[:k * world].clone()
                ours, ref = torch.empty(k, dtype=dtype), torch.empty(k, dtype=dtype)
                ring_reduce_scatter(ours, full, segment_bytes=seg)
                torch_reduce_scatter_tensor(ref, full)
                if not torch.equal(ours, ref):
                    bad.append(("reduce_scatter", seg, numel, str(dtype)))
                ours = torch.empty(numel * world, dtype=dtype)
                ref = torch.empty_like(ours)
                ring_all_gather(ours, x, segment_bytes=seg)
                torch_all_gather_into_tensor(ref, x)
                if not torch.equal(ours, ref):
                    bad.append(("all_gather", seg, numel, str(dtype)))
    return bad


@pytest.mark.parametrize("world", [2, 3])
def test_tiny_segments_give_exactly_the_builtins_results(world):
    """With 4-40 byte segments (many per chunk, the last one partial) every ring collective
    equals torch.distributed's exactly (small integers as values: sums are exact in float32 too,
    so any mix-up of segments or staging buffers shows as a mismatch)."""
    results = launch(_mismatches, world, timeout_s=120, preload=())
    assert results == [[]] * world, results


def test_segments_cover_a_chunk_once_and_refuse_a_size_below_one():
    """segments() cuts [0, numel) into consecutive pieces of segment_bytes // element_size
    elements (the last one shorter); segment_bytes=0 is refused with a message naming it."""
    assert segments(10, 4, 12) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with pytest.raises(ValueError, match="segment_bytes"):
        segments(10, 4, 0)
