"""Feeding N ranks: a DistributedSampler from scratch, and a sharded tar stream (WebDataset-style).

What. Data parallelism needs every rank to see a DIFFERENT part of the data, and all ranks
together to see every sample once per epoch.
- `DistributedSampler(num_samples, num_replicas=N, rank=r)` is the map-style answer (the dataset
  can be indexed): one permutation of 0..n-1 shared by all ranks (same seed), padded or cut to a
  multiple of N, then dealt round-robin: rank r takes positions r, r+N, r+2N, ...
- `ShardedStream(shard_paths, rank=r, world_size=N)` is the streaming answer (the data is too big
  to index, or lives in object storage as many tar files): whole SHARDS are dealt to the
  (rank, DataLoader worker) pairs, each reads its shards front to back, and a small shuffle buffer
  mixes samples locally. `write_shards` makes such shards with the standard library's `tarfile`.

Why. Without a sampler every rank draws the same samples (N copies of the same gradient: DDP then
costs N times the compute for one process's progress) or, with independent seeds, overlapping
random samples (some seen twice, some never in an epoch).

Formula (DistributedSampler, identical to torch.utils.data.DistributedSampler):
    perm       = randperm(n, seed + epoch)        if shuffle else 0..n-1
    per_rank   = ceil(n / N)                      or, drop_last and n % N != 0: ceil((n - N) / N)
    total      = per_rank * N
    padded     = perm + perm[:total - n] (repeated as needed)   if not drop_last
               = perm[:total]                                    if drop_last
    rank r     : padded[r : total : N]
So without drop_last a few samples are seen twice per epoch (at most N - 1), with drop_last at
most N - 1 are skipped: both keep every rank's epoch the same length, so no rank waits forever in
a collective for a peer that ran out of data.

Sharded stream: with W DataLoader workers per rank there are N * W readers; reader
g = rank * W + worker_id takes shards g, g + N*W, g + 2*N*W, ... of the (seeded, per-epoch) shard
order. Each sample lives in exactly one shard and each shard in exactly one reader, so one epoch
yields every sample exactly once across all ranks and workers. Readers with no shard yield
nothing: use at least N * W shards (many more, for balance).

When it helps: always with DDP/FSDP on a map-style dataset (sampler), and for corpora too large
for one file or one machine (shards: sequential reads, no index, easy to spread over machines).

Common bugs:
- forgetting `sampler.set_epoch(epoch)` on every rank: the shuffle is the same every epoch
  (a rank that forgets it shuffles differently from the others: samples are then duplicated and
  missed across ranks);
- giving ranks different seeds: the permutations differ, so the round-robin deal overlaps;
- splitting shards over ranks but not over DataLoader workers: every worker of a rank reads the
  same shards, so each sample appears num_workers times.
"""
import io
import math
import pathlib
import random
import tarfile

import torch
from torch.utils.data import IterableDataset, get_worker_info


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class DistributedSampler:
    """The indices rank `rank` of `num_replicas` visits in one epoch (see the module docstring)."""

    def __init__(self, num_samples, *, num_replicas, rank, shuffle=True, seed=0, drop_last=False):
        _check_int("num_samples", num_samples, 0)
        _check_int("num_replicas", num_replicas, 1)
        _check_int("seed", seed, 0)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, num_replicas - 1] = [0, "
                             f"{num_replicas - 1}], got {rank!r}")
        self.dataset_size, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.epoch = shuffle, seed, drop_last, 0
        if drop_last and num_samples % num_replicas != 0:
            self.num_samples = math.ceil((num_samples - num_replicas) / num_replicas)
        else:
            self.num_samples = math.ceil(num_samples / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch):
        """Call on EVERY rank before each epoch: the shuffle is seeded with seed + epoch."""
        _check_int("epoch", epoch, 0)
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        n = self.dataset_size
        if self.shuffle:  # the same permutation on every rank: same seed, same epoch
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=gen).tolist()
        else:
            order = list(range(n))
        if self.drop_last:
            order = order[:self.total_size]
        elif self.total_size > n:  # pad by wrapping around (as often as needed)
            order = (order * math.ceil(self.total_size / n))[:self.total_size]
        return iter(order[self.rank:self.total_size:self.num_replicas])

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state):
        self.set_epoch(int(state["epoch"]))
        self.seed = int(state["seed"])


