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

Also here: the memory readers lessons and benchmarks share (`peak_memory_bytes`, the one peak
reader; `proc_status_bytes` for the resettable high-water mark). Reporting plumbing (machine
metadata, writing tables) is benchmark tooling: `benchmarks/harness.py`.
"""
import os
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


def measure(step_fn, *, tokens_per_step, warmup=3, iters=10, before_each=None):
    """Time `iters` calls of `step_fn()` after `warmup` untimed calls.

    `before_each`: an optional function called, untimed, before every call (warm-up included),
    e.g. to evict a file from the page cache so each call times a cold read, or to line ranks up
    with a barrier.

    Returns a dict: median_s, p10_s, p90_s, mean_s, min_s, max_s, times_s (every timed call, in
    call order), tokens_per_s (tokens_per_step / median_s), warmup, iters.
    """
    if not callable(step_fn):
        raise ValueError("step_fn must be callable: pass a function that runs one step")
    if before_each is not None and not callable(before_each):
        raise ValueError("before_each must be callable or None: pass a function that runs "
                         "before every timed call")
    if tokens_per_step is None or tokens_per_step <= 0:
        raise ValueError(f"tokens_per_step must be > 0, got {tokens_per_step!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        step_fn()
    _synchronize()
    times = []
    for _ in range(iters):
        if before_each is not None:
            before_each()
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


def fastest_thread_count(candidates=None, *, probe=None, iters=9):
    """The torch thread count, of `candidates` (default: 1 and all cores), that runs `probe`
    fastest on this machine right now; all cores unless another count is > 10% faster.

    `probe` (default: a 256 x 256 float32 matmul) is timed with `measure` under each count;
    torch's thread count is left as it was. Why measure instead of always using every core: on
    an idle machine all cores win, but on a machine other processes keep busy, threads that must
    meet at the end of every parallel op wait for each other's turn on a core (measured on a
    2-core box at load 17: a tiny GPT step took 37 ms on 1 thread and 1,050 ms on 2)."""
    cores = os.cpu_count() or 1
    candidates = sorted(set(candidates or (1, cores)))
    if any(not isinstance(n, int) or n < 1 for n in candidates):
        raise ValueError(f"candidates must be thread counts >= 1, got {candidates!r}")
    if probe is None:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

        def probe():
            return a @ a
    previous = torch.get_num_threads()
    medians = {}
    try:
        for n in candidates:
            torch.set_num_threads(n)
            medians[n] = measure(probe, tokens_per_step=1, warmup=2, iters=iters)["median_s"]
    finally:
        torch.set_num_threads(previous)
    best = min(medians, key=medians.get)
    widest = max(candidates)
    return widest if medians[widest] <= 1.1 * medians[best] else best


def proc_status_bytes(field):
    """A memory field of /proc/self/status in bytes (Linux), e.g. "VmRSS" (resident now) or
    "VmHWM" (the resident high-water mark). KeyError when the field is absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_extra_bytes(step_fn, device="cpu"):
    """Run `step_fn()` once; return (peak bytes it added on top of what was in use before, how
    that was measured). CUDA: `max_memory_allocated` after `reset_peak_memory_stats`. CPU, Linux:
    writing "5" to /proc/self/clear_refs resets the resident high-water mark (VmHWM) to the
    current resident set, so VmHWM - VmRSS(before) is this call's peak alone; elsewhere the
    ru_maxrss delta (only growth past the process's earlier peak shows: an underestimate)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    try:
        rss_before = proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak resident set) to the current resident set
        step_fn()
        return proc_status_bytes("VmHWM") - rss_before, "VmHWM - VmRSS (clear_refs)"
    except OSError:
        import resource

        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step_fn()
        return ((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * unit,
                "ru_maxrss delta")


def peak_memory_bytes(device="cpu"):
    """Peak memory of this process so far: CUDA `torch.cuda.max_memory_allocated(device)`;
    CPU the peak resident set size: Linux VmHWM (this address space's high-water mark), else
    ru_maxrss (KiB on Linux, bytes on macOS); 0 off POSIX.

    Common bug: ru_maxrss on Linux. At exec the kernel carries the parent's high-water mark into
    the child's rusage, so a fresh `python` started by a 1 GiB process reports >= 1 GiB even if
    it used 20 MB (measured: 1.30 GB vs VmHWM 11 MB). VmHWM starts afresh with the new program."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        return proc_status_bytes("VmHWM")
    except (OSError, KeyError):  # not Linux: no /proc/self/status
        pass
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
