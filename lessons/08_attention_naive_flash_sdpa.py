"""Lesson 08 - attention three ways: the O(T^2) matrix (naive), tiles (flash), the built-in (SDPA).

Objective: see, with measured numbers, why FlashAttention exists. The textbook attention builds
the (T, T) score and probability matrices and autograd keeps them for backward, so its memory
grows with T^2. FlashAttention-2 (minitrain.attention.flash_attention) walks over tiles with an
online softmax and keeps only O and the log-sum-exp, so its extra memory grows with T. The
built-in torch.nn.functional.scaled_dot_product_attention (SDPA) uses a fused flash-style kernel.

Serves: Module 8 deck slide 8 (annotation 7: FlashAttention), slide 9 (annotation 6: it reduces
memory traffic in attention) and slide 18 / M8-LAB-03 (the FlashAttention toggle); syllabus 16-03
(activation memory analysis: the saved (T, T) matrices); GPT-2 notes section "6. Flash Attention
(PyTorch 2.0+)" ("The Standard Attention Problem", "The Key Insight: Tiling + Recomputation",
"Memory Savings"); workshop guide Section 8 "GPU, CUDA & Parallel Training" ("CUDA Kernels in
Transformers"). The animation animations/flash_tiling.py shows the tile sweep this lesson
measures.

Prerequisites: softmax, matrix multiplication, what autograd saves for backward.

What it does:
1. asserts that naive, flash and SDPA give the same output and gradients (float64);
2. for T = 256, 512, 1024 (B=1, H=4, D=64, causal, float32) runs each method in its own FRESH
   subprocess (sizes in increasing order) and measures forward+backward time (median of 3,
   after the first call) and the peak extra resident memory: on Linux /proc/self/clear_refs
   resets the high-water mark, then VmHWM - VmRSS(before) is what the first full-size
   forward+backward added (after a tiny warm-up call that pays one-off initialization;
   elsewhere: ru_maxrss delta). Memory a method freed could stay mapped and hide growth, so each
   method gets its own process, sizes run smallest first, glibc's mmap threshold is pinned to
   1 MiB (big blocks are fresh mappings, unmapped when freed) and malloc_trim(0) returns freed
   heap pages before each size (benchmarks/bench_attention.py goes further: one fresh process
   per cell);
3. prints a table, saves outputs/lesson08/attention.png, and asserts its claims: naive's
   memory grows ~T^2 (doubling T multiplies it by > 3), flash's stays a small fraction of naive's.

Timings are from a shared 2-core CPU with one torch thread per cell: read ratios, not absolutes.
Pure-PyTorch flash stays well behind SDPA's fused kernel (a Python loop over tiles, no on-chip
SRAM to win time from); naive, which writes and re-reads several (T, T) matrices, is slower
still as T grows (see the table). The win that is large and certain on a CPU is memory.
"""
import ctypes
import ctypes.util
import io
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from minitrain.attention import flash_attention, naive_attention
from minitrain.bench import measure, peak_extra_bytes
from minitrain.files import write_atomic
from minitrain.style import GOLD, MUTED, NAVY, RED, outputs_dir

OUT_DIR = outputs_dir("lesson08")
SEQ_LENS = (256, 512, 1024)
BATCH, HEADS, HEAD_DIM = 1, 4, 64
METHODS = ("naive", "flash", "sdpa")
TIMED_REPEATS = 3
# A fixed glibc mmap threshold: every block >= 1 MiB is its own mapping, returned to the OS the
# moment it is freed, so a later, larger cell cannot reuse pages an earlier cell left resident.
# (Not lower: flash's 64 KiB tiles would then each cost an mmap/munmap and distort its time.)
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def attention_fn(method):
    if method == "naive":
        return lambda q, k, v: naive_attention(q, k, v, causal=True)
    if method == "flash":
        return lambda q, k, v: flash_attention(q, k, v, causal=True, block_size=128)  # bench's best
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)



