"""Lesson 25 - torch.compile's modes, recompilation on new shapes, and reading what Inductor wrote.

Objective: lesson 10 measured the default mode's one-off cost and steady-state gain on an
elementwise chain. Here, on a transformer MLP sub-block (LayerNorm -> Linear -> GELU -> Linear,
inference), measure the three modes, count recompilations, and open the generated code.
1. Modes: "default", "reduce-overhead", "max-autotune": compile time (the first call) and
   steady-state time (median after warm-up, lesson 07), each checked equal to eager first.
   - reduce-overhead = default + CUDA graphs (record the kernel launches once, replay them with
     one launch: it removes per-kernel launch overhead on a GPU). CUDA graphs need CUDA tensors:
     on a CPU Inductor skips them (counted: torch._dynamo.utils.counters["inductor"]
     ["cudagraph_skips"]), so the mode is the default mode here.
   - max-autotune = benchmark several implementations of each matmul (and, on a GPU, Triton
     configurations) at compile time and keep the fastest, plus CUDA graphs as reduce-overhead
     (skipped on a CPU too; "max-autotune-no-cudagraphs" is the mode without them). On this CPU
     the generated code is inspected: if it still calls `extern_kernels.addmm` (the oneDNN/ATen
     matmul), autotuning kept the library matmul and the mode changed nothing but compile time.
   The first call of the first mode in a process also pays Inductor's start-up (imports, the
   compile-worker pool), so read "1st call" with the disk-cache column next to it.
2. Recompilation: a compiled function is specialised to its input shapes (guards). Feed the GPT
   four sequence lengths and count how many graphs get compiled, with dynamic=None (the default:
   specialise first, then recompile ONCE with a symbolic T when a second shape appears),
   dynamic=False (one compile per shape, until torch._dynamo.config.recompile_limit) and
   dynamic=True (one symbolic graph from the start). This part uses a counting backend (dynamo's
   graph capture without Inductor), because counting does not need code generation and 12
   Inductor compiles of a GPT would take minutes on 2 cores; the guards and recompiles are the
   same - they are decided by dynamo, before any backend runs.
3. Where to read the generated code: Inductor writes one Python module per graph under its cache
   directory (/tmp/torchinductor_$USER/<2 letters>/<hash>.py), with the C++ (CPU) or Triton (GPU)
   kernels as strings; TORCH_LOGS="output_code" prints it and logs "Output code written to:
   <path>". The lesson captures that path and prints the first lines of one fused kernel.

Serves: syllabus 16-02 (compilation modes default/reduce-overhead/max-autotune, dynamic shapes,
speedup methodology, the kernels the compiler generates); deck slide 9 (single-GPU changes:
compile) and slide 25 / M8-LAB-07 ("compile startup confusion"). Prerequisites: lessons 07, 10.

Run: python lessons/25_compile_modes.py   (measured at load ~10-13 on 2 cores: ~35-45 s with
Inductor's disk cache warm; ~50 s for a new graph once any compile ran on the machine, e.g.
lesson 10; ~90 s with an EMPTY cache, whose first compile also builds Inductor's C++ prefix
header - an idle 2-core box is several times faster; figure in outputs/lesson25/)
"""
import re
import statistics
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from minitrain.bench import fastest_thread_count, measure
from minitrain.model import GPT, GPTConfig
from minitrain.style import GOLD, MUTED, NAVY, outputs_dir

OUT = outputs_dir("lesson25")
B, T, C = 16, 64, 128
MODES = ("default", "reduce-overhead", "max-autotune")
SEQ_LENS = (16, 32, 48, 64)
DYNAMIC = (None, False, True)


class MLPBlock(nn.Module):
    """MLP(LayerNorm(x)): two matmuls and the elementwise ops compile can fuse around them
    (no residual add: one C++ kernel less to compile cold, ~10-30 s on 2 busy cores)."""

    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc = nn.Linear(c, 4 * c)
        self.proj = nn.Linear(4 * c, c)

    def forward(self, x):  # x: (B, T, C)
        return self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))  # (B, T, C)


def loaded_output_modules():
    """Files of the Inductor output modules loaded in this process (the files whose path
    TORCH_LOGS=output_code logs as "Output code written to: <path>")."""
    from torch._inductor.codecache import PyCodeCache

    return [m.__file__ for m in list(PyCodeCache.modules) if getattr(m, "__file__", None)]


