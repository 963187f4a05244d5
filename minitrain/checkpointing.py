"""Checkpoints that make a killed run resume bit for bit.

What. `save_checkpoint` writes everything the next step depends on; `load_checkpoint` reads it
back with `torch.load(..., weights_only=True)`; `truncate_metrics` keeps exactly one
`metrics.jsonl` line per step already covered by the checkpoint.

Why each piece. A resumed run reproduces the uninterrupted run's losses exactly (CPU, fp32) only
if *every* input of the next step is restored, not just the weights:
- model weights                        -> the forward pass
- optimizer state (Adam's m, v, step)  -> the update (reset m, v and the first steps jump)
- scheduler counter                    -> the lr (restart warmup and the loss spikes)
- GradScaler scale and growth tracker  -> which fp16 steps are skipped
- the data sampler's numpy Generator   -> which windows the next batches are
- torch / numpy / python RNG states    -> dropout masks and anything else random

Why atomic. `torch.save` straight onto `checkpoint.pt` and a kill halfway leaves a truncated file:
the only checkpoint is now garbage. `minitrain.files.write_atomic` writes
`checkpoint.pt.<random>.tmp` in the same directory, fsyncs it, then `os.replace`s it over the old
one: POSIX rename is atomic, so at every moment the path holds either the previous complete
checkpoint or the new complete one.

Why weights_only. `torch.load` of an untrusted pickle can run arbitrary code; `weights_only=True`
only rebuilds tensors, dicts, lists, tuples, str, int, float, bool and None. So the checkpoint
holds only those (the config as a plain dict, RNG states as tensors/lists/ints).

Why a checksum and a finiteness check. A checkpoint with flipped bytes (a bad disk or copy)
still unpickles; resuming from it changes the optimizer state without a word. `save_checkpoint`
stores a sha256 of every tensor byte and value, `load_checkpoint` recomputes it. And a
checkpoint holding inf/nan weights is never written: it would replace the last good one.

Common bug: resuming the metrics file by appending. The steps between the last checkpoint and the
kill were logged but are re-run after resume, so they would appear twice; we cut them first.
"""
import copy
import hashlib
import json
import os
import pathlib
import random

import numpy as np
import torch

from minitrain.files import read_jsonl, write_atomic
from minitrain.train_config import RESUME_FREE_FIELDS, ConfigError


def rng_state(sampler_rng):
    """Every RNG the training loop touches, as weights_only-safe values."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, gauss)
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
        "sampler": sampler_rng.bit_generator.state,  # dict of str/int (128-bit ints are fine)
    }


def set_rng_state(state, sampler_rng):
    """Inverse of `rng_state`: restores the global RNGs and the sampler Generator in place."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    sampler_rng.bit_generator.state = state["sampler"]


FORMAT = 2  # 2: with "checksum"; format 1 (no checksum) still loads
RUN_FILES = ("metrics.jsonl", "checkpoint.pt")  # what makes a folder "another run's"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, foreign, or non-finite."""


