"""Benchmark the speed ladder: every rung of minitrain.ladder, each in a fresh process.
Writes outputs/bench/ladder.md and ladder.json (with machine metadata).

What: for each rung (rung 0 baseline ... rung 8 larger batch, side rungs 4b and 5b) train
`--steps` steps of the same small GPT on the same pretokenized data with `minitrain.train`, in its
own subprocess (so its peak memory is its own), and report tokens/s (median of the per-step
values after `--warmup` steps: warm-up and compile steps excluded), the first step's time (shows
what compile costs), peak memory, the loss after the same number of steps, and the speedup vs
rung 0 and vs the rung it builds on, computed from those measured numbers.

Validate, then benchmark: the table prints a rung's speed only if its step-0 loss equals rung 0's
(same seed, init and first batch; tolerance per rung, see benchmarks.ladder_runner.validate); the
script exits non-zero if any rung fails validation or crashes.

Context length: one ladder per `--seq-len` (default 256 and 1024). At T=256 the matmuls dominate
a step, at T=1024 naive attention's (T, T) matrices do, so the same rungs pay very differently;
showing both is the honest picture, and the lesson in it.

Threads: every core by default (the machine's full width). On a machine shared with other work a
multi-thread OpenMP region stalls whenever another core is busy and the numbers turn into noise:
use `--threads 1` there; the ratios between rungs are what this table is for.

On a machine with CUDA the GPU ladder (minitrain.ladder.GPU_RUNGS: TF32, SDPA, bf16, fused AdamW,
torch.compile, larger batch) runs as well, on a GPT-2-small-like model (12 layers, 12 heads,
768 wide, T=1024; the byte vocabulary, 256, is already a multiple of 64, so it needs no padding),
and its table also gives MFU against the vendor's datasheet bf16 peak for the detected device.
Every rung, CPU and GPU, reports MFU = tokens/s x FLOPs/token / the MEASURED matmul peak of this
machine (minitrain.profile: FLOPs/token = 6 N + 12 L C T; peak_flops measured once, cached). NOTE: this GPU path was written on a machine without a GPU and has
never been run; treat its first run as a test of it.

Run: python benchmarks/bench_ladder.py [--rungs 0 4 7] [--steps 16] [--threads 1] [--seq-len 256 1024]
     python benchmarks/bench_ladder.py --quick   (rungs 0 and 4 on a tiny model: a smoke test)
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

import torch

from benchmarks import ladder_runner as runner
from benchmarks.harness import machine_metadata, write_report
from minitrain import ladder
from minitrain.profile import flops_per_token, mfu, peak_flops, vendor_peak_flops
from minitrain.style import outputs_dir

TARGET = 5.0  # the course's goal for the ladder: best rung >= 5x rung 0
QUICK = dict(rungs=["0", "4"], steps=3, warmup=1, seq_len=[64], batch_size=2, n_layer=1,
             n_head=2, n_embd=32)  # --quick: a smoke run of the whole pipeline, seconds
CPU_MODEL = dict(batch_size=8, seq_len=256, n_layer=2, n_head=4, n_embd=128)
# One ladder per context length. At T=256 the matmuls dominate a step; at T=1024 naive attention's
# (T, T) score matrix does, so the same rungs pay very differently: both are the honest picture.
CPU_SEQ_LENS = (256, 1024)
GPU_MODEL = dict(batch_size=8, seq_len=1024, n_layer=12, n_head=12, n_embd=768, steps=30)
GPU_WARMUP = 10


def measured_peak(device, threads):
    """This machine's measured matmul ceiling (FLOP/s): fp32 on CPU at the rungs' thread count,
    bf16 on a GPU (minitrain.profile.peak_flops, cached per machine)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return peak_flops(dtype, device=device), dtype
    finally:
        torch.set_num_threads(before)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def run_ladder(keys, base, *, warmup, threads, workdir, timeout_s):
    results, failures = [], {}
    for key in keys:
        t0 = time.perf_counter()
        try:
            r = runner.run_rung(key, base, out_dir=pathlib.Path(workdir) / f"rung_{key}",
                                warmup=warmup, timeout_s=timeout_s, threads=threads)
            results.append(r)
            print(f"rung {key:>3} ({ladder.get_rung(key).name}): trained in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 - a crashed rung is reported, the rest go on
            failures[key] = str(exc)[-1500:]
            print(f"rung {key:>3} FAILED: {str(exc)[-400:]}", flush=True)
    return results, failures


def section(title, keys, base, results, failures, *, warmup, peak, peak_dtype, gpu_name=None):
    """Validate, build the table, add MFU to every rung; returns (markdown, json, all_ok).

    MFU = tokens/s x flops_per_token (6N + 12 L T C, minitrain.profile) / `peak`, the MEASURED
    matmul ceiling of this machine; on a GPU also against the datasheet peak of the detected
    device (None when the device is not in the table: never one A100 number for every GPU)."""
    valid = runner.validate(results, reference_key=keys[0]) if results and \
        any(r["key"] == keys[0] for r in results) else {}
    rows = runner.ladder_table(results, reference_key=keys[0]) if valid else []
    for row in rows:
        row["valid"], row["validation"] = valid[row["key"]]
        fpt = flops_per_token(dict(row["config"]))
        row["flops_per_token"] = fpt
        row["mfu"] = mfu(row["tokens_per_s"], fpt, peak)
        note = f"MFU {row['mfu']:.1%} of the measured {_dtype_name(peak_dtype)} peak"
        if gpu_name is not None:
            sheet = vendor_peak_flops(gpu_name, torch.bfloat16)
            row["mfu_datasheet"] = mfu(row["tokens_per_s"], fpt, sheet) if sheet else None
            note += (f", {row['mfu_datasheet']:.1%} of the datasheet bf16 peak"
                     if sheet else ", datasheet peak unknown for this device")
        row["note"] = note + "; " + row["note"]
    lines = [f"## {title}", "", runner.format_table(rows, valid=valid) if rows else
             "No result: the reference rung did not run.", ""]
    ok = bool(rows) and all(v[0] for v in valid.values()) and not failures
    best = runner.best_rung(rows, valid=valid) if rows and any(v[0] for v in valid.values()) \
        else None
    if best is not None:
        met = best["speedup"] >= TARGET
        lines.append(f"Best rung: **{best['key']} ({best['name']}) = {best['speedup']:.2f}x** "
                     f"rung {keys[0]}'s tokens/s. Target >= {TARGET:.0f}x: "
                     f"**{'met' if met else 'NOT met'}**.")
    slower = [r for r in rows if r.get("vs_parent") and r["vs_parent"] < 1 and r["valid"]]
    for r in slower:
        lines.append(f"- Rung {r['key']} ({r['name']}) is SLOWER than the rung it builds on "
                     f"({r['vs_parent']:.2f}x) on this machine: {r['note']}.")
    for key, err in failures.items():
        lines.append(f"- Rung {key} FAILED to run: `{err.strip().splitlines()[-1][:200]}`")
    for r in rows:
        if not r["valid"]:
            lines.append(f"- Rung {r['key']} failed validation ({r['validation']}): no speed.")
    lines.append("")
    data = {"base": base, "warmup_steps_excluded": warmup, "rows": rows, "failures": failures,
            "best": best and {"key": best["key"], "speedup": best["speedup"]},
            "target": TARGET, "target_met": bool(best and best["speedup"] >= TARGET)}
    return "\n".join(lines), data, ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rungs", nargs="*", default=list(ladder.RUNG_KEYS),
                        help="CPU rungs to run (rung 0 is always included)")
    parser.add_argument("--steps", type=int, default=16, help="training steps per rung")
    parser.add_argument("--warmup", type=int, default=4,
                        help="first steps excluded from tokens/s (compile happens in step 0)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads per rung (default: every core; use 1 on a machine "
                             "other work is loading)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                        help="also run the GPU ladder (default: when CUDA is available)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per rung")
    parser.add_argument("--seq-len", type=int, nargs="+", default=list(CPU_SEQ_LENS),
                        help="context lengths: one CPU ladder per value (default "
                             f"{' '.join(map(str, CPU_SEQ_LENS))})")
    for name in ("batch_size", "n_layer", "n_head", "n_embd"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=CPU_MODEL[name],
                            help=f"CPU ladder model/batch setting (default {CPU_MODEL[name]})")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None,
                        help="where ladder.md/.json go (default <repo>/outputs/bench)")
    parser.add_argument("--quick", action="store_true",
                        help="rungs 0 and 4, 3 steps, tiny model: checks the pipeline, not speed")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.gpu = False if args.gpu is None else args.gpu
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    for key in args.rungs:
        if key not in ladder.RUNG_KEYS:
            parser.error(f"--rungs: {key!r} is not one of {' '.join(ladder.RUNG_KEYS)}")
    keys = ["0"] + [k for k in ladder.RUNG_KEYS if k in args.rungs and k != "0"]
    use_gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
    if use_gpu and not torch.cuda.is_available():
        parser.error("--gpu: CUDA is not available on this machine")

    torch.set_num_threads(args.threads)  # so machine_metadata records what the rungs used
    meta = machine_metadata(dtype="fp32 master weights; per-rung autocast dtype in the table")
    out_dir = args.out_dir if args.out_dir is not None else outputs_dir("bench")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=outputs_dir()) as tmp:
        data = runner.prepare_data(pathlib.Path(tmp) / "tokens.bin",
                                   max_bytes=200_000 if args.quick else 4_000_000)
        threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
        md, sections = [], []
        cpu_peak, cpu_dtype = measured_peak("cpu", args.threads)
        print(f"measured CPU peak: {cpu_peak / 1e9:,.1f} GFLOP/s ({_dtype_name(cpu_dtype)}, "
              f"{args.threads or torch.get_num_threads()} threads)", flush=True)
        for seq_len in args.seq_len:  # attention's share of the step grows with T: one ladder each
            model = {k: getattr(args, k) for k in CPU_MODEL if k != "seq_len"}
            base = ladder.default_base(**model, seq_len=seq_len, steps=args.steps, data=data)
            results, failures = run_ladder(keys, base, warmup=args.warmup, threads=args.threads,
                                           workdir=tmp, timeout_s=args.timeout)
            cpu_md, cpu_json, cpu_ok = section(
                f"CPU ladder, T={seq_len} ({threads})", keys,
                {k: v for k, v in base.items() if k != "data"}, results, failures,
                warmup=args.warmup, peak=cpu_peak, peak_dtype=cpu_dtype)
            md.append(cpu_md)
            sections.append((cpu_json, cpu_ok))
        ok = all(section_ok for _, section_ok in sections)
        cpu_json = max((j for j, _ in sections), key=lambda j: j["base"]["seq_len"])
        report = {"machine": meta, "quick": args.quick, "cpu": cpu_json,  # "cpu": longest T
                  "cpu_by_seq_len": {str(j["base"]["seq_len"]): j for j, _ in sections}}
        if use_gpu:
            gpu_keys = [r.key for r in ladder.GPU_RUNGS]
            gpu_peak, gpu_dtype = measured_peak("cuda", None)
            gbase = ladder.default_base(**GPU_MODEL, data=data, warmup_steps=5)
            gres, gfail = run_ladder(gpu_keys, gbase, warmup=GPU_WARMUP, threads=None,
                                     workdir=tmp, timeout_s=args.timeout)
            gpu_md, gpu_json, gok = section(
                f"GPU ladder ({torch.cuda.get_device_name(0)})", gpu_keys,
                {k: v for k, v in gbase.items() if k != "data"}, gres, gfail,
                warmup=GPU_WARMUP, peak=gpu_peak, peak_dtype=gpu_dtype,
                gpu_name=torch.cuda.get_device_name(0))
            md.append(gpu_md)
            report["gpu"] = gpu_json
            ok = ok and gok
    cfg = cpu_json["base"]
    command = " ".join(["python benchmarks/bench_ladder.py"]
                       + (sys.argv[1:] if argv is None else list(argv)))
    header = [
        "# The speed ladder", "",
        f"Made by `{command}` on {meta['cpu']} ({meta['cpu_count']} "
        f"cores), torch {meta['torch']}, GPU: {meta['gpu'] or 'none'}; "
        f"{time.perf_counter() - t_start:.0f} s in all.", "",
        f"Model: {cfg['n_layer']} layers, {cfg['n_head']} heads, width {cfg['n_embd']}, "
        f"B={cfg['batch_size']}, T in {{{', '.join(map(str, args.seq_len))}}} (one ladder per "
        f"context length), {cfg['steps']} steps per rung, each rung in "
        "a fresh process. tokens/s = median of the per-step values after "
        f"{args.warmup} warm-up steps (compile happens in step 0 and is excluded; 'first step s' "
        "shows it). Peak memory = the process's peak RSS (CPU) or torch.cuda.max_memory_allocated "
        "(GPU). Speedups are ratios of the measured tokens/s in this run. Every speed was printed "
        "only after the rung's step-0 loss matched rung 0's. 'best step' is the fastest timed step "
        "and 'load avg' the machine's 1-minute load when the rung finished: rungs run one after "
        "another, so a rung that ran while other work loaded the machine looks slower than it "
        "is; compare the best-step column before trusting a surprising ratio.",
        ""]
    text = "\n".join(header + md)
    report["elapsed_s"] = time.perf_counter() - t_start
    report["quick"] = args.quick  # a smoke run: the animation does not draw these numbers
    write_report(out_dir, "ladder", text, report)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
