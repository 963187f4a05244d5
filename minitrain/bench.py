"""Timing a training step fairly: warm-up excluded, device synchronized, median and spread.

What: `measure(step_fn, tokens_per_step=...)` calls `step_fn()` `warmup` times without timing it,
then `iters` times, each timed on its own, and reports the median, the 10th and 90th percentiles
and tokens/s computed from the median.

Why each piece matters:
- Warm-up. The first calls pay one-off costs: memory-allocator growth, lazy initialisation,
  cuDNN/oneDNN algorithm search, `torch.compile`'s compilation (seconds to minutes). Counting them
  makes a fast method look slow. Lesson 07 shows the distortion measured.
- Synchronization. GPU kernels are launched asynchronously: without `torch.cuda.synchronize()`
  the clock stops when the *launch* returns, not when the work is done.
- Median, not mean. A shared machine produces occasional slow outliers; the median ignores them,
  p10/p90 show how noisy the run was. Compare methods only inside one run, as ratios.

Formula: tokens_per_s = tokens_per_step / median_s.

Common bug: timing `loss = model(x)` without `loss.item()` or a synchronize on GPU, which
measures kernel launch time only.
"""
import os
import pathlib
import platform
import statistics
import sys
import time

import torch


def _synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _percentile(sorted_values, q):
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure(step_fn, *, tokens_per_step, warmup=3, iters=10):
    """Time `iters` calls of `step_fn()` after `warmup` untimed calls.

    Returns a dict: median_s, p10_s, p90_s, mean_s, min_s, max_s, times_s (every timed call),
    tokens_per_s (tokens_per_step / median_s), warmup, iters.
    """
    if not callable(step_fn):
        raise ValueError("step_fn must be callable: pass a function that runs one step")
    if tokens_per_step is None or tokens_per_step <= 0:
        raise ValueError(f"tokens_per_step must be > 0, got {tokens_per_step!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        step_fn()
    _synchronize()
    times = []
    for _ in range(iters):
        _synchronize()
        t0 = time.perf_counter()
        step_fn()
        _synchronize()
        times.append(time.perf_counter() - t0)
    ordered = sorted(times)
    median = statistics.median(ordered)
    return {
        "median_s": median,
        "p10_s": _percentile(ordered, 10),
        "p90_s": _percentile(ordered, 90),
        "mean_s": statistics.fmean(ordered),
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "times_s": times,
        "tokens_per_s": tokens_per_step / median,
        "warmup": warmup,
        "iters": iters,
    }


def write_text_atomic(path, text):
    """Write `text` to `path` via a temp file in the same folder and `os.replace`, so a killed
    benchmark never leaves a half-written table behind. Creates the parent folders."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def proc_status_bytes(field):
    """A memory field of /proc/self/status in bytes (Linux), e.g. "VmRSS" (resident now) or
    "VmHWM" (the resident high-water mark). KeyError when the field is absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_memory_bytes(device="cpu"):
    """Peak memory of this process so far: CUDA `torch.cuda.max_memory_allocated(device)`;
    CPU the peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS); 0 off POSIX."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


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
    """What a result table must say about where it was measured (the nanochat habit)."""
    meta = {
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
    return meta
