"""Lesson 18 - FSDP: shard the parameters too, gather each unit only while it computes.

Objective: on 2 CPU ranks, put the four ways of sharing one training step side by side,
  stage 0  DDP + AdamW                 every rank holds everything
  stage 1  DDP + ZeroOptimizer(1)      optimizer state / N
  stage 2  ZeroOptimizer(2)            + gradients / N
  stage 3  minitrain.fsdp.FSDP         + parameters / N (each unit gathered only while it runs)
and measure, for each: the bytes per rank of parameters, gradients and AdamW state (predicted by
minitrain.zero.predicted_bytes, measured from the live tensors), the bytes each rank sends per
step (counted by wrapping every torch.distributed collective the code calls), and for FSDP the
step time with and without prefetch. All four train the tiny GPT to the same loss.

Serves: syllabus 16-09 (FSDP & ZeRO: parameter / gradient / optimizer-state sharding, the ZeRO
1/2/3 comparison, DeepSpeed overview); continues M8-LAB-04 (the multi-process DDP run) and
lesson 14. Prerequisites: lessons 12-14 (all-reduce, DDP, ZeRO).
Run: python lessons/18_fsdp.py   (spawns 2 CPU processes, ~30 s)

Bytes sent per rank are counted with the bandwidth-optimal (ring) algorithm's cost for a tensor
of S bytes on N ranks: all-reduce 2(N-1)/N S; all-gather, reduce-scatter, broadcast, reduce
(N-1)/N S. So DDP sends 2(N-1)/N * 4P per step and FSDP 3(N-1)/N * 4P (two all-gathers and one
reduce-scatter): 1.5x. minitrain's ZeRO-1 also sends 1.5x (it all-reduces like DDP, then
broadcasts the updated parameters); DeepSpeed's ZeRO-1/2 reduce-scatter instead and send 1x.

How the stages map to the production tools (say it on the slide):
  minitrain            DeepSpeed          PyTorch
  stage 0 (DDP)        ZeRO stage 0       DistributedDataParallel
  stage 1              ZeRO stage 1       ZeroRedundancyOptimizer
  stage 2              ZeRO stage 2       FSDP1 SHARD_GRAD_OP
                                          ~ fully_shard(reshard_after_forward=False)
  stage 3 (FSDP)       ZeRO stage 3       FSDP1 FULL_SHARD = fully_shard(reshard_after_forward=True)
reshard_after_forward=False keeps each unit's gathered weights from forward to backward: no
second all-gather (1x DDP's bytes) but the full parameters are alive during the step; this
lesson measures both settings of our FSDP.
"""
import os

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from benchmarks.experiments import train_with_stage
from minitrain.bench import measure
from minitrain.distributed_utils import launch
from minitrain.fsdp import FSDP
from minitrain.model import GPT, GPTConfig
from minitrain.style import GOLD, MUTED, NAVY, RED, outputs_dir
from minitrain.zero import memory_report

OUT = outputs_dir("lesson18")
WORLD = 2
KINDS = ("params", "grads", "optimizer_state")
SETTINGS = dict(n_layer=2, n_embd=32, seed=0, batch=2, seq_len=32, lr=1e-3)  # as lesson 14
TIMING = dict(n_layer=4, n_embd=128, batch=4, seq_len=64)  # bigger, so messages cost something
RING = {"all_reduce": lambda n: 2 * (n - 1) / n}  # every other collective: (n - 1) / n
COUNTED = ("all_reduce", "broadcast", "reduce", "all_gather_single", "reduce_scatter_single")


def counting(sent):
    """Wrap the collectives minitrain calls; add each call's ring bytes per rank to `sent`."""
    originals = {name: getattr(dist, name) for name in COUNTED}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            t = args[1] if name == "reduce_scatter_single" else args[0]  # the full-size tensor
            sent["bytes"] += t.numel() * t.element_size() * RING.get(
                name, lambda n: (n - 1) / n)(dist.get_world_size())
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    return lambda: [setattr(dist, name, fn) for name, fn in originals.items()]


