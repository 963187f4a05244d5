"""Lesson 06 — gradient accumulation: a big batch's gradient at a small batch's memory.

Objective: see, measured on the tiny GPT, that
  1. accumulating micro-batches (weighted by counted targets) gives the SAME gradient as one
     backward on the whole batch (asserted, float64: agreement to ~1e-15 relative);
  2. the memory autograd keeps for backward scales with the MICRO-batch, not the effective
     batch (measured with `torch.autograd.graph.saved_tensors_hooks`), paid for in time;
  3. the classic recipe `loss / accum_steps` is wrong when micro-batches have different numbers
     of counted targets (a short last batch, padding, -100 targets): measured gradient error.

Serves: Module 8 deck slide 9 (annotations 9-10: a larger batch if memory permits, OOM after
it); syllabus 16-04 (large effective batch without more memory); notebook section "4. Memory
Optimization" ("Gradient Accumulation: The Simple Solution"); GPT-2 notes "Gradient
Accumulation" and "Memory vs Effective Batch Size"; workshop guide Section 8 "GPU, CUDA &
Parallel Training" ("Gradient Accumulation").
Prerequisites: lesson 01 (batches, mean loss), `minitrain.accumulate`.

Run: python lessons/06_gradient_accumulation.py   (~15 s on 2 cores; figure in outputs/lesson06/)
"""
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from minitrain.accumulate import accumulate_gradients
from minitrain.bench import fastest_thread_count, measure
from minitrain.data import corpus_tokens, get_batch
from minitrain.model import GPT, GPTConfig
from minitrain.style import BACKGROUND, GOLD, NAVY, PANEL, RED, outputs_dir

OUT = outputs_dir("lesson06")
SEQ, EFFECTIVE_BATCH = 32, 32
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=64)


def lm_loss(output, y):                                   # output = (logits, None) from GPT
    logits = output[0]                                    # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


def grads_of(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def full_batch_grad(model, x, y):
    model.zero_grad(set_to_none=True)
    lm_loss(model(x), y).backward()
    return grads_of(model)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


class SavedActivationMeter:
    """Bytes autograd saves for backward, parameters excluded, each storage counted once."""

    def __init__(self, model):
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.param_storages:
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def bytes(self):
        return sum(self.storages.values())


def exactness(data):
    """Part 1 and 3: equal micro-batches, unequal ones with -100 targets, and the /K recipe."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL)).double()
    x, y = get_batch(data, 16, SEQ, rng=np.random.default_rng(0))          # (16, T), (16, T)
    y = y.clone()
    pad = np.random.default_rng(1).integers(0, SEQ, size=16)                # padded tails
    for i, n in enumerate(pad):
        y[i, SEQ - n:] = -100
    g_full = full_batch_grad(model, x, y)
    rows = []
    for name, sizes in [("4 equal micro-batches of 4", [4, 4, 4, 4]),
                        ("unequal micro-batches 9+4+2+1", [9, 4, 2, 1])]:
        cuts = np.cumsum([0] + sizes)
        mbs = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
        model.zero_grad(set_to_none=True)
        accumulate_gradients(model, mbs, lm_loss)
        err_weighted = rel_err(grads_of(model), g_full)
        model.zero_grad(set_to_none=True)
        for xb, yb in mbs:                                 # the classic recipe: loss / K
            (lm_loss(model(xb), yb) / len(mbs)).backward()
        err_naive = rel_err(grads_of(model), g_full)
        counts = [int((yb != -100).sum()) for _, yb in mbs]
        rows.append((name, counts, err_weighted, err_naive))
    return rows


def memory_and_time(data):
    """Part 2: the same effective batch of 32 sequences as 1x32, 2x16, 4x8, 8x4."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    x, y = get_batch(data, EFFECTIVE_BATCH, SEQ, rng=np.random.default_rng(2))
    g_full = full_batch_grad(model, x, y)
    rows = []
    for micro in [32, 16, 8, 4]:
        k = EFFECTIVE_BATCH // micro
        mbs = [(x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]) for i in range(k)]
        meter = SavedActivationMeter(model)
        with meter:                                        # peak = one micro-batch's graph
            model.zero_grad(set_to_none=True)
            lm_loss(model(mbs[0][0]), mbs[0][1]).backward()
        timing = measure(lambda: accumulate_gradients(model, mbs, lm_loss),
                         tokens_per_step=EFFECTIVE_BATCH * mbs[0][0].shape[1], warmup=1, iters=3,
                         before_each=lambda: model.zero_grad(set_to_none=True))
        rows.append((micro, k, meter.bytes, timing["median_s"],
                     rel_err(grads_of(model), g_full)))
    return rows


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    data = corpus_tokens(max_bytes=300_000)
    exact = exactness(data)
    mem = memory_and_time(data)

    print("Accumulated vs full-batch gradient (tiny GPT, float64, 16 sequences, padded tails = -100)")
    print(f"{'micro-batches':32} {'counted targets':>22} {'weighted n_k/N':>15} {'loss / K':>10}")
    for name, counts, ew, en in exact:
        print(f"{name:32} {str(counts):>22} {ew:15.1e} {en:10.1e}")
    print("\nSame effective batch (32 x 32 tokens), float32: memory vs time")
    print(f"{'micro':>5} {'accum':>5} {'saved activations':>18} {'time/step':>10} {'grad rel err':>13}")
    for micro, k, nbytes, t, err in mem:
        print(f"{micro:5d} {k:5d} {nbytes / 2**20:15.2f} MB {t * 1e3:8.0f} ms {err:13.1e}")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), facecolor=BACKGROUND)
    ax = axes[0]
    ax.set_facecolor(PANEL)
    micro = [r[0] for r in mem]
    ax.plot(micro, [r[2] / 2**20 for r in mem], "o-", color=NAVY, label="saved activations (MB)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batch size (effective batch fixed at 32)")
    ax.set_ylabel("MB kept for backward", color=NAVY)
    ax2 = ax.twinx()
    ax2.plot(micro, [r[3] * 1e3 for r in mem], "s--", color=GOLD, label="time per step (ms)")
    ax2.set_ylabel("ms per optimizer step", color=GOLD)
    ax.set_title("Memory follows the micro-batch; time pays for it", color=NAVY, loc="left")
    ax = axes[1]
    ax.set_facecolor(PANEL)
    labels = ["equal", "unequal"]
    w = [r[2] for r in exact]
    n = [r[3] for r in exact]
    pos = np.arange(2)
    ax.bar(pos - 0.2, np.maximum(w, 1e-18), 0.4, color=NAVY, label="weighted n_k / N (minitrain)")
    ax.bar(pos + 0.2, np.maximum(n, 1e-18), 0.4, color=RED, label="loss / K (classic recipe)")
    ax.set_yscale("log")
    ax.set_xticks(pos, labels)
    ax.set_ylabel("relative gradient error vs full batch")
    ax.set_title("Unequal micro-batches break loss / K", color=NAVY, loc="left")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "accumulation.png", dpi=110)
    plt.close(fig)
    print(f"\nfigure: {OUT / 'accumulation.png'}")

    for name, counts, ew, en in exact:                    # the lesson's claims
        assert ew < 1e-12, f"{name}: accumulated gradient differs from full batch ({ew:.1e})"
    assert exact[1][3] > 1e-2, "loss/K should be visibly wrong for unequal micro-batches"
    assert all(r[4] < 1e-5 for r in mem), "float32 accumulation drifted from the full batch"
    sizes = [r[2] for r in mem]
    assert all(a > 1.6 * b for a, b in zip(sizes, sizes[1:])), "memory should halve with micro"


if __name__ == "__main__":
    main()
