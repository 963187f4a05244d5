"""Lesson 02 — pretokenize once; RAM vs memmap; loop vs vectorized batching. All measured.

Objective: see where the time goes before the model even runs.
  1. text -> token ids ONCE: tokenizing costs seconds every run, loading the saved ids costs
     milliseconds (our byte tokenizer is one numpy call, so the gap is small here; a real BPE
     tokenizer is orders of magnitude slower per byte, which is why datasets ship as .bin).
     Sizes: UTF-8 text vs the uint16 .bin vs a Python list of ints.
  2. RAM (`numpy.fromfile`) vs memmap (`numpy.memmap`) random-batch throughput, with a WARM page
     cache (the file's pages already in memory) and, where the OS lets us drop the file from the
     cache (`os.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`, Linux), COLD: every batch's
     pages must come from disk again. The table says which rows are which.
  3. `get_batch_loop` (a Python loop, slices -> lists -> torch.tensor) vs `get_batch` (one
     vectorized gather) at B=64, T=512, asserting that both return the same tensors.

Serves: Module 8 deck slide 8 (the speed ladder; this is its rungs 1 RAM preload and 2
vectorized batching) and slide 18 / M8-LAB-03 (isolate one toggle's impact on tokens/sec);
syllabus 16-05 (memory-mapped datasets with numpy memmap; avoiding data-starved training);
GPT-2 notes sections "1. Pre-Tokenization (Before Training)", "2. RAM Preload vs Memory-Mapping
(mmap)" and "5. Vectorized Batch Creation".
Prerequisites: minitrain.data (ByteTokenizer, pretokenize, load_tokens, get_batch).

Run: python lessons/02_pretokenize_memmap_vs_ram.py   (~20 s on 2 cores; outputs/lesson02/)
Numbers are wall-clock medians on whatever machine runs it (shared and noisy here): compare
the ratios inside one run, never across machines.
"""
import mmap
import os
import sys
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from minitrain.bench import fastest_thread_count, measure
from minitrain.data import (ByteTokenizer, default_corpus, get_batch,
                            get_batch_loop, load_tokens, pretokenize)
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson02")
CORPUS_BYTES = 16_000_000  # half of the stdlib corpus: big enough that batches hit many pages
B, T = 64, 512
REPEATS = 7


def median_time(fn, repeats=REPEATS, before=None, tokens=B * T):
    """Median wall time of fn() over `repeats` calls after one untimed warm-up call
    (`minitrain.bench.measure`); `before` runs untimed before every call (e.g. evict the cache)."""
    return measure(fn, tokens_per_step=tokens, warmup=1, iters=repeats,
                   before_each=before)["median_s"]


