"""TrainConfig: every knob of the trainer, its validation, and its command-line flags.

What. One dataclass field per knob, each with a default and a help text; `validate_config` checks
every field before any work starts and raises `ConfigError` (a ValueError) naming the field and
the fix; `build_parser` turns the fields into flags (`max_lr` -> `--max-lr`; booleans get
`--flag/--no-flag`; `--clip-norm none` means None).

Why validate first. A typo found after ten minutes of training (or after the first checkpoint)
wastes the run; a bad value that is silently clamped or ignored makes a comparison lie. So every
bad value stops the program before training with ONE line naming the flag, never a traceback.

Common bug: argparse's `type=bool` turns the string "False" into True (any non-empty string is
truthy); `BooleanOptionalAction` gives `--compile/--no-compile` instead.
"""
import argparse
import dataclasses
import math
import os
import pathlib
from dataclasses import dataclass, field

import numpy as np
import torch

from minitrain.model import ATTENTION_KINDS, GELU_KINDS

CHOICES = {"attention": ATTENTION_KINDS, "gelu": GELU_KINDS,
           "precision": ("fp32", "bf16", "fp16"),
           "loader": ("ram", "memmap", "dataloader"), "batching": ("vectorized", "loop"),
           "zero_stage": (0, 1, 2, 3), "device": ("auto", "cpu", "cuda"),
           "on_nonfinite": ("rollback", "skip", "stop"),
           "optimizer": ("adamw", "lamb", "lars"),
           "schedule": ("cosine", "step", "one-cycle", "constant", "inverse-sqrt")}
# fields that may differ between a run and its --resume (they do not change any number)
# (the recovery policy may change too: resuming after a `stop` with `rollback` is its point)
RESUME_FREE_FIELDS = {"resume", "out_dir", "log_every", "progress", "cache_dir", "overwrite",
                      "dist_timeout_s", "on_nonfinite", "min_loss_scale", "profile",
                      "num_workers", "prefetch_factor", "persistent_workers", "pin_memory",
                      "log_ranks"}


def _opt_float(text):
    return None if str(text).lower() == "none" else float(text)


def _opt_int(text):
    return None if str(text).lower() == "none" else int(text)


def _opt_str(text):
    return None if str(text).lower() == "none" else str(text)