def _walk(obj, name=""):
    """(name, leaf) pairs of a nested payload in a fixed order (dicts keep insertion order)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{name}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{name}/{i}")
    else:
        yield name, obj


def payload_checksum(payload):
    """sha256 over every name, tensor byte and value of the payload ("checksum" left out): one
    flipped bit anywhere in a weight or in Adam's state changes it."""
    h = hashlib.sha256()
    for name, leaf in _walk({k: v for k, v in payload.items() if k != "checksum"}):
        h.update(name.encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def nonfinite_tensors(payload, keys=("model", "optimizer")):
    """Names of floating tensors under `keys` holding inf or nan (what must never be saved)."""
    return [name for key in keys for name, leaf in _walk(payload.get(key), key)
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()
            and not bool(torch.isfinite(leaf).all())]


def save_checkpoint(path, payload):
    """torch.save(payload + its checksum) to `path` atomically (temp file + fsync + os.replace).
    Refuses (CheckpointError, nothing written) a payload with a non-finite weight or state."""
    bad = nonfinite_tensors(payload)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {len(bad)} tensor(s) hold inf/nan "
                              f"(first: {bad[0]}); the previous checkpoint is kept")
    payload = {**payload, "checksum": payload_checksum(payload)}
    write_atomic(path, write_fn=lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu"):
    """torch.load(path, weights_only=True), then checks it is a trainer checkpoint whose checksum
    matches; every problem is one CheckpointError naming the file and the cause."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated, zero bytes, not a torch file, unsafe pickle ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first[:120]}); delete it "
                              "or start a fresh run without --resume") from None
    if not isinstance(state, dict) or "format" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a minitrain trainer checkpoint (a bare state_dict "
                              "or another program's file); use a fresh --out-dir")
    if state["format"] >= 2 and state.get("checksum") != payload_checksum(state):
        raise CheckpointError(f"{path} fails its checksum: its bytes changed after it was "
                              "written (disk or copy error); restore it or start a fresh run")
    return state


def check_out_dir(out_dir, *, resume, overwrite):
    """Refuse (ValueError) an out_dir that is a file, is not writable, or already holds another
    run's files unless resume or overwrite says what to do with them. Changes nothing."""
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a folder; choose another --out-dir")
    existing = out_dir
    while not existing.exists():  # the nearest folder that exists must let us create ours
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable; choose another --out-dir")
    found = [n for n in RUN_FILES if (out_dir / n).exists()]
    if found and not (resume or overwrite):
        raise ValueError(f"{out_dir} already holds a run ({', '.join(found)}); pass --resume to "
                         "continue it or --overwrite to replace it (or choose another --out-dir)")


def check_resumable(state, cfg, world, data_print):
    """Refuse (ConfigError, one line) a checkpoint whose numbers this run would silently change:
    other settings, another world size (so another global batch), other token data."""
    changed = sorted(k for k, v in state["config"].items()
                     if k not in RESUME_FREE_FIELDS and getattr(cfg, k, v) != v)
    if changed:
        raise ConfigError(changed[0], f"differs from the checkpoint's config ({changed}); "
                          "resume with the same settings or use a fresh out_dir")
    saved_world = state.get("world_size", world)
    if saved_world != world:
        raise ConfigError("world_size", f"the checkpoint was written by {saved_world} "
                          f"process(es) (a global batch of {saved_world * cfg.batch_size} "
                          f"sequences), this run has {world}: resume with torchrun "
                          f"--nproc_per_node {saved_world}")
    saved_data = state.get("data", data_print)
    if saved_data != data_print:
        old, new = saved_data, data_print
        raise ConfigError("data", f"the token data differ from the checkpoint's "
                          f"({old['tokens']} tokens, sample {old['sample_sha256'][:12]} vs "
                          f"{new['tokens']}, {new['sample_sha256'][:12]}); "
                          "resume on the same data or use a fresh out_dir")


class Snapshot:
    """A copy of the state at the last checkpoint (or the start): what the trainer's
    `--on-nonfinite rollback` returns to (`mode` is a `minitrain.parallel` mode, `precision` the
    trainer's precision object; both only need state_dict / load_state_dict).
    Deep copies both ways: the optimizer would otherwise keep stepping the saved tensors."""

    def __init__(self, step, state, precision):
        self.step = step
        self.state = copy.deepcopy({"model": state["model"], "optimizer": state["optimizer"],
                                    "scaler": precision.state_dict()})

    def restore(self, mode, model, optimizer, precision, scheduler):
        state = copy.deepcopy(self.state)
        mode.load_state_dict(model, optimizer, state)
        precision.load_state_dict(state["scaler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the schedule goes on: the lr is this step's, not the snapshot's


def truncate_metrics(path, next_step):
    """Keep only records with step < next_step (those the checkpoint covers), atomically.

    Returns the kept records. Raises ValueError if a step in [0, next_step) has no record, since
    then "exactly one line per step" cannot be restored.
    """
    kept = [r for r in read_jsonl(path) if isinstance(r, dict) and r.get("step", -1) < next_step]
    steps = [r["step"] for r in kept]
    if steps != list(range(next_step)):
        raise ValueError(
            f"{path} does not hold exactly one line for each of steps 0..{next_step - 1} that the "
            "checkpoint covers; it was edited or deleted. Start a fresh run without --resume")
    text = "".join(json.dumps(r) + "\n" for r in kept)
    write_atomic(path, text)
    return kept
