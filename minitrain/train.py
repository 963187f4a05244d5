"""The training loop: one readable file that wires every minitrain technique together.

What. `train(TrainConfig(...))` trains the tiny GPT on byte tokens and returns a `RunResult`;
`python -m minitrain.train --help` is the same as a command line (every field is a flag:
`--max-lr 3e-4`, `--compile/--no-compile`, `--clip-norm none`). One optimizer step is:

    for each of accum_steps micro-batches (batch_size sequences each):   # minitrain.accumulate
        forward under autocast (bf16 / fp16), backward of loss * n_k/N (* scale for fp16)
    DDP: finish_gradient_synchronization()        # every rank now holds the averaged gradient
    fp16: scaler.unscale_(optimizer)              # true gradients before measuring them
    grad_norm = clip_grad_norm(params, clip_norm) # the norm BEFORE clipping is what we log
    scaler.step(optimizer) / optimizer.step()     # fp16: skipped if a gradient was inf/nan
    scaler.update(); scheduler.step(); optimizer.zero_grad()

So `batch_size` is per micro-batch and per rank; one step sees
`tokens_per_step = batch_size * seq_len * accum_steps * world_size` tokens.

Choices, and why:
- AdamW, weight decay only on 2-D tensors (matmul weights, embeddings). Biases and LayerNorm
  gains are 1-D: decaying them pulls the gains towards 0 and does nothing useful.
- `fused_adamw=True` asks torch for its fused AdamW kernel (`fused=True`, one kernel for all
  parameters; CPU and CUDA in recent torch); where the device does not support it we fall back
  to `foreach=True` (one kernel per operation over the list) and print that. `False` is the
  plain per-parameter loop (`foreach=False`): the speed ladder's baseline.
- The lr schedule is warmup + cosine (`minitrain.schedule.WarmupCosine`) over `steps` optimizer
  steps. A step that the fp16 GradScaler skips (inf/nan gradient) STILL advances the schedule,
  as torch's schedulers do when `scaler.step` skips: the schedule counts steps, not updates.
  We detect a skip by the scale going down in `scaler.update()` (it only backs off on inf/nan).
- Evaluation: `eval_iters` batches of the held-out split (the last `val_fraction` of the tokens,
  see `minitrain.data.split_tokens`), every `eval_every` steps and at the last step, always the
  SAME batches (a fresh generator seeded from `seed`), so val curves are not sampling noise.
- Reproducible resume: `minitrain.checkpointing` saves model, optimizer, scheduler, scaler, all
  RNGs and the sampler's Generator atomically; `--resume` restores them and cuts metrics.jsonl
  back to the checkpoint's step, so a killed run continues bit for bit (CPU, fp32, same threads).
  `--resume` without a checkpoint starts from step 0 (so one command restarts any run).

Distributed (data parallel). Launch with
    torchrun --nproc_per_node 2 -m minitrain.train --steps 50 ...
torchrun starts 2 processes and sets RANK / WORLD_SIZE / MASTER_ADDR. Every rank draws the same
global batch from the same seeded generator and keeps its own slice (rank r: rows
r*batch_size ... (r+1)*batch_size-1), so ranks never see the same samples and N ranks train like
one process on the N-times larger batch. `minitrain.ddp.DDP` averages gradients; `zero_stage`
1/2 use `minitrain.zero.ZeroOptimizer` (stage 2 without DDP: it reduce-scatters gradients
itself), 3 uses `minitrain.zero.shard_model`. Rank 0 alone writes files and prints; the logged
loss is the mean over ranks and tokens/s counts all ranks' tokens over the slowest rank's time.
The classic mistake: `python -m minitrain.train --zero-stage 1` (plain python) starts ONE
process with WORLD_SIZE unset; we refuse with a one-line error instead of silently training alone.

Common bugs this file avoids: logging the clipped norm (always <= clip_norm, so it hides spikes);
clipping fp16 gradients before unscaling them (the threshold then means nothing); counting the
lr schedule in micro-batches; resuming without the optimizer or the sampler state (the loss
curve jumps); stepping every rank on its own gradient (replicas drift apart).
"""
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from minitrain import checkpointing as ckpt
from minitrain.accumulate import accumulate_gradients
from minitrain.clip import clip_grad_norm, grad_norm
from minitrain.data import get_batch, get_batch_loop, load_dataset, split_tokens
from minitrain.grad_scaler import GradScaler
from minitrain.model import GPT, GPTConfig
from minitrain.schedule import WarmupCosine
from minitrain.train_config import (RESUME_FREE_FIELDS, ConfigError, TrainConfig,  # noqa: F401
                                    build_parser, validate_config)