def drop_from_page_cache(path, memmap=None):
    """Evict the file's pages from the OS page cache; False where the OS has no posix_fadvise.

    The kernel never evicts a page that some process still maps, so a live memmap first gives
    its pages back (`madvise(MADV_DONTNEED)` on numpy's underlying mmap object)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    if memmap is not None and hasattr(mmap, "MADV_DONTNEED"):
        memmap._mmap.madvise(mmap.MADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def main():
    # All cores unless 1 thread is faster on this machine right now (a busy one); the loaders
    # time numpy gathers, which use one thread anyway.
    torch.set_num_threads(fastest_thread_count())
    OUT.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    path = OUT / "corpus.bin"

    # 1. tokenize once, then load many times. Reading the corpus, pretokenizing it and the cold
    #    load below happen ONCE each by nature (a second call would be warm): timed as single
    #    calls with perf_counter, not with measure (whose warm-up would hide the cold cost).
    t0 = time.perf_counter()
    text = default_corpus(max_bytes=CORPUS_BYTES)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_tokens = pretokenize(text, path)
    t_tok = time.perf_counter() - t0
    t_list = median_time(lambda: tok.encode(text[:1_000_000]), repeats=3,
                         tokens=1_000_000) * len(text) / 1_000_000
    t_load = median_time(lambda: load_tokens(path, mode="ram"), repeats=3, tokens=n_tokens)
    text_bytes = len(text.encode("utf-8"))
    print(f"corpus: {n_tokens:,} tokens (Python {sys.version.split()[0]} stdlib sources)")
    print(f"{'what':<44}{'size MB':>10}{'time s':>10}")
    print(f"{'read + decode the .py files':<44}{text_bytes / 1e6:>10.1f}{t_read:>10.2f}")
    bin_mb, list_mb = path.stat().st_size / 1e6, n_tokens * 8 / 1e6
    print(f"{'encode to a Python list[int] (extrapolated)':<44}{list_mb:>10.1f}{t_list:>10.2f}")
    print(f"{'pretokenize (numpy) + write uint16 .bin':<44}{bin_mb:>10.1f}{t_tok:>10.2f}")
    print(f"{'load_tokens(mode=ram) of the .bin':<44}{bin_mb:>10.1f}{t_load:>10.3f}")
    print("  (byte tokens: the uint16 file is 2x the text; a BPE id covers ~4 bytes, so there it"
          " is ~half)\n")

    # 2. RAM vs memmap random batches, warm and cold page cache
    ram, mm = load_tokens(path, mode="ram"), load_tokens(path, mode="memmap")

    def batches(data):
        rng = np.random.default_rng(0)
        return lambda: get_batch(data, B, T, rng=rng)

    rows = {"RAM (fromfile)": median_time(batches(ram)),
            "memmap, warm cache": median_time(batches(mm))}
    del mm  # its mapping would keep the pages in the cache
    cold = drop_from_page_cache(path)
    if cold:  # every timed batch starts with the file's pages evicted
        mm_cold = load_tokens(path, mode="memmap")
        rows["memmap, cold cache (fadvise DONTNEED)"] = median_time(
            batches(mm_cold), before=lambda: drop_from_page_cache(path, mm_cold))
        drop_from_page_cache(path, mm_cold)
        t0 = time.perf_counter()
        load_tokens(path, mode="ram")
        t_load_cold = time.perf_counter() - t0
        del mm_cold
    print(f"random batches B={B}, T={T}:")
    print(f"{'loader':<40}{'ms/batch':>10}{'tok/s':>14}")
    for name, s in rows.items():
        print(f"{name:<40}{s * 1e3:>10.2f}{B * T / s:>14,.0f}")
    if cold and rows["memmap, cold cache (fadvise DONTNEED)"] < 2 * rows["memmap, warm cache"]:
        print("(eviction had no measurable effect here, e.g. a tmpfs file: the cold row is warm)")
    if cold:
        print(f"RAM pays its cold cost once: load_tokens(ram) right after eviction took "
              f"{t_load_cold:.3f} s (warm: {t_load:.3f} s)")
    else:
        print("(no posix_fadvise on this OS: the cold-cache rows are skipped)")
    warm_ratio = rows["memmap, warm cache"] / rows["RAM (fromfile)"]
    print(f"memmap/RAM time ratio, warm: {warm_ratio:.2f}x")
    if cold:
        cold_ratio = rows["memmap, cold cache (fadvise DONTNEED)"] / rows["RAM (fromfile)"]
        print(f"memmap/RAM time ratio, cold: {cold_ratio:.2f}x")

    # 3. loop vs vectorized, same rng state -> same batch
    xl, yl = get_batch_loop(ram, B, T, rng=np.random.default_rng(1))
    xv, yv = get_batch(ram, B, T, rng=np.random.default_rng(1))
    assert torch.equal(xl, xv) and torch.equal(yl, yv), "loop and vectorized batches differ"
    xm, ym = get_batch(load_tokens(path, mode="memmap"), B, T, rng=np.random.default_rng(1))
    assert torch.equal(xm, xv) and torch.equal(ym, yv), "memmap and RAM batches differ"
    rng_l, rng_v = np.random.default_rng(2), np.random.default_rng(2)
    t_loop = median_time(lambda: get_batch_loop(ram, B, T, rng=rng_l))
    t_vec = median_time(lambda: get_batch(ram, B, T, rng=rng_v))
    speedup = t_loop / t_vec
    print(f"\nbatching B={B}, T={T} (equal outputs asserted):")
    print(f"{'get_batch_loop (Python loop)':<40}{t_loop * 1e3:>10.2f} ms")
    print(f"{'get_batch (vectorized gather)':<40}{t_vec * 1e3:>10.2f} ms")
    print(f"loop/vectorized time ratio: {speedup:.1f}x")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), facecolor=BACKGROUND)
    names = list(rows) + ["loop batching (RAM)"]
    values = [s * 1e3 for s in rows.values()] + [t_loop * 1e3]
    ax1.barh(names, values, color=[NAVY, GOLD, MUTED, RED][:len(names)])
    ax1.set_xlabel("ms per batch (B=64, T=512), log scale")
    ax1.set_xscale("log")
    ax1.set_title("Where a batch comes from", loc="left", color=NAVY)
    sizes = {"UTF-8 text": text_bytes, "uint16 .bin": path.stat().st_size,
             "list[int]\n(8-byte pointers)": n_tokens * 8}
    ax2.bar(list(sizes), [v / 1e6 for v in sizes.values()], color=[MUTED, NAVY, GOLD])
    ax2.set_ylabel("MB")
    ax2.set_title("Size of the same tokens", loc="left", color=NAVY)
    for ax in (ax1, ax2):
        ax.set_facecolor(PANEL)
    fig.tight_layout()
    fig.savefig(OUT / "loaders.png", dpi=110)
    plt.close(fig)
    print(f"figure: {OUT / 'loaders.png'}")
    path.unlink()  # 32 MB: do not leave it lying around

    # the lesson's claims
    assert t_load < t_tok, "loading saved ids must beat re-tokenizing the text"
    assert speedup > 5, f"vectorized batching should be much faster than the loop ({speedup:.1f}x)"
    assert path.exists() is False


if __name__ == "__main__":
    main()
