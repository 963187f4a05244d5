"""Lesson 05 — fp16, its underflow dead zone, and the GradScaler that works around it.

Objective:
  1. fp16's range next to bf16's and fp32's (torch.finfo, printed).
  2. Which REAL gradients vanish in fp16 without scaling — counted: take the tiny GPT after a
     few fp32 training steps, run one batch backward (a) in fp32, (b) under fp16 autocast
     unscaled, (c) under fp16 autocast with the loss scaled by 2^16 (then unscaled), (d) under
     bf16 autocast unscaled; count the gradient elements that are non-zero in fp32 but exactly 0
     in the others (underflow), and cast the fp32 gradients to fp16 / bf16 to count the dead zone
     (|g| below fp16's smallest subnormal 2^-24 ~ 6e-8 rounds to 0).
  3. The scale trajectory of a real fp16 run on CPU (`torch.autocast("cpu", torch.float16)` +
     `minitrain.grad_scaler.GradScaler`, init scale 2^24, growth_interval 10): it halves on every
     overflow (that step is skipped) and doubles after 10 clean steps — a saw-tooth.
  4. bf16 needs no scaler: a bf16 autocast run without one trains like fp32 (same seed, batches).

What the measurements say: a fraction of a percent of this model's gradients is below fp16's
floor, and ~1 in 5 sits in fp16's subnormal range where only a few mantissa bits remain; the
unscaled fp16 backward loses a handful of elements, the 2^16-scaled one none; bf16 loses none.
Small models with large gradients suffer little — the dead zone bites in big, deep models late
in training, where gradients shrink. The scaler's cost is visible too: every overflow skips a
step (the start at 2^24 calibrates down over the first steps), so fp16 lags fp32 slightly.

Serves: Module 8 deck slide 8 (annotation 6: mixed precision) and slide 9 (annotation 4: BF16);
syllabus 16-01 (FP32/FP16/BF16 dynamic range, GradScaler loss scaling, why BF16 needs no
scaler); notebook section "3. Mixed Precision Training" ("The Challenge: Gradient Underflow");
GPT-2 notes section "4. AMP (Automatic Mixed Precision)" ("The Underflow Problem", "How
GradScaler Solves This", "GradScaler: Dynamic Scale Adjustment").
Prerequisites: lesson 03, floating-point basics (sign, exponent, mantissa), `minitrain.grad_scaler`.

Run: python lessons/05_fp16_and_gradscaler.py   (~30 s on 2 cores; figure in outputs/lesson05/)
"""
import matplotlib.pyplot as plt
import numpy as np
import torch

from minitrain.bench import fastest_thread_count
from minitrain.data import corpus_tokens, get_batch
from minitrain.grad_scaler import GradScaler
from minitrain.model import GPT, GPTConfig
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson05")
STEPS, LR, BATCH, SEQ = 80, 3e-3, 16, 32
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)
INIT_SCALE, GROWTH_INTERVAL = 2.0**24, 10


def fresh_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def grads_under(model, x, y, dtype, scale=1.0):
    """One backward of the same batch; returns the flat fp32 gradient (unscaled)."""
    model.zero_grad(set_to_none=True)
    with autocast(dtype):
        _, loss = model(x, y)
    (loss * scale).backward()
    return torch.cat([p.grad.reshape(-1).float() for p in model.parameters()]) / scale


def dead_zone(data):
    """Part 2: count real gradients lost to fp16 underflow."""
    model, opt = fresh_model()
    rng = np.random.default_rng(0)
    for _ in range(20):                                   # a few fp32 steps: realistic grads
        x, y = get_batch(data, BATCH, SEQ, rng=rng)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    x, y = get_batch(data, BATCH, SEQ, rng=rng)
    g32 = grads_under(model, x, y, None)
    live = g32 != 0
    rows = [("fp32 gradient, non-zero elements", int(live.sum()), 1.0)]
    tiny = live & (g32.abs() < 2.0**-24)                  # below fp16's smallest subnormal
    rows.append(("  |g| < 2^-24: below fp16's smallest step", int(tiny.sum()), None))
    rows.append(("  cast to fp16 -> 0 (|g| <= 2^-25)", int(((g32.half() == 0) & live).sum()), None))
    rows.append(("  |g| < 2^-14: fp16 subnormal (few bits)", int((live & (g32.abs() < 2.0**-14)).sum()), None))
    rows.append(("  cast to bf16 -> 0", int(((g32.bfloat16() == 0) & live).sum()), None))
    for name, dtype, scale in [("fp16 autocast backward, unscaled", torch.float16, 1.0),
                               ("fp16 autocast backward, scale 2^16", torch.float16, 2.0**16),
                               ("bf16 autocast backward, unscaled", torch.bfloat16, 1.0)]:
        g = grads_under(model, x, y, dtype, scale)
        rows.append((f"{name}: lost (0)", int(((g == 0) & live).sum()), None))
    return rows, g32[live].abs().numpy()


