"""Lesson 21 — data loading at scale: find the data-starved step, then feed it.

Objective: a training step can only be as fast as its next batch arrives. Here the dataset is
deliberately CPU-heavy (it tokenizes raw text on the fly with a slow, pure-Python tokenizer, as a
real BPE tokenizer in Python would be), so the step starves. We measure the fraction of each
step spent WAITING for data, then change one DataLoader knob at a time:
  num_workers 0 / 1 / 2       the batches are built in 0, 1, 2 worker processes, ahead of time
  prefetch_factor 2 -> 4      how many batches each worker keeps ready
  persistent_workers          workers kept alive between epochs (else re-forked every epoch)
  pin_memory                  page-locked host memory for fast async host->GPU copies
and finally compare three storage layouts for pre-tokenized data: one memmap file, several
memmap shards, and a tar stream (minitrain.sampler.ShardedStream, WebDataset-style).

What the measurements say: with num_workers=0 most of the step is data wait; workers move the
tokenization off the training process's critical path. On THIS machine (2 cores) the workers
compete with the training step for the same two cores, so the gain is bounded: on a GPU machine
the model runs on the GPU and the CPU cores are free for workers, and the same knob typically
removes the wait entirely. persistent_workers removes the per-epoch fork cost (measured below);
pin_memory does nothing without a GPU (the lesson says so rather than inventing a number).

Serves: syllabus 16-05 (num_workers, prefetch_factor, persistent_workers, memmap, WebDataset
streaming, data-starved training); 16-07 (data loading vs compute breakdown).
Prerequisites: lesson 02 (pretokenize, memmap vs RAM).

Run: python lessons/21_data_loading_at_scale.py   (~40 s on 2 cores; figure in outputs/lesson21/)
"""
import os
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from minitrain.bench import measure
from minitrain.data import default_corpus, get_batch, load_tokens
from minitrain.model import GPT, GPTConfig
from minitrain.sampler import DistributedSampler, ShardedStream, write_shards
from minitrain.style import BACKGROUND, GOLD, MUTED, NAVY, PANEL, outputs_dir

SEQ, BATCH, STEPS = 64, 16, 24
MODEL = dict(block_size=SEQ, n_layer=2, n_head=2, n_embd=32)
STARVE = 3.0  # the slow tokenizer is calibrated to cost ~STARVE x the compute of one step


class OnTheFlyText(Dataset):
    """Sample i = the text at a fixed random offset, tokenized NOW, in Python (slow on purpose)."""

    def __init__(self, text, n_samples, seed=0, passes=1):
        self.text, self.passes = text, passes
        rng = np.random.default_rng(seed)
        self.starts = rng.integers(0, len(text) - 4 * SEQ, size=n_samples)

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        chunk = self.text[self.starts[i]:self.starts[i] + 4 * SEQ]
        for _ in range(self.passes):  # a Python-level tokenizer: per-character work
            ids = [b for ch in chunk for b in ch.encode("utf-8")]
        ids = torch.tensor(ids[:SEQ + 1], dtype=torch.long)
        return ids[:-1], ids[1:]  # (T,), (T,)


def starved_run(loader, model, opt, steps):
    """Train `steps` steps from `loader`; returns (total s, data-wait s)."""
    it, wait, t_start = iter(loader), 0.0, time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        x, y = next(it)  # the time spent here is the step waiting for its data
        wait += time.perf_counter() - t0
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t_start, wait


