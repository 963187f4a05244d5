"""The training loop: one readable file that wires every minitrain technique together.

What. `train(TrainConfig(...))` trains the tiny GPT on byte tokens and returns a `RunResult`;
`python -m minitrain.train --help` is the same as a command line (every field is a flag:
`--max-lr 3e-4`, `--compile/--no-compile`, `--clip-norm none`). A few objects are chosen ONCE
at start-up, so the loop reads the same for every setting:

    mode = choose_parallel_mode(cfg, rank, world)    # minitrain.parallel: single/DDP/ZeRO-1/2/FSDP
    precision = choose_precision(cfg.precision, device)  # minitrain.precision: fp32/bf16/fp16
    batches = _batch_source(cfg, ...)                # minitrain.data: seeded batcher / DataLoader
    scheduler = build_scheduler(optimizer, cfg)      # --schedule, counted in optimizer steps

and one optimizer step is:

    loss = accumulate_gradients(forward, micro_batches, lm_loss,      # minitrain.accumulate
                                scaler=precision.scaler, no_sync=mode.no_sync)
    mode.after_backward(optimizer)                # DDP: finish the all-reduce; ZeRO-2: reduce
    precision.unscale_(optimizer)                 # fp16: true gradients before measuring them
    grad_norm = mode.clip(params, clip_norm)      # the norm BEFORE clipping is what we log
    skipped = precision.step(optimizer)           # fp16: the scaler skips an inf/nan step
    scheduler.step(); optimizer.zero_grad()

So `batch_size` is per micro-batch and per rank; one step sees
`tokens_per_step = batch_size * seq_len * accum_steps * world_size` tokens.

Choices, and why:
- AdamW, weight decay only on 2-D tensors (matmul weights, embeddings). Biases and LayerNorm
  gains are 1-D: decaying them pulls the gains towards 0 and does nothing useful.
- `fused_adamw=True` asks torch for its fused AdamW kernel (`fused=True`, one kernel for all
  parameters; CPU and CUDA in recent torch); where the device does not support it we fall back
  to `foreach=True` (one kernel per operation over the list) and print that. `False` is the
  plain per-parameter loop (`foreach=False`): the speed ladder's baseline.
- `--optimizer lamb|lars` swaps AdamW for `minitrain.large_batch`'s layer-wise optimizers
  (same decay groups; ZeRO-1/2 shard them like AdamW: owners hold whole parameters, so the
  per-layer trust ratio is unchanged). `--batch-warmup-steps W` ramps the micro-batches per
  step from 1 to `accum_steps` over W steps (`micro_batches_at`); the lr schedule still counts
  optimizer STEPS, not tokens (so a ramped run has the lrs of the unramped one).
- The lr schedule is `--schedule`: warmup + cosine (`minitrain.schedule.WarmupCosine`, the
  default), or step / one-cycle / constant / inverse-sqrt (`schedule_factor`) over `steps`
  optimizer steps. A step that the fp16 GradScaler skips (inf/nan gradient) STILL advances the schedule,
  as torch's schedulers do when `scaler.step` skips: the schedule counts steps, not updates.
  Whether a step was skipped is asked of the scaler (`GradScaler.last_step_skipped`).
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
global batch from the same seeded generator and keeps its own slice (`minitrain.data.rank_rows`:
rows r*batch_size ... (r+1)*batch_size-1), so ranks never see the same samples and N ranks train
like one process on the N-times larger batch. The parallel mode (`minitrain.parallel`) decides
how: `minitrain.ddp.DDP` averages gradients; `zero_stage` 1/2 use `minitrain.zero.ZeroOptimizer`
(stage 2 without DDP: it reduces gradients to their owners itself), 3 uses FSDP
(`minitrain.fsdp.FSDP`: parameters, gradients and optimizer state sharded; checkpoints hold the
FULL state dict, so `--resume` works as for every other mode; `--precision bf16/fp16` becomes
its compute dtype over fp32 master shards). With fp16 and sharded gradients (ZeRO-2, FSDP) the
ranks all-reduce "found inf" so all skip a step together. Rank 0 alone writes files and prints;
the logged loss is the mean over ranks and tokens/s counts all ranks' tokens over the slowest
rank's time; `peak_mem_bytes_ranks` is every rank's peak memory (CPU: peak RSS).
Data under torchrun: `--loader ram|memmap` is the seeded global batch above; `--loader
dataloader` is torch's DataLoader (`--num-workers`, `--prefetch-factor`, `--persistent-workers`,
`--pin-memory`) over fixed windows of the token file, each rank reading the shard that
`minitrain.sampler.DistributedSampler` gives it (set_epoch every epoch); the sampler's epoch and
position are in the checkpoint, so resume is exact. `--log-ranks` prints each rank's loss and
tokens; the run header prints world size, per-rank and global batch.
Elastic: under `torchrun --max-restarts N`, when a worker dies torchrun restarts all of them
with TORCHELASTIC_RESTART_COUNT > 0; the trainer then resumes from out_dir's last checkpoint by
itself (as if `--resume` had been given; each attempt gets its own key prefix in torchrun's
store), so the run ends with exactly the losses of an uninterrupted one.
`--profile N` records N steps after 3 warm-up steps: out_dir/trace.json (chrome://tracing or
Perfetto; phases data / forward / forward_backward / communication / clip / optimizer / eval by
name) and out_dir/profile.md; every metrics line has `mfu` against this machine's measured peak.
The classic mistake: `python -m minitrain.train --zero-stage 1` (plain python) starts ONE
process with WORLD_SIZE unset; we refuse with a one-line error instead of silently training alone.

Failures (non-finite loss or norm, loss spikes, the fp16 scale floor, stuck or dead ranks, a
full disk, Ctrl-C): the policy and its reasons are in `minitrain.recovery`'s docstring.

Common bugs this file avoids: logging the clipped norm (always <= clip_norm, so it hides spikes);
clipping fp16 gradients before unscaling them (the threshold then means nothing); counting the
lr schedule in micro-batches; resuming without the optimizer or the sampler state (the loss
curve jumps); stepping every rank on its own gradient (replicas drift apart).
"""
import contextlib
import dataclasses
import datetime
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
from minitrain.accumulate import IGNORE_INDEX, accumulate_gradients
from minitrain.bench import peak_memory_bytes
from minitrain.data import (SeededBatches, WindowLoader, fingerprint, get_batch, load_dataset,
                            rank_rows, split_tokens)
