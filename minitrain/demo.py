"""`make demo`: train a tiny GPT on Python's own source code, on the CPU (800 steps).

What it does, in order:
1. pretokenizes the default corpus (this Python's standard-library `.py` files, ~31 MB for
   3.11) once into `.cache/minitrain/` (later runs reuse the file);
2. trains the tiny GPT with `minitrain.train` - warmup + cosine lr, gradient clipping - with the
   speedrun's record recipe (`make speedrun`): all cores, fused AdamW, exact GELU, 800 steps of
   8 x 128 bytes at lr 4e-3 (the lr minitrain.hparam's search picked). It reaches the old
   recipe's validation loss (500 steps of 16 x 128, plain AdamW, one thread) in under half the
   time on 2 cores (README, Results). A progress bar and a log line every 50 steps; the run's
   metrics.jsonl and checkpoint.pt go to `outputs/demo/run/`;
3. prints the validation loss (nats per byte; a fresh model scores ln 256 = 5.55) and a sample
   the model writes from a Python-looking prompt.
`make demo` then draws `outputs/demo/loss_lr.png` from the run's metrics with
`python -m benchmarks.demo_figure` (plotting is tooling; the library does not plot).

Threads: by default the fastest count on this machine right now, timed on one training step of
the demo's model (`minitrain.bench.fastest_thread_count`: all cores, unless one thread is faster
because other processes keep the cores busy); `--threads N` sets it by hand.

    python -m minitrain.demo [--steps 800] [--threads N] [--out DIR]
"""
import argparse
import math
import pathlib
import time

import torch

from minitrain.bench import fastest_thread_count
from minitrain.data import ByteTokenizer, corpus_cache_path
from minitrain.style import outputs_dir
from minitrain.train import TrainConfig, build_model, lm_loss, load_model, train

PROMPT = "def "


# What differs between the demo's recipe before `make speedrun` and now (the record it found;
# benchmarks/bench_speedrun.py measures both in one run). Everything else is shared.
ORIGINAL_RECIPE = dict(steps=500, batch_size=16, max_lr=2e-3, min_lr=2e-4, fused_adamw=False,
                       gelu="tanh")
SPEEDRUN_RECIPE = dict(steps=800, batch_size=8, max_lr=4e-3, min_lr=4e-4, fused_adamw=True,
                       gelu="exact")


def demo_config(out_dir, recipe=SPEEDRUN_RECIPE, steps=None):
    """The demo's run: a 4-layer, 128-wide GPT on 128-byte windows; `recipe` sets the schedule
    length, batch size, lr and optimizer kernel (`steps` overrides the recipe's length)."""
    steps = recipe["steps"] if steps is None else steps
    return TrainConfig(steps=steps, batch_size=recipe["batch_size"], seq_len=128, n_layer=4,
                       n_head=4, n_embd=128, max_lr=recipe["max_lr"], min_lr=recipe["min_lr"],
                       warmup_steps=max(1, steps // 20), clip_norm=1.0, weight_decay=0.1,
                       eval_every=max(1, steps // 4), fused_adamw=recipe["fused_adamw"],
                       gelu=recipe["gelu"],
                       eval_iters=10, checkpoint_every=steps, log_every=50, progress=True,
                       out_dir=str(out_dir), seed=0,
                       overwrite=True)  # `make demo` again replaces the last demo run


def training_step_probe(cfg):
    """One forward + backward of the demo's model on one batch of the demo's shape: the work
    whose speed the thread count decides (a lone matmul is not: measured, a 256 x 256 matmul
    picked 1 thread on a machine where the demo then trained 1.28x faster with 2)."""
    model = build_model(cfg)  # a throwaway copy: train() builds (and seeds) its own
    x = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len),
                      generator=torch.Generator().manual_seed(0))  # (B, T)

    def probe():
        model.zero_grad(set_to_none=True)
        lm_loss(model(x), x).backward()
    return probe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=SPEEDRUN_RECIPE["steps"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: all cores, unless 1 is faster right now)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="output folder (default: <repo>/outputs/demo)")
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps and --threads must be >= 1")
    out = args.out if args.out is not None else outputs_dir("demo")
    t0 = time.perf_counter()
    cfg = demo_config(out / "run", steps=args.steps)
    threads = (args.threads if args.threads is not None
               else fastest_thread_count(probe=training_step_probe(cfg), iters=5))
    torch.set_num_threads(threads)
    cache = corpus_cache_path()  # pretokenize once; the trainer (data=None) reads this file
    n_tokens = cache.stat().st_size // 2
    print(f"corpus: {cache} ({n_tokens:,} tokens, {time.perf_counter() - t0:.1f} s)")
    result = train(cfg)
    wall = time.perf_counter() - t0
    model = load_model(result.checkpoint_path)
    tok = ByteTokenizer()
    idx = torch.tensor([tok.encode(PROMPT)], dtype=torch.long)
    sample = model.generate(idx, 300, temperature=0.8, top_k=40,
                            generator=torch.Generator().manual_seed(0))
    print("\n--- sample (temperature 0.8, top-k 40) ---")
    print(tok.decode(sample[0].tolist()))
    print("---")
    print(f"validation loss: {result.final_val_loss:.4f} nats/byte (fresh model: ln 256 = "
          f"{math.log(256):.2f}) after {cfg.steps} steps, {wall:.0f} s wall, "
          f"{result.tokens_per_s:,.0f} tok/s, {threads} thread(s)")
    print(f"metrics: {result.metrics_path}")
    if not result.final_val_loss < math.log(256) - 1.0:
        raise SystemExit("the demo did not learn: validation loss is not well below ln 256")
    return result


if __name__ == "__main__":
    main()
