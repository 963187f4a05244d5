"""The DistributedSampler equals torch's; the sharded stream yields every sample exactly once."""
import collections
import tempfile

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler as TorchDistributedSampler

from minitrain.sampler import ShardedStream, read_shard, write_shards
from tests.implementation import under_test

DistributedSampler = under_test("minitrain.sampler", "DistributedSampler")

pytestmark = pytest.mark.lesson21


class _Sized:
    """A stand-in dataset for torch's sampler: it only asks len()."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@given(n=st.integers(0, 8) | st.integers(0, 120), replicas=st.integers(1, 7),
       rank_draw=st.integers(0, 6), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 2**20), epoch=st.integers(0, 5))
@example(n=1, replicas=5, rank_draw=4, shuffle=False, drop_last=False, seed=0, epoch=0)
@example(n=2, replicas=7, rank_draw=6, shuffle=True, drop_last=False, seed=1, epoch=0)
def test_sampler_yields_exactly_torchs_indices(n, replicas, rank_draw, shuffle, drop_last, seed,
                                               epoch):
    """For every size, replica count, rank, seed, shuffle/drop_last and epoch, our sampler yields
    the same index list (and the same len) as torch.utils.data.DistributedSampler -- also when
    the padding is longer than the data (n=1 over 5 ranks: the one sample is repeated)."""
    rank = rank_draw % replicas
    ours = DistributedSampler(n, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)
    ref = TorchDistributedSampler(_Sized(n), num_replicas=replicas, rank=rank, shuffle=shuffle,
                                  seed=seed, drop_last=drop_last)
    ours.set_epoch(epoch)
    ref.set_epoch(epoch)
    assert list(ours) == list(ref)
    assert len(ours) == len(ref)


@given(n=st.integers(1, 90), replicas=st.integers(1, 6), seed=st.integers(0, 1000))
def test_ranks_together_cover_every_index_with_at_most_replicas_minus_one_repeats(n, replicas,
                                                                                  seed):
    """Without drop_last the ranks' shards cover all n indices, and only the padding (fewer than
    num_replicas indices) is seen twice; with drop_last no index is seen twice."""
    for drop_last in (False, True):
        seen = collections.Counter()
        for rank in range(replicas):
            seen.update(DistributedSampler(n, num_replicas=replicas, rank=rank, seed=seed,
                                           drop_last=drop_last))
        extra = sum(seen.values()) - len(seen)
        if drop_last:
            assert extra == 0 and n - len(seen) < replicas
        else:
            assert set(seen) == set(range(n)) and extra < replicas


def test_forgetting_set_epoch_repeats_the_same_shuffle():
    """The epoch seeds the shuffle: epoch 0 twice is the same order, epoch 1 differs."""
    s = DistributedSampler(50, num_replicas=2, rank=0, seed=3)
    first, again = list(s), list(s)
    s.set_epoch(1)
    assert first == again and list(s) != first


@pytest.mark.parametrize("bad", [dict(rank=2), dict(rank=-1), dict(num_replicas=0)])
def test_bad_sampler_arguments_name_the_argument(bad):
    args = dict(num_replicas=2, rank=0) | bad
    with pytest.raises(ValueError, match="rank|num_replicas"):
        DistributedSampler(10, **args)


@settings(max_examples=15)
@given(sizes=st.lists(st.integers(0, 9), min_size=0, max_size=7), per_shard=st.integers(1, 5),
       world=st.integers(1, 3), workers=st.integers(1, 3), buffer=st.integers(0, 4),
       seed=st.integers(0, 100))
def test_stream_yields_every_sample_exactly_once_over_ranks_and_workers(sizes, per_shard, world,
                                                                        workers, buffer, seed):
    """Over one epoch, the union of what every (rank, worker) reader yields is every written
    sample exactly once, whatever the shard count, shard size, ranks, workers and buffer."""
    samples = [bytes([i % 256]) * (1 + size) for i, size in enumerate(sizes)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_shards(samples, tmp, samples_per_shard=per_shard)
        keys = collections.Counter()
        for rank in range(world):
            stream = ShardedStream(paths, rank=rank, world_size=world, shuffle_buffer=buffer,
                                   seed=seed)
            for worker in range(workers):
                for sample in stream.samples_for(worker, workers):
                    keys[sample["__key__"]] += 1
                    assert sample["bin"] == samples[int(sample["__key__"])]
    assert keys == collections.Counter(f"{i:09d}" for i in range(len(samples)))


def test_stream_through_a_real_dataloader_with_two_workers(tmp_path):
    """With torch's DataLoader (2 worker processes), each sample arrives once: the stream splits
    its shards by get_worker_info(), not only by rank."""
    samples = [f"sample {i}" for i in range(23)]
    paths = write_shards(samples, tmp_path, samples_per_shard=3)
    stream = ShardedStream(paths, shuffle_buffer=4, seed=1)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = sorted(s["txt"].decode() for s in loader)
    assert got == sorted(samples)


def test_shuffle_buffer_changes_the_order_but_not_the_set(tmp_path):
    paths = write_shards([bytes([i]) for i in range(40)], tmp_path,
                         samples_per_shard=10)
    plain = [s["__key__"] for s in ShardedStream(paths).samples_for()]
    mixed = [s["__key__"] for s in ShardedStream(paths, shuffle_buffer=8, seed=2).samples_for()]
    assert plain == sorted(plain) and mixed != plain and sorted(mixed) == plain


def test_write_shards_groups_fields_by_key(tmp_path):
    paths = write_shards([{"tokens": b"\x01\x02", "txt": "hi"}, b"raw"], tmp_path,
                         samples_per_shard=2)
    assert len(paths) == 1
    first, second = list(read_shard(paths[0]))
    assert first == {"__key__": "000000000", "tokens": b"\x01\x02", "txt": b"hi"}
    assert second == {"__key__": "000000001", "bin": b"raw"}