def fsdp_run(rank, world, steps, *, n_layer, n_embd, seed, batch, seq_len, lr, **fsdp_kwargs):
    """The same run as train_with_stage, with FSDP: same weights, batches and optimizer."""
    torch.manual_seed(seed)
    model = FSDP(GPT(GPTConfig(vocab_size=256, block_size=seq_len, n_layer=n_layer, n_head=2,
                               n_embd=n_embd)), **fsdp_kwargs)
    num_params = sum(s.numel() for u in model.units for s in u.shapes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 256, (world * batch, seq_len + 1), generator=gen)
        mine = idx[rank * batch:(rank + 1) * batch]  # (batch, seq_len + 1)
        opt.zero_grad()
        loss = model(mine[:, :-1], mine[:, 1:])[1]
        loss.backward()
        model.finish_gradient_synchronization()
        opt.step()
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    unit_bytes = [4 * world * u.K for u in model.units]  # gathered (padded) bytes per unit
    root = unit_bytes[-1]  # the last unit is the root: gathered for the whole forward/backward
    return {"loss": loss.item() / world, "peak_gathered": model.stats["peak_gathered_bytes"],
            "peak_predicted": root + 2 * max(unit_bytes[:-1]),  # + current + prefetched block
            **memory_report(model.module, opt, stage=3, num_params=num_params),
            "num_params": num_params, "units": model.units}


def per_step_bytes(run):
    """Bytes sent per rank in one step: (3 steps - 1 step) / 2 leaves out the set-up."""
    counts = []
    for steps in (1, 3):
        sent = {"bytes": 0.0}
        restore = counting(sent)
        try:
            out = run(steps)
        finally:
            restore()
        counts.append(sent["bytes"])
    return out, (counts[1] - counts[0]) / 2


def step_times(rank, world):
    """FSDP step time with and without prefetch, round-robin (fair on a noisy machine)."""
    torch.manual_seed(0)
    models, times = {}, {True: [], False: []}
    cfg = GPTConfig(vocab_size=256, block_size=TIMING["seq_len"], n_layer=TIMING["n_layer"],
                    n_head=4, n_embd=TIMING["n_embd"])
    base = GPT(cfg).state_dict()
    idx = torch.randint(0, 256, (TIMING["batch"], TIMING["seq_len"] + 1))
    for prefetch in times:
        gpt = GPT(cfg)
        gpt.load_state_dict(base)
        models[prefetch] = (FSDP(gpt, prefetch=prefetch),)
        models[prefetch] += (torch.optim.AdamW(models[prefetch][0].parameters(), lr=1e-3),)

    def step(prefetch):
        model, opt = models[prefetch]
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        model.finish_gradient_synchronization()
        opt.step()

    for _ in range(3):
        for prefetch in times:
            r = measure(lambda: step(prefetch), tokens_per_step=idx[:, 1:].numel(), warmup=1,
                        iters=4, before_each=dist.barrier)
            times[prefetch] += r["times_s"]
    same = all(torch.equal(a, b) for a, b in zip(models[True][0].full_state_dict().values(),
                                                  models[False][0].full_state_dict().values()))
    return {"times": times, "same_weights": same}


def rank_main(rank, world):
    rows = []
    for stage in (0, 1, 2):
        out, sent = per_step_bytes(lambda steps: train_with_stage(rank, world, stage,
                                                                  steps=steps, **SETTINGS))
        rows.append({"label": f"stage {stage}", **out, "sent": sent})
    for label, reshard in (("FSDP", True), ("FSDP, no reshard", False)):
        out, sent = per_step_bytes(lambda steps: fsdp_run(rank, world, steps, **SETTINGS,
                                                          reshard_after_forward=reshard))
        units = out.pop("units")
        rows.append({"label": label, **out, "sent": sent,
                     "padding": 4 * sum(k * world - m for u in units
                                        for k, m in zip(u.ks, u.numels)) / world})
    return {"rows": rows, **step_times(rank, world)}


