"""Lesson 17 — profiling a training step and the roofline: where the time goes, how close to the limit.

Objective: measure, on this machine, (1) its two ceilings: peak matmul FLOP/s and memory
bandwidth, and the ridge point between them; (2) where one training step of the tiny GPT spends
its time, phase by phase (data, forward, backward, clip, optimizer) and operator by operator
(torch.profiler, Chrome trace); (3) where its operators sit on the roofline (memory- or
compute-bound, and at which matmul size that flips); (4) MFU at two widths and two context
lengths; (5) a data-starved run; (6) the FLOPs that torch's own FlopCounterMode misses on CPU.

Serves: syllabus 16-07 (profiling & bottleneck analysis: torch.profiler + Chrome trace, CUDA
event timing, CPU-GPU overlap, data vs compute, the roofline); Module 8 deck slide 12 (metric
stack: tokens/s made comparable as MFU) and M8-LAB-03 (which optimization toggle pays: read it
off the profile before trying it).

Prerequisites: lesson 07 (fair timing, `bench.measure`), lesson 08 (attention kernels), lesson
11 (the speed ladder); `minitrain.profile`, `minitrain.step_profiler`.

Run: python lessons/17_profiling_and_roofline.py   (~30 s on 2 idle cores; outputs/lesson17/)
The measured peaks are cached in ~/.cache/minitrain/peaks.json: delete that file (or call
peak_flops(refresh=True)) to measure again on an idle machine.
"""
import math
import queue
import threading
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode as TorchFlopCounterMode

from minitrain import profile as mp
from minitrain.bench import measure
from minitrain.clip import clip_grad_norm
from minitrain.data import corpus_cache_path, get_batch, get_batch_loop, load_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.step_profiler import StepProfiler, export_chrome_trace, top_operators, trace_names
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, TEXT, outputs_dir

TINY = dict(n_layer=2, n_head=4, n_embd=128)  # the tiny GPT profiled throughout
BATCH, SEQ = 8, 128
SMALL = dict(n_layer=2, n_head=4, n_embd=64)  # the data-starvation runs: 8 x 64 tokens
# ONE thread, on purpose: MFU and the roofline divide by a peak, so the peak and every op must
# be measured at the same thread count, and one thread is stable on a shared machine (with 2
# threads a busy neighbour stalls every op's thread barrier: we saw 100x slower steps).
THREADS = 1
PHASES = ("data", "forward", "backward", "clip", "optimizer")
MATMUL_OPS = set(mp.FLOP_RULES)  # mm, addmm, bmm, baddbmm, SDPA kernels, ...