from minitrain.files import append_jsonl, remove_stale_temp_files
from minitrain.model import GPT, GPTConfig
from minitrain.parallel import choose_parallel_mode
from minitrain.precision import (FullPrecision, ScaledFp16,  # noqa: F401 (re-exported)
                                 autocast_context, choose_precision)
from minitrain.profile import flops_per_token, mfu, peak_bandwidth, peak_flops
from minitrain.recovery import event_line as _event_line
from minitrain.recovery import judge as _judge
from minitrain.recovery import num as _num
from minitrain.recovery import resume_hint as _resume_hint
from minitrain.recovery import stop_message as _stop_message
from minitrain.schedule import LambdaSchedule, WarmupCosine, one_cycle, step_decay
from minitrain.stability import SpikeDetector
from minitrain.step_profiler import ProfileWindow, StepProfiler
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
    skipped_steps: int = 0  # steps without an update: fp16 overflow, or an event below
    events: list = field(default_factory=list)  # [(step, event, action), ...] of this call
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


# --- building blocks: small public functions the loop below is made of ------------------------

def resolve_device(cfg, local_rank=0):
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_model(cfg, device="cpu"):
    """The GPT for a TrainConfig (block_size = seq_len), seeded with cfg.seed, on `device`."""
    torch.manual_seed(cfg.seed)
    gpt_cfg = GPTConfig(block_size=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        n_embd=cfg.n_embd, dropout=cfg.dropout, attention=cfg.attention,
                        native_layers=cfg.native_layers, gelu=cfg.gelu,
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


def build_optimizer(model, cfg, device="cpu", say=print, *, mode=None):
    """cfg.optimizer with decay groups, built by the parallel mode (ZeRO-1/2: a ZeroOptimizer
    around it): AdamW(max_lr, betas=(0.9, 0.95)); LAMB the same plus its layer-wise trust ratio;
    LARS (momentum 0.9, trust coefficient 0.001) for the large-batch comparison of lesson
    large_batch. `mode` defaults to the one chosen for cfg in the current process group."""
    if mode is None:
        rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                       if _dist_ready() else (0, 1))
        mode = choose_parallel_mode(cfg, rank, world)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return mode.build_optimizer(groups, lr=cfg.max_lr, betas=(0.9, 0.95), eps=1e-8,
                                    **adamw_kernel_kwargs(cfg.fused_adamw, device, say))
    from minitrain.large_batch import LAMB, LARS
    kwargs = ({"optimizer_cls": LAMB, "betas": (0.9, 0.95), "eps": 1e-8}
              if cfg.optimizer == "lamb" else {"optimizer_cls": LARS, "momentum": 0.9})
    return mode.build_optimizer(groups, lr=cfg.max_lr, **kwargs)


