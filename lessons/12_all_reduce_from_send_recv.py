"""Lesson 12 - all-reduce from send/recv: why the ring sends 2(N-1)/N of the data, the optimum.

Objective: build the collective that data parallelism runs every step, from point-to-point
messages only, and measure what each rank sends.
  1. naive all-reduce: every rank sends its tensor to rank 0, rank 0 adds and sends the sum back.
     Rank 0's link carries 2(N-1) * D bytes; the others idle.
  2. ring all-reduce (minitrain.collectives): reduce-scatter then all-gather around a ring; every
     rank sends 2(N-1)/N * D bytes and all links work at once.
We count the bytes every rank actually hands to a send (naive: by wrapping `dist.send`; ring: by
handing it a group that counts, since the ring calls its group's own `send`), check both results
against `dist.all_reduce`, and time all three on CPU processes (gloo).

Serves: Module 8 deck slide 10 (annotations 2-3: gradients synchronized across workers;
throughput depends on the communication balance); syllabus 16-08 (the all-reduce that
synchronizes gradients after backward); workshop guide Section 8 "GPU, CUDA & Parallel Training"
("Data Parallelism Strategies": gradient synchronization with all_reduce).
Prerequisites: lesson 01 (gradient averaging), `torch.distributed` basics (rank, world size,
process group).
Run: python lessons/12_all_reduce_from_send_recv.py   (spawns its own CPU processes, < 60 s)
"""
import json
import os

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from minitrain import collectives
from minitrain.bench import measure
from minitrain.distributed_utils import launch
from minitrain.style import GOLD, MUTED, NAVY, outputs_dir

OUT = outputs_dir("lesson12")
SIZES_MB = (0.25, 1.0, 4.0)
WORLDS = (2, 3)
REPEATS = 5


