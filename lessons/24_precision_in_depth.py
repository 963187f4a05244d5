"""Lesson 24 - precision in depth: what autocast really runs in low precision, what it saves,
and where fp16 overflows.

Objective: three measurements lesson 09 (speed) does not make.
1. Activation memory per precision: the bytes autograd keeps for backward in one training step
   of the tiny GPT under fp32, bf16 autocast and fp16 autocast, split by dtype (counted with
   `torch.autograd.graph.saved_tensors_hooks`; without checkpointing the peak is the end of the
   forward, lesson 23 asserts it) - against the notes' "AMP ... -50% activations".
2. The autocast op table, read from a REAL traced step: a `TorchDispatchMode` records every ATen
   op that runs (forward and backward) and the dtype it produced, next to the notes' table
   ("Softmax FP32 - Needs precision for exp(); Layer Norm FP32 - Needs precision for variance").
   On a CPU that table is only half true: CPU autocast lowers matmuls (addmm, mm, SDPA) but has no
   fp32 rule for softmax or layer_norm - they run in whatever dtype reaches them (probed below).
   The GPT's LayerNorms run in fp32 anyway, because the residual stream stays fp32 (x + bf16
   promotes to fp32); the loss's log_softmax is fp32 because `lm_loss` casts the logits.
3. fp16 overflow in a LayerNorm and a softmax, shown and fixed. fp16's largest value is 65504:
   a hand-written LayerNorm squares (x - mean), so one activation with |x - mean| > 256
   (sqrt 65504) already gives var = inf and the output silently becomes 0; a softmax written
   as exp(x) / sum exp(x) overflows for x > 11.1 (e^11.09 = 65504) and returns inf / inf = nan.
   Fixes: compute the statistics in fp32 (what native kernels do inside: F.layer_norm on fp16
   accumulates in fp32), subtract the max before exp (what F.softmax does), or use bf16 (fp32's
   exponent range, 7-bit mantissa: ~1e-2 error instead of fp16's ~1e-3).

Serves: syllabus 16-01 (FP32/FP16/BF16 dynamic range, speed AND memory benchmarks, numerical
edge cases: overflow in FP16 normalization layers); deck slide 9 (single-GPU changes: bf16) and
slide 18 / M8-LAB-03 (a toggle's effect on memory). Prerequisites: lessons 05 and 09.

Run: python lessons/24_precision_in_depth.py   (~10-20 s on 2 busy cores; figure in
outputs/lesson24/)
"""
from collections import defaultdict

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minitrain.bench import fastest_thread_count
from minitrain.model import GPT, GPTConfig, LayerNorm
from minitrain.style import GOLD, GREEN, MUTED, NAVY, RED, TEXT, outputs_dir
from minitrain.train import autocast_context, lm_loss

OUT = outputs_dir("lesson24")
MIB = 2**20
MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
B, T = 8, 128
PRECISIONS = ("fp32", "bf16", "fp16")
NOTES_CLAIM = 0.50  # notes (course file 001): "AMP (Mixed Precision) | ~1.5-2x | -50% activations"
# The notes' op table (CUDA), and the ATen ops that implement each row here: (forward, backward).
NOTES_TABLE = [
    ("Matrix multiply (Linear, Attention)", "FP16", ("addmm", "mm"), ("mm",)),
    ("Attention kernel (SDPA)", "FP16", ("_scaled_dot_product_flash_attention_for_cpu",),
     ("_scaled_dot_product_flash_attention_for_cpu_backward",)),
    ("GELU", "FP16", ("gelu",), ("gelu_backward",)),
    ("Softmax (in the loss)", "FP32", ("_log_softmax",), ("_log_softmax_backward_data",)),
    ("Layer Norm", "FP32", ("native_layer_norm",), ("native_layer_norm_backward",)),
    ("Loss calculation", "FP32", ("nll_loss_forward",), ("nll_loss_backward",)),
    ("residual add (not in the notes)", "-", ("add",), ("add",))]