@dataclass
class RunResult:
    final_loss: float  # train loss of the last step (mean over ranks)
    final_val_loss: float  # val loss of the last evaluation (the last step)
    tokens_per_s: float  # median per-step tokens/s of this call's steps, first 3 excluded
    metrics_path: str
    checkpoint_path: str
    steps_run: int = 0  # steps run by this call (fewer than steps after --resume)
    start_step: int = 0  # first step this call ran (the checkpoint's step after --resume)
    losses: list = field(default_factory=list)  # train loss of every step 0..steps-1
    val_losses: list = field(default_factory=list)  # [(step, val_loss), ...]
    lrs: list = field(default_factory=list)  # lr of every step
    skipped_steps: int = 0  # fp16 steps skipped by the scaler (over the whole run)
    peak_mem_bytes: int = 0
    wall_s: float = 0.0
    world_size: int = 1


def _distributed_env():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("world_size", "WORLD_SIZE/RANK must be integers; launch with torchrun "
                          "--nproc_per_node N -m minitrain.train ...") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError("world_size", f"need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got "
                          f"{world} and {rank}; launch with torchrun --nproc_per_node N")
    if world > 1 and "MASTER_ADDR" not in os.environ and not _dist_ready():
        raise ConfigError("world_size", f"WORLD_SIZE={world} but no MASTER_ADDR: launch with "
                          "torchrun --nproc_per_node N -m minitrain.train ...")
    return rank, world, local


def _dist_ready():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --- building blocks (public: lessons, the ladder and the hparam search reuse them) -----------

def resolve_device(cfg, local_rank=0):
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_model(cfg, device="cpu"):
    """The GPT for a TrainConfig (block_size = seq_len), seeded with cfg.seed, on `device`."""
    torch.manual_seed(cfg.seed)
    gpt_cfg = GPTConfig(block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, dropout=cfg.dropout, attention=cfg.attention,
                        native_layers=cfg.native_layers,
                        activation_checkpointing=cfg.activation_checkpointing)
    return GPT(gpt_cfg).to(device)


def load_model(checkpoint_path, device="cpu"):
    """The GPT saved in a trainer checkpoint (its TrainConfig rebuilds the architecture)."""
    state = ckpt.load_checkpoint(checkpoint_path, map_location=device)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in fields})
    model = build_model(cfg, device)
    model.load_state_dict(state["model"])
    return model.eval()


def param_groups(model, weight_decay):
    """AdamW groups: decay for tensors with >= 2 dims, none for biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw_kernel_kwargs(fused, device, say=print):
    """{"fused": True} if this torch supports it on `device`, else {"foreach": True}; plain loop
    ({"foreach": False}) when fused is False."""
    if not fused:
        return {"foreach": False}
    probe = torch.zeros(1, device=device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
        return {"fused": True}
    except (RuntimeError, ValueError) as err:
        say(f"note: fused AdamW unsupported on {device} ({err}); using foreach=True")
        return {"foreach": True}


def build_optimizer(model, cfg, device="cpu", say=print):
    """AdamW(max_lr, betas=(0.9, 0.95)) with decay groups; ZeroOptimizer when zero_stage 1/2."""
    kwargs = dict(lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8,
                  **adamw_kernel_kwargs(cfg.fused_adamw, device, say))
    if cfg.zero_stage in (1, 2):
        from minitrain.zero import ZeroOptimizer
        return ZeroOptimizer(param_groups(model, cfg.weight_decay), torch.optim.AdamW,
                             stage=cfg.zero_stage, **kwargs)
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def autocast_context(precision, device):
    """torch.autocast for bf16/fp16 on `device`'s type; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def lm_loss(output, y):
    """Mean next-token cross-entropy of model(x)'s (logits, _) against y; -100 targets ignored."""
    logits = output[0]  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax + log in fp32: low-precision logits lose the tail
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


