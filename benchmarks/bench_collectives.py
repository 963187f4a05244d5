"""Benchmark: minitrain's pipelined ring all-reduce vs dist.all_reduce (gloo), 1-64 MB, 2 and 3 ranks.

What: for every (ranks N, size) cell, N gloo CPU processes (1 torch thread each)
  1. check ring_all_reduce against dist.all_reduce on the same float32 input (bit for bit on 2
     ranks; within the summation-order bound on 3) - a wrong result exits non-zero, no time;
  2. time both round-robin in the same processes: barrier, one call, next implementation, ...
     (one warm-up round, then rounds until --seconds have passed, at least --iters), the two
     taking turns to go first. A collective ends when its slowest rank does, so each round's
     time is the max over ranks.
Reported: median ms, algorithm bandwidth (bytes / time) and bus bandwidth (algbw * 2(N-1)/N, the
per-link rate, comparable across N) for both, and the ratio ring / gloo: the median over rounds
of (ring's time / gloo's time in the same round). Pairing by round matters on a shared 2-core
machine: a single 1 MB call takes 1 ms or 3 ms depending on who else holds the cores at that
moment, and both calls of one round see the same moment. Small sizes get many rounds (~400 at
1 MB), so the median is steady. Turns matter too: with the ring always first, the call that
went second was systematically faster (measured at 4 MB on 3 ranks: ring / gloo 1.27-1.28 with
a fixed order, 1.04-1.07 taking turns, four alternating runs), so the ranks take turns and the
table also shows the ratio over the rounds the ring went first and over those it went second.
The method's own noise, from A/A runs at 1 MB on 2 ranks (one implementation in both seats):
gloo / gloo 0.96 and 1.02, ring / ring 1.05 and 1.02.

Target (the course's): ring <= 1.2x dist.all_reduce at every size 1-64 MB, 2 and 3 ranks (same-run
ratios). A miss is reported, not hidden; --strict turns it into a non-zero exit.

Writes outputs/bench/collectives.md and outputs/bench/collectives.json.

    python benchmarks/bench_collectives.py           # the full table (~1-3 min on 2 cores)
    python benchmarks/bench_collectives.py --quick   # 1 MB, 2 ranks, 3 rounds: a smoke test
"""
import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from benchmarks.harness import machine_metadata, paired_ratio, write_report
from minitrain.collectives import SEGMENT_BYTES, ring_all_reduce
from minitrain.distributed_utils import launch
from minitrain.style import outputs_dir

SIZES_MB = (1, 4, 16, 64)
WORLDS = (2, 3)
TARGET_RATIO = 1.2


