"""Benchmark the data path: RAM vs memmap random batches (warm and cold page cache), loop vs
vectorized batching. Writes outputs/bench/loaders.md and loaders.json.

What is measured (minitrain.data, validated first: a speed is printed only after the batch it
times was checked equal to the reference batch):
1. Random-batch throughput (tokens/s of `get_batch`, B=32, T=512) from a token file loaded into
   RAM (`load_tokens(mode="ram")`) vs memory-mapped (`mode="memmap"`):
   - warm: the file's pages are already in the OS page cache (the usual case on a second epoch
     or a small corpus);
   - cold: before every batch the file is dropped from the page cache with
     `posix_fadvise(POSIX_FADV_DONTNEED)` and mapped afresh, so each window is a disk read. We check
     with `mincore` that the drop really happened; where it does not work (other OS, no mincore,
     pages pinned), the table says "cold: not available" instead of printing a warm number as cold.
   For RAM the cold cost is paid once: reading the whole file (`load s`, also measured cold).
2. Loop vs vectorized batching (`get_batch_loop` vs `get_batch`) from RAM, B = 16, 32, 64, 128 at
   T = 512. Target: vectorized >= 20x the loop at B=64.

Why: a training step that waits for its batch wastes the accelerator; the loop converts every
token to a Python int and back (B*T objects), the vectorized gather is one numpy fancy index.

Run: python benchmarks/bench_loaders.py [--quick]   (~30-60 s on 2 cores; --quick: seconds)
"""
import argparse
import ctypes
import ctypes.util
import gc
import mmap
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from benchmarks.harness import machine_metadata, write_report
from minitrain.bench import measure
from minitrain.data import default_corpus, get_batch, get_batch_loop, load_tokens, pretokenize
from minitrain.style import outputs_dir

CORPUS_BYTES = 16_000_000  # 32 MB token file (uint16)
QUICK_CORPUS_BYTES = 1_000_000  # --quick: a smoke run of every measurement, a few seconds
SEQ_LEN = 512
THROUGHPUT_BATCH = 32
BATCH_SIZES = (16, 32, 64, 128)
TARGET_B, TARGET_RATIO = 64, 20.0


def resident_fraction(path):
    """Fraction of the file's pages in the page cache (mincore); None where we cannot ask."""
    libc_name = ctypes.util.find_library("c")
    size = os.path.getsize(path)
    if not libc_name or size == 0:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    page = mmap.PAGESIZE
    n_pages = (size + page - 1) // page
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable view: an address
        try:
            buf = (ctypes.c_char * size).from_buffer(mm)
            vec = (ctypes.c_ubyte * n_pages)()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
            del buf
            if rc != 0:
                return None
            return sum(v & 1 for v in vec) / n_pages
        finally:
            mm.close()


def drop_from_page_cache(path):
    """Ask the kernel to forget the file's cached pages; True if mincore confirms it worked."""
    if not hasattr(os, "posix_fadvise"):
        return False
    gc.collect()  # mapped pages cannot be dropped: make sure no memmap of ours is alive
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    frac = resident_fraction(path)
    return frac is not None and frac < 0.05


def check_equal(a, b, what):
    if not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])):
        raise SystemExit(f"VALIDATION FAILED: {what}; no speed reported")