def train_run(data, dtype, scaler=None):
    """Part 3/4: STEPS steps; returns losses, scale before each step, skipped flags."""
    model, opt = fresh_model()
    rng = np.random.default_rng(1)
    losses, scales, skipped = [], [], []
    for _ in range(STEPS):
        x, y = get_batch(data, BATCH, SEQ, rng=rng)
        with autocast(dtype):
            _, loss = model(x, y)
        if scaler is None:
            loss.backward()
            opt.step()
            skipped.append(False)
            scales.append(1.0)
        else:
            scales.append(scaler.get_scale())
            scaler.scale(loss).backward()
            scaler.step(opt)                              # skipped if inf/nan was found
            scaler.update()
            skipped.append(scaler.last_step_skipped)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return np.array(losses), np.array(scales), np.array(skipped)


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    data = corpus_tokens(max_bytes=300_000)

    print(f"{'dtype':9} {'max':>10} {'smallest normal':>16} {'smallest subnormal':>19} {'eps':>9}")
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        fi = torch.finfo(dt)
        print(f"{str(dt)[6:]:9} {fi.max:10.3e} {fi.tiny:16.3e} {fi.smallest_normal * fi.eps:19.3e} "
              f"{fi.eps:9.2e}")

    rows, mags = dead_zone(data)
    total = rows[0][1]
    print(f"\nReal gradients of the tiny GPT (one batch after 20 fp32 steps), {total:,} non-zero")
    for name, count, _ in rows[1:]:
        print(f"{name:46} {count:8,d}  ({count / total:.3%})")

    scaler = GradScaler(init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)
    runs = {"fp32": train_run(data, None),
            "fp16 + GradScaler": train_run(data, torch.float16, scaler),
            "bf16, no scaler": train_run(data, torch.bfloat16)}
    l16, scales, skipped = runs["fp16 + GradScaler"]
    print(f"\n{STEPS} training steps, same seed and batches")
    print(f"{'run':18} {'loss (last 10)':>15} {'skipped':>8}")
    for name, (losses, _, sk) in runs.items():
        print(f"{name:18} {losses[-10:].mean():15.4f} {int(sk.sum()):8d}")
    halvings = int((np.diff(scales) < 0).sum())
    doublings = int((np.diff(scales) > 0).sum())
    print(f"scale: start 2^{np.log2(scales[0]):.0f}, end 2^{np.log2(scaler.get_scale()):.0f}, "
          f"{halvings} halvings, {doublings} doublings, settles around 2^{np.log2(np.median(scales)):.0f}")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), facecolor=BACKGROUND)
    ax = axes[0]
    ax.hist(np.log2(mags), bins=60, color=NAVY)
    for x, c, label in [(-24, RED, "fp16 -> 0 below 2^-24"), (-14, GOLD, "fp16 subnormal below 2^-14"),
                        (-24 + 16, MUTED, "scaled by 2^16: 2^-24 lands here")]:
        ax.axvline(x, color=c, ls="--", lw=1.5, label=label)
    ax.set_xlabel("log2 |gradient|")
    ax.set_title("real gradient magnitudes vs fp16's floor", color=NAVY, loc="left")
    ax = axes[1]
    ax.step(np.arange(STEPS), np.log2(scales), where="post", color=NAVY, lw=2)
    ax.scatter(np.flatnonzero(skipped), np.log2(scales[skipped]), color=RED, zorder=3,
               label="overflow: step skipped, scale halves")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("log2 scale")
    ax.set_title(f"GradScaler scale (growth_interval {GROWTH_INTERVAL})", color=NAVY, loc="left")
    ax = axes[2]
    for (name, (losses, _, _)), c, lw in zip(runs.items(), (MUTED, NAVY, GOLD), (5, 2, 2)):
        ax.plot(np.convolve(losses, np.ones(5) / 5, mode="valid"), color=c, lw=lw, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_title("training loss (5-step mean)", color=NAVY, loc="left")
    for ax in axes:
        ax.set_facecolor(PANEL)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "fp16_gradscaler.png", dpi=110)
    plt.close(fig)
    print(f"figure: {OUT / 'fp16_gradscaler.png'}")

    counts = {name: c for name, c, _ in rows}
    assert counts["  cast to fp16 -> 0 (|g| <= 2^-25)"] > 0, "expected real gradients in the dead zone"
    assert counts["  cast to bf16 -> 0"] == 0, "bf16 has fp32's exponent range: no underflow"
    assert (counts["fp16 autocast backward, scale 2^16: lost (0)"]
            < counts["fp16 autocast backward, unscaled: lost (0)"]), "scaling should rescue grads"
    assert halvings >= 1 and doublings >= 1, "expected the scale to both back off and grow"
    assert int(skipped.sum()) == halvings + int(skipped[-1]), "every skip halves the scale"
    for name in ("fp16 + GradScaler", "bf16, no scaler"):
        gap = abs(runs[name][0][-10:].mean() - runs["fp32"][0][-10:].mean())
        # fp16's skipped steps are updates it never made: a small lag behind fp32 is expected
        assert gap < 0.15, f"{name} should train like fp32 (gap {gap:.3f})"


if __name__ == "__main__":
    main()
