"""Lesson 23 - memory anatomy: where a training step's memory goes, and what checkpointing buys.

Objective: split one training step's memory of the tiny GPT into its four parts - parameters,
gradients, optimizer state (AdamW: exp_avg + exp_avg_sq), activations - MEASURED, versus batch
size and context length; then checkpoint activations fully and selectively (attention only, MLP
only, every other block) and measure the memory saved and the time and FLOPs paid, next to the
workshop guide's "Gradient Checkpointing - Recompute activations during backward pass - 30-50%
memory savings - 20-30% slower"; and price the CPU-offload idea in bytes per step / bandwidth.
Serves: syllabus 16-03 (activation memory analysis, recompute vs store, selective checkpointing,
CPU offloading concepts); deck slide 18 / M8-LAB-03 (isolate a toggle's effect on memory);
slide 25 / M8-LAB-07 (OOM: the lever is checkpointing). Prerequisites: lessons 06 and 07.

How each part is measured (and why not with peak RSS): parameters, gradients and optimizer
state are summed from the tensors themselves (`nbytes`, each storage once: the tied embedding
is one matrix). Activations are the bytes autograd really keeps for backward, counted with
`torch.autograd.graph.saved_tensors_hooks`: the pack hook wraps each saved tensor in a holder
that adds its storage's bytes to a live total and subtracts them when autograd frees it, so the
PEAK over forward AND backward is measured - which matters for checkpointing, whose backward
recomputes one block at a time. The process peak RSS (`bench.peak_memory_bytes`) cannot split a
step into parts and only ever grows, so it cannot show a saving inside one process.
Not counted: transient gradients of activations during backward and the allocator's slack.

Run: python lessons/23_memory_anatomy.py   (~20-40 s on 2 busy cores; figure in outputs/lesson23/)
"""
import matplotlib.pyplot as plt
import torch
import torch.nn as nn

from minitrain.bench import fastest_thread_count, measure
from minitrain.model import GPT, GPTConfig
from minitrain.profile import count_flops
from minitrain.recompute import checkpoint
from minitrain.style import GOLD, MUTED, NAVY, TEXT, outputs_dir
from minitrain.train import lm_loss

OUT = outputs_dir("lesson23")
MIB = 2**20
MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=256)  # block_size = the longest T used
BATCHES = (4, 8, 16)  # at T = 128
SEQS = (64, 128, 256)  # at B = 8
CKPT_B, CKPT_T = 8, 128  # the checkpointing comparison
POLICIES = ("none", "full", "attention only", "MLP only", "every other block")
GUIDE = "30-50% memory savings - 20-30% slower"  # workshop guide (course file 003), verbatim
PCIE_GBPS = 25.0  # PCIe 4.0 x16, ~25 GB/s achievable of 32 nominal (assumed: no GPU here)


class Held:
    """What autograd stores instead of a saved tensor; its death tells the meter the bytes left."""

    __slots__ = ("tensor", "meter", "ptr")

    def __init__(self, tensor, meter, ptr):
        self.tensor, self.meter, self.ptr = tensor, meter, ptr

    def __del__(self):
        self.meter.release(self.ptr)


class ActivationMeter:
    """Live and peak bytes of the storages autograd keeps for backward (parameters excluded).

    with ActivationMeter(model) as m: loss = ...; loss.backward()   -> m.peak, m.at_end_of_forward
    """

    def __init__(self, model):
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs, self.sizes = {}, {}
        self.live = self.peak = 0

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.param_ptrs:  # weights are counted as parameters, not activations
            return t
        if self.refs.get(ptr, 0) == 0:  # a storage saved twice (views) is counted once
            self.sizes[ptr] = storage.nbytes()
            self.live += self.sizes[ptr]
            self.peak = max(self.peak, self.live)
        self.refs[ptr] = self.refs.get(ptr, 0) + 1
        return Held(t, self, ptr)

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, Held) else held

    def release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= self.sizes.pop(ptr)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def unique_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (a tied weight is one storage)."""
    storages = {}
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class Checkpointed(nn.Module):
    """Wrap a submodule so its inside is recomputed in backward (minitrain.recompute)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):  # x: (B, T, C)
        return checkpoint(self.inner, x)


