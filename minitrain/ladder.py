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

Formula: rung k's config = default_base() + the changes on the path 0 -> ... -> k, applied in
order (`rung_overrides`); speedup(k) = tokens/s(k) / tokens/s(0), both measured.

When it helps: deciding which optimisation to turn on first on a new machine.

This module is only the table of rungs (data a lesson can read). Measuring them -- a fresh
process per rung, validation of the step-0 loss, the Markdown table -- is benchmark tooling and
lives in `benchmarks/ladder_runner.py` (`train_rung`, `run_rung`, `validate`, `ladder_table`).

Common bug: comparing rungs measured in one process one after the other: the second inherits the
first's warm allocator and page cache, and its peak memory is the max of both.
"""
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

# The GPU ladder (benchmarks/bench_ladder.py runs it when CUDA is available). The CPU rungs 1-3
# are data-pipeline and layer changes that a GPU run takes for granted, so it starts from them and
# climbs the GPU-specific rungs. "tf32" is not a TrainConfig field: the runner sets torch's flag.
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
