"""Gradient accumulation: the gradient of a big batch, computed a few micro-batches at a time.

What: instead of one forward/backward on a batch of B sequences (which may not fit in memory),
run K smaller micro-batches and let `.backward()` *add* their gradients into `.grad` before one
optimizer step. Memory is set by the micro-batch; the update is the big batch's.

The formula. The loss we want is the mean over every counted target of the whole batch
(targets equal to -100 are ignored, as in `F.cross_entropy(ignore_index=-100)`):

    L = (1/N) * sum_{all counted targets t} loss_t,       N = sum_k n_k
      = sum_k (n_k / N) * L_k,                            L_k = micro-batch k's mean loss

so micro-batch k is backpropagated with weight n_k / N, where n_k is its number of counted
targets. Gradients are linear, hence sum_k grad((n_k/N) L_k) = grad(L): exactly the full-batch
gradient (up to float summation order).

Why "divide by accum_steps" is wrong in general: the common recipe backpropagates L_k / K. That
equals the weights n_k / N only when every micro-batch has the same number of counted targets.
With a short last micro-batch, padded sequences, or different numbers of ignored (-100) targets,
the targets of small micro-batches get too much weight (each of their tokens counts more than a
token of a full micro-batch), and the result is no longer the gradient of any batch's mean loss.
Lesson 06 measures the difference.

When it helps: whenever the batch you want does not fit in memory; it trades time (K sequential
passes) for memory. It is also the default "more batch" knob in DDP: pass `no_sync=ddp.no_sync`
and micro-batches 0..K-2 run inside it (gradients only add up locally), so only the last
backward pays for the all-reduce, once for the whole sum.

Common bugs: zeroing the gradients inside the accumulation loop (keeps only the last
micro-batch); stepping the optimizer every micro-batch; forgetting the 1/K (or n_k/N) weight, so
the gradient is K times too large (clipping then hides it, Adam partly hides it, SGD does not);
counting `total_steps` of the lr schedule in micro-batches instead of optimizer steps.

This function neither zeroes gradients nor steps: the caller owns the loop.
"""
import contextlib

import torch

__all__ = ["accumulate_gradients", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def accumulate_gradients(model, micro_batches, loss_fn, *, scaler=None, no_sync=None):
    """Backpropagate each micro-batch with weight n_k / N; return the mean loss over the batch.

    micro_batches: iterable of (x, y); y holds targets, IGNORE_INDEX (-100) where not counted.
    loss_fn(model(x), y): that micro-batch's mean loss over its counted targets (a 0-dim tensor).
    scaler: optional GradScaler; each weighted loss goes through `scaler.scale(...)` before
    backward (the gradients are then scaled; unscale them before clipping).
    no_sync: optional callable returning a context manager (e.g. `DDP.no_sync`); the forward and
    backward of every micro-batch but the last run inside it.
    """
    micro_batches = list(micro_batches)           # two passes: count first, then backward
    if not micro_batches:
        raise ValueError("micro_batches is empty: pass at least one (x, y) pair")
    counts = []
    for k, mb in enumerate(micro_batches):
        if not (isinstance(mb, (tuple, list)) and len(mb) == 2):
            raise ValueError(f"micro_batches[{k}] must be an (x, y) pair, got {type(mb).__name__}")
        counts.append(int((mb[1] != IGNORE_INDEX).sum()))
    total = sum(counts)                           # N: counted targets in the whole batch
    if total == 0:
        raise ValueError("micro_batches has no counted target (all are -100): nothing to learn from")
    last = max(k for k, n_k in enumerate(counts) if n_k > 0)  # the backward that synchronises
    mean_loss = 0.0
    for k, ((x, y), n_k) in enumerate(zip(micro_batches, counts)):
        if n_k == 0:
            continue                              # its mean loss is nan (0/0); its weight is 0
        local = no_sync is not None and k < last
        with no_sync() if local else contextlib.nullcontext():
            loss_k = loss_fn(model(x), y)         # () mean over this micro-batch's counted targets
            weighted = loss_k * (n_k / total)     # () its share of the full-batch mean
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
        mean_loss += float(loss_k.detach()) * n_k / total
    return mean_loss