def build(policy, seed=0, sizes=None):
    """The GPT (GPTConfig fields `sizes`, default MODEL) with one checkpointing policy; the same
    seed gives the same weights for every policy. "full" is the model's own switch."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(sizes or MODEL), activation_checkpointing=(policy == "full")))
    for i, block in enumerate(model.transformer.h):  # wrapping keeps parameter order
        if policy == "attention only":
            block.attn = Checkpointed(block.attn)
        elif policy == "MLP only":
            block.mlp = Checkpointed(block.mlp)
        elif policy == "every other block" and i % 2 == 0:
            model.transformer.h[i] = Checkpointed(block)
    return model


def batch(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, t), generator=g)  # (B, T) token ids
    return x, torch.roll(x, -1, dims=1)  # (B, T) targets: memory does not depend on the text


def anatomy(b, t):
    """Bytes of parameters, gradients, AdamW state and peak activations of one training step."""
    model = build("none")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x, y = batch(b, t)
    with ActivationMeter(model) as meter:
        loss = lm_loss(model(x), y)
        at_end_of_forward = meter.live
        loss.backward()
    opt.step()  # AdamW creates its state on the first step
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return dict(params=unique_bytes(model.parameters()),
                grads=unique_bytes(p.grad for p in model.parameters()),
                optimizer=unique_bytes(state), activations=meter.peak,
                at_end_of_forward=at_end_of_forward, n_param_tensors=len(list(model.parameters())))


def step_fn(model, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        lm_loss(model(x), y).backward()
    return step


def checkpointing_table():
    """Per policy: peak activation bytes, gradients (checked equal to storing), FLOPs, time."""
    x, y = batch(CKPT_B, CKPT_T)
    rows, reference = {}, None
    for policy in POLICIES:
        model = build(policy)
        with ActivationMeter(model) as meter:  # the same step counts bytes and FLOPs
            _, flops = count_flops(step_fn(model, x, y))
        grads = [p.grad.clone() for p in model.parameters()]
        if reference is None:
            reference = grads
        # Validate before timing: recomputation must give the same gradients as storing.
        worst = max(float((g - r).abs().max()) for g, r in zip(grads, reference))
        assert worst < 1e-6, f"{policy}: gradients differ from no checkpointing by {worst:.1e}"
        timing = measure(step_fn(model, x, y), tokens_per_step=CKPT_B * CKPT_T, warmup=1, iters=5)
        rows[policy] = dict(act=meter.peak, flops=flops, time=timing["median_s"],
                            p10=timing["p10_s"], p90=timing["p90_s"], grad_err=worst)
    return rows


def host_copy_gbps():
    """This machine's RAM -> RAM copy bandwidth (a 64 MiB tensor), the offload floor on a CPU."""
    src = torch.ones(16 * MIB)  # 64 MiB of fp32
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), tokens_per_step=1, warmup=2, iters=7)["median_s"]
    return 2 * src.nbytes / t / 1e9  # read + write


