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
the only checkpoint is now garbage. We write `checkpoint.pt.<random>.tmp` in the same directory,
fsync it, then `os.replace` it over the old one: POSIX rename is atomic, so at every moment the
path holds either the previous complete checkpoint or the new complete one.

Why weights_only. `torch.load` of an untrusted pickle can run arbitrary code; `weights_only=True`
only rebuilds tensors, dicts, lists, tuples, str, int, float, bool and None. So the checkpoint
holds only those (the config as a plain dict, RNG states as tensors/lists/ints).

Common bug: resuming the metrics file by appending. The steps between the last checkpoint and the
kill were logged but are re-run after resume, so they would appear twice; we cut them first.
"""
import json
import os
import pathlib
import random
import tempfile

import numpy as np
import torch


def _atomic_replace(path, write_fn, mode="wb"):
    """Call write_fn(file) on a temp file next to `path`, fsync, then atomically rename it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temp_files(directory, name):
    """Delete `<name>.*.tmp` left behind by a run killed in the middle of an atomic write."""
    for stale in pathlib.Path(directory).glob(f"{name}.*.tmp"):
        stale.unlink(missing_ok=True)


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


def save_checkpoint(path, payload):
    """torch.save(payload) to `path` atomically (temp file + fsync + os.replace)."""
    _atomic_replace(path, lambda f: torch.save(payload, f))


def load_checkpoint(path, map_location="cpu"):
    """torch.load(path, weights_only=True): only tensors and plain containers/scalars inside."""
    return torch.load(path, map_location=map_location, weights_only=True)


def read_metrics(path):
    """The JSON records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    path = pathlib.Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path, next_step):
    """Keep only records with step < next_step (those the checkpoint covers), atomically.

    Returns the kept records. Raises ValueError if a step in [0, next_step) has no record, since
    then "exactly one line per step" cannot be restored.
    """
    kept = [r for r in read_metrics(path) if isinstance(r, dict) and r.get("step", -1) < next_step]
    steps = [r["step"] for r in kept]
    if steps != list(range(next_step)):
        raise ValueError(
            f"{path} does not hold exactly one line for each of steps 0..{next_step - 1} that the "
            "checkpoint covers; it was edited or deleted. Start a fresh run without --resume")
    text = "".join(json.dumps(r) + "\n" for r in kept)
    _atomic_replace(path, lambda f: f.write(text), mode="w")
    return kept