def bench_ram_vs_memmap(path):
    ram = load_tokens(path, mode="ram")
    mem = load_tokens(path, mode="memmap")
    for seed in range(3):  # validate: the same rng state gives the same batch from both
        check_equal(get_batch(ram, THROUGHPUT_BATCH, SEQ_LEN, rng=np.random.default_rng(seed)),
                    get_batch(mem, THROUGHPUT_BATCH, SEQ_LEN, rng=np.random.default_rng(seed)),
                    "memmap batch != RAM batch")
    tokens = THROUGHPUT_BATCH * SEQ_LEN
    rows = {}
    for mode, data in (("ram", ram), ("memmap", mem)):
        rng = np.random.default_rng(0)
        t = measure(lambda d=data, r=rng: get_batch(d, THROUGHPUT_BATCH, SEQ_LEN, rng=r),
                    tokens_per_step=tokens, warmup=3, iters=30)
        rows[mode] = {"warm_tokens_per_s": t["tokens_per_s"], "warm_median_s": t["median_s"]}
    del mem, data  # no live mapping may pin the pages we are about to drop
    # RAM: the cold cost is loading the whole file once.
    cold_ok = drop_from_page_cache(path)
    t0 = time.perf_counter()
    load_tokens(path, mode="ram")
    rows["ram"]["load_s_cold" if cold_ok else "load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_tokens(path, mode="ram")
    rows["ram"]["load_s_warm"] = time.perf_counter() - t0
    # memmap cold: drop, map afresh, time one batch; repeat.
    cold_times = []
    for i in range(12):
        if not drop_from_page_cache(path):
            cold_ok = False
            break
        fresh = load_tokens(path, mode="memmap")
        rng = np.random.default_rng(100 + i)
        t0 = time.perf_counter()
        get_batch(fresh, THROUGHPUT_BATCH, SEQ_LEN, rng=rng)
        cold_times.append(time.perf_counter() - t0)
        del fresh
    if cold_ok and cold_times:
        median = float(np.median(cold_times))
        rows["memmap"].update(cold_tokens_per_s=tokens / median, cold_median_s=median)
    return rows, cold_ok


def bench_loop_vs_vectorized(ram, batch_sizes=BATCH_SIZES):
    rows = []
    for b in batch_sizes:
        for seed in range(2):  # validate first
            check_equal(get_batch(ram, b, SEQ_LEN, rng=np.random.default_rng(seed)),
                        get_batch_loop(ram, b, SEQ_LEN, rng=np.random.default_rng(seed)),
                        f"get_batch != get_batch_loop at B={b}")
        rng_v, rng_l = np.random.default_rng(1), np.random.default_rng(1)
        vec = measure(lambda: get_batch(ram, b, SEQ_LEN, rng=rng_v), tokens_per_step=b * SEQ_LEN,
                      warmup=3, iters=25)
        loop = measure(lambda: get_batch_loop(ram, b, SEQ_LEN, rng=rng_l),
                       tokens_per_step=b * SEQ_LEN, warmup=1, iters=7)
        rows.append({"batch_size": b, "seq_len": SEQ_LEN, "loop_median_s": loop["median_s"],
                     "vectorized_median_s": vec["median_s"],
                     "loop_tokens_per_s": loop["tokens_per_s"],
                     "vectorized_tokens_per_s": vec["tokens_per_s"],
                     "speedup": loop["median_s"] / vec["median_s"]})
    return rows


def render(meta, rm, cold_ok, lv, target_met):
    ram, mem = rm["ram"], rm["memmap"]
    cold = (f"{mem['cold_tokens_per_s']:,.0f}" if "cold_tokens_per_s" in mem
            else "not available")
    lines = [
        "# Data loaders: RAM vs memmap, loop vs vectorized", "",
        f"Made by `python benchmarks/bench_loaders.py` on {meta['cpu']} "
        f"({meta['cpu_count']} cores, torch {meta['torch']}, {meta['torch_threads']} thread). "
        "Every batch timed was first checked equal to the reference batch.", "",
        f"## Random batches (B={THROUGHPUT_BATCH}, T={SEQ_LEN}), tokens/s", "",
        "| loader | warm page cache | cold page cache | note |", "|---|---:|---:|---|",
        f"| RAM (`np.fromfile`) | {ram['warm_tokens_per_s']:,.0f} | = warm | whole file read "
        f"once: {ram.get('load_s_cold', ram.get('load_s', float('nan'))):.3f} s "
        f"{'cold' if 'load_s_cold' in ram else '(cache state unknown)'}, "
        f"{ram['load_s_warm']:.3f} s warm |",
        f"| memmap | {mem['warm_tokens_per_s']:,.0f} | {cold} | pages read on first touch |", "",
        ("Cold = `posix_fadvise(DONTNEED)` before every batch, checked with `mincore` (< 5% of "
         "pages resident)." if cold_ok else
         "Cold page cache NOT measured: `posix_fadvise(DONTNEED)` did not empty the cache here "
         "(checked with `mincore`)."), "",
        f"## Loop vs vectorized batching (T={SEQ_LEN}, from RAM)", "",
        "| B | loop ms | vectorized ms | loop tokens/s | vectorized tokens/s | speedup |",
        "|---:|---:|---:|---:|---:|---:|"]
    for r in lv:
        lines.append(f"| {r['batch_size']} | {r['loop_median_s'] * 1e3:.2f} | "
                     f"{r['vectorized_median_s'] * 1e3:.3f} | {r['loop_tokens_per_s']:,.0f} | "
                     f"{r['vectorized_tokens_per_s']:,.0f} | {r['speedup']:.1f}x |")
    lines += ["", f"Target: vectorized >= {TARGET_RATIO:.0f}x the loop at B={TARGET_B}: "
              f"**{'met' if target_met else 'NOT met'}**."]
    return "\n".join(lines) + "\n"



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 1 MB corpus and B in {16, 64}: checks the pipeline, not speed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the loader work is single-threaded numpy: one torch thread
    corpus_bytes = QUICK_CORPUS_BYTES if args.quick else CORPUS_BYTES
    batch_sizes = (16, TARGET_B) if args.quick else BATCH_SIZES
    with tempfile.TemporaryDirectory(dir=outputs_dir()) as tmp:
        path = pathlib.Path(tmp) / "tokens.bin"
        n = pretokenize(default_corpus(max_bytes=corpus_bytes), path)
        rm, cold_ok = bench_ram_vs_memmap(path)
        lv = bench_loop_vs_vectorized(load_tokens(path, mode="ram"), batch_sizes)
    at_target = next(r for r in lv if r["batch_size"] == TARGET_B)
    target_met = at_target["speedup"] >= TARGET_RATIO
    meta = machine_metadata(dtype="uint16 tokens -> int64")
    text = render(meta, rm, cold_ok, lv, target_met)
    write_report(outputs_dir("bench"), "loaders", text, {
        "machine": meta, "tokens_in_file": n, "seq_len": SEQ_LEN, "quick": args.quick,
        "ram_vs_memmap": rm, "cold_page_cache_measured": cold_ok,
        "loop_vs_vectorized": lv,
        "target": {"batch_size": TARGET_B, "ratio": TARGET_RATIO,
                   "measured": at_target["speedup"], "met": target_met}})
    print(text)


if __name__ == "__main__":
    main()
