"""What every benchmark table carries: the machine it was measured on, and an atomic write.

What: `machine_metadata(dtype)` names the CPU, core count, torch threads, versions and GPU (the
nanochat habit: a result without its machine is not a result); `write_report(out_dir, name,
markdown, record)` writes `<name>.md` and `<name>.json` with `minitrain.files.write_atomic`, so
a killed benchmark never leaves half a table behind.

Why here and not in `minitrain/`: this is reporting plumbing for `benchmarks/bench_*.py`, lessons
that print where they ran, and `run_all.py`; the library keeps only the timing technique
(`minitrain.bench.measure`) and the memory readers.

Common bug: a results table copied into a README without the machine, the thread count or the
torch version: nobody can tell later whether a regression is the code or the box.
"""
import json
import os
import pathlib
import platform
import subprocess
import statistics
import sys
import time

import torch

from minitrain.files import write_atomic


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_metadata(dtype="float32"):
    """What a result table must say about where it was measured."""
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dtype": dtype,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_metadata(t_start):
    """machine_metadata() plus what identifies this run: the git commit (short hash, "unknown"
    outside a checkout), the command line and the wall time since `t_start` (perf_counter)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {**machine_metadata(), "commit": commit,
            "command": " ".join([sys.executable] + sys.argv),
            "wall_s": time.perf_counter() - t_start}


def paired_ratio(numerators, denominators):
    """Median over i of numerators[i] / denominators[i]: the ratio of two things timed side by
    side (the same round, the same step), so the machine's drift, which on a shared 2-core box
    is larger than many of the gaps measured, hits both sides of each ratio alike."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def write_report(out_dir, name, markdown, record):
    """Write `out_dir/<name>.md` (text) and `out_dir/<name>.json` (`record`), each atomically;
    returns the two paths."""
    out_dir = pathlib.Path(out_dir)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    write_atomic(md, markdown if markdown.endswith("\n") else markdown + "\n")
    write_atomic(js, json.dumps(record, indent=2) + "\n")
    return md, js
