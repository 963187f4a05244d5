"""The speed ladder: the same training loop made faster one measured change at a time.

What: a list of rungs. Rung 0 is the slowest honest baseline; every later rung adds EXACTLY ONE
change (a `TrainConfig` override) on top of the rung it builds on and keeps everything else:

    0 baseline   memmap + Python-loop batches + from-scratch LayerNorm/GELU + naive attention
                 + fp32 + plain AdamW
    1 RAM preload          5 bf16 autocast        (5b: fp16 + GradScaler, side rung on 4)
    2 vectorized batches   6 fused AdamW
    3 native layers        7 torch.compile
    4 SDPA  (4b: our flash_attention, side rung on 3)       8 larger batch (x4)

A side rung sits at the same position as its main rung but is not carried forward.

Why a ladder and not one "fast" switch: each technique's gain depends on the hardware and on what
is already fixed. Measured one at a time, in order, a learner sees which change pays on THIS
machine and which does not (on a CPU, bf16 autocast can be slower: casts cost more than the
matmul saves when the matrices are small).

How a rung is measured (`run_rung`): in a FRESH subprocess (so peak RSS, allocator state, the
compile cache in memory and thread pools are its own), `minitrain.train.train` runs `steps`
steps; from its `metrics.jsonl` we take
    tokens/s    = median over steps >= warmup of the per-step tokens_per_s
                  (warm-up and compile steps excluded; the first step's time is kept separately)
    peak memory = the worker's peak resident set (ru_maxrss), and train's own peak_mem_bytes
    loss        = training loss after the same number of steps
and the table (`ladder_table`, a pure function) computes speedup = tokens/s / rung 0's tokens/s
from those measured numbers, never from a constant.

Validate, then benchmark (`validate`): every rung starts from the same seed, the same
initialization and the same first batch, so its step-0 loss must equal rung 0's (tight for fp32
rungs, loose for bf16/fp16, looser for the larger batch). A rung that fails prints no speed.

Common bug: comparing rungs measured in one process one after the other: the second inherits the
first's warm allocator and page cache, and its peak memory is the max of both.
"""
import json
import math
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

BASELINE = {"loader": "memmap", "batching": "loop", "native_layers": False,
            "attention": "naive", "precision": "fp32", "fused_adamw": False, "compile": False}


@dataclass(frozen=True)
class Scale:
    """An override that multiplies the previous rung's value (rung 8: batch size x4)."""

    factor: int

    def __call__(self, previous):
        return previous * self.factor

    def __str__(self):
        return f"x{self.factor}"


@dataclass(frozen=True)
class Rung:
    key: str  # "0".."8", side rungs "4b", "5b"
    name: str
    change: dict  # TrainConfig overrides added on top of `builds_on` (exactly one change)
    note: str  # one line: what it changes and why it may (or may not) help
    builds_on: str | None = None  # the rung this adds its change to; None for the baseline
    side: bool = False  # side rungs are not carried forward
    tolerance: float = 1e-4  # |step-0 loss - rung 0's| / rung 0's allowed by validate()