def _f(default, help, **cli):
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    steps: int = _f(200, "optimizer steps")
    batch_size: int = _f(16, "sequences per micro-batch, per rank")
    seq_len: int = _f(128, "tokens per sequence (= the model's block_size)")
    accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    max_lr: float = _f(1e-3, "peak learning rate (after warmup)")
    min_lr: float = _f(1e-4, "learning rate at the end of the cosine")
    warmup_steps: int = _f(20, "linear warmup steps")
    clip_norm: float = _f(1.0, "clip the global grad norm to this ('none' = off)", type=_opt_float)
    weight_decay: float = _f(0.1, "AdamW weight decay (2-D weights only)")
    n_layer: int = _f(4, "transformer blocks")
    n_head: int = _f(4, "attention heads")
    n_embd: int = _f(128, "embedding width")
    attention: str = _f("sdpa", "attention kernel")
    native_layers: bool = _f(True, "nn.LayerNorm/nn.GELU (else the from-scratch ones)")
    gelu: str = _f("tanh", "GELU form: tanh (GPT-2's approximation) or exact (erf)")
    precision: str = _f("fp32", "fp32 | bf16 autocast | fp16 autocast + GradScaler")
    compile: bool = _f(False, "torch.compile the model")
    fused_adamw: bool = _f(False, "fused AdamW kernel (foreach where fused is unsupported)")
    loader: str = _f("ram", "read tokens into RAM, memory-map the file, or torch's DataLoader "
                     "over fixed windows sharded by DistributedSampler")
    batching: str = _f("vectorized", "vectorized gather or the Python loop")
    zero_stage: int = _f(0, "ZeRO stage (needs torchrun, >1 process)")
    activation_checkpointing: bool = _f(False, "recompute each block in backward")
    data: str = _f(None, "a UTF-8 text file or a uint16 token .bin ('none' = default corpus)",
                   type=_opt_str)
    eval_every: int = _f(50, "evaluate every N steps (and at the last step)")
    eval_iters: int = _f(10, "validation batches per evaluation")
    checkpoint_every: int = _f(50, "write checkpoint.pt every N steps (and at the end)")
    seed: int = _f(0, "seed for init, sampling and dropout")
    out_dir: str = _f("outputs/run", "where metrics.jsonl and checkpoint.pt go")
    resume: bool = _f(False, "continue from out_dir/checkpoint.pt")
    # -- beyond the fields every minitrain trainer has --
    val_fraction: float = _f(0.1, "held-out fraction (the last part of the token stream)")
    corpus_bytes: int = _f(None, "use only the first N bytes of the default corpus", type=_opt_int)
    dropout: float = _f(0.0, "dropout probability")
    log_every: int = _f(10, "print a log line every N steps (0 = never)")
    progress: bool = _f(False, "show a tqdm progress bar")
    device: str = _f("auto", "auto = cuda if available, else cpu")
    cache_dir: str = _f(None, "where pretokenized data is cached ('none' = .cache/minitrain)",
                        type=_opt_str)
    # -- failures and recovery (see the module docstring of minitrain.train) --
    on_nonfinite: str = _f("rollback", "what a non-finite loss/grad norm or a loss spike does: "
                           "rollback to the last good checkpoint | skip the step | stop")
    spike_threshold: float = _f(None, "a loss above this x the median of the last 50 is a spike "
                                "('none' = off)", type=_opt_float)
    z_loss: float = _f(0.0, "weight of PaLM's z-loss, mean(logsumexp(logits)^2) (0 = off)")
    min_loss_scale: float = _f(1.0, "fp16: the run ends when the GradScaler's scale falls below")
    overwrite: bool = _f(False, "replace the run already in out_dir (else refused unless --resume)")
    dist_timeout_s: float = _f(300.0, "seconds a collective may wait for a stuck or dead rank")
    # -- the DataLoader path (--loader dataloader) and per-rank logging --
    num_workers: int = _f(0, "DataLoader worker processes (0 = load in the training process)")
    prefetch_factor: int = _f(None, "batches each worker loads ahead ('none' = torch's default, "
                              "2; needs --num-workers >= 1)", type=_opt_int)
    persistent_workers: bool = _f(False, "keep DataLoader workers alive between epochs")
    pin_memory: bool = _f(False, "DataLoader copies batches into pinned memory (CUDA only)")
    log_ranks: bool = _f(False, "print every rank's loss and tokens at each log line")
    # -- optimizer, schedule, batch-size warmup --
    optimizer: str = _f("adamw", "adamw | lamb | lars (minitrain.large_batch)")
    schedule: str = _f("cosine", "lr schedule over steps: cosine (warmup + cosine) | step | "
                       "one-cycle | constant | inverse-sqrt (each after --warmup-steps)")
    batch_warmup_steps: int = _f(0, "ramp the micro-batches per step linearly from 1 to "
                                 "--accum-steps over N steps (0 = off)")
    profile: int = _f(0, "profile this many steps after 3 warm-up steps: out_dir/trace.json + "
                      "profile.md (0 = off)")


