"""The speed ladder's data-parallel stage: one rung's exact config on 1 process and on N.

What: `measure_scaling(config)` trains the SAME model on the SAME global batch twice with
`minitrain.train.train`, once on 1 process (batch_size = N x B) and once on N gloo processes
(`minitrain.distributed_utils.launch`; the trainer wraps the model in `minitrain.ddp.DDP`, each
rank trains on B rows, the rung's own shape). Every process gets 1 thread, so "N processes" means
"N cores". It checks that both runs log the same loss at every step (data parallelism must not
change the training) and only then returns their speeds.

Why: the hour-16 animation (deck slide 19: baseline -> optimized single device -> DDP scaling)
must put the DDP bars on the same model and shape as the ladder's best rung; a DDP bar from
another model reads as "DDP made it slower" when it only measured a different network.

Formula: T_N = tokens per step of the whole run / step time (median after `warmup` steps; the
step time is the slowest rank's, the trainer takes the max over ranks)
    speedup      = T_N / T_1
    efficiency   = T_N / (N T_1)        1.0 = perfect linear scaling (each process adds a T_1)
    per process  = T_N / N

When it helps: deciding whether a second device pays for this model before renting it; on this
2-core CPU it shows the mechanics honestly, not a GPU node's numbers (there each rank owns its
GPU and NCCL links; here both processes share one socket and gloo talks over loopback).

Common bug: giving the 1-process run every core and each of the N processes one: the comparison
then measures threads against processes, not data parallelism. Both sides get 1 thread per
process here.
"""
import os
import pathlib

from benchmarks.ladder_runner import summarize_metrics
from minitrain.distributed_utils import launch
from minitrain.files import read_jsonl
from minitrain.ladder import EXTRA_KEYS


def _rank_train(rank, world, config):
    """One rank of the run (under launch): train, then rank 0 hands back its metrics lines."""
    from minitrain.train import TrainConfig, train

    train(TrainConfig(**config))
    if rank != 0:  # rank 0 alone writes metrics.jsonl
        return None
    return read_jsonl(pathlib.Path(config["out_dir"]) / "metrics.jsonl")


def stage_configs(config, *, world=2):
    """(1-process config, per-rank config): the same global batch of world x B rows."""
    if not isinstance(world, int) or world < 2:
        raise ValueError(f"world must be an int >= 2 (the processes to compare with 1), got "
                         f"{world!r}")
    config = {k: v for k, v in config.items() if k not in EXTRA_KEYS}  # tf32: CUDA-only flag
    return {**config, "batch_size": config["batch_size"] * world}, dict(config)


def check_same_losses(one, many, *, tolerance):
    """Largest relative loss difference over the steps; ValueError above `tolerance`."""
    if len(one) != len(many) or not one:
        raise ValueError(f"the runs logged {len(one)} and {len(many)} steps: they must match")
    worst = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(one, many))
    if not worst <= tolerance:
        raise ValueError(f"VALIDATION FAILED: 1 process and DDP differ by {worst:.1e} (relative "
                         f"loss, tolerance {tolerance:.0e}): no speed is shown for them")
    return worst


def measure_scaling(config, *, out_dir, world=2, warmup=2, tolerance=1e-4, timeout_s=600.0):
    """Train `config` on 1 process (batch world x B) and on `world` DDP processes (B each).

    Returns a dict: tokens/s of both (T_1, T_N), per-process tokens/s, efficiency
    T_N / (world T_1), the validated loss difference and the shapes. Raises ValueError when the
    two runs do not train the same way."""
    if config["steps"] <= warmup:
        raise ValueError(f"config['steps'] ({config['steps']}) must be larger than warmup "
                         f"({warmup}): the timed steps come after the warm-up")
    one_cfg, rank_cfg = stage_configs(config, world=world)
    out_dir = pathlib.Path(out_dir)
    one_cfg["out_dir"], rank_cfg["out_dir"] = str(out_dir / "one"), str(out_dir / f"ddp{world}")
    one = launch(_rank_train, 1, one_cfg, timeout_s=timeout_s, threads=1)[0]
    many = launch(_rank_train, world, rank_cfg, timeout_s=timeout_s, threads=1)[0]
    one, many = sorted(one, key=lambda r: r["step"]), sorted(many, key=lambda r: r["step"])
    worst = check_same_losses(one, many, tolerance=tolerance)  # validate, then time
    t1 = summarize_metrics(one, warmup=warmup)["tokens_per_s"]
    tn = summarize_metrics(many, warmup=warmup)["tokens_per_s"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"world": world, "tokens_per_s_1": t1, "tokens_per_s_n": tn,
            "per_process_tokens_per_s": tn / world, "speedup": tn / t1,
            "efficiency": tn / (world * t1), "max_rel_loss_diff": worst,
            "global_batch": one_cfg["batch_size"], "per_rank_batch": rank_cfg["batch_size"],
            "seq_len": config["seq_len"], "n_layer": config["n_layer"],
            "n_embd": config["n_embd"], "steps": config["steps"], "warmup": warmup,
            "threads_per_process": 1, "load_avg_1min": load}