@torch.no_grad()
def evaluate(model, data, cfg, device="cpu", *, rank=0, world=1):
    """Mean loss over cfg.eval_iters batches of `data`; always the same batches for one seed.

    With several ranks each evaluates its slice of the global batch and the mean is
    all-reduced: the same number as one process evaluating the whole global batch."""
    rng = np.random.default_rng([cfg.seed, 1])  # its own stream: the sampler is not touched
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_iters):
        x, y = get_batch(data, cfg.batch_size * world, cfg.seq_len, rng=rng)  # (B*W, T)
        lo = rank * cfg.batch_size
        x, y = x[lo:lo + cfg.batch_size].to(device), y[lo:lo + cfg.batch_size].to(device)
        with autocast_context(cfg.precision, device):
            total += lm_loss(model(x), y).item()
    model.train(was_training)
    mean = total / cfg.eval_iters
    if world > 1:
        mean_t = torch.tensor([mean / world], dtype=torch.float64)
        torch.distributed.all_reduce(mean_t)
        mean = float(mean_t[0])
    return mean


def peak_memory_bytes(device):
    """CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set size."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS: bytes; Linux: KiB


class _MicroBatchForward:
    """What accumulate_gradients calls as `model(x)`: autocast, and DDP's no_sync() around every
    micro-batch but the last (accumulate_gradients runs forward k, backward k, forward k+1, ...,
    so a no_sync entered at forward 0 and left before the last forward covers backwards
    0..n-2: those only accumulate locally and the last backward all-reduces the sum)."""

    def __init__(self, model, n_micro, precision, device, ddp=None):
        self.model, self.n, self.ddp = model, n_micro, ddp
        self.precision, self.device = precision, device
        self.calls, self._no_sync = 0, None

    def __call__(self, x):
        k, self.calls = self.calls, self.calls + 1
        if self.ddp is not None and self.n > 1:
            if k == 0:
                self._no_sync = self.ddp.no_sync()
                self._no_sync.__enter__()
            if k == self.n - 1:
                self._no_sync.__exit__(None, None, None)
        with autocast_context(self.precision, self.device):
            return self.model(x)


@torch.no_grad()
def clip_gradients(params, clip_norm, *, sharded=False):
    """Global grad norm before clipping (a float); clips in place when clip_norm is not None.

    sharded=True (ZeRO 2/3): each rank holds a disjoint part of the gradient, so the global norm
    is sqrt(sum over ranks of local_norm**2) (one all-reduce), and every rank scales its part by
    the same min(1, clip_norm / (norm + 1e-6)) that clip_grad_norm uses."""
    if not sharded:
        if clip_norm is None:
            return float(grad_norm(params))
        return float(clip_grad_norm(params, clip_norm))
    squared = grad_norm(params).double() ** 2
    torch.distributed.all_reduce(squared)
    norm = squared.sqrt()
    if clip_norm is not None:
        coef = torch.clamp(clip_norm / (norm + 1e-6), max=1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return float(norm)


def _finite(x):
    return float(x) if math.isfinite(float(x)) else None  # JSON has no inf/nan: null instead


def _draw_micro_batches(train_data, cfg, rng, rank, world, device):
    """accum_steps micro-batches for this rank: each is its slice of one global batch."""
    batch_fn = get_batch_loop if cfg.batching == "loop" else get_batch
    out = []
    for _ in range(cfg.accum_steps):
        x, y = batch_fn(train_data, cfg.batch_size * world, cfg.seq_len, rng=rng)  # (B*W, T)
        lo = rank * cfg.batch_size
        out.append((x[lo:lo + cfg.batch_size].to(device), y[lo:lo + cfg.batch_size].to(device)))
    return out  # accum_steps x ((B, T), (B, T))


def train(config):
    """Train per `config` (a TrainConfig); returns a RunResult. Bad fields raise ConfigError.

    Seeds the global torch / numpy / python RNGs with config.seed (the run owns them). Under
    torchrun it creates the process group (and destroys it at the end); if a group already
    exists (a test's launcher), it uses that one and leaves it alone."""
    rank, world, local_rank = _distributed_env()
    validate_config(config, world)
    own_group = world > 1 and not _dist_ready()
    if own_group:  # torchrun set the environment; we create (and later destroy) the group
        backend = "nccl" if resolve_device(config, local_rank).type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
    try:
        return _train(config, rank, world, local_rank)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg, rank, world, local_rank):
    t_start = time.perf_counter()
    is_main = rank == 0
    say = print if (is_main and cfg.log_every > 0) else (lambda *a, **k: None)
    device = resolve_device(cfg, local_rank)
    out_dir = pathlib.Path(cfg.out_dir)
    metrics_path, ckpt_path = out_dir / "metrics.jsonl", out_dir / "checkpoint.pt"
    try:
        tokens = load_dataset(cfg.data, mode=cfg.loader, cache_dir=cfg.cache_dir,
                              max_bytes=cfg.corpus_bytes)
        train_data, val_data = split_tokens(tokens, cfg.val_fraction)
    except ValueError as err:
        raise ConfigError("data", str(err)) from None
    if min(len(train_data), len(val_data)) <= cfg.seq_len:
        raise ConfigError("seq_len", f"{cfg.seq_len} is too long for this data: the train/val "
                          f"splits have {len(train_data)}/{len(val_data)} tokens; use more data")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_model(cfg, device)  # seeds torch with cfg.seed first
    if cfg.zero_stage == 3:
        from minitrain.zero import shard_model
        model = shard_model(model)
    optimizer = build_optimizer(model, cfg, device, say)
    scheduler = WarmupCosine(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             min_lr=cfg.min_lr)
    scaler = None
    if cfg.precision == "fp16":
        scaler = GradScaler()
    sampler = np.random.default_rng(cfg.seed)  # draws every training batch

    start_step, records = 0, []
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("checkpoint.pt", "metrics.jsonl"):
            ckpt.remove_stale_temp_files(out_dir, name)
    if cfg.resume and ckpt_path.is_file():
        state = ckpt.load_checkpoint(ckpt_path, map_location=device)
        changed = sorted(k for k, v in state["config"].items()
                         if k not in RESUME_FREE_FIELDS and getattr(cfg, k, v) != v)
        if changed:
            raise ConfigError(changed[0], f"differs from the checkpoint's config ({changed}); "
                              "resume with the same settings or use a fresh out_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"], sampler)
        start_step = int(state["step"])
        if is_main:
            records = ckpt.truncate_metrics(metrics_path, start_step)
        say(f"resumed from {ckpt_path} at step {start_step}")
    elif is_main:
        if cfg.resume:
            say(f"no checkpoint in {out_dir}: starting from step 0")
        metrics_path.unlink(missing_ok=True)

    train_model = torch.compile(model) if cfg.compile else model
    ddp = None
    if world > 1 and cfg.zero_stage in (0, 1):
        from minitrain.ddp import DDP
        ddp = train_model = DDP(train_model)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accum_steps * world
    bar = None
    if cfg.progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True)
        say = bar.write if cfg.log_every > 0 else say

    model.train()
    step_tps = []
    with open(metrics_path, "a") if is_main else contextlib.nullcontext() as metrics_file:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            micro = _draw_micro_batches(train_data, cfg, sampler, rank, world, device)
            forward = _MicroBatchForward(train_model, cfg.accum_steps, cfg.precision, device, ddp)
            loss = accumulate_gradients(forward, micro, lm_loss, scaler=scaler)
            if ddp is not None:
                ddp.finish_gradient_synchronization()
            scale = scaler.get_scale() if scaler is not None else 1.0
            if scaler is not None:
                scaler.unscale_(optimizer)  # true gradients before measuring/clipping them
            if cfg.zero_stage == 2:  # sum each gradient at its owner now, so we can measure it
                optimizer.reduce_gradients()  # step() below then does not reduce again
            norm = clip_gradients(params, cfg.clip_norm, sharded=cfg.zero_stage >= 2)
            lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
                skipped = scaler.get_scale() < scale  # the scale only backs off on inf/nan
            else:
                optimizer.step()
                skipped = False
            scheduler.step()  # also after a skipped step: the schedule counts steps
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if world > 1:  # mean loss over ranks; the slowest rank's time
                stats = torch.tensor([loss / world], dtype=torch.float64)
                torch.distributed.all_reduce(stats)
                slowest = torch.tensor([dt], dtype=torch.float64)
                torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
                loss, dt = float(stats[0]), float(slowest[0])
            tps = tokens_per_step / dt
            step_tps.append(tps)
            record = {"step": step, "loss": _finite(loss), "lr": lr, "grad_norm": _finite(norm),
                      "clipped": bool(cfg.clip_norm is not None and math.isfinite(norm)
                                      and norm > cfg.clip_norm),
                      "skipped": bool(skipped), "scale": scale, "tokens_per_s": tps,
                      "peak_mem_bytes": peak_memory_bytes(device)}
            last = step == cfg.steps - 1
            if (step + 1) % cfg.eval_every == 0 or last:
                val_loss = evaluate(model, val_data, cfg, device, rank=rank, world=world)
                record["val_loss"] = _finite(val_loss)
            records.append(record)  # every rank keeps them (same numbers: all-reduced)
            if is_main:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()  # in the OS cache: a killed process loses nothing
                if cfg.log_every and (step % cfg.log_every == 0 or last or "val_loss" in record):
                    say(format_log_line(record, dt))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if cfg.zero_stage != 3 and ((step + 1) % cfg.checkpoint_every == 0 or last):
                _save(ckpt_path, cfg, step + 1, model, optimizer, scheduler, scaler, sampler,
                      is_main)
    if bar is not None:
        bar.close()

    # (after --resume, rank 0 also holds the records of earlier steps; other ranks only theirs)
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    warm = step_tps[min(3, len(step_tps) - 1):] if step_tps else []
    tps_all = warm or [r["tokens_per_s"] for r in records if r.get("tokens_per_s")]
    return RunResult(
        final_loss=records[-1]["loss"] if records else None,
        final_val_loss=vals[-1][1] if vals else None,
        tokens_per_s=statistics.median(tps_all) if tps_all else 0.0,
        metrics_path=str(metrics_path), checkpoint_path=str(ckpt_path),
        steps_run=cfg.steps - start_step, start_step=start_step,
        losses=[r["loss"] for r in records], val_losses=vals,
        lrs=[r["lr"] for r in records], skipped_steps=sum(r["skipped"] for r in records),
        peak_mem_bytes=peak_memory_bytes(device), wall_s=time.perf_counter() - t_start,
        world_size=world)