def threads_per_rank(world):
    """All cores, shared by the ranks: one process per rank, cores // world threads each."""
    return max(1, (os.cpu_count() or 1) // world)


def naive_all_reduce(tensor):
    """Everyone -> rank 0, rank 0 sums, rank 0 -> everyone (blocking send/recv)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        incoming = torch.empty_like(tensor)
        for src in range(1, world):
            dist.recv(incoming, src)
            tensor.add_(incoming)
        for dst in range(1, world):
            dist.send(tensor, dst)
    else:
        dist.send(tensor, 0)
        dist.recv(tensor, 0)


def _count_sent_bytes():
    """Wrap dist.send / dist.isend so every byte this rank sends through them is counted."""
    counter = {"bytes": 0}
    for name in ("send", "isend"):
        original = getattr(dist, name)

        def counting(tensor, *args, _original=original, **kwargs):
            counter["bytes"] += tensor.numel() * tensor.element_size()
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, counting)
    return counter


class CountingGroup:
    """All the ring asks of a process group - rank, size, send, recv - forwarded to the real
    one, with every byte handed to send counted."""

    def __init__(self, group, counter):
        self.group, self.counter = group, counter

    def rank(self):
        return self.group.rank()

    def size(self):
        return self.group.size()

    def send(self, tensors, dst, tag):
        self.counter["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return self.group.send(tensors, dst, tag)

    def recv(self, tensors, src, tag):
        return self.group.recv(tensors, src, tag)


def _median_time(fn, x):
    """Median of REPEATS calls of fn on a fresh copy of x, the ranks lined up by a barrier
    before each call (untimed: `measure`'s before_each), no warm-up excluded."""
    y = x.clone()

    def reset():
        y.copy_(x)
        dist.barrier()

    return measure(lambda: fn(y), tokens_per_step=x.numel(), warmup=0, iters=REPEATS,
                   before_each=reset)["median_s"]


def _rank_main(rank, world):
    counter = _count_sent_bytes()
    counting_world = CountingGroup(dist.group.WORLD, counter)
    rows = []
    for mb in SIZES_MB:
        numel = int(mb * 2**20) // 4
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank))
        ref = x.clone()
        dist.all_reduce(ref)
        record = {"world": world, "mb": mb}
        counted = {"naive": naive_all_reduce,
                   "ring": lambda t: collectives.ring_all_reduce(t, group=counting_world)}
        for name, fn in (("naive", naive_all_reduce), ("ring", collectives.ring_all_reduce)):
            y = x.clone()
            counter["bytes"] = 0
            counted[name](y)  # the same algorithm, its bytes counted; timed below uncounted
            record[f"{name}_sent_bytes"] = counter["bytes"]
            record[f"{name}_max_err"] = (y - ref).abs().max().item()
            record[f"{name}_ms"] = 1e3 * _median_time(fn, x)
        record["dist_ms"] = 1e3 * _median_time(dist.all_reduce, x)
        record["data_bytes"] = numel * 4
        rows.append(record)
    return rows


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    per_world = {world: launch(_rank_main, world, timeout_s=120, preload=(),
                               threads=threads_per_rank(world)) for world in WORLDS}
    print(f"{'N':>2} {'MB':>5} | {'sent/rank naive (max)':>21} {'ring':>10} {'2(N-1)/N*D':>11} | "
          f"{'naive ms':>8} {'ring ms':>8} {'gloo ms':>8}")
    table = []
    for world, ranks in per_world.items():
        for i, mb in enumerate(SIZES_MB):
            recs = [r[i] for r in ranks]
            data = recs[0]["data_bytes"]
            ideal = 2 * (world - 1) * data // world
            naive_max = max(r["naive_sent_bytes"] for r in recs)
            ring_sent = [r["ring_sent_bytes"] for r in recs]
            # the lesson's claims, checked on the measured numbers:
            assert all(r["ring_max_err"] < 1e-4 and r["naive_max_err"] < 1e-4 for r in recs)
            assert naive_max == (world - 1) * data  # rank 0 sends the sum N-1 times
            assert all(abs(s - ideal) <= 8 * world for s in ring_sent), (ring_sent, ideal)
            row = {"world": world, "mb": mb, "naive_max_sent": naive_max,
                   "ring_sent": ring_sent, "ideal": ideal,
                   **{k: max(r[k] for r in recs) for k in ("naive_ms", "ring_ms", "dist_ms")},
                   "naive_sent_per_rank": [r["naive_sent_bytes"] for r in recs]}
            table.append(row)
            print(f"{world:>2} {mb:>5} | {naive_max:>21,} {max(ring_sent):>10,} {ideal:>11,} | "
                  f"{row['naive_ms']:>8.2f} {row['ring_ms']:>8.2f} {row['dist_ms']:>8.2f}")
    (OUT / "results.json").write_text(json.dumps(table, indent=1))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    biggest = [r for r in table if r["mb"] == SIZES_MB[-1]]
    width = 0.35
    for j, row in enumerate(biggest):
        ranks = range(row["world"])
        xs = [j * 4 + r for r in ranks]
        axes[0].bar([x - width / 2 for x in xs], [b / 2**20 for b in row["naive_sent_per_rank"]],
                    width, color=MUTED, label="naive (via rank 0)" if j == 0 else None)
        axes[0].bar([x + width / 2 for x in xs], [b / 2**20 for b in row["ring_sent"]], width,
                    color=NAVY, label="ring" if j == 0 else None)
    axes[0].set_xticks([j * 4 + r for j, row in enumerate(biggest) for r in range(row["world"])])
    axes[0].set_xticklabels([f"N={row['world']}\nrank {r}" for row in biggest
                             for r in range(row["world"])])
    axes[0].set_title(f"MB sent by each rank for one all-reduce of D = {SIZES_MB[-1]} MB")
    axes[0].legend()
    for name, color in (("naive_ms", MUTED), ("ring_ms", NAVY), ("dist_ms", GOLD)):
        for world, style in zip(WORLDS, ("-", "--")):
            rows = [r for r in table if r["world"] == world]
            axes[1].plot([r["mb"] for r in rows], [r[name] for r in rows], style, color=color,
                         marker="o", label=f"{name[:-3]} N={world}")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xticks(SIZES_MB)
    axes[1].set_xticklabels([str(mb) for mb in SIZES_MB])
    axes[1].minorticks_off()
    axes[1].set_xlabel("tensor size (MB)")
    axes[1].set_ylabel("median time (ms), 2 shared CPU cores")
    axes[1].set_title("time per all-reduce (gloo, CPU processes)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "bytes_and_time.png", dpi=110)
    plt.close(fig)
    print("bytes are exact: every ring rank sends 2(N-1)/N of the data, naive rank 0 sends "
          "(N-1)x (and receives (N-1)x).\ntimes are medians on 2 shared CPU cores: small sizes "
          "are latency-bound and noisy; compare within one run only.\n"
          f"figure: {OUT / 'bytes_and_time.png'}")


if __name__ == "__main__":
    main()
