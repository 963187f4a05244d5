"""Lesson 26 — large batches: the lr scaling rules, LARS/LAMB, batch-size warmup, sync frequency.

Objective: four measured questions about making the batch bigger, on the tiny GPT.
1. Scaling rules. Tune nothing: take one lr that works at batch 8, then train at batch 8, 16,
   32, 64 on the SAME token budget (so bigger batch = fewer steps) with the lr scaled by the
   linear rule (lr x k) and by the sqrt rule (lr x sqrt(k)) (`minitrain.large_batch.scaled_lr`).
2. At the largest batch: AdamW vs LAMB vs LARS (from scratch in minitrain.large_batch), and the
   per-layer trust ratios LAMB actually used (why "per layer" matters: they differ a lot).
3. Batch-size warmup: ramp the batch from 8 to 64 over the first quarter of the tokens, against
   batch 64 from step 0, same tokens.
4. Accumulation vs sync frequency under DDP (2 gloo processes): the same global batch as k
   micro-batches, synchronizing gradients once per optimizer step (`no_sync` around the first
   k - 1 backwards) or after every micro-batch. Same gradient, k times the all-reduces.

What the measurements say (and the lesson asserts what is robust): with a fixed token budget
the larger batches take fewer, larger steps and end higher at this size (the tiny model is far
from its "critical batch size", so the step count matters more than the gradient noise); the
linear rule's lr at 8x is large enough to hurt an Adam-type optimizer, which is why sqrt is the
usual rule for Adam. Syncing every micro-batch sends exactly k times the all-reduces for the
same gradient (asserted); its time cost on 2 CPU processes is shown, not asserted (noise).

Serves: syllabus 16-04 (linear scaling rule, LARS/LAMB from scratch, batch-size warmup, gradient
sync frequency); 16-08 (accumulation and synchronization under DDP).
Prerequisites: lessons 06 (accumulation) and 13 (DDP).

Run: python lessons/26_large_batch.py   (~40 s on 2 cores; figure in outputs/lesson26/)
"""
import math

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist

from minitrain.bench import measure
from minitrain.data import corpus_tokens, get_batch, split_tokens
from minitrain.ddp import DDP
from minitrain.distributed_utils import launch
from minitrain.large_batch import LAMB, LARS, scaled_lr
from minitrain.model import GPT, GPTConfig
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, RED, outputs_dir

SEQ, BASE_BATCH, BASE_LR, BASE_STEPS = 32, 8, 3e-3, 128  # budget: 8 x 128 sequences
BATCHES = (8, 16, 32, 64)
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)


def train(data, val_batches, *, batches, make_opt, seed=0):
    """Train on the list of per-step batch sizes `batches`; returns (val loss, opt, losses)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MODEL))
    opt = make_opt(model.parameters())
    rng = np.random.default_rng(seed)
    losses = []
    for b in batches:
        x, y = get_batch(data, b, SEQ, rng=rng)  # (b, T), (b, T)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    with torch.no_grad():
        val = float(np.mean([model(x, y)[1].item() for x, y in val_batches]))
    return val, opt, losses


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def lamb_trust_ratios(opt):
    """||w|| / ||update|| of each tensor at LAMB's last step (recomputed from its state)."""
    ratios = []
    for group in opt.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
            st = opt.state[p]
            t = st["step"]
            r = (st["exp_avg"] / (1 - b1 ** t)) / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt()
                                                   + group["eps"])
            ratios.append(float(p.detach().norm() / r.norm()))
    return ratios


