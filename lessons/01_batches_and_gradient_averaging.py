"""Lesson 01 — what a batch is, why its loss and gradient are averages, and what it costs.

Objective:
  1. A batch is B random windows of the token stream; the targets y are the inputs x shifted by
     one token (printed, decoded).
  2. The batch loss is the MEAN of the per-sample losses, and - because the gradient is linear -
     the batch gradient is the MEAN of the per-sample gradients. Shown numerically (float64) and
     asserted. Also shown: the averaged gradient is shorter than a typical per-sample gradient
     (the samples' noise partly cancels), which is why bigger batches give smoother steps.
  3. Activation memory - the tensors autograd keeps for backward - grows linearly with B.
     Measured with `torch.autograd.graph.saved_tensors_hooks` (every saved tensor's storage,
     counted once, parameters excluded), not quoted.

Serves: Module 8 deck slide 9 (annotations 9-10: a larger batch raises utilization if memory
permits; OOM after a batch increase); syllabus 16-03 (activation memory analysis) and 16-04 (the
averaging that accumulation, 16-04, and DDP, 16-08, rely on); GPT-2 notes section "Batch
Fundamentals" ("What is a Batch?", "Gradient Averaging (The Key Insight)", "Memory Usage Per
Batch Size").
Prerequisites: minitrain.data (get_batch), minitrain.model (GPT), what a gradient is.

Run: python lessons/01_batches_and_gradient_averaging.py   (~10 s on 2 cores; outputs/lesson01/)
"""
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from minitrain.bench import fastest_thread_count
from minitrain.data import ByteTokenizer, corpus_tokens, get_batch
from minitrain.model import GPT, GPTConfig
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, outputs_dir

OUT = outputs_dir("lesson01")
B, T = 8, 32
MEMORY_BATCHES = (1, 2, 4, 8, 16, 32)


def flat_grad(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # (n_params,)


def loss_of(model, x, y):
    logits, _ = model(x)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))


def saved_activation_bytes(model, x, y):
    """Bytes of the distinct storages autograd saves for backward during one forward."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_storages:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def main():
    torch.set_num_threads(fastest_thread_count())  # all cores, unless 1 is faster now
    OUT.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    data = corpus_tokens(max_bytes=1_000_000)
    rng = np.random.default_rng(0)

    # 1. a batch
    x, y = get_batch(data, B, T, rng=rng)  # (B, T) int64 each
    print(f"x: {tuple(x.shape)} {x.dtype}   y: {tuple(y.shape)} {y.dtype}")
    print(f"x[0] = {tok.decode(x[0])!r}")
    print(f"y[0] = {tok.decode(y[0])!r}   <- the same window, one byte later\n")
    assert torch.equal(x[:, 1:], y[:, :-1])

    # 2. batch loss / gradient = mean of per-sample losses / gradients (float64: exact to 1e-12)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, n_layer=2, n_head=2, n_embd=32)).double()
    batch_loss = loss_of(model, x, y)
    batch_loss.backward()
    batch_grad = flat_grad(model).clone()
    model.zero_grad(set_to_none=True)
    losses, grads = [], []
    for i in range(B):
        li = loss_of(model, x[i:i + 1], y[i:i + 1])
        li.backward()
        losses.append(li.item())
        grads.append(flat_grad(model).clone())
        model.zero_grad(set_to_none=True)
    grads = torch.stack(grads)  # (B, n_params)
    mean_grad = grads.mean(dim=0)
    print(f"{'sample':>8}{'loss':>12}{'|grad|':>12}")
    for i in range(B):
        print(f"{i:>8}{losses[i]:>12.6f}{grads[i].norm().item():>12.4f}")
    print(f"{'mean':>8}{np.mean(losses):>12.6f}{grads.norm(dim=1).mean().item():>12.4f}"
          "   <- mean of the per-sample norms")
    print(f"{'batch':>8}{batch_loss.item():>12.6f}{batch_grad.norm().item():>12.4f}"
          "   <- the batch's loss and gradient norm")
    loss_err = abs(batch_loss.item() - float(np.mean(losses)))
    grad_err = (batch_grad - mean_grad).abs().max().item()
    print(f"|batch loss - mean loss| = {loss_err:.1e}; "
          f"max |batch grad - mean grad| = {grad_err:.1e}\n")
    assert loss_err < 1e-12, "the batch loss must be the mean of the per-sample losses"
    assert torch.allclose(batch_grad, mean_grad, rtol=0, atol=1e-12), "grad must be the mean"
    assert batch_grad.norm() < grads.norm(dim=1).mean(), "averaging must shrink the noise"

    # 3. activation memory grows with the batch size (fp32, a slightly wider model)
    torch.manual_seed(0)
    model32 = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    mem = {}
    for b in MEMORY_BATCHES:
        xb, yb = get_batch(data, b, 64, rng=np.random.default_rng(b))
        mem[b] = saved_activation_bytes(model32, xb, yb)
    n_params = sum(p.numel() for p in model32.parameters())
    print(f"activations saved for backward (T=64, fp32; "
          f"parameters: {n_params * 4 / 2**20:.2f} MiB)")
    print(f"{'B':>4}{'MiB':>10}{'MiB/sample':>12}")
    for b, v in mem.items():
        print(f"{b:>4}{v / 2**20:>10.2f}{v / b / 2**20:>12.3f}")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), facecolor=BACKGROUND)
    ax1.bar(range(B), losses, color=MUTED, label="per-sample loss")
    ax1.axhline(np.mean(losses), color=NAVY, lw=2, label="mean of the samples")
    ax1.axhline(batch_loss.item(), color=GOLD, ls="--", lw=2, label="batch loss (the same)")
    ax1.set_ylim(min(losses) - 0.02, max(losses) + 0.08)
    ax1.set_xlabel("sample in the batch")
    ax1.set_title("Batch loss = mean of per-sample losses", loc="left", color=NAVY)
    ax1.legend(frameon=False, loc="upper left", ncol=3, fontsize=8)
    bs = list(mem)
    ax2.plot(bs, [mem[b] / 2**20 for b in bs], "o-", color=NAVY, label="measured")
    ax2.plot(bs, [b * mem[1] / 2**20 for b in bs], "--", color=GOLD, label="B x (B=1 value)")
    ax2.set_xlabel("batch size B")
    ax2.set_ylabel("MiB saved for backward")
    ax2.set_title("Activation memory grows linearly with B", loc="left", color=NAVY)
    ax2.legend(frameon=False)
    for ax in (ax1, ax2):
        ax.set_facecolor(PANEL)
    fig.tight_layout()
    fig.savefig(OUT / "batches.png", dpi=110)
    plt.close(fig)
    print(f"figure: {OUT / 'batches.png'}")

    assert all(mem[a] < mem[b] for a, b in zip(bs, bs[1:])), "memory must grow with B"
    ratio = mem[32] / (32 * mem[1])
    assert 0.8 < ratio < 1.2, f"activation memory should be ~linear in B (ratio {ratio:.2f})"


if __name__ == "__main__":
    main()