ABBREV = {"_scaled_dot_product_flash_attention_for_cpu": "sdpa_flash_cpu"}
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class DtypeRecorder(TorchDispatchMode):
    """Every ATen op that runs inside, with the dtype of its first floating-point output,
    counted separately for the forward and the backward (`self.phase`)."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops = {"forward": defaultdict(lambda: defaultdict(int)),
                    "backward": defaultdict(lambda: defaultdict(int))}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.ops[self.phase][func._overloadpacket.__name__][SHORT.get(t.dtype, "?")] += 1
                break
        return out


def saved_bytes_by_dtype(model, precision, x, y):
    """Bytes autograd saves in the forward, by dtype, each storage once, parameters excluded.
    Also runs the backward (so the recorder below can see it) and returns the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = (SHORT.get(t.dtype, str(t.dtype)), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast_context(precision, "cpu"):
            loss = lm_loss(model(x), y)
    by_dtype = defaultdict(int)
    for dtype, nbytes in seen.values():
        by_dtype[dtype] += nbytes
    return dict(by_dtype), loss


def traced_step(precision, x, y):
    """One forward + backward of a fresh GPT under `precision`, every ATen op's dtype recorded."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    with DtypeRecorder() as rec:
        saved, loss = saved_bytes_by_dtype(model, precision, x, y)
        rec.phase = "backward"
        loss.backward()
    return saved, rec.ops, loss.item()


def layer_norm_variant(x, how):
    """LayerNorm over the last dim of x (no grad), computed one of the ways of part 3."""
    with torch.no_grad():
        if how == "fp16, hand-written":
            return LayerNorm(x.shape[-1]).half()(x.half())  # mean((x - mean)^2) in fp16
        if how == "fp16, statistics in fp32":
            return LayerNorm(x.shape[-1])(x.half().float()).half()  # fp16 in/out, fp32 inside
        if how == "fp16, native F.layer_norm":
            return F.layer_norm(x.half(), x.shape[-1:])  # the kernel accumulates in fp32
        if how == "bf16, hand-written":
            return LayerNorm(x.shape[-1]).bfloat16()(x.bfloat16())
    raise ValueError(f"unknown LayerNorm variant {how!r}")


def max_error(out, ref):
    """Max |out - ref| in float64; inf when out has a non-finite value."""
    out = out.double()
    return float((out - ref).abs().max()) if torch.isfinite(out).all() else float("inf")


def layer_norm_error(x, how):
    """Max |LayerNorm(x) - fp64 reference| for one way of computing it; inf when non-finite."""
    return max_error(layer_norm_variant(x, how), F.layer_norm(x.double(), x.shape[-1:]))


def softmax_variant(z, how):
    """softmax over the last dim of z, computed one of the ways of part 3."""
    zh = z.half()
    if how == "fp16, exp(x) / sum exp(x)":
        e = zh.exp()
    elif how == "fp16, subtract the max first":
        e = (zh - zh.amax(dim=-1, keepdim=True)).exp()  # every exponent <= 0: e <= 1
    elif how == "bf16, exp(x) / sum exp(x)":
        e = z.bfloat16().exp()
    else:
        raise ValueError(f"unknown softmax variant {how!r}")
    return e / e.sum(dim=-1, keepdim=True)


def softmax_error(z, how):
    return max_error(softmax_variant(z, how), F.softmax(z.double(), dim=-1))


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (B, T), generator=g)  # (B, T)
    y = torch.roll(x, -1, dims=1)  # (B, T)

    # 1. Activation memory per precision.
    runs = {p: traced_step(p, x, y) for p in PRECISIONS}
    fp32_total = sum(runs["fp32"][0].values())
    print(f"GPT {MODEL}, B={B}, T={T}: bytes autograd keeps for backward (saved-tensor hooks)\n")
    print(f"{'precision':<10}{'fp32 MiB':>9}{'bf16 MiB':>9}{'fp16 MiB':>9}{'total':>8}"
          f"{'vs fp32':>9}{'loss':>8}")
    for p, (saved, _, loss) in runs.items():
        total = sum(saved.values())
        print(f"{p:<10}" + "".join(f"{saved.get(d, 0) / MIB:>9.2f}" for d in PRECISIONS)
              + f"{total / MIB:>8.2f}{total / fp32_total - 1:>+9.0%}{loss:>8.3f}")
    cut = 1 - sum(runs["bf16"][0].values()) / fp32_total
    print(f"notes: \"-50% activations\"; measured with bf16 autocast: -{cut:.0%}. What stays "
          "fp32: the residual stream and its LayerNorms,\nthe logits cast for the loss, and the "
          "fp32 inputs that a cast saves; autocast also keeps a low-precision COPY of each weight.")

    # 2. The op table from the traced steps, next to the notes' table.
    print(f"\n{'notes row':<37}{'notes':>6}   {'ATen op (fwd)':<18}{'bf16 fwd':>9}{'bf16 bwd':>9}"
          f"{'fp16 fwd':>9}")

    def seen(precision, phase, ops):
        counts = defaultdict(int)
        for op in ops:
            for dtype, n in runs[precision][1][phase].get(op, {}).items():
                counts[dtype] += n
        return "/".join(sorted(counts)) or "-"

    for row, notes_dtype, ops, bwd_ops in NOTES_TABLE:
        name = ABBREV.get(ops[0], ops[0])
        print(f"{row:<37}{notes_dtype:>6}   {name:<18}{seen('bf16', 'forward', ops):>9}"
              f"{seen('bf16', 'backward', bwd_ops):>9}{seen('fp16', 'forward', ops):>9}")
    casts = runs["bf16"][1]["forward"]["_to_copy"]
    print(f"casts (_to_copy) in the bf16 forward: {dict(casts)} - autocast inserts them")
    probe = torch.randn(4, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probed = {name: SHORT[fn(probe).dtype] for name, fn in
                  (("layer_norm", lambda t: F.layer_norm(t, (64,))),
                   ("softmax", lambda t: F.softmax(t, -1)),
                   ("linear(fp32 in)", lambda t: F.linear(t.float(), torch.randn(8, 64))))}
    print(f"probe, bf16 input under CPU autocast: {probed} (CUDA autocast would give fp32 for "
          "layer_norm and softmax)")

    fwd = runs["bf16"][1]["forward"]
    assert set(fwd["addmm"]) == {"bf16"}, f"Linear layers should run in bf16: {dict(fwd['addmm'])}"
    assert set(fwd["native_layer_norm"]) == {"fp32"}, "LayerNorm sees the fp32 residual stream"
    assert set(fwd["_log_softmax"]) == {"fp32"}, "lm_loss computes the log-softmax in fp32"
    assert probed["softmax"] == "bf16", "CPU autocast has no fp32 rule for softmax"
    for p in ("bf16", "fp16"):
        total = sum(runs[p][0].values())
        assert total < fp32_total, f"{p} autocast should keep fewer activation bytes"
        assert 1 - total / fp32_total < NOTES_CLAIM, \
            "mixed precision keeps fp32 tensors too, so it saves less than half"

    # 3. fp16 overflow in LayerNorm and softmax, and the fixes.
    scales = [1, 4, 16, 64, 128, 256, 512, 1024, 4096]
    ln_ways = ("fp16, hand-written", "fp16, statistics in fp32", "fp16, native F.layer_norm",
               "bf16, hand-written")
    xs = {s: s * torch.randn(64, 128, generator=g) for s in scales}  # (rows, C) activations
    ln_err = {w: [layer_norm_error(xs[s], w) for s in scales] for w in ln_ways}
    sm_ways = ("fp16, exp(x) / sum exp(x)", "fp16, subtract the max first",
               "bf16, exp(x) / sum exp(x)")
    shifts = [0, 5, 10, 11, 12, 20, 50]
    zs = {s: torch.randn(64, 128, generator=g) + s for s in shifts}  # logits around `s`
    sm_err = {w: [softmax_error(zs[s], w) for s in shifts] for w in sm_ways}
    print("\nLayerNorm, max |error| vs fp64 (inf = non-finite), activations of size ~scale:")
    print(f"{'scale':<28}" + "".join(f"{s:>8}" for s in scales))
    for w, errs in ln_err.items():
        print(f"{w:<28}" + "".join(f"{e:>8.0e}" if e < float("inf") else f"{'inf':>8}"
                                   for e in errs))
    print("\nsoftmax, max |error| vs fp64, logits ~ N(shift, 1):")
    print(f"{'shift':<28}" + "".join(f"{s:>8}" for s in shifts))
    for w, errs in sm_err.items():
        print(f"{w:<28}" + "".join(f"{e:>8.0e}" if e < float("inf") else f"{'inf':>8}"
                                   for e in errs))
    print("why 'hand-written' fails from scale 128 with a finite error: once some |x - mean| > "
          "256 = sqrt(65504) (4-sigma values at scale 128),\nvar = inf, (x - mean) / sqrt(inf) = 0 "
          "and every output is the bias (0): silently wrong, not nan.")

    big = scales.index(512)
    assert ln_err["fp16, hand-written"][big] > 0.5, "fp16 variance should overflow at scale 512"
    assert ln_err["fp16, hand-written"][0] < 1e-2, "and be fine at scale 1"
    for w in ln_ways[1:]:
        assert max(ln_err[w]) < 5e-2, f"{w} should survive every scale"
    assert sm_err["fp16, exp(x) / sum exp(x)"][shifts.index(20)] == float("inf"), \
        "exp(20) = 4.9e8 > 65504 should overflow in fp16"
    assert max(sm_err["fp16, subtract the max first"]) < 1e-2, "max-subtraction fixes it"

    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4.5))
    bottom = [0.0] * len(PRECISIONS)
    for dtype, color in (("fp32", NAVY), ("bf16", GOLD), ("fp16", MUTED)):
        vals = [runs[p][0].get(dtype, 0) / MIB for p in PRECISIONS]
        ax0.bar(PRECISIONS, vals, bottom=bottom, color=color, label=f"saved as {dtype}")
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax0.axhline(fp32_total / MIB / 2, color=TEXT, ls="--", lw=1, label="notes: -50%")
    ax0.set_ylabel("activation MiB kept for backward")
    ax0.set_title(f"activations per precision (B={B}, T={T})")
    ax0.legend(fontsize=8)
    ceiling = 10.0  # draw non-finite results at the top of the plot
    for ax, errs, xs_, xlabel, title in (
            (ax1, ln_err, scales, "activation scale", "LayerNorm: fp16 variance overflows"),
            (ax2, sm_err, shifts, "logit shift", "softmax: fp16 exp overflows")):
        for (w, e), color, marker in zip(errs.items(), (RED, GREEN, NAVY, GOLD), "osx^"):
            ax.plot(xs_, [min(v, ceiling) for v in e], marker=marker, color=color, label=w,
                    alpha=0.85)
        ax.set_yscale("log")
        ax.set_xscale("linear" if 0 in xs_ else "log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"max |error| vs fp64 (inf drawn at {ceiling:g})")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "precision_in_depth.png", dpi=100)
    plt.close(fig)
    print(f"\nwrote {OUT / 'precision_in_depth.png'}")


if __name__ == "__main__":
    main()
