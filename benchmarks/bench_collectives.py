"""Benchmark: minitrain's pipelined ring all-reduce vs dist.all_reduce (gloo), 1-64 MB, 2 and 3 ranks.

What: for every (ranks N, size) cell, N gloo CPU processes (1 torch thread each)
  1. check ring_all_reduce against dist.all_reduce on the same float32 input (bit for bit on 2
     ranks; within the summation-order bound on 3) - a wrong result exits non-zero, no time;
  2. time both round-robin in the same processes: barrier, one call, next implementation, ...
     (one warm-up round, then --iters rounds). A collective ends when its slowest rank does, so
     each round's time is the max over ranks; the cell reports the median round.
Reported: median ms, algorithm bandwidth (bytes / time) and bus bandwidth (algbw * 2(N-1)/N, the
per-link rate, comparable across N) for both, and the ratio ring / gloo.

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

from benchmarks.harness import machine_metadata, write_report
from minitrain.collectives import SEGMENT_BYTES, ring_all_reduce
from minitrain.distributed_utils import launch
from minitrain.style import outputs_dir

SIZES_MB = (1, 4, 16, 64)
WORLDS = (2, 3)
TARGET_RATIO = 1.2


def _worker(rank, world, sizes_mb, iters):
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
        for i in range(iters + 1):  # round 0 is the warm-up
            for name, fn in impls.items():
                y = x.clone()
                dist.barrier()
                t0 = time.perf_counter()
                fn(y)
                if i > 0:
                    times[name].append(time.perf_counter() - t0)
        out.append({"mb": mb, "exact": exact, "within_bound": within, "times": times})
    return out


def bench(sizes_mb, worlds, iters, timeout_s):
    rows = []
    for world in worlds:
        ranks = launch(_worker, world, sizes_mb, iters, timeout_s=timeout_s, preload=())
        for i, mb in enumerate(sizes_mb):
            recs = [r[i] for r in ranks]
            ok = all(r["exact"] for r in recs) if world == 2 else all(r["within_bound"] for r in recs)
            if not ok:
                raise SystemExit(f"VALIDATION FAILED: ring_all_reduce != dist.all_reduce at {mb} MB, "
                                 f"{world} ranks (no time printed)")
            row = {"world": world, "mb": mb, "exact": all(r["exact"] for r in recs)}
            for name in ("ring", "gloo"):
                rounds = [max(r["times"][name][j] for r in recs) for j in range(iters)]
                med = statistics.median(rounds)
                algbw = mb * 2**20 / med / 1e9
                row.update({f"{name}_ms": 1e3 * med, f"{name}_rounds_ms": [1e3 * t for t in rounds],
                            f"{name}_algbw_GBps": algbw,
                            f"{name}_busbw_GBps": algbw * 2 * (world - 1) / world})
            row["ratio"] = row["ring_ms"] / row["gloo_ms"]
            row["met"] = row["ratio"] <= TARGET_RATIO
            rows.append(row)
            print(f"  N={world} {mb:3d} MB  ring {row['ring_ms']:8.1f} ms  gloo {row['gloo_ms']:8.1f} ms"
                  f"  ratio {row['ratio']:.2f}  ring busbw {row['ring_busbw_GBps']:.2f} GB/s", flush=True)
    return rows


def render(rows, meta, iters, command):
    lines = ["# Ring all-reduce (minitrain, pipelined isend/irecv) vs dist.all_reduce (gloo)", "",
             f"float32, gloo CPU processes, 1 torch thread per rank, ring segments of "
             f"{SEGMENT_BYTES // 2**10} KiB. Both implementations validated, then timed "
             f"round-robin in the same processes: median of {iters} rounds, each round the "
             "slowest rank's time.", "",
             f"Machine: {meta['cpu']} ({meta['cpu_count']} cores, shared with other jobs: compare "
             f"ratios within this table), torch {meta['torch']}. Command: `{command}`.", "",
             "| N | MB | ring ms | gloo ms | ring/gloo | ring busbw GB/s | gloo busbw GB/s | target <= "
             f"{TARGET_RATIO}x |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['world']} | {r['mb']} | {r['ring_ms']:.1f} | {r['gloo_ms']:.1f} | "
              f"{r['ratio']:.2f}x | {r['ring_busbw_GBps']:.2f} | {r['gloo_busbw_GBps']:.2f} | "
              f"{'met' if r['met'] else 'NOT met'} |" for r in rows]
    worst = max(rows, key=lambda r: r["ratio"])
    lines += ["", f"Worst cell: {worst['ratio']:.2f}x at {worst['mb']} MB, {worst['world']} ranks: "
              f"target **{'met' if all(r['met'] for r in rows) else 'NOT met'}** in this run.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 MB, 2 ranks, 3 rounds: a smoke test")
    parser.add_argument("--iters", type=int, default=9, help="timed rounds per cell (median)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the target is missed")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    sizes, worlds, iters = ((1,), (2,), 3) if args.quick else (SIZES_MB, WORLDS, args.iters)
    command = "python benchmarks/bench_collectives.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    t0 = time.perf_counter()
    rows = bench(sizes, worlds, iters, args.timeout)
    meta = machine_metadata(dtype="float32")
    markdown = render(rows, meta, iters, command)
    write_report(outputs_dir("bench"), "collectives", markdown, {
        "machine": meta, "command": command, "quick": args.quick, "segment_bytes": SEGMENT_BYTES,
        "target_ratio": TARGET_RATIO, "rows": rows, "seconds": time.perf_counter() - t0})
    print(markdown)
    return 1 if args.strict and not all(r["met"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