# --- sharded tar streams -------------------------------------------------------------------------

def _as_fields(sample):
    """A sample is bytes / str (stored as `.bin` / `.txt`) or a dict {extension: bytes | str}."""
    if isinstance(sample, dict):
        fields = sample
    elif isinstance(sample, str):
        fields = {"txt": sample}
    else:
        fields = {"bin": sample}
    out = {}
    for ext, value in fields.items():
        if not isinstance(ext, str) or not ext or "." in ext or "/" in ext:
            raise ValueError(f"sample field names must be plain extensions like 'bin', got {ext!r}")
        out[ext] = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return out


def write_shards(samples, directory, *, samples_per_shard):
    """Write `samples` into tar shards `shard-000000.tar, ...` in `directory`; return their paths.

    Each sample becomes the members `<key>.<ext>` of ONE shard, with key = its index as 9 digits
    (the WebDataset convention: files sharing a key form one sample). Each shard is written to a
    temporary name and renamed, so a killed writer never leaves a half shard under a real name."""
    _check_int("samples_per_shard", samples_per_shard, 1)
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths, tar, tmp, count = [], None, None, 0
    try:
        for index, sample in enumerate(samples):
            if count % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                    tmp.replace(paths[-1])
                paths.append(directory / f"shard-{len(paths):06d}.tar")
                tmp = paths[-1].with_name(paths[-1].name + ".partial")
                tar = tarfile.open(tmp, "w")
            for ext, data in _as_fields(sample).items():
                info = tarfile.TarInfo(f"{index:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            count += 1
    finally:
        if tar is not None:
            tar.close()
            tmp.replace(paths[-1])
    return [str(p) for p in paths]


def read_shard(path):
    """Yield the samples of one tar shard, in order, as dicts {"__key__": key, ext: bytes}."""
    sample, key = {}, None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.rpartition(".")
            if k != key and sample:
                yield sample
                sample = {}
            key = k
            sample["__key__"] = k
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


class ShardedStream(IterableDataset):
    """An IterableDataset over tar shards, split over ranks AND DataLoader workers.

    `shuffle_buffer=0` keeps each reader's shard order and sample order; `k > 0` shuffles the
    shard order (the same order on every rank: seed + epoch) and mixes samples through a buffer of
    k samples (a reader emits a random buffered sample each time a new one arrives)."""

    def __init__(self, shard_paths, *, rank=0, world_size=1, shuffle_buffer=0, seed=0):
        self.shard_paths = [str(p) for p in shard_paths]
        _check_int("world_size", world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size - 1], got {rank!r}")
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        _check_int("seed", seed, 0)
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, 0

    def set_epoch(self, epoch):
        _check_int("epoch", epoch, 0)
        self.epoch = epoch

    def shards_for(self, worker_id=0, num_workers=1):
        """The shard paths reader (this rank, worker_id of num_workers) reads, in order."""
        order = list(self.shard_paths)
        if self.shuffle_buffer:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        readers = self.world_size * num_workers
        return order[self.rank * num_workers + worker_id::readers]

    def samples_for(self, worker_id=0, num_workers=1):
        """What one reader yields (used by __iter__ with the DataLoader's worker info)."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker_id}")
        buffer = []
        for path in self.shards_for(worker_id, num_workers):
            for sample in read_shard(path):
                if not self.shuffle_buffer:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def __iter__(self):
        info = get_worker_info()  # None in the main process (num_workers=0)
        if info is None:
            return self.samples_for(0, 1)
        return self.samples_for(info.id, info.num_workers)