RUNGS = (
    Rung("0", "baseline", dict(BASELINE),
         "memmap + loop batches + from-scratch LayerNorm/GELU + naive attention + fp32 + AdamW"),
    Rung("1", "RAM preload", {"loader": "ram"},
         "whole token file in RAM: no page-cache lookups (tiny gain when the cache is warm)", "0"),
    Rung("2", "vectorized batching", {"batching": "vectorized"},
         "one fancy-index gather instead of a Python loop over B rows", "1"),
    Rung("3", "native layers", {"native_layers": True},
         "nn.LayerNorm/nn.GELU: one fused kernel each instead of ~8 elementwise ops", "2"),
    Rung("4", "SDPA attention", {"attention": "sdpa"},
         "F.scaled_dot_product_attention: fused kernel, no (T, T) matrix in memory", "3"),
    Rung("4b", "flash_attention (ours)", {"attention": "flash"},
         "side rung: FlashAttention-2 tiles in pure PyTorch; memory-lean, Python-loop slow", "3",
         side=True),
    Rung("5", "bf16 autocast", {"precision": "bf16"},
         "matmuls in bfloat16; pays only where the CPU has bf16 units and matrices are large",
         "4", tolerance=2e-2),
    Rung("5b", "fp16 + GradScaler", {"precision": "fp16"},
         "side rung: float16 autocast + loss scaling; CPUs rarely have fast fp16 matmul", "4",
         side=True, tolerance=2e-2),
    Rung("6", "fused AdamW", {"fused_adamw": True},
         "one fused kernel updates every parameter instead of a loop of small ops", "5",
         tolerance=2e-2),
    Rung("7", "torch.compile", {"compile": True},
         "inductor fuses elementwise ops into generated C++/Triton kernels; compile step excluded",
         "6", tolerance=2e-2),
    Rung("8", "larger batch (x4)", {"batch_size": Scale(4)},
         "4x tokens per step amortizes per-step overhead; loss not comparable (more data/step)",
         "7", tolerance=5e-2),
)
RUNG_KEYS = tuple(r.key for r in RUNGS)
MAIN_KEYS = tuple(r.key for r in RUNGS if not r.side)

# The GPU ladder (benchmarks/bench_ladder.py runs it when CUDA is available). The CPU rungs 1-3
# are data-pipeline and layer changes that a GPU run takes for granted, so it starts from them and
# climbs the GPU-specific rungs. "tf32" is not a TrainConfig field: train_rung sets torch's flag.
# NOTE: written without a GPU at hand (the development machine has none): it has never been run.
GPU_BASELINE = {"device": "cuda", "loader": "ram", "batching": "vectorized",
                "native_layers": True, "attention": "naive", "precision": "fp32",
                "fused_adamw": False, "compile": False, "tf32": False}
GPU_RUNGS = (
    Rung("g0", "GPU baseline", dict(GPU_BASELINE),
         "fp32 matmuls (TF32 off) + naive attention + plain AdamW"),
    Rung("g1", "TF32 matmuls", {"tf32": True},
         "tensor cores on fp32 inputs with a 10-bit mantissa", "g0", tolerance=5e-3),
    Rung("g2", "SDPA (flash kernel)", {"attention": "sdpa"},
         "fused attention: no (T, T) scores in HBM", "g1", tolerance=5e-3),
    Rung("g3", "bf16 autocast", {"precision": "bf16"},
         "bf16 tensor cores: ~2x TF32 throughput, half the activation bytes", "g2",
         tolerance=2e-2),
    Rung("g4", "fused AdamW", {"fused_adamw": True},
         "one kernel launch for the whole update instead of ~10 per parameter", "g3",
         tolerance=2e-2),
    Rung("g5", "torch.compile", {"compile": True},
         "Triton kernels fuse elementwise ops; fewer HBM round trips", "g4", tolerance=2e-2),
    Rung("g6", "larger batch (x2)", {"batch_size": Scale(2)},
         "fills the GPU better; loss not comparable (more data per step)", "g5",
         tolerance=5e-2),
)
EXTRA_KEYS = ("tf32",)  # rung settings that are torch flags, not TrainConfig fields


def get_rung(key):
    for rung in RUNGS + GPU_RUNGS:
        if rung.key == str(key):
            return rung
    raise ValueError(f"rung must be one of {RUNG_KEYS + tuple(r.key for r in GPU_RUNGS)}, "
                     f"got {key!r}")


def rung_overrides(key, base):
    """The full TrainConfig overrides of rung `key`: `base`, then every change on its path."""
    rung = get_rung(key)
    path = []
    while rung is not None:
        path.append(rung)
        rung = get_rung(rung.builds_on) if rung.builds_on is not None else None
    config = dict(base)
    for r in reversed(path):  # baseline first, this rung's change last
        for name, value in r.change.items():
            config[name] = value(config[name]) if callable(value) else value
    return config