def schedule_factor(cfg):
    """lr(step) / max_lr for the non-cosine --schedule choices (step = optimizer step, 0-based;
    the schedule counts STEPS, also with --batch-warmup-steps). Each starts with the same linear
    warmup as WarmupCosine ((step + 1) / W for step < W), except one-cycle, whose rise IS its
    warmup (pct_start = W / steps, or torch's 0.3 without warmup):
    - constant: 1 after warmup;
    - step: x gamma every third of the steps after warmup, gamma = sqrt(min_lr / max_lr), so
      the last third runs at min_lr (gamma 0.1 if min_lr is 0);
    - inverse-sqrt: sqrt(W / (step + 1)) after warmup (the Transformer paper's schedule);
    - one-cycle: minitrain.schedule.one_cycle (= torch's OneCycleLR) with max_lr 1."""
    w, n = cfg.warmup_steps, cfg.steps
    if cfg.schedule == "one-cycle":
        pct = w / n if 0 < w < n else 0.3
        return lambda step: one_cycle(min(step, n), max_lr=1.0, total_steps=n, pct_start=pct)
    gamma = math.sqrt(cfg.min_lr / cfg.max_lr) if cfg.min_lr > 0 else 0.1
    after = {"constant": lambda k: 1.0,
             "step": lambda k: step_decay(k, lr=1.0, step_size=max(1, math.ceil((n - w) / 3)),
                                          gamma=gamma),
             "inverse-sqrt": lambda k: math.sqrt(max(w, 1) / (k + w + 1))}[cfg.schedule]
    return lambda step: (step + 1) / w if step < w else after(step - w)


def build_scheduler(optimizer, cfg):
    """The --schedule object (state_dict / load_state_dict / step), chosen once."""
    if cfg.schedule == "cosine":
        return WarmupCosine(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                            min_lr=cfg.min_lr)
    return LambdaSchedule(optimizer, schedule_factor(cfg))


def micro_batches_at(step, cfg):
    """--batch-warmup-steps W: micro-batches in optimizer step `step`, a linear ramp from 1 at
    step 0 to accum_steps at step W (then accum_steps); accum_steps without a ramp."""
    w = cfg.batch_warmup_steps
    if not w or step >= w:
        return cfg.accum_steps
    return 1 + (cfg.accum_steps - 1) * step // w


def lm_loss(output, y):
    """Mean next-token cross-entropy of model(x)'s (logits, _) against y; -100 targets ignored."""
    logits = output[0]  # (B, T, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax + log in fp32: low-precision logits lose the tail
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                           ignore_index=IGNORE_INDEX)


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
        x = rank_rows(x, rank, cfg.batch_size).to(device)  # (B, T)
        y = rank_rows(y, rank, cfg.batch_size).to(device)  # (B, T)
        with autocast_context(cfg.precision, device):
            total += lm_loss(model(x), y).item()
    model.train(was_training)
    mean = total / cfg.eval_iters
    if world > 1:
        mean_t = torch.tensor([mean / world], dtype=torch.float64)
        torch.distributed.all_reduce(mean_t)
        mean = float(mean_t[0])
    return mean


PROFILE_WARMUP = 3  # --profile records steps after these (allocations, AdamW state, caches)


def _finite(x):
    return float(x) if math.isfinite(float(x)) else None  # JSON has no inf/nan: null instead


def _draw_micro_batches(batches, n_micro, device):
    """n_micro micro-batches for this rank from the batch source."""
    return [batches.next(device) for _ in range(n_micro)]  # n_micro x ((B, T), (B, T))


