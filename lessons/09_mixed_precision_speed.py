"""Lesson 09 - mixed precision: is bf16 / fp16 faster on THIS machine? Measure, don't assume.

Objective: measure fp32 vs bf16 vs fp16 twice - a bare matrix multiply (what the hardware can do)
and a whole training step of the tiny GPT under autocast (what a training run gets) - and check
that the low-precision runs still learn the same thing (loss after the same steps).
Serves: Module 8 deck slide 8 (annotation 5: some gains are hardware-dependent), slide 9
(annotation 4: BF16 often boosts speed) and slide 18 / M8-LAB-03 (the bf16 toggle); syllabus
16-01 (speed and memory benchmarks, FP16/BF16); notebook section "3. Mixed Precision Training";
GPT-2 notes section "4. AMP (Automatic Mixed Precision)" ("What autocast() Does Automatically").
Prerequisites: lesson 05 (fp16 and the GradScaler), lesson 07 (fair timing: warm-up, median).

What to see:
- Low precision is fast only where the chip has units for it. x86 CPUs with AMX or AVX512-BF16
  (Sapphire Rapids and later) multiply bf16 matrices several times faster than fp32; without
  them bf16 is emulated and SLOWER. fp16 matmul on CPUs is usually no faster than fp32.
- A training step is not one big matmul. Autocast casts every weight to bf16 on every forward,
  runs the elementwise ops (LayerNorm, GELU, softmax) in fp32 anyway, and a small model spends
  most of its time there: the step can be slower even where the matmul is 5x faster.
- bf16 keeps fp32's exponent range (no overflow, no GradScaler); fp16 does not, so fp16 needs the
  GradScaler (minitrain.grad_scaler) - and its loss must still match fp32's closely.

Run: python lessons/09_mixed_precision_speed.py   (about 20-40 s on 2 busy cores)
"""
import matplotlib.pyplot as plt
import torch

from benchmarks.harness import machine_metadata
from minitrain.bench import fastest_thread_count, measure
from minitrain.grad_scaler import GradScaler
from minitrain.model import GPT, GPTConfig
from minitrain.style import GOLD, MUTED, NAVY, outputs_dir

OUT = outputs_dir("lesson09")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MATMUL_N = 1024
MODEL = dict(n_layer=2, n_head=4, n_embd=256, block_size=128)
BATCH, SEQ, TRAIN_STEPS = 8, 128, 8


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matmul_gflops(name):
    """GFLOP/s of an (N, N) @ (N, N) product in `name`'s dtype, after checking the result."""
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(MATMUL_N, MATMUL_N, generator=g), torch.randn(MATMUL_N, MATMUL_N,
                                                                          generator=g)
    a, b = a32.to(DTYPES[name]), b32.to(DTYPES[name])
    ref = a.float() @ b.float()  # exact product of the rounded inputs, in fp32
    err = ((a @ b).float() - ref).abs().max() / ref.abs().max()
    assert err < {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-3}[name], f"{name} matmul wrong: {err}"
    t = measure(lambda: a @ b, tokens_per_step=1, warmup=2, iters=5)
    return 2 * MATMUL_N**3 / t["median_s"] / 1e9


def train_run(name, batches):
    """Tokens/s of a full training step (forward, backward, AdamW) and the loss it reaches."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = GradScaler() if name == "fp16" else None  # fp16 gradients underflow without it
    state = {"i": 0, "losses": []}

    def step():
        x, y = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.autocast("cpu", dtype=DTYPES[name], enabled=name != "fp32"):
            _, loss = model(x, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        state["losses"].append(loss.item())

    for _ in range(TRAIN_STEPS):  # the same batches in the same order for every dtype
        step()
    loss_after = state["losses"][-1]
    timing = measure(step, tokens_per_step=BATCH * SEQ, warmup=1, iters=5)
    return timing["tokens_per_s"], loss_after


def main():
    # All cores, unless 1 thread is faster on this machine right now (a busy one): dtype speed
    # is a property of the whole machine; the table prints the thread count it used.
    torch.set_num_threads(fastest_thread_count())
    OUT.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags()
    units = sorted(flags & {"amx_bf16", "avx512_bf16", "avx512_fp16", "amx_fp16"})
    print(f"CPU: {machine_metadata()['cpu']}, {torch.get_num_threads()} thread(s); "
          f"low-precision units: {', '.join(units) or 'none'}")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (BATCH, SEQ), generator=g),
                torch.randint(0, 256, (BATCH, SEQ), generator=g)) for _ in range(4)]
    rows = {}
    for name in DTYPES:
        gflops = matmul_gflops(name)
        tps, loss = train_run(name, batches)
        rows[name] = (gflops, tps, loss)

    print(f"\n{'dtype':<6}{'matmul GFLOP/s':>16}{'x fp32':>8}{'train tok/s':>13}{'x fp32':>8}"
          f"{'loss after ' + str(TRAIN_STEPS) + ' steps':>22}")
    for name, (gflops, tps, loss) in rows.items():
        print(f"{name:<6}{gflops:>16.1f}{gflops / rows['fp32'][0]:>8.2f}{tps:>13,.0f}"
              f"{tps / rows['fp32'][1]:>8.2f}{loss:>22.4f}")
    for name in ("bf16", "fp16"):
        mm, step = rows[name][0] / rows["fp32"][0], rows[name][1] / rows["fp32"][1]
        why = ("the chip multiplies it natively" if mm > 1.2 else "no fast units: emulated or "
               "converted")
        print(f"- {name}: matmul {mm:.2f}x ({why}); training step {step:.2f}x"
              + ("" if step >= 1 else " - SLOWER: casts + fp32 elementwise ops cost more than "
                 "the matmuls save at this model size"))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = list(rows)
    colors = [NAVY, GOLD, MUTED]
    for ax, idx, title in ((axes[0], 0, f"matmul {MATMUL_N}x{MATMUL_N}: GFLOP/s"),
                           (axes[1], 1, "GPT training step: tokens/s")):
        values = [rows[n][idx] for n in names]
        ax.bar(names, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v / values[0]:.2f}x", ha="center", va="bottom")
        ax.set_title(title)
    fig.suptitle(f"Mixed precision on {machine_metadata()['cpu']} (measured)")
    fig.tight_layout()
    fig.savefig(OUT / "precision_speed.png", dpi=100)
    plt.close(fig)
    print(f"\nwrote {OUT / 'precision_speed.png'}")

    # The claims: low precision learns the same thing...
    for name in ("bf16", "fp16"):
        rel = abs(rows[name][2] - rows["fp32"][2]) / rows["fp32"][2]
        assert rel < 0.02, f"{name} loss differs from fp32 by {rel:.1%} after {TRAIN_STEPS} steps"
    # ...and bf16 matmul speed follows the hardware: native units => clearly faster, i.e. by more
    # than the ~10% that repeated timings here vary by. (How much faster depends on the thread
    # count and the size: 1.35x at n=1024 with 2 threads on the course machine, several times at
    # n=512 with 1 thread in lesson 17's peak measurement.)
    if {"amx_bf16", "avx512_bf16"} & flags:
        assert rows["bf16"][0] > 1.2 * rows["fp32"][0], "bf16 units present but matmul not faster"


if __name__ == "__main__":
    main()