def default_base(**overrides):
    """The CPU ladder's shared settings (everything a rung does not change)."""
    base = dict(steps=14, batch_size=16, seq_len=256, n_layer=4, n_head=4, n_embd=128,
                warmup_steps=2, eval_every=10_000, eval_iters=1, checkpoint_every=10_000,
                seed=0, log_every=0, device="cpu")
    base.update(overrides)
    return base


def prepare_data(path, *, max_bytes=4_000_000):
    """Pretokenize `max_bytes` of the default corpus to `path` once; every rung reads this file."""
    from minitrain import data

    path = pathlib.Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        data.pretokenize(data.default_corpus(max_bytes=max_bytes), path)
    return str(path)


def summarize_metrics(records, *, warmup):
    """Reduce train's per-step metrics to one rung's numbers (pure; used on metrics.jsonl)."""
    if not records:
        raise ValueError("records is empty: the run wrote no metrics lines")
    records = sorted(records, key=lambda r: r["step"])
    timed = records[warmup:] or records[-1:]  # a 2-step smoke run still gets a number
    tps = [r["tokens_per_s"] for r in timed]
    peaks = [r.get("peak_mem_bytes") or 0 for r in records]
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_worst": min(tps),
            "tokens_per_s_best": max(tps), "timed_steps": len(timed),
            "first_step_tokens_per_s": records[0]["tokens_per_s"],
            "loss_step0": records[0]["loss"], "final_loss": records[-1]["loss"],
            "steps": len(records), "peak_mem_bytes": max(peaks),
            "skipped_steps": sum(bool(r.get("skipped")) for r in records)}


def _read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train_rung(key, base, *, out_dir, warmup=4):
    """Train rung `key` IN THIS PROCESS and return its summary (run_rung wraps it in a process)."""
    import torch

    from minitrain.train import TrainConfig, train

    config = rung_overrides(key, base)
    config["out_dir"] = str(out_dir)
    extras = {k: config.pop(k) for k in EXTRA_KEYS if k in config}
    if "tf32" in extras:  # TF32 matmuls on tensor cores (CUDA only; a no-op on CPU)
        torch.set_float32_matmul_precision("high" if extras["tf32"] else "highest")
    rss_before = _peak_rss_bytes()
    t0 = time.perf_counter()
    result = train(TrainConfig(**config))
    wall_s = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the box
    summary = summarize_metrics(_read_metrics(pathlib.Path(out_dir) / "metrics.jsonl"),
                                warmup=warmup)
    summary.update(key=key, name=get_rung(key).name, wall_s=wall_s, load_avg_1min=load,
                   peak_rss_bytes=_peak_rss_bytes(), rss_at_start_bytes=rss_before,
                   final_val_loss=getattr(result, "final_val_loss", None),
                   tokens_per_step=config["batch_size"] * config["seq_len"]
                   * config.get("accum_steps", 1),
                   threads=torch.get_num_threads(),
                   config={**{k: v for k, v in config.items() if k != "out_dir"}, **extras})
    return summary