def _batch_source(cfg, train_data, rng, rank, world):
    """ram / memmap: minitrain's seeded batcher (rank slices of one global batch);
    dataloader: torch's DataLoader over fixed windows, sharded by DistributedSampler."""
    if cfg.loader != "dataloader":
        return SeededBatches(train_data, cfg.batch_size, cfg.seq_len, rng=rng, rank=rank,
                             world=world, loop=cfg.batching == "loop")
    try:
        return WindowLoader(train_data, cfg.batch_size, cfg.seq_len, rank=rank, world=world,
                            seed=cfg.seed, num_workers=cfg.num_workers,
                            prefetch_factor=cfg.prefetch_factor,
                            persistent_workers=cfg.persistent_workers,
                            pin_memory=cfg.pin_memory)
    except ValueError as err:
        raise ConfigError("batch_size", str(err)) from None


class TrainingStopped(RuntimeError):
    """The run ended before `steps` for a reason the command line reports in one line: the
    --on-nonfinite stop policy, the fp16 scale floor, Ctrl-C, a stuck or dead rank, a full disk,
    out of memory. Files in out_dir are as the last completed step left them."""


def train(config):
    """Train per `config` (a TrainConfig); returns a RunResult. Bad fields raise ConfigError;
    a run that had to end early raises TrainingStopped (its message is one line).

    Seeds the global torch / numpy / python RNGs with config.seed (the run owns them). Under
    torchrun it creates the process group with a timeout of `dist_timeout_s` (and destroys it
    at the end); if a group already exists (a test's launcher), it uses that one as it is."""
    rank, world, local_rank = _distributed_env()
    restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restarts.isdigit() and int(restarts) > 0 and not config.resume:
        # torchrun --max-restarts N restarted the workers after one died: continue from the
        # last checkpoint (same flags, no edits). --overwrite must not wipe the run now.
        config = dataclasses.replace(config, resume=True, overwrite=False)
        if rank == 0:
            print(f"torchrun restart {restarts}: resuming from the last checkpoint")
    validate_config(config, world)
    own_group = world > 1 and not _dist_ready()
    if own_group:  # torchrun set the environment; we create (and later destroy) the group
        backend = "nccl" if resolve_device(config, local_rank).type == "cuda" else "gloo"
        try:
            _init_process_group(backend, datetime.timedelta(seconds=config.dist_timeout_s),
                                int(restarts) if restarts.isdigit() else 0)
        except RuntimeError as err:  # includes the store's timeout: a rank never arrived
            raise TrainingStopped(f"rank {rank}: the {world} processes did not meet within "
                                  f"--dist-timeout-s {config.dist_timeout_s:g} "
                                  f"({_first_line(err)})") from None
    try:
        return _train(config, rank, world, local_rank)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _init_process_group(backend, timeout, restarts):
    """torchrun's env:// group. After an elastic restart torchrun's store still holds the dead
    attempt's addresses under the same keys (gloo would dial the dead ranks): each attempt gets
    its own key prefix in the same store."""
    if restarts == 0:
        torch.distributed.init_process_group(backend, timeout=timeout)
        return
    store, rank, world = next(torch.distributed.rendezvous("env://", timeout=timeout))
    store = torch.distributed.PrefixStore(f"minitrain/attempt{restarts}", store)
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world,
                                         timeout=timeout)


def _first_line(err):
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def _load_data(cfg):
    """All token ids and their (train, val) split; every problem is a ConfigError naming the
    flag (--data, --cache-dir, --seq-len)."""
    try:
        mode = "memmap" if cfg.loader == "dataloader" else cfg.loader  # workers share pages
        tokens = load_dataset(cfg.data, mode=mode, cache_dir=cfg.cache_dir,
                              max_bytes=cfg.corpus_bytes)
        train_data, val_data = split_tokens(tokens, cfg.val_fraction)
    except ValueError as err:
        raise ConfigError("data", str(err)) from None
    except OSError as err:  # the cache folder is a file, read-only, or the disk is full
        raise ConfigError("cache_dir", f"cannot write the token cache ({err.strerror or err}: "
                          f"{err.filename}); choose another --cache-dir") from None
    if min(len(train_data), len(val_data)) <= cfg.seq_len:
        raise ConfigError("seq_len", f"{cfg.seq_len} is too long for this data: the train/val "
                          f"splits have {len(train_data)}/{len(val_data)} tokens; use more data")
    return tokens, train_data, val_data


