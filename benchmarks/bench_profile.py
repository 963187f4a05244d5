"""Benchmark this machine's roofline ceilings: peak matmul FLOP/s and copy bandwidth, at 1 thread
and at all threads, fp32 and bf16. Writes outputs/bench/profile.md and profile.json.

What is measured (minitrain.profile, validated first: a speed is printed only after the
operation it times was checked against a float64 reference / an exact copy):
1. `peak_flops(dtype)`: the best (n x n) @ (n x n) over n in 512, 1024, 2048 (CPU) -- the
   ceiling MFU divides by. bf16 on a CPU with AMX runs several times the fp32 peak; without
   it, bf16 is emulated and SLOWER (then bf16 autocast cannot pay, whatever the model).
2. `peak_bandwidth()`: the best copy of a 256 MiB buffer (2 x 256 MiB moved): the memory
   slope of the roofline. Ridge point = peak / bandwidth in FLOP/byte.
Both are re-measured here (refresh=True) and stored in the machine cache
(~/.cache/minitrain/peaks.json) that lessons and the trainer read.

Run: python benchmarks/bench_profile.py [--quick]   (~20 s on 2 idle cores; --quick: seconds,
tiny sizes, NOT the machine's ceilings: written to a temporary cache, not the machine's)
"""
import argparse
import os
import tempfile

import torch

from benchmarks.harness import machine_metadata, write_report
from minitrain import profile as mp
from minitrain.style import outputs_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # relative error of a 64 x 64 matmul vs float64


def validate_matmul(name, dtype):
    """The matmul we time gives the right numbers at this dtype (else no speed is printed)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)  # (64, 64)
    ref = a.double() @ b.double()
    got = (a.to(dtype) @ b.to(dtype)).double()
    err = ((got - ref).norm() / ref.norm()).item()
    if not err < TOLERANCE[name]:
        raise SystemExit(f"matmul at {name} is wrong (relative error {err:.2e}): no speed printed")
    return err


def validate_copy():
    src = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0))
    dst = torch.zeros_like(src)
    dst.copy_(src)
    if not torch.equal(dst, src):
        raise SystemExit("copy_ did not copy: no bandwidth printed")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = parser.parse_args(argv)
    flops_kw = dict(size=256, reps=2) if args.quick else {}
    bw_kw = dict(size_bytes=2**22, reps=2) if args.quick else {}
    tmp = tempfile.TemporaryDirectory()
    cache = os.path.join(tmp.name, "peaks.json") if args.quick else None  # quick: not the machine's

    validate_copy()
    errors = {name: validate_matmul(name, dtype) for name, dtype in DTYPES.items()}
    rows = []
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        row = {"threads": threads}
        for name, dtype in DTYPES.items():
            row[name] = mp.peak_flops(dtype, refresh=True, cache_path=cache, **flops_kw)
        row["bandwidth"] = mp.peak_bandwidth(refresh=True, cache_path=cache, **bw_kw)
        row["ridge_fp32"] = mp.ridge_point(row["fp32"], row["bandwidth"])
        rows.append(row)
        print(f"threads {threads}: fp32 {row['fp32'] / 1e9:.1f} GFLOP/s, bf16 "
              f"{row['bf16'] / 1e9:.1f} GFLOP/s, copy {row['bandwidth'] / 1e9:.2f} GB/s", flush=True)
    tmp.cleanup()

    meta = machine_metadata()
    lines = ["# Roofline ceilings of this machine (minitrain.profile)", "",
             f"{meta['cpu']}, {meta['cpu_count']} cores, torch {meta['torch']}"
             + (" -- **--quick: tiny sizes, not the real ceilings**" if args.quick else ""), "",
             "| threads | fp32 matmul GFLOP/s | bf16 matmul GFLOP/s | bf16 / fp32 | copy GB/s |"
             " ridge (fp32) FLOP/byte |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['fp32'] / 1e9:.1f} | {r['bf16'] / 1e9:.1f} | "
                     f"{r['bf16'] / r['fp32']:.2f}x | {r['bandwidth'] / 1e9:.2f} | "
                     f"{r['ridge_fp32']:.1f} |")
    lines += ["", "Validated first: 64 x 64 matmul vs float64 (relative error "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + "), copy exact.",
              "Each number is the best of several calls (a ceiling); a busy machine only lowers it."]
    md, _ = write_report(outputs_dir("bench"), "profile", "\n".join(lines),
                         {"machine": meta, "quick": args.quick, "rows": rows,
                          "validation_rel_error": errors})
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