def main():
    # All cores unless 1 is faster right now (a loaded machine); memory is exact either way.
    torch.set_num_threads(fastest_thread_count())
    OUT.mkdir(parents=True, exist_ok=True)

    # 1. The anatomy of one step, versus B (T = 128) and versus T (B = 8).
    grid = [(b, 128) for b in BATCHES] + [(8, t) for t in SEQS if t != 128]
    parts = {bt: anatomy(*bt) for bt in grid}
    print(f"GPT {MODEL}, fp32, AdamW; MiB measured from tensors / saved-tensor hooks\n")
    print(f"{'B':>3}{'T':>5}{'params':>9}{'grads':>8}{'AdamW':>8}{'activ.':>9}"
          f"{'total':>8}{'activ. share':>14}")
    for (b, t), p in sorted(parts.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        total = p["params"] + p["grads"] + p["optimizer"] + p["activations"]
        print(f"{b:>3}{t:>5}{p['params'] / MIB:>9.2f}{p['grads'] / MIB:>8.2f}"
              f"{p['optimizer'] / MIB:>8.2f}{p['activations'] / MIB:>9.2f}{total / MIB:>8.1f}"
              f"{p['activations'] / total:>13.0%}")
    p8 = parts[(8, 128)]
    print(f"(without checkpointing the peak is the end of forward: "
          f"{p8['at_end_of_forward'] / MIB:.2f} MiB = the peak {p8['activations'] / MIB:.2f})")

    # The claims of part 1: exact bookkeeping and the scaling law of activations.
    for p in parts.values():
        assert p["grads"] == p["params"], "one gradient per parameter, same dtype"
        # AdamW: exp_avg + exp_avg_sq (2 x params) + one 4-byte `step` tensor per parameter.
        assert p["optimizer"] == 2 * p["params"] + 4 * p["n_param_tensors"], p
        assert p["activations"] == p["at_end_of_forward"], "no checkpointing: peak = end of fwd"
    assert len({p["params"] for p in parts.values()}) == 1, "params do not depend on B or T"
    act_b = [parts[(b, 128)]["activations"] for b in BATCHES]
    assert abs(act_b[-1] / act_b[0] - BATCHES[-1] / BATCHES[0]) < 0.05 * BATCHES[-1] / BATCHES[0], \
        f"activations should grow linearly with the batch: {act_b}"
    assert p8["activations"] > p8["params"] + p8["grads"] + p8["optimizer"], \
        "at B=8, T=128 activations should dominate the step's memory"

    # 2. Activation checkpointing: full and selective.
    rows = checkpointing_table()
    base = rows["none"]
    states = p8["params"] + p8["grads"] + p8["optimizer"]  # independent of the policy
    print(f"\nactivation checkpointing at B={CKPT_B}, T={CKPT_T} (time: median of 5 "
          f"forward+backward, p10-p90; gradients checked equal first)")
    print(f"{'policy':<19}{'activ. MiB':>11}{'saved':>7}{'step mem saved':>15}"
          f"{'GFLOP':>7}{'+FLOPs':>8}{'ms':>8}{'p10-p90':>13}{'slower':>8}")
    for policy, r in rows.items():
        saved = 1 - r["act"] / base["act"]
        step_saved = (base["act"] - r["act"]) / (states + base["act"])
        print(f"{policy:<19}{r['act'] / MIB:>11.2f}{saved:>7.0%}{step_saved:>15.0%}"
              f"{r['flops'] / 1e9:>7.2f}{r['flops'] / base['flops'] - 1:>+8.0%}"
              f"{r['time'] * 1e3:>8.0f}{r['p10'] * 1e3:>7.0f}-{r['p90'] * 1e3:<5.0f}"
              f"{r['time'] / base['time'] - 1:>+8.0%}")
    full = rows["full"]
    step_saved = (base["act"] - full["act"]) / (states + base["act"])
    where = "inside" if 0.30 <= step_saved <= 0.50 else ("above" if step_saved > 0.5 else "below")
    print(f"\nguide: \"{GUIDE}\". Measured, full checkpointing: "
          f"{1 - full['act'] / base['act']:.0%} of the activations, {step_saved:.0%} of the step's "
          f"memory ({where} the guide's range),\n{full['flops'] / base['flops'] - 1:+.0%} FLOPs "
          f"(one more forward of the blocks), {full['time'] / base['time'] - 1:+.0%} time. The "
          "share saved depends on how much of the memory\nis activations (more with B x T, less "
          "with a big model's weights and AdamW state); time under load is noisy: the FLOPs "
          "column is the work paid.")

    # The claims of part 2 (memory and FLOPs are deterministic; time is shown, not asserted).
    for policy in POLICIES[1:]:
        assert rows[policy]["act"] < base["act"], f"{policy} should keep fewer bytes"
        assert rows[policy]["flops"] > base["flops"], f"{policy} should recompute something"
    assert min(rows, key=lambda k: rows[k]["act"]) == "full", "full checkpointing keeps least"
    assert 1.15 < full["flops"] / base["flops"] < 1.45, \
        "full recomputation costs about one more forward of the blocks (~+33% of fwd+bwd)"
    assert rows["MLP only"]["act"] < rows["attention only"]["act"], \
        "with SDPA the 4C-wide MLP hidden, not attention, holds most activation bytes"

    # 3. CPU offload, priced: park the activations in host RAM between forward and backward.
    moved = 2 * base["act"]  # out after forward, back before backward: bytes moved per step
    host = host_copy_gbps()
    print(f"\nCPU offload: keep tensors that wait (activations between forward and backward, or "
          f"AdamW's state between steps) in host RAM\nand copy them back when needed; it costs "
          f"2 x bytes / bandwidth per step:\n  activations here: {moved / MIB:.0f} MiB moved -> "
          f"{moved / (PCIE_GBPS * 1e9) * 1e3:.1f} ms over PCIe 4.0 x16 (~{PCIE_GBPS:.0f} GB/s, "
          f"assumed), vs a {base['time'] * 1e3:.0f} ms step;\n  this CPU copies RAM->RAM at "
          f"{host:.1f} GB/s (measured). It pays when the copy overlaps compute.")

    # The figure: the anatomy (stacked bars) and the policies (memory saved vs time paid).
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    labels = [f"B={b}\nT={t}" for b, t in sorted(parts, key=lambda bt: (bt[1], bt[0]))]
    bottom = [0.0] * len(labels)
    ordered = [parts[bt] for bt in sorted(parts, key=lambda bt: (bt[1], bt[0]))]
    for key, color in (("params", TEXT), ("grads", MUTED), ("optimizer", GOLD),
                       ("activations", NAVY)):
        vals = [p[key] / MIB for p in ordered]
        ax0.bar(labels, vals, bottom=bottom, color=color, label=key)
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax0.set_ylabel("MiB (measured)")
    ax0.set_title("one step's memory: activations grow with B x T")
    ax0.legend()
    ax1.axvspan(30, 50, color=MUTED, alpha=0.2)
    ax1.axhspan(20, 30, color=MUTED, alpha=0.2, label=f"guide: {GUIDE}")
    for policy, r in rows.items():
        sx = 100 * (base["act"] - r["act"]) / (states + base["act"])
        ax1.scatter(sx, 100 * (r["time"] / base["time"] - 1), color=NAVY, s=40)
        ax1.scatter(sx, 100 * (r["flops"] / base["flops"] - 1), color=GOLD, marker="x", s=40)
        ax1.annotate(policy, (sx, 100 * (r["time"] / base["time"] - 1)), fontsize=8,
                     xytext=(4, 4), textcoords="offset points")
    ax1.scatter([], [], color=NAVY, label="time paid (median)")
    ax1.scatter([], [], color=GOLD, marker="x", label="FLOPs paid")
    ax1.set_xlabel("step memory saved (%)")
    ax1.set_ylabel("extra cost (%)")
    ax1.set_title(f"checkpointing policies, B={CKPT_B}, T={CKPT_T}")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "memory_anatomy.png", dpi=100)
    plt.close(fig)
    print(f"wrote {OUT / 'memory_anatomy.png'}")


if __name__ == "__main__":
    main()