def return_freed_memory_to_os():
    """glibc keeps freed heap pages mapped; malloc_trim(0) hands them back, so the next cell's
    allocations must fault in fresh pages and show up in the peak (no-op off glibc)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def run_cell(method, T):
    """Peak extra memory of the first full-size fwd+bwd, then the median time of the next ones."""
    return_freed_memory_to_os()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, T, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
    grad_out = torch.randn(BATCH, HEADS, T, HEAD_DIM, generator=gen)
    fn = attention_fn(method)
    # Warm up on a tiny problem: one-off costs (lazy kernel init, library pages) are not the
    # method's memory; a tiny T leaves no large freed block behind to hide the real peak.
    tiny = [t[..., :16, :].detach().requires_grad_() for t in (q, k, v)]
    fn(*tiny).backward(grad_out[..., :16, :])

    def step():
        fn(q, k, v).backward(grad_out)

    peak, how = peak_extra_bytes(step)  # this first full-size call is the warm-up
    timing = measure(step, tokens_per_step=BATCH * T, warmup=0, iters=TIMED_REPEATS)
    print(json.dumps({"method": method, "T": T, "peak_bytes": peak, "how": how,
                      "median_s": timing["median_s"]}), flush=True)


def check_equal():
    """All three methods: same output and gradients (float64, T not a multiple of the block)."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 3, 150, 16, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, 3, 150, 16, generator=gen, dtype=torch.float64)
    results = {}
    for method in METHODS:
        out = attention_fn(method)(q, k, v)
        results[method] = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
    for method in ("naive", "flash"):
        for got, ref in zip(results[method], results["sdpa"]):
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)
    print("equality: naive == flash == SDPA (output, dq, dk, dv; float64, T=150, block 64)  OK")


def main():
    import matplotlib.pyplot as plt  # here, not at the top: the --cells processes never plot

    check_equal()
    rows = {}
    for method in METHODS:
        seq_lens = ",".join(str(T) for T in SEQ_LENS)
        proc = subprocess.run([sys.executable, __file__, "--cells", method, seq_lens],
                              capture_output=True, text=True, timeout=150, env=MALLOC_ENV)
        if proc.returncode != 0:
            raise RuntimeError(f"cells of {method} failed:\n{proc.stderr[-2000:]}")
        for line in proc.stdout.strip().splitlines():
            r = json.loads(line)
            rows[(method, r["T"])] = r
    how = rows[("naive", SEQ_LENS[0])]["how"]
    print(f"\nB={BATCH} H={HEADS} D={HEAD_DIM} causal float32, forward+backward, 1 thread, "
          f"one fresh process per method, peak = {how}")
    print(f"{'T':>5} | {'method':6} | {'time ms':>8} | {'peak extra MiB':>14} | {'one TxT matrix MiB':>18}")
    for T in SEQ_LENS:
        matrix_mib = BATCH * HEADS * T * T * 4 / 2**20
        for method in METHODS:
            r = rows[(method, T)]
            print(f"{T:>5} | {method:6} | {r['median_s'] * 1e3:8.1f} | {r['peak_bytes'] / 2**20:14.1f} | "
                  f"{matrix_mib:18.1f}")

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"naive": RED, "flash": GOLD, "sdpa": NAVY}
    for method in METHODS:
        ax_t.plot(SEQ_LENS, [rows[(method, T)]["median_s"] * 1e3 for T in SEQ_LENS], "o-",
                  color=colors[method], label=method)
        ax_m.plot(SEQ_LENS, [rows[(method, T)]["peak_bytes"] / 2**20 for T in SEQ_LENS], "o-",
                  color=colors[method], label=method)
    ax_m.plot(SEQ_LENS, [BATCH * HEADS * T * T * 4 / 2**20 for T in SEQ_LENS], "--", color=MUTED,
              label="one (T, T) fp32 matrix")
    for ax, title, unit in ((ax_t, "forward+backward time", "ms"), (ax_m, "peak extra memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("Lesson 08: naive O(T^2) matrix vs flash tiles vs SDPA (measured, 2-core CPU)")
    fig.tight_layout()
    buf = io.BytesIO()  # render, then one atomic write: never half a PNG on disk
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(OUT_DIR / "attention.png", buf.getvalue())
    plt.close(fig)
    print(f"figure: {OUT_DIR / 'attention.png'}")

    naive_growth = rows[("naive", SEQ_LENS[-1])]["peak_bytes"] / rows[("naive", SEQ_LENS[-2])]["peak_bytes"]
    flash_share = rows[("flash", SEQ_LENS[-1])]["peak_bytes"] / rows[("naive", SEQ_LENS[-1])]["peak_bytes"]
    print(f"naive memory x{naive_growth:.2f} when T doubles; flash uses {flash_share:.3f}x naive's "
          f"memory at T={SEQ_LENS[-1]}")
    assert naive_growth > 3.0, "naive attention memory should grow ~4x when T doubles"
    assert flash_share < 0.25, "flash attention should need a small fraction of naive's memory"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--cells":
        # One thread, on purpose: this lesson measures each method's peak extra memory, and
        # per-thread scratch buffers of a multi-threaded run can add to the high-water mark.
        torch.set_num_threads(1)
        for T in sys.argv[3].split(","):  # increasing T: each cell needs more than any before
            run_cell(sys.argv[2], int(T))
    else:
        main()