def epoch_startup_s(dataset, persistent, epochs=3):
    """Mean time to the first batch of each epoch (the fork + first batch cost)."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=2, persistent_workers=persistent,
                        sampler=DistributedSampler(len(dataset), num_replicas=1, rank=0))
    firsts = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        t0 = time.perf_counter()
        for _ in loader:
            firsts.append(time.perf_counter() - t0)
            break
    return float(np.mean(firsts[1:]))  # epoch 0 forks in both settings: compare epochs 1..


def calibrate_passes(dataset, model, opt):
    """Tokenizer passes per sample so that building one batch costs ~STARVE x one compute step
    on this machine (the lesson needs a starved step; how starved is a choice, stated here)."""
    x, y = (torch.stack(t) for t in zip(*[dataset[i] for i in range(BATCH)]))

    def compute_step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    compute_s = measure(compute_step, tokens_per_step=BATCH * SEQ, warmup=2, iters=5)["median_s"]
    one_pass_s = measure(lambda: [dataset[i] for i in range(BATCH)], tokens_per_step=BATCH * SEQ,
                         warmup=1, iters=3)["median_s"]
    return max(1, round(STARVE * compute_s / one_pass_s)), compute_s


def _rate(read_batch):
    """Sequences per second of read_batch() (warm: the first calls, page faults included, are
    excluded by measure's warm-up, so the layouts are compared on a warm page cache)."""
    return BATCH / measure(read_batch, tokens_per_step=BATCH * SEQ, warmup=3, iters=15)["median_s"]


def storage_layouts(tokens, tmp):
    """Sequences per second read from one memmap file, 8 memmap shards, and 8 tar shards."""
    one = os.path.join(tmp, "all.bin")
    np.asarray(tokens, dtype=np.uint16).tofile(one)
    shards = np.array_split(np.asarray(tokens, dtype=np.uint16), 8)
    shard_paths = []
    for i, s in enumerate(shards):
        path = os.path.join(tmp, f"shard{i}.bin")
        s.tofile(path)
        shard_paths.append(path)
    n_seq = 600
    rng = np.random.default_rng(0)
    data = load_tokens(one, mode="memmap")
    one_file = _rate(lambda: get_batch(data, BATCH, SEQ, rng=rng))
    maps = [load_tokens(p, mode="memmap") for p in shard_paths]
    turn = iter(range(10**9))
    memmap_shards = _rate(lambda: get_batch(maps[next(turn) % len(maps)], BATCH, SEQ, rng=rng))
    seqs = [np.asarray(tokens[i * SEQ:(i + 1) * SEQ], dtype=np.uint16).tobytes()
            for i in range(n_seq)]
    tars = write_shards(seqs, os.path.join(tmp, "tar"), samples_per_shard=n_seq // 8)
    stream = {"it": iter(())}

    def read_tar_batch():
        for _ in range(BATCH):
            try:
                next(stream["it"])
            except StopIteration:  # start the next epoch of the stream
                stream["it"] = iter(ShardedStream(tars, shuffle_buffer=64))
                next(stream["it"])
    tar_stream = _rate(read_tar_batch)
    return {"one memmap file": one_file, "8 memmap shards": memmap_shards,
            "8 tar shards (stream)": tar_stream}


def main():
    # The training process uses one thread: the DataLoader workers need the other core.
    torch.set_num_threads(1)
    out = outputs_dir("lesson21")
    text = default_corpus(max_bytes=400_000)
    torch.manual_seed(0)
    probe = GPT(GPTConfig(**MODEL))
    passes, compute_s = calibrate_passes(OnTheFlyText(text, BATCH), probe,
                                         torch.optim.AdamW(probe.parameters(), lr=1e-3))
    dataset = OnTheFlyText(text, n_samples=STEPS * BATCH * 4, passes=passes)
    settings = [("num_workers=0", dict(num_workers=0)),
                ("num_workers=1", dict(num_workers=1)),
                ("num_workers=2", dict(num_workers=2)),
                ("num_workers=2, prefetch 4", dict(num_workers=2, prefetch_factor=4))]
    rows = []
    for name, kw in settings:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**MODEL))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = DataLoader(dataset, batch_size=BATCH, **kw,
                            sampler=DistributedSampler(len(dataset), num_replicas=1, rank=0))
        starved_run(loader, model, opt, 2)  # warm-up: first batches and forks not counted
        total, wait = starved_run(loader, model, opt, STEPS)
        rows.append((name, total / STEPS, wait / total))
    print(f"tiny GPT step fed by an on-the-fly Python tokenizer (B={BATCH}, T={SEQ}), "
          f"{STEPS} steps per setting; compute alone {compute_s * 1e3:.1f} ms/step, tokenizer "
          f"calibrated to {passes} passes (~{STARVE:g}x the compute per batch)")
    print(f"{'setting':28} {'ms/step':>8} {'data wait':>10}")
    for name, per_step, frac in rows:
        print(f"{name:28} {per_step * 1e3:8.1f} {frac:10.0%}")

    # Start-up cost alone: a cheap dataset (1 tokenizer pass), so building the first batch does
    # not hide the cost of forking the workers again.
    cheap = OnTheFlyText(text, n_samples=BATCH * 8)
    cold, warm = epoch_startup_s(cheap, False), epoch_startup_s(cheap, True)
    print(f"\nfirst batch of an epoch, 2 workers: {cold * 1e3:.0f} ms re-forking "
          f"(persistent_workers=False) vs {warm * 1e3:.0f} ms (persistent_workers=True)")
    if torch.cuda.is_available():
        print("pin_memory: a GPU is present; time .to(device, non_blocking=True) with and "
              "without it (lesson 17 shows CUDA-event timing)")
    else:
        print("pin_memory: no GPU here, so there is no host->device copy to speed up; "
              "not measured (on a GPU it enables asynchronous copies)")

    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        layouts = storage_layouts(tokens, tmp)
    print("\nreading pre-tokenized sequences (no tokenizer in the loop):")
    for name, rate in layouts.items():
        print(f"  {name:24} {rate:12,.0f} sequences/s")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), facecolor=BACKGROUND)
    names = [r[0] for r in rows]
    axes[0].barh(names, [r[1] * 1e3 * (1 - r[2]) for r in rows], color=NAVY, label="compute")
    axes[0].barh(names, [r[1] * 1e3 * r[2] for r in rows], left=[r[1] * 1e3 * (1 - r[2])
                                                                  for r in rows],
                 color=GOLD, label="waiting for data")
    axes[0].set_xlabel("ms per step")
    axes[0].set_title("where a step's time goes", color=NAVY, loc="left")
    axes[0].legend()
    axes[1].bar(list(layouts), list(layouts.values()), color=[NAVY, MUTED, GOLD])
    axes[1].set_ylabel("sequences/s")
    axes[1].set_title("pre-tokenized storage layouts", color=NAVY, loc="left")
    axes[1].tick_params(axis="x", labelsize=8)
    for ax in axes:
        ax.set_facecolor(PANEL)
    fig.tight_layout()
    fig.savefig(out / "data_loading.png", dpi=110)
    plt.close(fig)
    print(f"figure: {out / 'data_loading.png'}")

    # The lesson's claims, on these runs.
    assert rows[0][2] > 0.5, "with num_workers=0 the on-the-fly tokenizer should dominate"
    assert min(r[2] for r in rows[1:]) < rows[0][2], "workers should cut the data wait"
    assert warm < cold, "persistent workers should start an epoch faster than re-forked ones"


if __name__ == "__main__":
    main()
