"""Lesson 10 - torch.compile: pay once (compile), then run faster (steady state). Time it right.

Objective: measure what `torch.compile` costs (the first call traces the Python code, generates
and compiles C++ kernels) and what it buys (later calls run one fused kernel instead of a chain
of small ops), and show the classic timing mistake: averaging over the first calls, which counts
the compilation and turns a real speedup into an apparent slowdown.
Serves: Module 8 deck slide 8 (annotations 8 and 10: steady-state speed; "measuring before
compile warmup settles"), slide 18 / M8-LAB-03 (the compile toggle), slide 25 / M8-LAB-07
("compile startup confusion"); syllabus 16-02 (Dynamo + Inductor, speedup measurement
methodology); GPT-2 notes section "3. torch.compile (PyTorch 2.0+)" ("Concrete Example: Layer
Normalization", "The Compilation Process").
Prerequisites: lesson 07 (fair timing: warm-up, median), lesson 09.

The function compiled is the from-scratch part of a transformer block that the speed ladder's
rung 3 replaces by native kernels: LayerNorm written out, then tanh-GELU written out
(minitrain.model.LayerNorm, minitrain.model.TanhGELU). In eager mode each line is a separate
kernel that reads and writes the whole (B, T, C) tensor from memory (~15 passes); inductor fuses
them into one or two loops, so the data is read once. That is where compile's gain comes from:
memory traffic of elementwise chains, not faster matmuls.

Why the first call is slow: dynamo traces the Python bytecode into a graph, inductor lowers it
and writes C++ source, a C++ compiler builds it (seconds to a minute on 2 cores). Results are
cached on disk (/tmp/torchinductor_$USER): a second run of this script compiles much faster.
Another trap (not timed here): a new input shape triggers a recompile, i.e. another slow call.

Run: python lessons/10_torch_compile.py   (first run on a machine ~20-40 s, later runs ~5-15 s)
"""
import statistics

import matplotlib.pyplot as plt
import torch

from minitrain.bench import fastest_thread_count, measure
from minitrain.model import LayerNorm, TanhGELU
from minitrain.style import GOLD, MUTED, NAVY, outputs_dir

OUT = outputs_dir("lesson10")
B, T, C = 16, 128, 256
CALLS = 15  # calls timed one by one, the first one included
WARMUP = 5  # calls skipped by the correct measurement
NAIVE_WINDOW = 10  # the mistake: the mean over the first 10 calls


def per_call_times(fn, x, n):
    """Every call's time, the first (compiling) one included: measure with warmup=0."""
    return measure(lambda: fn(x), tokens_per_step=B * T, warmup=0, iters=n)["times_s"]


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ln, gelu = LayerNorm(C), TanhGELU()

    def norm_gelu(x):  # x: (B, T, C)
        return gelu(ln(x))

    x = torch.randn(B, T, C)
    compiled = torch.compile(norm_gelu)

    with torch.no_grad():
        eager_times = per_call_times(norm_gelu, x, CALLS)
        compiled_times = per_call_times(compiled, x, CALLS)  # call 0 compiles
        # Validate, then benchmark: the compiled kernel computes the same numbers.
        err = (compiled(x) - norm_gelu(x)).abs().max().item()
    assert err < 1e-4, f"compiled output differs from eager by {err}"

    compile_s = compiled_times[0]
    eager_s = statistics.median(eager_times[WARMUP:])
    steady_s = statistics.median(compiled_times[WARMUP:])
    naive_eager = statistics.fmean(eager_times[:NAIVE_WINDOW])
    naive_compiled = statistics.fmean(compiled_times[:NAIVE_WINDOW])
    print(f"LayerNorm + tanh-GELU written out, x: ({B}, {T}, {C}) fp32, 1 thread; "
          f"max |compiled - eager| = {err:.1e}\n")
    print(f"{'':<44}{'eager ms':>10}{'compiled ms':>13}{'compiled / eager':>18}")
    print(f"{'first call (compiled: includes compilation)':<44}{eager_times[0] * 1e3:>10.2f}"
          f"{compile_s * 1e3:>13.1f}{compile_s / eager_times[0]:>17.1f}x")
    print(f"{'WRONG: mean of the first ' + str(NAIVE_WINDOW) + ' calls':<44}{naive_eager * 1e3:>10.2f}"
          f"{naive_compiled * 1e3:>13.1f}{naive_compiled / naive_eager:>17.1f}x")
    print(f"{'RIGHT: median after ' + str(WARMUP) + ' warm-up calls':<44}{eager_s * 1e3:>10.2f}"
          f"{steady_s * 1e3:>13.2f}{steady_s / eager_s:>17.2f}x")
    breakeven = compile_s / max(eager_s - steady_s, 1e-12)
    print(f"\nsteady-state speedup {eager_s / steady_s:.2f}x; compilation pays for itself after "
          f"~{breakeven:,.0f} calls" if steady_s < eager_s else "\ncompiled is not faster here")

    fig, ax = plt.subplots(figsize=(9, 4))
    calls = range(1, CALLS + 1)
    ax.semilogy(calls, [t * 1e3 for t in eager_times], "o-", color=MUTED, label="eager")
    ax.semilogy(calls, [t * 1e3 for t in compiled_times], "o-", color=NAVY,
                label="torch.compile")
    ax.axvspan(0.5, WARMUP + 0.5, color=GOLD, alpha=0.15, label="warm-up: not timed")
    ax.set_xlabel("call number")
    ax.set_ylabel("time per call (ms, log scale)")
    ax.set_title(f"compile once ({compile_s:.1f} s), then {eager_s / steady_s:.1f}x faster per "
                 "call")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "compile_timeline.png", dpi=100)
    plt.close(fig)
    print(f"wrote {OUT / 'compile_timeline.png'}")

    # The claims: the first call is dominated by compilation; counting it (the mistake) makes
    # compile look slower than eager, while the steady state is faster.
    assert compile_s > 10 * steady_s, "first call should be far slower than steady state"
    assert naive_compiled > naive_eager, "the wrong measurement should show compile 'slower'"
    assert steady_s < eager_s, f"fused kernel not faster: {steady_s:.4f} s vs {eager_s:.4f} s"


if __name__ == "__main__":
    main()
