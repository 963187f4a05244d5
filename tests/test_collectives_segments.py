"""minitrain's pipelined ring: results do not depend on the segment size it sends in.

The ring collectives cut each chunk into `segment_bytes` pieces (4 MiB by default) so that the
next send starts while the previous piece is still being added. The exercise tests
(tests/test_collectives.py) use sizes that fit in one default segment, so this file forces tiny
segments (4 to 40 bytes: many segments, a partial last one, staging buffers reused) and checks
every result against torch.distributed bit for bit (small integer values: int64, float32 and
complex64 sums are exact), for sizes that do not divide the world size. This is minitrain's own
keyword, not part of the exercise.
"""
import pytest
import torch
import torch.distributed as dist
from torch.distributed import all_gather_into_tensor as torch_all_gather_into_tensor
from torch.distributed import all_reduce as torch_all_reduce
from torch.distributed import reduce_scatter_tensor as torch_reduce_scatter_tensor

from minitrain.collectives import (chunk_sizes, ring_all_gather, ring_all_reduce,
                                   ring_reduce_scatter, segments)
from minitrain.distributed_utils import launch
from tests.lesson_modules import load_lesson

pytestmark = [pytest.mark.distributed, pytest.mark.lesson12]


def _mismatches(rank, world):
    bad = []
    for seg in (4, 8, 12, 40):
        for numel in (0, 1, world, 7, 33, 1001):
            for dtype in (torch.int64, torch.float32, torch.complex64):
                gen = torch.Generator().manual_seed(rank * 7 + numel)
                x = torch.randint(-9, 9, (numel,), generator=gen).to(dtype)
                if dtype.is_complex:  # an imaginary part too: (re, im) travel as two floats
                    x = x + 1j * torch.randint(-9, 9, (numel,), generator=gen)
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


def _bytes_sent_through_the_group(rank, world):
    counting_group = load_lesson("12_all_reduce_from_send_recv.py").CountingGroup
    records = []
    for numel in (1, 5, 1000, 4097):
        for seg in (None, 12):
            counter = {"bytes": 0}
            x = torch.randint(-9, 9, (numel,), generator=torch.Generator().manual_seed(rank))
            ours, ref = x.float(), x.float()
            ring_all_reduce(ours, group=counting_group(dist.group.WORLD, counter), segment_bytes=seg)
            torch_all_reduce(ref)
            sizes = chunk_sizes(numel, world)
            # reduce-scatter sends every chunk but this rank's own, all-gather every chunk but
            # the right neighbour's (it is the one that finishes it): 2(N-1)/N of the data
            expected = 4 * (2 * numel - sizes[rank] - sizes[(rank + 1) % world])
            records.append((numel, seg, torch.equal(ours, ref), counter["bytes"], expected))
    return records


@pytest.mark.parametrize("world", [2, 3])
def test_the_ring_talks_only_through_its_group_and_sends_2_n_minus_1_over_n_of_the_data(world):
    """Handed lesson 12's counting group, the ring still equals dist.all_reduce and every rank
    hands exactly sum(chunks) - own chunk - right neighbour's chunk bytes, per phase pair, to the
    group's send: nothing travels by another route (a built-in collective would count 0)."""
    for rank_records in launch(_bytes_sent_through_the_group, world, timeout_s=120, preload=()):
        for numel, seg, equal, sent, expected in rank_records:
            assert equal, (numel, seg)
            assert sent == expected, (numel, seg, sent, expected)
