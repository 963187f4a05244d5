"""Counting FLOPs and measuring the machine's ceilings: how close is a step to the hardware limit?

What: `flops_per_token` is the analytic cost of one token (the 6N + 12 L T C rule);
`count_flops(fn)` counts the matmul FLOPs that `fn` really runs (a from-scratch
`TorchDispatchMode`, i.e. it sees every ATen op after autograd, forward AND backward);
`peak_flops` / `peak_bandwidth` MEASURE this machine's two roofline ceilings (a large matmul, a
large copy) and cache them per machine; `mfu` = achieved FLOP/s / peak FLOP/s.
The pure roofline arithmetic (`mfu`, `roofline`, `ridge_point`), the datasheet table
(`vendor_peak_flops`) and the machine facts (`device_name`, `default_cache_path`) live in
minitrain/roofline.py and are re-exported here (`from minitrain.profile import mfu` works).

Why: tokens/s alone is not comparable across models or machines (a 2x wider model is slower
per token and that is not a regression). Model FLOPs Utilization, MFU = tokens/s x FLOPs/token
/ peak, is: 40% on an H100 and 40% on a laptop mean the same thing, "the matmul units are busy
40% of the time". The roofline says why it is not 100%: an op with arithmetic intensity
I = FLOPs / bytes moved can reach at most min(peak_flops, I x peak_bandwidth). Below the ridge
point I* = peak_flops / peak_bandwidth an op is memory-bound (LayerNorm, GELU, softmax, small
matmuls); above it, compute-bound (big matmuls).

Formula:
    MFU = tokens_per_s * flops_per_token / peak_flops
    attainable(I) = min(peak_flops, I * peak_bandwidth)            (the roofline)
    matmul (m, k) @ (k, n): 2 m k n FLOPs; >= 4 (m k + k n + m n) bytes in fp32

When it helps: deciding what to optimise. A memory-bound step wants fewer bytes (fusion,
torch.compile, bf16); a compute-bound one wants faster matmul units (bf16 autocast on AMX or
tensor cores) or nothing: it is at the ceiling.

Common bugs: (1) trusting `torch.utils.flop_counter.FlopCounterMode` on CPU: in torch 2.13 it
counts no FLOPs for `_scaled_dot_product_flash_attention_for_cpu` (the kernel F.sdpa uses on
CPU) nor for in-place `baddbmm_`/`addmm_`, so a faster SDPA model "costs" fewer FLOPs than the
same model with naive attention; (2) dividing by a datasheet peak (often sparse or bf16) for an
fp32 CPU run: MFU must be against the peak of the dtype and thread count you ran.
"""
import dataclasses
import json
import math
import pathlib
import platform
import time
from collections.abc import Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minitrain.files import write_atomic
from minitrain.roofline import (VENDOR_PEAKS, default_cache_path, device_name, mfu, ridge_point,
                                roofline, vendor_peak_flops)

__all__ = ["n_params_for_flops", "flops_per_token", "FLOP_RULES", "OpStats", "FlopCounter",
           "count_flops", "peak_flops", "peak_bandwidth",
           # the roofline arithmetic and machine facts, re-exported from minitrain.roofline:
           "mfu", "roofline", "ridge_point", "VENDOR_PEAKS", "vendor_peak_flops", "device_name",
           "default_cache_path"]


def _config_fields(config):
    """(n_layer, n_embd, vocab_size, block_size) of a GPTConfig, a GPT or a ladder-style dict."""
    config = getattr(config, "config", config)  # a GPT model carries its GPTConfig
    if isinstance(config, Mapping):
        get = config.get
    elif hasattr(config, "n_layer"):
        def get(name, default=None):
            return getattr(config, name, default)
    else:
        raise ValueError(f"config must be a GPTConfig, a GPT or a dict, got {type(config).__name__}")
    block = get("block_size", get("seq_len"))
    return int(get("n_layer")), int(get("n_embd")), int(get("vocab_size", 256)), block


def n_params_for_flops(config):
    """The N of 6N: every parameter except the position embedding, the tied matrix counted once.

    = 12 L C^2 (the four weight matrices of each block) + 13 L C (their biases and the two
    LayerNorms) + V C (token embedding = lm_head) + 2 C (ln_f); equal to
    GPT(config).num_params(non_embedding=True)."""
    L, C, V, _ = _config_fields(config)
    return 12 * L * C * C + 13 * L * C + V * C + 2 * C