class ConfigError(ValueError):
    """A bad TrainConfig field; `.field` names it (the CLI turns it into `--flag-name`)."""

    def __init__(self, field_name, reason):
        super().__init__(f"{field_name}: {reason}")
        self.field, self.reason = field_name, reason


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate_config(cfg, world_size=1):
    """Raise ConfigError (a ValueError) naming the first bad field; returns None if all is fine."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(cfg).__name__}")
    for name in ("steps", "batch_size", "seq_len", "accum_steps", "n_layer", "n_head", "n_embd",
                 "eval_every", "eval_iters", "checkpoint_every"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 1:
            raise ConfigError(name, f"must be an int >= 1, got {v!r}")
    for name in ("warmup_steps", "seed", "log_every", "profile", "num_workers",
                 "batch_warmup_steps"):
        v = getattr(cfg, name)
        if not _is_int(v) or v < 0:
            raise ConfigError(name, f"must be an int >= 0, got {v!r}")
    for name, lo in (("max_lr", 0.0), ("min_lr", 0.0), ("weight_decay", 0.0)):
        v = getattr(cfg, name)
        bad_type = isinstance(v, bool) or not isinstance(v, (int, float))
        if bad_type or not math.isfinite(v) or v < lo or (name == "max_lr" and v == 0):
            relation = ">" if name == "max_lr" else ">="
            raise ConfigError(name, f"must be a finite number {relation} 0, got {v!r}")
    if cfg.min_lr > cfg.max_lr:
        raise ConfigError("min_lr", f"must be <= max_lr ({cfg.max_lr}), got {cfg.min_lr}")
    if cfg.profile and cfg.steps < cfg.profile + 3:
        raise ConfigError("profile", f"needs steps >= profile + 3 warm-up steps, got steps="
                          f"{cfg.steps}, profile={cfg.profile}: raise --steps or lower --profile")
    if cfg.warmup_steps > cfg.steps:
        raise ConfigError("warmup_steps", f"must be <= steps ({cfg.steps}), got {cfg.warmup_steps}")
    if cfg.clip_norm is not None and (isinstance(cfg.clip_norm, bool) or not isinstance(
            cfg.clip_norm, (int, float)) or not cfg.clip_norm > 0 or math.isinf(cfg.clip_norm)):
        raise ConfigError("clip_norm",
                          f"must be a finite number > 0 or None (off), got {cfg.clip_norm!r}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError("n_head", f"must divide n_embd ({cfg.n_embd}), got {cfg.n_head}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(name, f"must be one of {', '.join(map(str, allowed))}; "
                              f"got {getattr(cfg, name)!r}")
    for name in ("native_layers", "compile", "fused_adamw", "activation_checkpointing", "resume",
                 "progress", "overwrite", "persistent_workers", "pin_memory", "log_ranks"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(name, f"must be True or False, got {getattr(cfg, name)!r}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError("val_fraction", f"must be in (0, 1), got {cfg.val_fraction!r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError("dropout", f"must be in [0, 1), got {cfg.dropout!r}")
    if cfg.corpus_bytes is not None and (not _is_int(cfg.corpus_bytes) or cfg.corpus_bytes < 1):
        raise ConfigError("corpus_bytes", f"must be an int >= 1 or None, got {cfg.corpus_bytes!r}")
    if cfg.data is not None and cfg.corpus_bytes is not None:
        raise ConfigError("corpus_bytes", "only cuts the default corpus and would be ignored with "
                          "--data; drop it (or cut the file itself)")
    for name, lo, allow_none in (("spike_threshold", 1.0, True), ("z_loss", 0.0, False),
                                 ("min_loss_scale", 0.0, False), ("dist_timeout_s", 0.0, False)):
        v = getattr(cfg, name)
        if v is None and allow_none:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                v <= lo if name != "z_loss" else v < lo):
            relation = ">=" if name == "z_loss" else ">"
            raise ConfigError(name, f"must be a finite number {relation} {lo:g}"
                              f"{' or None (off)' if allow_none else ''}, got {v!r}")
    need, have = activation_bytes(cfg, world_size), _physical_memory_bytes()
    if have and need > have:
        one = activation_bytes(dataclasses.replace(cfg, batch_size=1), world_size) > have
        fix = ("a smaller --seq-len" if one else
               "a smaller --batch-size (--accum-steps keeps the batch)")
        raise ConfigError("seq_len" if one else "batch_size",
                          f"{cfg.batch_size} sequences x {cfg.seq_len} tokens need about "
                          f"{need / 2**30:.0f} GiB of activations, more than this machine's "
                          f"{have / 2**30:.0f} GiB; use {fix}")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("overwrite", "contradicts --resume (continue the run in out_dir or "
                          "replace it: pick one)")
    if cfg.data is not None and not pathlib.Path(cfg.data).is_file():
        raise ConfigError("data", f"file {cfg.data!r} does not exist (None = the default corpus)")
    if not isinstance(cfg.out_dir, (str, os.PathLike)) or not str(cfg.out_dir):
        raise ConfigError("out_dir", f"must be a non-empty path, got {cfg.out_dir!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but torch.cuda.is_available() is False")
    if cfg.zero_stage > 0 and world_size == 1:
        raise ConfigError("zero_stage", "ZeRO shards state across processes: launch with "
                          "torchrun --nproc_per_node 2 -m minitrain.train ... "
                          "(plain python runs ONE process)")
    if cfg.loader != "dataloader":
        for name in ("num_workers", "prefetch_factor", "persistent_workers", "pin_memory"):
            if getattr(cfg, name) not in (0, None, False):
                raise ConfigError(name, "only applies to --loader dataloader; add it or drop "
                                  f"--{name.replace('_', '-')}")
    if cfg.num_workers == 0 and (cfg.prefetch_factor is not None or cfg.persistent_workers):
        name = "prefetch_factor" if cfg.prefetch_factor is not None else "persistent_workers"
        raise ConfigError(name, "needs worker processes: add --num-workers 1 (or more)")
    if cfg.prefetch_factor is not None and (not _is_int(cfg.prefetch_factor)
                                            or cfg.prefetch_factor < 1):
        raise ConfigError("prefetch_factor", f"must be an int >= 1 or None, got "
                          f"{cfg.prefetch_factor!r}")
    if cfg.batch_warmup_steps > cfg.steps:
        raise ConfigError("batch_warmup_steps", f"must be <= steps ({cfg.steps}), got "
                          f"{cfg.batch_warmup_steps}")
    if cfg.batch_warmup_steps and cfg.accum_steps < 2:
        raise ConfigError("batch_warmup_steps", "ramps the micro-batches per step up to "
                          "--accum-steps: set --accum-steps >= 2 (the full batch)")
    if cfg.optimizer != "adamw" and cfg.zero_stage == 3:
        raise ConfigError("optimizer", f"{cfg.optimizer} is not wired into zero_stage 3 (FSDP "
                          "builds AdamW over its shards): use --optimizer adamw or zero_stage <= 2")
    if cfg.optimizer != "adamw" and cfg.fused_adamw:
        raise ConfigError("fused_adamw", f"is AdamW's kernel; --optimizer {cfg.optimizer} has "
                          "none: drop --fused-adamw")
    if cfg.compile and cfg.zero_stage == 3:
        raise ConfigError("compile", "not supported with zero_stage 3 (FSDP): drop --compile")


def activation_bytes(cfg, world_size=1):
    """A rough upper estimate of one micro-batch's memory: the (B*W, T+1) int64 index of the
    global batch, ~34 fp32 values per token per layer per channel, and 3 fp32 (B, T, 256)
    logit-sized tensors. Only meant to refuse absurd sizes before the allocator does."""
    tokens = cfg.batch_size * cfg.seq_len
    return (8 * cfg.batch_size * world_size * (cfg.seq_len + 1)
            + 4 * tokens * (34 * cfg.n_layer * cfg.n_embd + 3 * 256))


def _physical_memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return 0


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; we print one line, no traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _OneLineParser(prog="python -m minitrain.train",
                            description="Train the tiny GPT (see the module docstring).")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = {"default": f.default, "help": f"{f.metadata['help']} (default: {f.default})"}
        if isinstance(f.default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = f.metadata.get("type", type(f.default))
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
        parser.add_argument(flag, **kw)
    return parser