def compile_mode(model, x, mode):
    """Compile with `mode`; returns its first-call time, steady median, counters and code paths."""
    torch._dynamo.reset()  # forget earlier compiles in this process (the disk cache stays)
    counters.clear()
    before = set(loaded_output_modules())
    compiled = torch.compile(model, mode=mode)
    first = measure(lambda: compiled(x), tokens_per_step=B * T, warmup=0, iters=1)["median_s"]
    paths = [p for p in loaded_output_modules() if p not in before]
    err = (compiled(x) - model(x)).abs().max().item()  # validate before timing
    assert err < 1e-4, f"{mode}: compiled output differs from eager by {err:.1e}"
    steady = measure(lambda: compiled(x), tokens_per_step=B * T, warmup=3, iters=10)
    inductor = dict(counters["inductor"])
    return dict(first_s=first, steady_s=steady["median_s"], p10=steady["p10_s"],
                p90=steady["p90_s"], err=err, paths=paths,
                cache_hit=inductor.get("fxgraph_cache_hit", 0) > 0,
                cudagraph_skips=inductor.get("cudagraph_skips", 0))


def count_compiles(model, dynamic):
    """Graphs dynamo compiles for SEQ_LENS with this `dynamic` setting (a counting backend)."""
    torch._dynamo.reset()
    compiled_graphs = []

    def counting_backend(gm, example_inputs):
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]
        compiled_graphs.append(shapes)
        return gm.forward  # run the captured graph eagerly: no code generation

    fn = torch.compile(model, backend=counting_backend, dynamic=dynamic)
    per_call = []
    for t in SEQ_LENS:
        before = len(compiled_graphs)
        idx = torch.randint(0, 256, (2, t), generator=torch.Generator().manual_seed(t))
        out, _ = fn(idx)
        ref, _ = model(idx)
        assert torch.allclose(out, ref, atol=1e-5), f"captured graph differs at T={t}"
        per_call.append(len(compiled_graphs) - before)
    return per_call