def sync_frequency(rank, world, k_values, rows):
    """Per k: (all-reduce calls per step, median step s) for sync-once vs sync-every; and
    whether both strategies gave the same gradient."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    ddp = DDP(model, bucket_cap_mb=0.05)  # small buckets: several all-reduces per sync
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, 256, (rows, SEQ), generator=gen)  # this rank's rows of the global batch
    calls = {"n": 0}
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls["n"] += 1
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    out = {}
    try:
        for k in k_values:
            micro = x.chunk(k)
            grads = {}
            for strategy in ("once", "every"):
                def step():
                    for i, xm in enumerate(micro):
                        last = i == len(micro) - 1
                        ctx = ddp.no_sync() if (strategy == "once" and not last) else _null()
                        with ctx:
                            _, loss = ddp(xm, xm)
                            (loss / k).backward()
                        if strategy == "every" or last:
                            ddp.finish_gradient_synchronization()
                calls["n"] = 0
                model.zero_grad(set_to_none=True)
                step()
                per_step = calls["n"]
                grads[strategy] = [p.grad.clone() for p in model.parameters()]

                def timed():
                    model.zero_grad(set_to_none=True)
                    step()
                t = measure(timed, tokens_per_step=rows * SEQ * world, warmup=1, iters=5)
                out[(k, strategy)] = (per_step, t["median_s"])
            out[(k, "same_grad")] = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7)
                                        for a, b in zip(grads["once"], grads["every"]))
    finally:
        dist.all_reduce = real_all_reduce
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main():
    # One thread: for a model this small it is the fastest setting (the matmuls are too small
    # to split; on the shared 2-core machine a second thread only spins). Part 4's DDP processes
    # also run one thread each (one core per process).
    torch.set_num_threads(1)
    out = outputs_dir("lesson26")
    train_data, val_data = split_tokens(corpus_tokens(max_bytes=300_000))
    vrng = np.random.default_rng(1234)
    val_batches = [get_batch(val_data, 32, SEQ, rng=vrng) for _ in range(4)]
    budget = BASE_BATCH * BASE_STEPS  # sequences

    print(f"1. scaling rules, same budget ({budget} sequences of {SEQ} tokens), AdamW, base lr "
          f"{BASE_LR:g} at batch {BASE_BATCH}")
    print(f"{'batch':>6} {'steps':>6} {'linear lr':>10} {'val':>7} {'sqrt lr':>9} {'val':>7}")
    scaling = {}
    for b in BATCHES:
        steps = budget // b
        row = []
        for rule in ("linear", "sqrt"):
            lr = scaled_lr(BASE_LR, BASE_BATCH, b, rule=rule)
            val, _, _ = train(train_data, val_batches, batches=[b] * steps, make_opt=adamw(lr))
            row += [lr, val]
        scaling[b] = row
        print(f"{b:6d} {steps:6d} {row[0]:10.2e} {row[1]:7.4f} {row[2]:9.2e} {row[3]:7.4f}")

    big, steps = BATCHES[-1], budget // BATCHES[-1]
    lr_sqrt = scaled_lr(BASE_LR, BASE_BATCH, big, rule="sqrt")
    print(f"\n2. batch {big}, {steps} steps: AdamW vs LAMB vs LARS, each at the best of three "
          "learning rates (they need different ones: LAMB and LARS move each layer by about "
          "lr x ||w||, Adam each element by about lr)")
    candidates = {"AdamW": (adamw, (lr_sqrt / 3, lr_sqrt, lr_sqrt * 3)),
                  "LAMB": (lambda lr: lambda ps: LAMB(ps, lr), (0.03, 0.1, 0.3)),
                  "LARS (eta 1e-3)": (lambda lr: lambda ps: LARS(ps, lr, momentum=0.9),
                                      (3.0, 10.0, 30.0))}
    opt_vals, lamb_ratios = {}, None
    for name, (make, lrs) in candidates.items():
        tried = []
        for lr in lrs:
            val, opt, _ = train(train_data, val_batches, batches=[big] * steps, make_opt=make(lr))
            tried.append((val if math.isfinite(val) else math.inf, lr, opt))
        val, lr, opt = min(tried, key=lambda t: t[0])
        opt_vals[name] = val
        if name == "LAMB":
            lamb_ratios = lamb_trust_ratios(opt)
        print(f"   {name:16} best lr {lr:8.3g}  val {val:.4f}   (tried "
              + ", ".join(f"{t[1]:g}: {t[0]:.3f}" for t in tried) + ")")
    print(f"   LAMB's per-tensor trust ratios at its last step: {min(lamb_ratios):.3g} .. "
          f"{max(lamb_ratios):.3g} (one global lr would give every layer the same)")

    ramp_steps = (budget // 4) // ((BASE_BATCH + big) // 2)  # a quarter of the tokens
    ramp = [int(round(BASE_BATCH + (big - BASE_BATCH) * i / max(1, ramp_steps - 1)))
            for i in range(ramp_steps)]
    left = budget - sum(ramp)
    ramp += [big] * (left // big)
    val_ramp, _, _ = train(train_data, val_batches, batches=ramp, make_opt=adamw(lr_sqrt))
    val_flat = scaling[big][3]  # batch 64 from step 0 at the same (sqrt-rule) lr
    print(f"\n3. batch-size warmup {BASE_BATCH} -> {big} over {ramp_steps} steps "
          f"({sum(ramp)} sequences, {len(ramp)} steps): val {val_ramp:.4f} vs batch {big} "
          f"from step 0 ({budget} sequences, {steps} steps): val {val_flat:.4f}")

    k_values = (1, 2, 4)
    ranks = launch(sync_frequency, 2, k_values, 16, timeout_s=240, threads=1)
    res = ranks[0]
    print("\n4. DDP, 2 processes, 16 rows per rank, k micro-batches per optimizer step "
          "(times on 2 shared cores are noisy: read the counts)")
    print(f"{'k':>3} {'all-reduces (once)':>19} {'(every)':>8} {'ms (once)':>10} "
          f"{'ms (every)':>11} {'same grad':>10}")
    for k in k_values:
        (n1, t1), (nk, tk) = res[(k, "once")], res[(k, "every")]
        print(f"{k:3d} {n1:19d} {nk:8d} {t1 * 1e3:10.1f} {tk * 1e3:11.1f} "
              f"{str(res[(k, 'same_grad')]):>10}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), facecolor=BACKGROUND)
    axes[0].plot(BATCHES, [scaling[b][1] for b in BATCHES], "o-", color=RED, label="linear rule")
    axes[0].plot(BATCHES, [scaling[b][3] for b in BATCHES], "o-", color=NAVY, label="sqrt rule")
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("batch (same tokens: fewer steps)")
    axes[0].set_ylabel("validation loss")
    axes[0].set_title("lr scaling rules, AdamW", color=NAVY, loc="left")
    axes[0].legend()
    names = list(opt_vals) + ["batch warmup"]
    axes[1].bar(names, [*opt_vals.values(), val_ramp], color=[NAVY, GOLD, MUTED, NAVY])
    axes[1].set_title(f"batch {big}: optimizers and batch-size warmup", color=NAVY, loc="left")
    axes[1].tick_params(axis="x", labelsize=8)
    for ax in axes:
        ax.set_facecolor(PANEL)
    fig.tight_layout()
    fig.savefig(out / "large_batch.png", dpi=110)
    plt.close(fig)
    print(f"figure: {out / 'large_batch.png'}")

    # The lesson's claims, on these runs.
    for k in k_values:
        (n1, _), (nk, _) = res[(k, "once")], res[(k, "every")]
        assert nk == k * n1, f"syncing every micro-batch should send k x the all-reduces (k={k})"
        assert res[(k, "same_grad")], "both sync strategies must give the same gradient"
    assert all(math.isfinite(v) for v in opt_vals.values())
    assert scaling[BATCHES[-1]][3] > scaling[BASE_BATCH][3], \
        "with the same tokens, the 8x batch (8x fewer steps) should end higher at this size"


if __name__ == "__main__":
    main()