def main():
    torch.manual_seed(0)
    threads = max(1, (os.cpu_count() or 1) // WORLD)  # all cores, shared by the ranks
    result = launch(rank_main, WORLD, timeout_s=150, threads=threads)[0]  # rank 0's view
    rows, times = result["rows"], result["times"]
    num_params = rows[0]["num_params"]
    ddp_sent = rows[0]["sent"]
    print(f"tiny GPT, {num_params:,} parameters, N = {WORLD} ranks; bytes per rank "
          "measured (predicted)")
    print(f"{'':>16} | " + " | ".join(f"{k:>20}" for k in KINDS) + " | sent/step | vs DDP | loss")
    for r in rows:
        cells = " | ".join(f"{r['measured'][k]:>9,} ({r['predicted'][k]:>8,.0f})" for k in KINDS)
        print(f"{r['label']:>16} | {cells} | {r['sent']:>9,.0f} | {r['sent'] / ddp_sent:>5.2f}x |"
              f" {r['loss']:.4f}")
    fsdp, keep = rows[3], rows[4]
    print(f"FSDP gathered weights at the peak: {fsdp['peak_gathered']:,} B (predicted <= root + "
          f"2 blocks = {fsdp['peak_predicted']:,}); without resharding {keep['peak_gathered']:,}"
          f" B; the full fp32 model is {4 * num_params:,} B (so tiny a model gains little here:"
          " the root holds the embeddings and every block is one unit)")
    med = {p: sorted(t)[len(t) // 2] for p, t in times.items()}
    print(f"FSDP step ({TIMING}): prefetch {med[True] * 1e3:.1f} ms, no prefetch "
          f"{med[False] * 1e3:.1f} ms (median of {len(times[True])}; ratio "
          f"{med[False] / med[True]:.2f}x; noisy on a shared machine; the weights are "
          "bit-identical)")

    # The lesson's claims, checked on the measured numbers:
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-5, f"every stage trains alike: {losses}"
    for r in rows[:3]:  # stages 0-2: the greedy partition is within 10% of total/N
        for k in KINDS:
            assert abs(r["measured"][k] - r["predicted"][k]) <= 0.10 * r["predicted"][k], r
    for r in (fsdp, keep):  # FSDP: exactly total/N plus this rank's zero padding
        assert r["measured"]["params"] == r["predicted"]["params"] + r["padding"], r
        assert r["measured"]["grads"] == r["predicted"]["grads"] + r["padding"], r
        assert r["measured"]["optimizer_state"] == 2 * r["measured"]["params"], r
    pad_bytes = fsdp["padding"] * WORLD
    assert abs(fsdp["sent"] - 1.5 * ddp_sent) <= 0.02 * ddp_sent + 3 * pad_bytes, "FSDP = 1.5x"
    assert abs(keep["sent"] - ddp_sent) <= 0.02 * ddp_sent + 2 * pad_bytes, "no reshard = 1x"
    assert fsdp["peak_gathered"] <= fsdp["peak_predicted"], "root + current + prefetched"
    assert keep["peak_gathered"] >= 4 * num_params, "no reshard: every unit gathered at once"
    assert result["same_weights"], "prefetch changes no number"

    fig, (ax_mem, ax_net) = plt.subplots(1, 2, figsize=(14, 5))
    labels = [r["label"] for r in rows]
    bottom = [0.0] * len(rows)
    for k, color in zip(KINDS, (NAVY, MUTED, GOLD)):
        vals = [r["measured"][k] / 1024 for r in rows]
        ax_mem.bar(labels, vals, bottom=bottom, color=color, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax_mem.plot(labels, [sum(r["predicted"].values()) / 1024 for r in rows], "o--", color=RED,
                label="predicted total")
    ax_mem.set_ylabel("KiB per rank")
    ax_mem.set_title("memory per rank (rank 0, N = 2)")
    ax_mem.legend()
    ax_net.bar(labels, [r["sent"] / ddp_sent for r in rows], color=NAVY)
    ax_net.axhline(1.0, color=MUTED, ls="--")
    ax_net.set_ylabel("bytes sent per step / DDP's")
    ax_net.set_title("communication per step (counted)")
    for ax in (ax_mem, ax_net):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(OUT / "fsdp_memory_and_bytes.png", dpi=110)
    plt.close(fig)
    print("claims hold (memory, 1.5x bytes, same loss, prefetch changes nothing); figure: "
          f"{OUT / 'fsdp_memory_and_bytes.png'}")


if __name__ == "__main__":
    main()