def flops_per_token(config, *, seq_len=None, training=True):
    """Analytic FLOPs of one token: 6 N + 12 L T C for training, a third of that for the forward.

    Derivation (the tiny GPT of minitrain.model; L layers, width C, context T, vocab V):
    - Every weight matrix W (C_in x C_out) is used once per token in a matmul: 2 C_in C_out FLOPs
      (a multiply and an add per weight). Per block: c_attn C x 3C, attn.c_proj C x C, c_fc
      C x 4C, mlp.c_proj 4C x C = 12 C^2 weights; plus the head V x C. Forward = 2 x (weights).
    - Backward = 2 x forward: each matmul y = x W needs dL/dx = dL/dy W^T AND dL/dW = x^T dL/dy,
      two matmuls of the same size. So training = 2 + 4 = 6 FLOPs per weight per token.
    - Attention adds matmuls with no weights: per layer and token, q k^T against T keys
      (2 T C) and probs @ v (2 T C): 4 T C forward, x3 with backward = 12 L T C. It grows with T,
      which is why long contexts cost more per token than 6N says.
    - Which N: `n_params_for_flops` = num_params(non_embedding=True). The tied token
      embedding IS the head's matmul (counted once, as the head); the position embedding is a
      lookup (0 FLOPs), left out. Biases and LayerNorm gains (13 L C + 2 C) are in N by the
      usual convention although they do no matmul: that is the formula's one overcount,
      exactly 6 (13 L C + 2 C) per token against `count_flops` (< 1.25 / C relative:
      about 1% at C = 128).
    - Left out: elementwise work (softmax, GELU, LayerNorm, residual adds, the loss: O(C) per
      token, memory-bound anyway), the causal mask's savings (half the T x T entries are
      masked; counted in full, as FlopCounterMode does), activation recomputation, and the
      optimizer step (~10 FLOPs per parameter per STEP, not per token).
    """
    L, C, _, block = _config_fields(config)
    T = block if seq_len is None else seq_len
    if T is None or T < 1:
        raise ValueError(f"seq_len must be a positive int (or set config.block_size), got {T!r}")
    train_flops = 6 * n_params_for_flops(config) + 12 * L * T * C
    return int(train_flops if training else train_flops // 3)


# ---------------------------------------------------------------- counting FLOPs as they run

def _mm(a, b):  # (m, k) @ (k, n)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a, b):  # (B, m, k) @ (B, k, n)
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _sdpa_forward(q, k, v):  # q (B, H, Tq, D), k (B, Hkv, Tk, D), v (B, Hkv, Tk, Dv)
    b, h, tq, d = q.shape
    tk, dv = k.shape[-2], v.shape[-1]
    return 2 * b * h * tq * tk * (d + dv)  # q k^T, then probs @ v; causal mask NOT discounted


def _sdpa_backward(grad_out, q, k, v):
    b, h, tq, d = q.shape
    tk, dv = k.shape[-2], v.shape[-1]
    # recompute q k^T (d), grad_probs = g v^T (dv), grad_v = p^T g (dv), grad_q (d), grad_k (d)
    return 2 * b * h * tq * tk * (3 * d + 2 * dv)


# Op name (the OpOverloadPacket, so .out and .default overloads share a rule) -> FLOPs from args.
FLOP_RULES = {
    "mm": lambda a, b, *_, **__: _mm(a, b),
    "addmm": lambda s, a, b, *_, **__: _mm(a, b),
    "addmm_": lambda s, a, b, *_, **__: _mm(a, b),
    "_scaled_mm": lambda a, b, *_, **__: _mm(a, b),
    "bmm": lambda a, b, *_, **__: _bmm(a, b),
    "baddbmm": lambda s, a, b, *_, **__: _bmm(a, b),
    "baddbmm_": lambda s, a, b, *_, **__: _bmm(a, b),
    "addbmm": lambda s, a, b, *_, **__: _bmm(a, b),
    "addbmm_": lambda s, a, b, *_, **__: _bmm(a, b),
}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    FLOP_RULES[_name] = lambda q, k, v, *_, **__: _sdpa_forward(q, k, v)
    FLOP_RULES[_name + "_backward"] = lambda g, q, k, v, *_, **__: _sdpa_backward(g, q, k, v)
_NO_TRAFFIC = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh")


@dataclasses.dataclass
class OpStats:
    """What one op name did inside a FlopCounter: calls, matmul FLOPs, bytes touched, seconds."""
    calls: int = 0
    flops: int = 0
    bytes: int = 0  # inputs read + outputs written, ignoring caches: an upper bound on traffic
    elements: int = 0  # largest tensor's elements per call, summed: a nominal 1 FLOP each
    #                    for elementwise ops and reductions (GELU really does ~10, an add 1)
    seconds: float = 0.0  # only with time_ops=True

    @property
    def intensity(self):
        """FLOPs per byte (0 when the op moved no bytes)."""
        return self.flops / self.bytes if self.bytes else 0.0


def _tensor_bytes(tree):
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class FlopCounter(TorchDispatchMode):
    """`with FlopCounter() as c: ...` counts every op that runs inside: `c.total_flops`,
    `c.total_bytes`, `c.by_op[name]` (an OpStats). `time_ops=True` also times each op (CPU:
    ops are synchronous; CUDA: synchronizes around each op - slow, for analysis only)."""

    def __init__(self, *, time_ops=False):
        super().__init__()
        self.time_ops = time_ops
        self.by_op = {}

    @property
    def total_flops(self):
        return sum(s.flops for s in self.by_op.values())

    @property
    def total_bytes(self):
        return sum(s.bytes for s in self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__  # "mm" for aten.mm.default and aten.mm.out alike
        if func.is_view or name in _NO_TRAFFIC:  # views and allocations move no data
            return func(*args, **kwargs)
        sync = self.time_ops and any(isinstance(t, torch.Tensor) and t.is_cuda
                                     for t in tree_flatten((args, kwargs))[0])
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if sync:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        stats = self.by_op.setdefault(name, OpStats())
        stats.calls += 1
        stats.seconds += elapsed if self.time_ops else 0.0
        rule = FLOP_RULES.get(name)
        stats.flops += int(rule(*args, **kwargs)) if rule is not None else 0
        stats.bytes += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        stats.elements += max((t.numel() for t in tensors), default=0)
        return out


def count_flops(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` and count its matmul FLOPs (forward and any backward it runs).

    Returns (fn's result, FLOPs as an int). Counts mm/addmm/bmm/baddbmm/addbmm, their in-place
    and out= forms, and SDPA's fused kernels (CPU flash, CUDA flash/efficient/cudnn, forward and
    backward) with FlopCounterMode's formulas; everything else counts 0."""
    if not callable(fn):
        raise ValueError("fn must be callable: pass the function to run, e.g. lambda: model(x)")
    with FlopCounter() as counter:
        result = fn(*args, **kwargs)
    return result, counter.total_flops


# ---------------------------------------------------------------- the machine's ceilings

def _timer(device):
    """A function f(fn) -> seconds of one call, exact for the device: CUDA events on GPU
    (the launch returns at once; the events are timestamped on the GPU's own stream)."""
    if device.type == "cuda":
        def time_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3  # ms -> s
        return time_cuda

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_cpu


def _best_seconds(fn, device, reps, warmup=2):
    """The FASTEST of `reps` timed calls after `warmup`: a ceiling is the best the machine did,
    not the typical (a shared machine only ever makes a call slower)."""
    timer = _timer(device)
    for _ in range(warmup):
        fn()
    return min(timer(fn) for _ in range(reps))


def _cached(kind, device, extra, measure, cache_path, refresh):
    path = pathlib.Path(cache_path) if cache_path is not None else default_cache_path()
    device = torch.device(device)
    threads = torch.get_num_threads()
    key = "|".join([kind, platform.node(), device_name(device), torch.__version__,
                    f"threads={threads}", *extra])
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}  # a corrupt cache is re-measured, never trusted
    if not refresh and key in cache and math.isfinite(cache[key].get("value", float("nan"))):
        return float(cache[key]["value"])
    value = float(measure())
    cache[key] = {"value": value, "metadata": {
        "kind": kind, "host": platform.node(), "device": device_name(device),
        "torch": torch.__version__, "threads": threads, "extra": list(extra),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    write_atomic(path, json.dumps(cache, indent=1, sort_keys=True))
    return value


def peak_flops(dtype=torch.float32, *, device="cpu", size=None, reps=5, cache_path=None,
               refresh=False):
    """This machine's matmul ceiling in FLOP/s at `dtype` and the current thread count, MEASURED:
    the best of `reps` (n x n) @ (n x n) matmuls (2 n^3 FLOPs each) for n = `size`, or by
    default the best over n in 512, 1024, 2048 (CPU) / 4096, 8192 (CUDA): which size reaches the
    ceiling depends on the caches (on the course VM n = 512 beat n = 2048 by 3.6x). Cached per
    (host, device, torch, threads, dtype, sizes) in `cache_path` (default_cache_path());
    `refresh=True` measures again."""
    device = torch.device(device)
    sizes = (size,) if size else ((4096, 8192) if device.type == "cuda" else (512, 1024, 2048))
    if min(sizes) < 1 or reps < 1:
        raise ValueError(f"size and reps must be >= 1, got size={size}, reps={reps}")

    def measure():
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)  # (n, n)
            b = torch.randn(n, n, device=device).to(dtype)  # (n, n)
            best = max(best, 2 * n**3 / _best_seconds(lambda: torch.mm(a, b), device, reps))
        return best
    extra = [str(dtype), "sizes=" + ",".join(map(str, sizes))]
    return _cached("matmul", device, extra, measure, cache_path, refresh)


def peak_bandwidth(*, device="cpu", size_bytes=None, reps=5, cache_path=None, refresh=False):
    """This machine's memory ceiling in bytes/s, MEASURED: the best of `reps` copies of a
    `size_bytes` buffer (read once + written once = 2 x size_bytes moved). Pick a buffer far
    larger than the last-level cache, or you measure the cache. Cached like peak_flops."""
    device = torch.device(device)
    size_bytes = size_bytes or (2**30 if device.type == "cuda" else 2**28)
    if size_bytes < 4 or reps < 1:
        raise ValueError(f"size_bytes must be >= 4 and reps >= 1, got {size_bytes}, {reps}")

    def measure():
        src = torch.ones(size_bytes // 4, device=device)  # float32; pages touched before timing
        dst = torch.zeros_like(src)
        return 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), device, reps)
    return _cached("copy", device, [f"bytes={size_bytes}"], measure, cache_path, refresh)