def format_log_line(record, dt):
    """`step 120 | loss 2.3100 | lr 6.0e-04 | norm 0.91 | 412 ms | 9,950 tok/s` (+ val/skip)."""
    def num(v, fmt):
        return "inf/nan" if v is None else format(v, fmt)  # None = non-finite in the record

    line = (f"step {record['step']} | loss {num(record['loss'], '.4f')} | lr {record['lr']:.1e}"
            f" | norm {num(record['grad_norm'], '.2f')} | {dt * 1000:.0f} ms"
            f" | {record['tokens_per_s']:,.0f} tok/s")
    if "val_loss" in record:
        line += f" | val {num(record['val_loss'], '.4f')}"
    if record["skipped"]:
        line += " | skipped (inf/nan gradient)"
    return line


def _save(path, cfg, next_step, model, optimizer, scheduler, scaler, sampler, is_main):
    """Checkpoint after `next_step` completed steps; every rank takes part in gathering."""
    payload = {"format": 1, "step": next_step, "config": dataclasses.asdict(cfg),
               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(),
               "scaler": scaler.state_dict() if scaler is not None else None,
               "rng": ckpt.rng_state(sampler)}
    if is_main:
        ckpt.save_checkpoint(path, payload)


# --- command line -------------------------------------------------------------------------------

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        result = train(TrainConfig(**vars(args)))
    except ConfigError as err:
        flag = "--" + err.field.replace("_", "-")
        if err.field == "world_size":
            flag = "WORLD_SIZE"
        print(f"python -m minitrain.train: error: {flag}: {err.reason}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {result.steps_run} steps | final loss {result.final_loss:.4f} | "
              f"val loss {result.final_val_loss:.4f} | {result.tokens_per_s:,.0f} tok/s | "
              f"{result.metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