def make_step(data, loader, profiler, *, config=TINY, batch=BATCH, seq=SEQ, seed=0):
    """A fresh tiny GPT + AdamW and a closure doing one profiled training step."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=seq, **config))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)

    def step():
        with profiler.phase("data"):
            x, y = loader(data, batch, seq, rng=rng)  # (B, T), (B, T)
        with profiler.phase("forward"):
            _, loss = model(x, y)
        with profiler.phase("backward"):
            loss.backward()
        with profiler.phase("clip"):
            clip_grad_norm(model.parameters(), 1.0)
        with profiler.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        profiler.step()
        return loss
    return step, model


def run_phases(step, profiler, warmup=2, steps=6):
    for _ in range(warmup):
        step()
    profiler.reset()  # warm-up excluded (lesson 07)
    for _ in range(steps):
        step()
    return profiler.summary()


def op_points(counter, n=8):
    """The n most expensive ops of a FlopCounter(time_ops=True) run, placed on the roofline.
    Non-matmul ops get a nominal 1 FLOP per output element (GELU does ~10, an add 1)."""
    points = []
    for name, s in sorted(counter.by_op.items(), key=lambda kv: -kv[1].seconds)[:n]:
        flops = s.flops if name in MATMUL_OPS else s.elements
        short = name.replace("_scaled_dot_product_flash_attention_for_cpu", "sdpa_cpu")
        points.append(dict(name=short, calls=s.calls, seconds=s.seconds, flops=flops,
                           intensity=flops / max(s.bytes, 1), rate=flops / max(s.seconds, 1e-9),
                           gbps=s.bytes / max(s.seconds, 1e-9) / 1e9, matmul=name in MATMUL_OPS))
    return points


def matmul_sweep(sizes=(16, 64, 256, 1024)):
    """Square fp32 matmuls: intensity n/6 FLOP/byte (3 n^2 floats moved for 2 n^3 FLOPs)."""
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)  # (n, n) each
        t = measure(lambda: torch.mm(a, b), tokens_per_step=1, warmup=2,
                    iters=max(3, min(50, 2 * 10**8 // n**3)))["median_s"]
        rows.append(dict(n=n, intensity=2 * n**3 / (12 * n * n), rate=2 * n**3 / t))
    return rows


def matmul_share(counter):
    total = sum(s.seconds for s in counter.by_op.values())
    return sum(s.seconds for n, s in counter.by_op.items() if n in MATMUL_OPS) / total


def slow_storage(latency_s):
    """The rung-0 loader (Python loop on a memmap) behind a simulated storage latency
    (time.sleep: a network filesystem, or decoding on the fly)."""
    def loader(data, batch, seq, *, rng):
        time.sleep(latency_s)
        return get_batch_loop(data, batch, seq, rng=rng)
    return loader


def prefetched(loader, workers=2, depth=4):
    """The same loader run ahead by `workers` background threads (what DataLoader(num_workers)
    does with processes): the latency overlaps the compute instead of adding to it. Two
    workers, because with a latency as long as the compute one worker only just keeps up."""
    q, threads = queue.Queue(maxsize=depth), []

    def fill(data, batch, seq, rng):
        while True:
            q.put(loader(data, batch, seq, rng=rng))  # numpy's Generator locks itself

    def get(data, batch, seq, *, rng):
        while len(threads) < workers:
            threads.append(threading.Thread(target=fill, args=(data, batch, seq, rng),
                                            daemon=True))
            threads[-1].start()
        return q.get(timeout=60)
    return get


def flop_counts(batch, seq):
    """(ours, built-in) FLOPs of one forward + backward, for naive and SDPA attention."""
    out = {}
    for attention in ("naive", "sdpa"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=seq, attention=attention, **TINY))
        x = torch.randint(0, 256, (batch, seq))  # (B, T)

        def fwd_bwd():
            model(x, x)[1].backward()
        _, ours = mp.count_flops(fwd_bwd)
        with TorchFlopCounterMode(display=False) as builtin:
            fwd_bwd()
        out[attention] = (ours, builtin.get_total_flops())
    return out


def gpu_async_demo():
    """CUDA only: a launch returns before the GPU is done; synchronize or CUDA events time it."""
    a = torch.randn(8192, 8192, device="cuda")  # (8192, 8192)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    c = a @ a  # queued on the stream; Python continues at once
    launch_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    synced_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    c = a @ a
    end.record()
    end.synchronize()
    event_s = start.elapsed_time(end) / 1e3
    print(f"\nGPU: launch returned after {launch_s * 1e3:.3f} ms; the matmul finished after "
          f"{synced_s * 1e3:.3f} ms (synchronize); CUDA events: {event_s * 1e3:.3f} ms. "
          "The CPU runs ahead of the GPU: that overlap is free speed, a stray .item() kills it.")
    assert launch_s < synced_s and c.shape == a.shape


def main():
    torch.set_num_threads(THREADS)  # see THREADS: peak and ops at the same thread count
    out = outputs_dir("lesson17")
    path = corpus_cache_path(max_bytes=2_000_000)
    ram, memmap = load_tokens(path, mode="ram"), load_tokens(path, mode="memmap")
    t_start = time.perf_counter()

    # 1. The machine's ceilings (measured once per machine, cached with their metadata).
    peak, bw = mp.peak_flops(torch.float32), mp.peak_bandwidth()
    peak_bf16, ridge = mp.peak_flops(torch.bfloat16), mp.ridge_point(peak, bw)
    print(f"Ceilings ({torch.get_num_threads()} threads, {mp.device_name()}; cache "
          f"{mp.default_cache_path()}):\n  fp32 matmul {peak / 1e9:8.1f} GFLOP/s | bf16 matmul "
          f"{peak_bf16 / 1e9:8.1f} GFLOP/s | copy {bw / 1e9:6.2f} GB/s | ridge {ridge:.1f} FLOP/byte")

    # 2. Where one step's time goes, phase by phase.
    profiler = StepProfiler("cpu")
    step, model = make_step(ram, get_batch, profiler)
    phases = run_phases(step, profiler)
    step_s = phases["(step)"]["per_step_s"]
    fpt = mp.flops_per_token(model.config, seq_len=SEQ)
    tiny_mfu = mp.mfu(BATCH * SEQ / step_s, fpt, peak)
    print(f"\nTiny GPT {TINY}, B={BATCH}, T={SEQ}: {step_s * 1e3:.1f} ms/step, "
          f"{BATCH * SEQ / step_s:,.0f} tok/s, {fpt:,} FLOPs/token -> MFU {tiny_mfu:.1%}")
    print(profiler.table())

    # 3. Operators by self time, and the Chrome trace.
    trace = out / "trace.json"
    prof = export_chrome_trace(step, trace, steps=3, warmup=0)
    top = top_operators(prof, 8, exclude=PHASES)
    assert set(PHASES) <= trace_names(trace), "the phases must appear by name in the trace"
    print("\nTop operators by self time (torch.profiler, 3 steps):")
    for o in top:
        print(f"  {o['name']:<42} {o['self_s'] * 1e3 / 3:8.2f} ms/step {o['share']:6.1%}")
    print(f"Chrome trace: {trace} - open it in chrome://tracing or https://ui.perfetto.dev: one row "
          "per thread, the phase names are the outer bars, the ATen ops nest inside them.")

    # 4. The roofline: each operator at its arithmetic intensity, and a matmul size sweep.
    with mp.FlopCounter(time_ops=True) as counter:
        step()
    points, sweep = op_points(counter), matmul_sweep()
    print(f"\nRoofline (ridge {ridge:.1f} FLOP/byte; bytes = every input read + output written):")
    print(f"  {'op':<38}{'ms':>8}{'FLOP/byte':>10}{'GFLOP/s':>9}{'GB/s':>7}  bound")
    for p in points:
        bound = "memory" if p["intensity"] < ridge else "compute"
        print(f"  {p['name'][:38]:<38}{p['seconds'] * 1e3:8.2f}{p['intensity']:10.2f}"
              f"{p['rate'] / 1e9:9.3f}{p['gbps']:7.2f}  {bound}")
    for r in sweep:
        print(f"  {'square matmul n=' + str(r['n']):<38}{'':8}{r['intensity']:10.2f}"
              f"{r['rate'] / 1e9:9.3f}{'':7}  {'memory' if r['intensity'] < ridge else 'compute'}")
    crossing = math.ceil(6 * ridge)  # square fp32 matmul: intensity n / 6 >= ridge
    print("  Dots far BELOW the roof are neither memory- nor compute-bound but overhead-bound: "
          "a small op pays a fixed ~10 us launch cost (what torch.compile and CUDA graphs cut).\n  Dots ABOVE the "
          "slope are served by the caches: the copy measured DRAM, a small matmul never leaves L2.")
    fastest = max([p["rate"] for p in points] + [r["rate"] for r in sweep])
    if fastest > 1.2 * peak:
        print(f"  NOTE: an op ran at {fastest / 1e9:.1f} GFLOP/s, above the cached peak: the peak "
              "was measured on a busier machine; re-measure with peak_flops(refresh=True).")
    assert sweep[-1]["rate"] > 3 * sweep[0]["rate"], "a big matmul must run far faster per FLOP"

    # 5. MFU at two widths x two context lengths (timing only: the profiler is disabled).
    grid = []
    for width in (64, 256):
        for seq in (64, 256):
            cfg = dict(n_layer=2, n_head=4, n_embd=width)
            s, m = make_step(ram, get_batch, StepProfiler(enabled=False), config=cfg, batch=2,
                             seq=seq)
            tps = measure(s, tokens_per_step=2 * seq, warmup=1, iters=3)["tokens_per_s"]
            with mp.FlopCounter(time_ops=True) as c:
                for _ in range(3):  # 3 steps: one step's op times are too noisy a sample
                    s()
            f = mp.flops_per_token(m.config, seq_len=seq)
            grid.append(dict(width=width, seq=seq, tps=tps, mfu=mp.mfu(tps, f, peak),
                             share=matmul_share(c)))
    print("\nMFU grid (2 layers, B=2):  width  T    tok/s    MFU   matmul share of op time")
    for g in grid:
        print(f"  {'':24}{g['width']:5} {g['seq']:4} {g['tps']:8,.0f} {g['mfu']:6.1%}  "
              f"{g['share']:6.1%}")
    for seq in (64, 256):
        narrow, wide = (next(g for g in grid if g["width"] == w and g["seq"] == seq)
                        for w in (64, 256))
        assert wide["mfu"] > narrow["mfu"], f"at T={seq} the wider model must use more of the peak"

    # 6. A data-starved run (a smaller model, 8 x 64 tokens): the real loaders, then slow
    #    storage as long as the compute, then the same storage prefetched in a thread.
    starved, compute_s = {}, None
    for name, loader, data in [("RAM, vectorized", get_batch, ram),
                               ("memmap, Python loop", get_batch_loop, memmap),
                               ("slow storage", None, memmap),
                               ("slow storage, prefetched", None, memmap)]:
        if loader is None:
            slow = slow_storage(compute_s)
            loader = prefetched(slow) if "prefetched" in name else slow
        p = StepProfiler("cpu")
        s, _ = make_step(data, loader, p, config=SMALL, batch=8, seq=64)
        summary = run_phases(s, p, warmup=2, steps=4)
        starved[name] = (summary["data"]["fraction"], summary["(step)"]["per_step_s"])
        if compute_s is None:  # the RAM run: the step's compute time sets the latency
            compute_s = summary["(step)"]["per_step_s"] - summary["data"]["per_step_s"]
    print(f"\nData-starved run (simulated storage latency {compute_s * 1e3:.0f} ms per batch):")
    for name, (share, s_) in starved.items():
        print(f"  {name:<28} data {share:6.1%} of a {s_ * 1e3:7.1f} ms step")
    assert starved["slow storage"][0] > 0.3, "the step must be seen waiting on data"
    assert starved["slow storage, prefetched"][0] < starved["slow storage"][0] / 2

    # 7. What FlopCounterMode misses on CPU.
    counts = flop_counts(4, SEQ)
    print("\nFLOPs of one forward + backward (B=4, T=128):   ours        FlopCounterMode")
    for attention, (ours, builtin) in counts.items():
        print(f"  {attention:<44} {ours / 1e6:9.1f} M  {builtin / 1e6:9.1f} M")
    (ours_naive, builtin_naive), (ours_sdpa, builtin_sdpa) = counts["naive"], counts["sdpa"]
    assert builtin_sdpa < builtin_naive == ours_naive <= ours_sdpa
    print(f"  -> the built-in reports the SDPA model {1 - builtin_sdpa / builtin_naive:.1%} cheaper "
          "than the naive one for the same math: it counts 0 for "
          "_scaled_dot_product_flash_attention_for_cpu and its backward.")

    if torch.cuda.is_available():
        gpu_async_demo()
        name = torch.cuda.get_device_name(0)
        print(f"GPU {name}: measured bf16 peak {mp.peak_flops(torch.bfloat16, device='cuda') / 1e12:.0f}"
              f" TFLOP/s; datasheet {mp.vendor_peak_flops(name) or 'unknown'}")

    # 8. The figure: phases, roofline, MFU grid, data starvation.
    fig, axes = plt.subplots(2, 2, figsize=(14, 9), facecolor=BACKGROUND)
    for ax in axes.flat:
        ax.set_facecolor(PANEL)
    ax = axes[0, 0]
    names = [n for n in phases if n != "(step)"]
    ax.barh(names, [phases[n]["per_step_s"] * 1e3 for n in names], color=NAVY)
    ax.set(xlabel="ms per step", title="where one step goes (tiny GPT)")
    ax.invert_yaxis()
    ax = axes[0, 1]
    xs = np.logspace(-2, 3, 200)
    ax.loglog(xs, [mp.roofline(x, peak, bw) / 1e9 for x in xs], color=TEXT, lw=2)
    ax.axvline(ridge, color=MUTED, ls="--")
    for p in points:
        ax.scatter(p["intensity"], p["rate"] / 1e9, color=GOLD if p["matmul"] else TEXT, zorder=3)
        ax.annotate(p["name"], (p["intensity"], p["rate"] / 1e9), fontsize=7, color=TEXT)
    ax.plot([r["intensity"] for r in sweep], [r["rate"] / 1e9 for r in sweep], "o-", color=NAVY,
            label="square matmul n=16..1024")
    ax.set(xlabel="arithmetic intensity (FLOP/byte)", ylabel="GFLOP/s",
           title="roofline: measured ceilings, measured ops")
    ax.legend(loc="lower right")
    ax = axes[1, 0]
    labels = [f"C={g['width']}\nT={g['seq']}" for g in grid]
    ax.bar(labels, [g["mfu"] * 100 for g in grid], color=[NAVY, NAVY, GOLD, GOLD])
    ax.set(ylabel="MFU (%)", title="MFU: wider models keep the matmul units busier")
    ax = axes[1, 1]
    ax.barh(list(starved), [v[0] * 100 for v in starved.values()],
            color=[RED if v[0] > 0.3 else NAVY for v in starved.values()])
    ax.set(xlabel="data share of the step (%)", title="a data-starved step, and prefetching")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "profiling_roofline.png", dpi=110, facecolor=BACKGROUND)
    plt.close(fig)

    top3 = ", ".join(o["name"] for o in top[:3])
    share = {w: np.mean([g["share"] for g in grid if g["width"] == w]) for w in (64, 256)}
    if share[256] > share[64]:
        advice = (f"matmuls take {share[64]:.0%} of the op time at width 64 and {share[256]:.0%} "
                  "at width 256: the narrow model is mostly memory-bound elementwise work, so "
                  "the rungs that cut bytes and overhead (native layers, SDPA, fused AdamW, "
                  "torch.compile) pay there; the wide one is matmul-bound, so the rung that "
                  f"speeds matmuls up (bf16 autocast, {peak_bf16 / peak:.1f}x the fp32 peak "
                  "here) pays")
    else:
        advice = (f"matmuls took {share[64]:.0%} of the op time at width 64 and {share[256]:.0%} "
                  "at width 256 in this run (noisy machine?): rerun before choosing a rung")
    print(f"\nClosing note: this machine's measured fp32 peak is {peak / 1e9:.1f} GFLOP/s "
          f"({bw / 1e9:.2f} GB/s, ridge {ridge:.1f} FLOP/byte); the tiny GPT's training step runs "
          f"at MFU {tiny_mfu:.1%}; its top three operators by self time are {top3}. A square fp32 "
          f"matmul needs n >= 6 x ridge = {crossing} to be compute-bound; below that it is "
          f"memory-bound, like every LayerNorm, GELU, softmax and optimizer update; {advice}. "
          f"Figure: {out / 'profiling_roofline.png'} ({time.perf_counter() - t_start:.0f} s).")


if __name__ == "__main__":
    main()