def run_rung(key, base, *, out_dir, warmup=4, timeout_s=600, threads=None):
    """Train and measure rung `key` in a fresh Python process; returns its summary dict."""
    get_rung(key)
    request = {"key": str(key), "base": base, "out_dir": str(out_dir), "warmup": warmup,
               "threads": threads}
    proc = subprocess.run([sys.executable, "-m", "minitrain.ladder", json.dumps(request)],
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("LADDER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"rung {key} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("LADDER_RESULT "))


def validate(results, *, reference_key="0"):
    """Check each rung's step-0 loss against the reference rung's; returns {key: (ok, reason)}.

    Same seed + same init + same first batch => the same loss before any update, up to the
    rung's tolerance (rounding of bf16/fp16; a larger batch sees more rows)."""
    by_key = {r["key"]: r for r in results}
    if reference_key not in by_key:
        raise ValueError(f"results must include the reference rung {reference_key!r}")
    ref = by_key[reference_key]["loss_step0"]
    verdicts = {}
    for r in results:
        tol = get_rung(r["key"]).tolerance
        numbers = (ref, r["loss_step0"], r["final_loss"], r["tokens_per_s"])
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            verdicts[r["key"]] = (False, "a loss or the speed is not a finite number")
            continue
        err = abs(r["loss_step0"] - ref) / abs(ref)
        verdicts[r["key"]] = (err <= tol, f"step-0 loss rel. diff {err:.1e} (tolerance {tol:.0e})")
    return verdicts


def ladder_table(results, *, reference_key="0"):
    """Rows with speedup and memory ratio vs the reference rung, computed from `results` (pure)."""
    by_key = {r["key"]: r for r in results}
    if reference_key not in by_key:
        raise ValueError(f"results must include the reference rung {reference_key!r}")
    ref = by_key[reference_key]
    rows = []
    for r in results:
        rung = get_rung(r["key"])
        row = dict(r)
        row["name"] = rung.name
        row["note"] = r.get("note", rung.note)
        if r.get("skipped_steps"):  # fp16: the GradScaler skipped updates with inf/nan grads
            row["note"] += f" ({r['skipped_steps']} steps skipped by the GradScaler)"
        row["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        parent = by_key.get(rung.builds_on) if rung.builds_on else None
        row["vs_parent"] = r["tokens_per_s"] / parent["tokens_per_s"] if parent else None
        if r.get("peak_rss_bytes") and ref.get("peak_rss_bytes"):
            row["mem_ratio"] = r["peak_rss_bytes"] / ref["peak_rss_bytes"]
        rows.append(row)
    return rows


def format_table(rows, *, valid=None, memory=True):
    """Markdown table; a rung whose validation failed shows INVALID instead of its speed.

    `memory=False` drops the peak-memory column (rungs measured in one process share a peak)."""
    head = ["rung", "change", "tokens/s", "speedup vs 0", "vs the rung below", "best step tok/s",
            "first step s", "peak mem MB", "loss after N steps", "load avg", "note"]
    if not memory:
        head.remove("peak mem MB")
    lines = ["| " + " | ".join(head) + " |",
             "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
    for row in rows:
        ok = True if valid is None else valid.get(row["key"], (False, ""))[0]
        first = row["tokens_per_step"] / row["first_step_tokens_per_s"] \
            if row.get("tokens_per_step") else float("nan")
        mem = (row.get("peak_mem_bytes") or row.get("peak_rss_bytes") or 0) / 2**20
        cells = [row["key"], row["name"],
                 f"{row['tokens_per_s']:,.0f}" if ok else "INVALID",
                 f"{row['speedup']:.2f}x" if ok else "-",
                 f"{row['vs_parent']:.2f}x" if ok and row.get("vs_parent") else "-",
                 f"{row['tokens_per_s_best']:,.0f}" if ok and row.get("tokens_per_s_best")
                 else "-",
                 f"{first:.2f}", f"{mem:,.0f}", f"{row['final_loss']:.4f}",
                 f"{row['load_avg_1min']:.1f}" if row.get("load_avg_1min") is not None else "-",
                 row["note"]]
        if not memory:
            del cells[7]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_rung(rows, *, valid=None):
    """The valid row with the highest speedup."""
    ok_rows = [r for r in rows if valid is None or valid.get(r["key"], (False,))[0]]
    if not ok_rows:
        raise ValueError("rows has no valid rung")
    return max(ok_rows, key=lambda r: r["speedup"])


def _worker(request):
    import torch

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    summary = train_rung(request["key"], request["base"], out_dir=request["out_dir"],
                         warmup=request["warmup"])
    print("LADDER_RESULT " + json.dumps(summary), flush=True)


if __name__ == "__main__":  # the subprocess side of run_rung
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m minitrain.ladder '<json request>' (used by run_rung)")
    os.environ.setdefault("PYTHONHASHSEED", "0")
    _worker(json.loads(sys.argv[1]))