def first_kernel_lines(path, n=14):
    """The first n lines of the first fused C++/Triton kernel in an Inductor output module."""
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if re.match(r"\w*fused\w* = ", line)), None)
    if start is None:
        return lines[:n]
    return lines[start:start + n]


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = MLPBlock(C).eval()
    x = torch.randn(B, T, C)  # (B, T, C)

    t_start = time.perf_counter()
    with torch.no_grad():
        eager = measure(lambda: model(x), tokens_per_step=B * T, warmup=3, iters=10)
        results = {mode: compile_mode(model, x, mode) for mode in MODES}

    # 1. The modes table.
    print(f"MLPBlock x: ({B}, {T}, {C}) fp32, inference, {torch.get_num_threads()} thread(s); "
          "compiled outputs checked equal to eager first\n")
    print(f"{'mode':<17}{'1st call s':>11}{'disk cache':>11}{'steady ms':>10}{'p10-p90 ms':>13}"
          f"{'vs eager':>9}{'cudagraph skips':>16}")
    print(f"{'eager':<17}{'-':>11}{'-':>11}{eager['median_s'] * 1e3:>10.2f}"
          f"{eager['p10_s'] * 1e3:>6.2f}-{eager['p90_s'] * 1e3:<6.2f}{1:>8.2f}x{'-':>16}")
    for mode, r in results.items():
        print(f"{mode:<17}{r['first_s']:>11.2f}{'hit' if r['cache_hit'] else 'miss':>11}"
              f"{r['steady_s'] * 1e3:>10.2f}{r['p10'] * 1e3:>6.2f}-{r['p90'] * 1e3:<6.2f}"
              f"{eager['median_s'] / r['steady_s']:>8.2f}x{r['cudagraph_skips']:>16}")
    codes = {mode: open(r["paths"][-1]).read() for mode, r in results.items() if r["paths"]}
    for mode, code in codes.items():
        kernels = sorted(set(re.findall(r"^(\w*fused\w*) = ", code, flags=re.M)))
        matmuls = "extern addmm (ATen/oneDNN)" if "extern_kernels.addmm" in code else \
            "a generated GEMM"
        print(f"  {mode:<15} {len(kernels)} fused kernels, matmuls: {matmuls}")
    sources = {mode: tuple(re.findall(r"r'''(.*?)'''", code, flags=re.S))
               for mode, code in codes.items()}
    if len(sources) == len(MODES) and len(set(sources.values())) == 1:
        ratios = [eager["median_s"] / results[m]["steady_s"] for m in MODES]
        print(f"  the three modes generated IDENTICAL kernels: their spread {min(ratios):.2f}x-"
              f"{max(ratios):.2f}x vs eager is this machine's timing noise right now")
    print("reduce-overhead and max-autotune on a CPU: CUDA graphs skipped (the counter above).\n"
          "max-autotune: on this CPU it keeps the matmul listed above; on a GPU it benchmarks "
          "Triton GEMM configs (minutes of compile).\nA disk-cache 'hit' means the "
          "compile was reused from an earlier run (or an earlier mode with an identical graph).")

    for mode in ("reduce-overhead", "max-autotune"):
        assert results[mode]["cudagraph_skips"] >= 1, f"on a CPU, {mode} must skip CUDA graphs"
    for mode, r in results.items():
        assert r["first_s"] > 3 * r["steady_s"], f"{mode}: the first call should pay compilation"

    # 2. Recompilation when the sequence length changes.
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=64, block_size=max(SEQ_LENS))).eval()
    with torch.no_grad():
        compiles = {dyn: count_compiles(gpt, dyn) for dyn in DYNAMIC}
    print(f"\ngraphs compiled per call, GPT forward with T = {SEQ_LENS} (counting backend):")
    print(f"{'dynamic':<9}" + "".join(f"{'T=' + str(t):>7}" for t in SEQ_LENS) + f"{'total':>7}")
    for dyn, per_call in compiles.items():
        print(f"{str(dyn):<9}" + "".join(f"{n:>7}" for n in per_call) + f"{sum(per_call):>7}")
    print("dynamic=None (default): the 2nd shape triggers one recompile with a symbolic T, then "
          "no more; dynamic=False: one per shape;\ndynamic=True: one graph. With padding to a few "
          "fixed lengths (buckets), dynamic=False compiles once per bucket.")
    assert compiles[False] == [1] * len(SEQ_LENS), "static shapes: one compile per new T"
    assert compiles[True] == [1] + [0] * (len(SEQ_LENS) - 1), "dynamic=True: one graph"
    assert compiles[None][:2] == [1, 1] and sum(compiles[None][2:]) == 0, \
        "automatic dynamic: recompile once on the 2nd shape, then reuse the symbolic graph"

    # 3. Where the generated code is.
    path = results["default"]["paths"][-1] if results["default"]["paths"] else None
    if path is None:
        print("\n(no output code path logged: set TORCH_LOGS=output_code to see it)")
    else:
        print(f"\ngenerated code of the default mode: {path}\n(see all of it: TORCH_LOGS="
              "output_code python lessons/25_compile_modes.py; debug dir: TORCH_COMPILE_DEBUG=1)")
        for line in first_kernel_lines(path):
            print("    " + line[:110])
        assert "def call(" in open(path).read(), "an Inductor module defines call(args)"

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = ["eager", *MODES]
    steady = [eager["median_s"] * 1e3] + [results[m]["steady_s"] * 1e3 for m in MODES]
    lows = [eager["p10_s"] * 1e3] + [results[m]["p10"] * 1e3 for m in MODES]
    highs = [eager["p90_s"] * 1e3] + [results[m]["p90"] * 1e3 for m in MODES]
    ax0.bar(names, steady, color=[MUTED, NAVY, NAVY, NAVY],
            yerr=[[m - lo for m, lo in zip(steady, lows)],
                  [hi - m for m, hi in zip(steady, highs)]],
            capsize=4, ecolor=GOLD)
    for i, m in enumerate(MODES, start=1):
        ax0.annotate(f"1st call {results[m]['first_s']:.1f} s", (i, steady[i]), ha="center",
                     xytext=(0, 4), textcoords="offset points", fontsize=8)
    ax0.set_ylabel("steady-state ms per call (median, p10-p90)")
    ax0.set_title("compile modes on a CPU: same kernels, compile time differs")
    width = 0.25
    for k, (dyn, color) in enumerate(zip(DYNAMIC, (NAVY, GOLD, MUTED))):
        ax1.bar([i + (k - 1) * width for i in range(len(SEQ_LENS))], compiles[dyn], width,
                color=color, label=f"dynamic={dyn}")
    ax1.set_xticks(range(len(SEQ_LENS)), [f"T={t}" for t in SEQ_LENS])
    ax1.set_ylabel("graphs compiled at this call")
    ax1.set_yticks([0, 1])
    ax1.set_ylim(0, 1.5)
    ax1.set_title("recompilation when the sequence length changes")
    ax1.legend(ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(OUT / "compile_modes.png", dpi=100)
    plt.close(fig)
    print(f"\nwrote {OUT / 'compile_modes.png'}")
    speedup = eager["median_s"] / statistics.median(r["steady_s"] for r in results.values())
    print(f"median steady-state speedup over the three modes: {speedup:.2f}x (shown, not "
          "asserted, noisy under load): the two matmuls are the\nsame oneDNN calls in every mode, "
          "only the LayerNorm and GELU around them get fused (lesson 10 times that part alone); "
          f"lesson wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