def _make_loss_fn(cfg):
    """lm_loss, plus PaLM's z-loss when cfg.z_loss > 0; returns (loss_fn, z_parts) where
    z_parts collects (z, counted targets) per micro-batch to log the z-loss on its own."""
    if not cfg.z_loss:
        return lm_loss, None
    from minitrain.stability import z_loss
    z_parts = []

    def loss_fn(output, y):
        z = z_loss(output[0], weight=cfg.z_loss, targets=y)
        z_parts.append((float(z.detach()), int((y != IGNORE_INDEX).sum())))
        return lm_loss(output, y) + z

    return loss_fn, z_parts


def _prepare_out_dir(cfg, out_dir, metrics_path, ckpt_path, start_step, resuming, say):
    """Rank 0's first change on disk, after every check: stale temp files go, metrics.jsonl is
    cut back to the checkpoint (resume) or the previous run's files are removed (--overwrite,
    or --resume of a run that never checkpointed). Returns the metrics records kept."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ckpt.RUN_FILES:
        remove_stale_temp_files(out_dir, name)
    if resuming:
        try:
            records = ckpt.truncate_metrics(metrics_path, start_step)
        except ValueError as err:
            raise ConfigError("resume", str(err)) from None
        say(f"resumed from {ckpt_path} at step {start_step}")
        return records
    if cfg.resume:
        say(f"no checkpoint in {out_dir}: starting from step 0")
    for name in ckpt.RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    return []


def _train(cfg, rank, world, local_rank):
    t_start = time.perf_counter()
    is_main = rank == 0
    say = print if (is_main and cfg.log_every > 0) else (lambda *a, **k: None)
    warn = print if is_main else (lambda *a, **k: None)  # events: printed whatever log_every
    device = resolve_device(cfg, local_rank)
    out_dir = pathlib.Path(cfg.out_dir)
    metrics_path, ckpt_path = out_dir / "metrics.jsonl", out_dir / "checkpoint.pt"
    tokens, train_data, val_data = _load_data(cfg)
    try:  # nothing in out_dir changes before data and settings are known to be good
        ckpt.check_out_dir(out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    except ValueError as err:
        raise ConfigError("out_dir", str(err)) from None
    data_print = fingerprint(tokens)

    # --- set-up: every choice is made once, here -------------------------------------------
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    mode = choose_parallel_mode(cfg, rank, world)  # single / DDP / ZeRO-1 / ZeRO-2 / FSDP
    precision = choose_precision(cfg.precision, device)  # fp32 / bf16 / fp16 + GradScaler
    model = mode.prepare_model(build_model(cfg, device))  # build_model seeds torch first
    optimizer = build_optimizer(model, cfg, device, say, mode=mode)
    scheduler = build_scheduler(optimizer, cfg)  # --schedule; counts optimizer steps
    sampler = np.random.default_rng(cfg.seed)  # draws every training batch (ram / memmap)
    batches = _batch_source(cfg, train_data, sampler, rank, world)  # --loader, chosen once
    spikes = SpikeDetector(threshold=cfg.spike_threshold) if cfg.spike_threshold else None
    loss_fn, z_parts = _make_loss_fn(cfg)

    start_step, records, state = 0, [], None
    resuming = cfg.resume and ckpt_path.is_file()
    if resuming:
        try:
            state = ckpt.load_checkpoint(ckpt_path, map_location=device)
        except ckpt.CheckpointError as err:
            raise ConfigError("resume", str(err)) from None
        ckpt.check_resumable(state, cfg, world, data_print)
        mode.load_state_dict(model, optimizer, state)
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"], sampler)
        try:
            batches.load_state_dict(state.get("loader"))  # DataLoader: epoch and position
        except ValueError as err:
            raise ConfigError("resume", str(err)) from None
        if spikes is not None and state.get("spikes"):
            spikes.load_state_dict(state["spikes"])
        start_step = int(state["step"])
    failure = None
    try:
        records = _prepare_out_dir(cfg, out_dir, metrics_path, ckpt_path, start_step,
                                   resuming, say) if is_main else []
    except ConfigError as err:
        failure = err
    except OSError as err:  # e.g. made read-only between the check and now
        failure = ConfigError("out_dir", f"cannot write {err.filename} ({err.strerror}); "
                              "choose another --out-dir")
    if mode.max(1.0 if failure else 0.0) > 0:  # every rank stops together, none waits forever
        raise failure or ConfigError("out_dir", "rank 0 could not prepare it (see its message)")
    last_good = None
    if cfg.on_nonfinite == "rollback":
        last_good = ckpt.Snapshot(start_step, state or mode.state_dict(model, optimizer),
                                  precision)
    state = None  # the loaded checkpoint is not needed any more

    train_model = mode.wrap_model(torch.compile(model) if cfg.compile else model)  # DDP here

    profiler = StepProfiler(device, enabled=cfg.profile > 0 and is_main)

    def forward(x):  # what accumulate_gradients calls as model(x)
        with profiler.phase("forward"), precision.autocast():
            return train_model(x)

    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.accum_steps * world
    # MFU: against this device's MEASURED peak at the run's dtype (cached per machine); rank 0
    # measures, the others wait in the all-reduce. One device per rank: world x the peak.
    fpt = flops_per_token(dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, seq_len=cfg.seq_len))
    peak_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # (measuring draws random matrices: the run's RNG must not depend on the cache)
        peak = mode.max(peak_flops(peak_dtype, device=device) if is_main else 0.0) * world
    window = None
    if cfg.profile and is_main:
        window = ProfileWindow(out_dir, profiler, start=start_step + PROFILE_WARMUP,
                               steps=cfg.profile, tokens_per_step=tokens_per_step,
                               flops_per_token=fpt, peak_flops=peak,
                               peak_bandwidth=peak_bandwidth(device=device) * world)
    extra = {"world_size": world, "data": data_print, "batches": batches}
    say(f"world size {world} | per rank {cfg.batch_size} sequences x {cfg.accum_steps} "
        f"micro-batches | global batch {cfg.batch_size * cfg.accum_steps * world} sequences x "
        f"{cfg.seq_len} = {tokens_per_step:,} tokens/step | loader {cfg.loader} | "
        f"{type(mode).__name__}")
    bar = None
    if cfg.progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start_step, unit="step", dynamic_ncols=True)
        say = bar.write if cfg.log_every > 0 else say
        warn = bar.write

    # --- the loop: the same lines for every parallel mode and precision ----------------------
    model.train()
    step_tps, step, saved = [], start_step, start_step if resuming else None
    try:
        with open(metrics_path, "a") if is_main else contextlib.nullcontext() as metrics_file:
            for step in range(start_step, cfg.steps):
                if window is not None:
                    window.begin(step)
                t0 = time.perf_counter()
                n_micro = micro_batches_at(step, cfg)  # accum_steps (or the --batch-warmup ramp)
                with profiler.phase("data"):
                    micro = _draw_micro_batches(batches, n_micro, device)
                if z_parts is not None:
                    z_parts.clear()
                with profiler.phase("forward_backward"):  # "forward" nests inside it
                    loss = accumulate_gradients(forward, micro, loss_fn, scaler=precision.scaler,
                                                no_sync=mode.no_sync)  # sync on the last backward
                with profiler.phase("communication"):
                    mode.after_backward(optimizer)  # every rank holds its averaged gradient (part)
                scale = precision.loss_scale()
                with profiler.phase("clip"):
                    precision.unscale_(optimizer)  # true gradients before measuring/clipping them
                    norm = mode.clip(params, cfg.clip_norm)  # the norm BEFORE clipping
                local_loss, loss = loss, mode.mean(loss)  # the same number on every rank
                z = None
                if z_parts is not None:  # log the language-model loss and the z-loss apart
                    n = sum(c for _, c in z_parts)
                    z = mode.mean(sum(v * c for v, c in z_parts) / n)
                    loss -= z
                lr = optimizer.param_groups[0]["lr"]  # the lr this step uses
                event = _judge(loss + (z or 0.0), norm, precision, spikes)  # before the step
                action = None if event is None else cfg.on_nonfinite
                if event is None:
                    with profiler.phase("optimizer"):
                        skipped = precision.step(optimizer)  # fp16: skipped on an inf/nan grad
                else:
                    precision.drop(optimizer)  # never step on it
                    skipped = True
                    if action == "rollback":
                        last_good.restore(mode, model, optimizer, precision, scheduler)
                if precision.below_floor(cfg.min_loss_scale):
                    event, action = "fp16 scale floor", "stop"
                scheduler.step()  # also after a skipped step: the schedule counts steps
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = mode.max(time.perf_counter() - t0)  # the slowest rank's time
                step_tokens = cfg.batch_size * cfg.seq_len * n_micro * world
                tps = step_tokens / dt
                step_tps.append(tps)
                record = {"step": step, "loss": _finite(loss), "lr": lr,
                          "grad_norm": _finite(norm),
                          "clipped": bool(cfg.clip_norm is not None and math.isfinite(norm)
                                          and norm > cfg.clip_norm),
                          "skipped": bool(skipped), "scale": scale, "tokens_per_s": tps,
                          "mfu": mfu(tps, fpt, peak),
                          "peak_mem_bytes": peak_memory_bytes(device),
                          "event": event, "action": action}
                if cfg.batch_warmup_steps:
                    record["micro_batches"], record["tokens"] = n_micro, step_tokens
                if cfg.log_ranks:  # each rank's own loss and data: the shards differ
                    record["rank_losses"] = mode.gather(local_loss)
                    record["rank_token_sums"] = [int(v) for v in mode.gather(
                        float(sum(int(x.sum()) for x, _ in micro)))]
                if world > 1:  # memory per rank: sharding shows here
                    record["peak_mem_bytes_ranks"] = [int(b) for b in
                                                      mode.gather(record["peak_mem_bytes"])]
                if z is not None:
                    record["z_loss"] = _finite(z)
                if action == "rollback":
                    record["rollback_to"] = last_good.step
                if event == "fp16 scale floor":
                    record["scale_after"] = precision.loss_scale()  # below the floor
                last = step == cfg.steps - 1
                if action != "stop" and ((step + 1) % cfg.eval_every == 0 or last):
                    with profiler.phase("eval"):
                        val_loss = evaluate(model, val_data, cfg, device, rank=rank, world=world)
                    record["val_loss"] = _finite(val_loss)
                records.append(record)  # every rank keeps them (same numbers: all-reduced)
                if is_main:
                    append_jsonl(metrics_file, record)  # flushed: a kill loses nothing
                    if event is not None:
                        warn(_event_line(record, cfg))
                    if cfg.log_every and (step % cfg.log_every == 0 or last
                                          or "val_loss" in record):
                        say(format_log_line(record, dt))
                        if cfg.log_ranks:
                            tokens_rank = cfg.batch_size * cfg.seq_len * n_micro
                            for r, (rl, ts) in enumerate(zip(record["rank_losses"],
                                                             record["rank_token_sums"])):
                                say(f"  rank {r} | loss {rl:.4f} | {tokens_rank:,} tokens | "
                                    f"sum of token ids {ts:,}")
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                if action == "stop":
                    raise TrainingStopped(_stop_message(record, cfg, saved))
                profiler.step()
                if window is not None:
                    window.end(step)
                    if window.done and step == window.stop - 1:
                        say(f"profile: {out_dir / 'profile.md'}, trace {out_dir / 'trace.json'}")
                if (step + 1) % cfg.checkpoint_every == 0 or last:
                    state = _save(ckpt_path, cfg, step + 1, model, optimizer, scheduler,
                                  precision, sampler, mode, {**extra, "spikes": spikes}, is_main)
                    saved = step + 1 if mode.can_checkpoint else saved
                    if last_good is not None:
                        last_good = ckpt.Snapshot(step + 1, state, precision)
    except KeyboardInterrupt:
        raise TrainingStopped(f"interrupted at step {step}; "
                              f"{_resume_hint(saved)}") from None
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise TrainingStopped(f"out of memory at step {step} ({_first_line(err)}); use a smaller "
                              f"--batch-size (--accum-steps keeps the batch); "
                              f"{_resume_hint(saved)}") from None
    except OSError as err:  # ENOSPC, a folder made read-only mid-run, ...
        raise TrainingStopped(f"cannot write {err.filename or out_dir} at step {step} "
                              f"({err.strerror or err}); free space or choose another "
                              f"--out-dir; {_resume_hint(saved)}") from None
    except RuntimeError as err:
        if isinstance(err, TrainingStopped):
            raise
        if "alloc" in str(err).lower():
            raise TrainingStopped(f"out of memory at step {step} ({_first_line(err)}); use a "
                                  f"smaller --batch-size; {_resume_hint(saved)}") from None
        if world > 1:  # gloo/nccl: a peer stopped answering within the timeout, or died
            raise TrainingStopped(f"rank {rank}: a collective failed at step {step} "
                                  f"(a stuck or dead rank; waited at most --dist-timeout-s "
                                  f"{cfg.dist_timeout_s:g}): {_first_line(err)}; "
                                  f"{_resume_hint(saved)}") from None
        raise
    finally:
        if window is not None:
            window.close()  # a run that stopped inside the profiled window leaves no mode on
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
        world_size=world,
        events=[(r["step"], r["event"], r["action"]) for r in records if r.get("event")])


def format_log_line(record, dt):
    """`step 120 | loss 2.3100 | lr 6.0e-04 | norm 0.91 | 412 ms | 9,950 tok/s` (+ val/skip)."""
    line = (f"step {record['step']} | loss {_num(record['loss'], '.4f')} | lr {record['lr']:.1e}"
            f" | norm {_num(record['grad_norm'], '.2f')} | {dt * 1000:.0f} ms"
            f" | {record['tokens_per_s']:,.0f} tok/s")
    if record.get("z_loss") is not None:
        line += f" | z {record['z_loss']:.2e}"
    if "val_loss" in record:
        line += f" | val {_num(record['val_loss'], '.4f')}"
    if record.get("event"):
        line += f" | {record['event']}: {record['action']}"
    elif record["skipped"]:
        line += " | skipped (inf/nan gradient)"
    return line


def _save(path, cfg, next_step, model, optimizer, scheduler, precision, sampler, mode, extra,
          is_main):
    """Checkpoint after `next_step` completed steps; every rank takes part in gathering and in
    the finiteness check (so all ranks stop together). Returns the model/optimizer state."""
    state = mode.state_dict(model, optimizer)  # {"model", "optimizer"}: a collective for ZeRO
    bad = ckpt.nonfinite_tensors(state)
    if bad:
        raise TrainingStopped(f"step {next_step - 1} left {len(bad)} non-finite tensor(s) "
                              f"(first: {bad[0]}); nothing was written and the previous "
                              "checkpoint is kept; try a lower --max-lr or --clip-norm")
    if mode.can_checkpoint and is_main:
        spikes = extra.get("spikes")
        payload = {"format": ckpt.FORMAT, "step": next_step, "config": dataclasses.asdict(cfg),
                   **state, "scheduler": scheduler.state_dict(),
                   "scaler": precision.state_dict(), "rng": ckpt.rng_state(sampler),
                   "world_size": extra["world_size"], "data": extra["data"],
                   "loader": extra["batches"].state_dict(),
                   "spikes": spikes.state_dict() if spikes is not None else None}
        ckpt.save_checkpoint(path, payload)
    return state


# --- command line -------------------------------------------------------------------------------

def main(argv=None):
    """The command line: every failure is ONE stderr line (rank 0 speaks for all ranks, except
    a rank that saw a peer fail, which names itself) and a non-zero exit code."""
    args = build_parser().parse_args(argv)
    prog = "python -m minitrain.train"
    is_main = os.environ.get("RANK", "0") == "0"

    def error(text):
        if is_main or text.startswith("rank "):
            print(f"{prog}: {text}", file=sys.stderr)

    try:
        result = train(TrainConfig(**vars(args)))
    except ConfigError as err:
        flag = "--" + err.field.replace("_", "-")
        if err.field == "world_size":
            flag = "WORLD_SIZE"
        error(f"error: {flag}: {err.reason}")
        return 2
    except TrainingStopped as err:
        error(str(err))
        return 130 if str(err).startswith("interrupted") else 1
    except KeyboardInterrupt:  # during set-up: nothing in out_dir was changed yet
        error("interrupted before the first step; nothing was written")
        return 130
    if is_main:
        print(f"done: {result.steps_run} steps | final loss {_num(result.final_loss, '.4f')} | "
              f"val loss {_num(result.final_val_loss, '.4f')} | {result.tokens_per_s:,.0f} "
              f"tok/s | {len(result.events)} event(s) | {result.metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
