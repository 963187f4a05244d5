"""Distributed benchmark: ring all-reduce, DDP variants, ZeRO memory - validated, then timed.

    python benchmarks/bench_distributed.py          # writes outputs/bench/distributed.md + .json
    python benchmarks/bench_distributed.py --quick  # 1 MB, 2 ranks, a 1-layer GPT: a smoke test

1. `ring_all_reduce` vs `dist.all_reduce` (gloo, CPU processes) for 1-64 MB at 2 and 3 ranks:
   median time, algorithm bandwidth (bytes / time) and bus bandwidth (algbw * 2(N-1)/N, the
   per-link rate, comparable across N). Each size is first checked against dist.all_reduce.
2. DDP naive / overlap / bucketed (+ without overlap) vs torch DDP: step time of the tiny GPT
   (n_layer 4, n_embd 128, B=8, T=128 per rank) on 2 ranks; every variant is first checked to
   reach torch DDP's parameters after 3 AdamW steps. Steps are timed round-robin.
3. ZeRO stages 0-3: per-rank bytes of parameters, gradients, AdamW state, predicted vs measured.
Targets (same-run ratios): ring <= 1.2x dist.all_reduce at 16 MB on 2 ranks; bucketed+overlapped
DDP <= 1.10x torch DDP; ZeRO-1 optimizer-state bytes per rank within 10% of total/N.
Exit status: non-zero when a validation fails (a wrong result never gets a time). A missed
timing target is reported, not hidden, and does not change the exit status.
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.experiments import compare_ddp_modes, train_with_stage
from benchmarks.harness import run_metadata, write_report
from minitrain.collectives import ring_all_reduce
from minitrain.distributed_utils import launch
from minitrain.style import outputs_dir

SIZES_MB = (1, 4, 16, 64)
WORLDS = (2, 3)
GPT = dict(n_layer=4, n_head=4, n_embd=128, batch=8, seq_len=128)
QUICK_GPT = dict(n_layer=1, n_head=2, n_embd=32, batch=2, seq_len=32)  # --quick


def _collective_worker(rank, world, sizes_mb, warmup, iters):
    out = []
    for mb in sizes_mb:
        numel = mb * 2**20 // 4
        x = torch.randn(numel, generator=torch.Generator().manual_seed(rank + 10 * mb))
        ours, ref = x.clone(), x.clone()
        ring_all_reduce(ours)
        dist.all_reduce(ref)
        err = (ours - ref).abs().max().item()
        times = {"ring": [], "dist": []}
        for i in range(warmup + iters):
            for name, fn in (("ring", ring_all_reduce), ("dist", dist.all_reduce)):
                y = x.clone()
                dist.barrier()
                t0 = time.perf_counter()
                fn(y)
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
        out.append({"mb": mb, "max_err": err, "times": times})
    return out


def bench_collectives(sizes_mb=SIZES_MB, worlds=WORLDS, iters=9):
    rows = []
    for world in worlds:
        ranks = launch(_collective_worker, world, sizes_mb, 2, iters, timeout_s=240, preload=())
        for i, mb in enumerate(sizes_mb):
            recs = [r[i] for r in ranks]
            err = max(r["max_err"] for r in recs)
            if not err < 1e-3:
                raise SystemExit(f"VALIDATION FAILED: ring_all_reduce {mb} MB N={world}: {err}")
            row = {"world": world, "mb": mb, "max_err": err}
            for name in ("ring", "dist"):  # a collective ends when its slowest rank does
                per_iter = [max(r["times"][name][j] for r in recs)
                            for j in range(len(recs[0]["times"][name]))]
                med = statistics.median(per_iter)
                algbw = mb * 2**20 / med / 1e9
                row.update({f"{name}_ms": 1e3 * med, f"{name}_algbw_GBps": algbw,
                            f"{name}_busbw_GBps": algbw * 2 * (world - 1) / world})
            row["ratio"] = row["ring_ms"] / row["dist_ms"]
            rows.append(row)
    return rows


def bench_ddp(gpt=GPT, iters=10):
    ranks = launch(compare_ddp_modes, 2, timeout_s=400, check_steps=3, warmup=3, iters=iters,
                   **gpt)
    rows = []
    for label in ranks[0]:
        diff = max(r[label]["max_diff"] for r in ranks)
        if not diff < 1e-5:
            raise SystemExit(f"VALIDATION FAILED: DDP {label} differs from torch DDP by {diff}")
        times = [max(r[label]["times_s"][i] for r in ranks)
                 for i in range(len(ranks[0][label]["times_s"]))]
        rows.append({"variant": label, "max_diff": diff, "median_ms": 1e3 * statistics.median(times),
                     "p10_ms": 1e3 * sorted(times)[1], "p90_ms": 1e3 * sorted(times)[-2],
                     "all_reduces_per_step": ranks[0][label]["all_reduces_per_step"],
                     "tokens_per_s": 2 * gpt["batch"] * gpt["seq_len"] / statistics.median(times)})
    return rows


def bench_zero(world=2, gpt=GPT):
    rows = []
    for stage in range(4):
        for r in launch(train_with_stage, world, stage, n_layer=gpt["n_layer"],
                        n_embd=gpt["n_embd"], steps=1, seed=0, timeout_s=240):
            rows.append({"world": world, **r})
    losses = [r["loss"] for r in rows]
    if max(losses) - min(losses) > 1e-4:
        raise SystemExit(f"VALIDATION FAILED: ZeRO stages disagree on the loss: {losses}")
    return rows



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 MB, 2 ranks, a 1-layer GPT: checks the pipeline, not the targets")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread per rank: the ranks share the machine's cores
    gpt = QUICK_GPT if args.quick else GPT
    t0 = time.perf_counter()
    if args.quick:
        coll = bench_collectives(sizes_mb=(1,), worlds=(2,), iters=3)
        ddp, zero = bench_ddp(gpt, iters=3), bench_zero(gpt=gpt)
    else:
        coll, ddp, zero = bench_collectives(), bench_ddp(), bench_zero()
    by = {r["variant"]: r for r in ddp}
    ring_mb = 1 if args.quick else 16
    ring16 = next(r for r in coll if r["world"] == 2 and r["mb"] == ring_mb)
    zero1 = [r for r in zero if r["stage"] == 1]
    total_state = 8 * zero1[0]["num_params"]
    worst_zero1 = max(abs(r["measured"]["optimizer_state"] - total_state / len(zero1))
                      / (total_state / len(zero1)) for r in zero1)
    targets = [
        (f"ring_all_reduce <= 1.2x dist.all_reduce, {ring_mb} MB, 2 ranks", ring16["ratio"], 1.2),
        (f"bucketed+overlapped DDP <= 1.10x torch DDP (tiny GPT, B={gpt['batch']}, "
         f"T={gpt['seq_len']}, 2 ranks)",
         by["bucketed"]["median_ms"] / by["torch_ddp"]["median_ms"], 1.10),
        ("ZeRO-1 optimizer-state bytes per rank within 10% of total/N (worst rank)",
         worst_zero1, 0.10),
    ]
    meta = run_metadata(t0)
    commit = meta["commit"]
    lines = ["# Distributed benchmark (gloo, CPU processes)", "",
             f"Machine: {meta['cpu']} ({meta['cpu_count']} cores, shared), torch {meta['torch']},"
             f" 1 thread per rank; commit {commit}; `python benchmarks/bench_distributed.py`.",
             "All results validated against torch.distributed before timing. Times are medians"
             " under contention: compare ratios within this run only.", "",
             "## Ring all-reduce vs dist.all_reduce", "",
             "| N | MB | ring ms | gloo ms | ring/gloo | ring algbw GB/s | ring busbw GB/s |"
             " gloo busbw GB/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['world']} | {r['mb']} | {r['ring_ms']:.1f} | {r['dist_ms']:.1f} | "
              f"{r['ratio']:.2f} | {r['ring_algbw_GBps']:.2f} | {r['ring_busbw_GBps']:.2f} | "
              f"{r['dist_busbw_GBps']:.2f} |" for r in coll]
    lines += ["", f"## DDP step time, tiny GPT ({gpt}), 2 ranks, AdamW", "",
              "| variant | all-reduces/step | median ms | p10-p90 ms | tokens/s | max abs diff vs "
              "torch DDP |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['all_reduces_per_step'] if r['variant'] != 'torch_ddp' else 'C++ reducer'}"
              f" | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {r['max_diff']:.1e} |" for r in ddp]
    lines += ["", f"## ZeRO per-rank bytes, tiny GPT ({zero[0]['num_params']:,} params), "
              "2 ranks: measured (predicted)", "",
              "| stage | rank | params | grads | optimizer state |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['rank']} | " + " | ".join(
        f"{r['measured'][k]:,} ({r['predicted'][k]:,.0f})"
        for k in ("params", "grads", "optimizer_state")) + " |" for r in zero]
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {'yes' if value <= limit else 'NO'} |"
              for name, value, limit in targets]
    lines += ["", f"Wall time {meta['wall_s']:.0f} s."]
    report = "\n".join(lines) + "\n"
    write_report(outputs_dir("bench"), "distributed", report, {
        "meta": meta, "quick": args.quick, "collectives": coll, "ddp": ddp, "zero": zero,
        "targets": [{"name": n, "value": v, "limit": lim, "met": v <= lim}
                    for n, v, lim in targets]})
    print(report)


if __name__ == "__main__":
    main()