def _worker(rank, world, sizes_mb, iters, seconds):
    """In every rank: validate, then time ring and gloo round-robin for each size."""
    torch.set_num_threads(1)  # the ranks share the machine's cores
    impls = {"ring": ring_all_reduce, "gloo": dist.all_reduce}
    out = []
    for mb in sizes_mb:
        x = torch.randn(mb * 2**20 // 4, generator=torch.Generator().manual_seed(rank + 10 * mb))
        ours, ref = x.clone(), x.clone()
        ring_all_reduce(ours)
        dist.all_reduce(ref)
        magnitude = x.abs().double()
        dist.all_reduce(magnitude)  # sum_r |x_r|: the scale of a float sum's rounding error
        bound = 2 * (world - 1) * torch.finfo(x.dtype).eps * magnitude
        exact = bool(torch.equal(ours, ref))
        within = bool(((ours.double() - ref.double()).abs() <= bound).all())
        times = {name: [] for name in impls}
        deadline, i = None, 0
        while True:  # round 0 is the warm-up
            order = list(impls) if i % 2 == 0 else list(impls)[::-1]  # take turns going first
            for name in order:
                fn = impls[name]
                y = x.clone()
                dist.barrier()
                t0 = time.perf_counter()
                fn(y)
                if i > 0:
                    times[name].append(time.perf_counter() - t0)
            if i == 0:
                deadline = time.perf_counter() + seconds
            i += 1
            done = torch.tensor([int(i > iters and time.perf_counter() > deadline)])
            dist.all_reduce(done)  # every rank stops after the same round
            if done.item():
                break
        out.append({"mb": mb, "exact": exact, "within_bound": within, "times": times})
    return out


def bench(sizes_mb, worlds, iters, seconds, timeout_s):
    rows = []
    for world in worlds:
        ranks = launch(_worker, world, sizes_mb, iters, seconds, timeout_s=timeout_s, preload=())
        for i, mb in enumerate(sizes_mb):
            recs = [r[i] for r in ranks]
            ok = all(r["exact"] for r in recs) if world == 2 else all(r["within_bound"] for r in recs)
            if not ok:
                raise SystemExit(f"VALIDATION FAILED: ring_all_reduce != dist.all_reduce at {mb} MB, "
                                 f"{world} ranks (no time printed)")
            row = {"world": world, "mb": mb, "exact": all(r["exact"] for r in recs)}
            n_rounds = len(recs[0]["times"]["ring"])
            per_round = {}
            for name in ("ring", "gloo"):
                rounds = [max(r["times"][name][j] for r in recs) for j in range(n_rounds)]
                per_round[name] = rounds
                med = statistics.median(rounds)
                algbw = mb * 2**20 / med / 1e9
                row.update({f"{name}_ms": 1e3 * med, f"{name}_rounds_ms": [1e3 * t for t in rounds],
                            f"{name}_algbw_GBps": algbw,
                            f"{name}_busbw_GBps": algbw * 2 * (world - 1) / world})
            row["rounds"] = n_rounds
            row["ratio"] = paired_ratio(per_round["ring"], per_round["gloo"])
            # timed round j is loop round i = j + 1, and the ring went first when i was even
            for seat, parity in (("ring_first", 0), ("ring_second", 1)):
                js = [j for j in range(n_rounds) if (j + 1) % 2 == parity]
                row[f"ratio_{seat}"] = paired_ratio([per_round["ring"][j] for j in js],
                                                    [per_round["gloo"][j] for j in js])
            row["met"] = row["ratio"] <= TARGET_RATIO
            rows.append(row)
            print(f"  N={world} {mb:3d} MB  {n_rounds:4d} rounds  ring {row['ring_ms']:8.1f} ms  gloo {row['gloo_ms']:8.1f} ms"
                  f"  ratio {row['ratio']:.2f} (ring first {row['ratio_ring_first']:.2f}, second "
                  f"{row['ratio_ring_second']:.2f})  ring busbw {row['ring_busbw_GBps']:.2f} GB/s", flush=True)
    return rows


def render(rows, meta, command):
    lines = ["# Ring all-reduce (minitrain, pipelined isend/irecv) vs dist.all_reduce (gloo)", "",
             f"float32, gloo CPU processes, 1 torch thread per rank, ring segments of "
             f"{SEGMENT_BYTES // 2**10} KiB. Both implementations validated, then timed "
             "round-robin in the same processes, taking turns to go first; each round's time is "
             "the slowest rank's; ms "
             "columns are medians over rounds, ring/gloo is the median of the per-round "
             "ratios.", "",
             f"Machine: {meta['cpu']} ({meta['cpu_count']} cores, shared with other jobs: compare "
             f"ratios within this table), torch {meta['torch']}. Command: `{command}`.", "",
             "| N | MB | rounds | ring ms | gloo ms | ring/gloo | ring first / second "
             f"| ring busbw GB/s | gloo busbw GB/s | target <= {TARGET_RATIO}x |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['world']} | {r['mb']} | {r['rounds']} | {r['ring_ms']:.1f} | {r['gloo_ms']:.1f} | "
              f"{r['ratio']:.2f}x | {r['ratio_ring_first']:.2f}x / {r['ratio_ring_second']:.2f}x | "
              f"{r['ring_busbw_GBps']:.2f} | {r['gloo_busbw_GBps']:.2f} | "
              f"{'met' if r['met'] else 'NOT met'} |" for r in rows]
    worst = max(rows, key=lambda r: r["ratio"])
    lines += ["", f"Worst cell: {worst['ratio']:.2f}x at {worst['mb']} MB, {worst['world']} ranks: "
              f"target **{'met' if all(r['met'] for r in rows) else 'NOT met'}** in this run.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 MB, 2 ranks, 3 rounds: a smoke test")
    parser.add_argument("--iters", type=int, default=5, help="at least this many timed rounds")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time budget per cell: rounds continue until it is spent")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.seconds < 0:
        parser.error("--iters must be >= 1 and --seconds >= 0")
    sizes, worlds, iters = ((1,), (2,), 3) if args.quick else (SIZES_MB, WORLDS, args.iters)
    seconds = 0.0 if args.quick else args.seconds
    command = "python benchmarks/bench_collectives.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    t0 = time.perf_counter()
    rows = bench(sizes, worlds, iters, seconds, args.timeout)
    meta = machine_metadata(dtype="float32")
    markdown = render(rows, meta, command)
    write_report(outputs_dir("bench"), "collectives", markdown, {
        "machine": meta, "command": command, "quick": args.quick, "segment_bytes": SEGMENT_BYTES,
        "target_ratio": TARGET_RATIO, "rows": rows, "seconds": time.perf_counter() - t0})
    print(markdown)
    return 1 if args.strict and not all(r["met"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
