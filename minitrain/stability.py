"""Training stability: z-loss (PaLM) and a loss-spike detector, with the spike taxonomy.

What: two small tools for the "my loss blew up" moment.
- `z_loss(logits, weight=1e-4, targets=None)`: an auxiliary loss that keeps the softmax
  normalizer log Z = logsumexp(logits) near 0, so the logits cannot drift to huge values.
- `SpikeDetector(window=50, threshold=3.0).update(loss) -> bool`: True when this step's loss is a
  spike (non-finite, or above `threshold` x the median of the recent healthy losses), so the
  training loop can skip the step, roll back, or stop before the damage reaches a checkpoint.

Formula:
    z_loss = weight * mean_i( logsumexp_v(logits[i, v]) ** 2 )   over positions i whose target
                                                                 is not -100 (all i without targets)
    spike(loss) = not isfinite(loss)  or  loss > threshold * median(last `window` healthy losses)

Why z-loss: cross-entropy only sees differences of logits (softmax is shift-invariant), so nothing
stops every logit from drifting up together. Large logits make exp() overflow in fp16 (65504 is
e^11.1) and make bf16's 8-bit mantissa round log Z badly; the drift is a slow fuse for a late
spike. Penalizing (log Z)^2 pins the shift at ~0 for free (PaLM used weight 1e-4). Its gradient
w.r.t. the logits is 2 * weight * logZ * softmax(logits) / n: small while log Z is small.

The spike taxonomy (16-06): the cause, how it looks in loss / grad norm / fp16 scale, the lever.
- LR too high. Loss climbs within a few steps, oscillates, may reach inf/nan; the grad norm grows
  step after step; an fp16 scale falls again and again. Lever: lower max_lr or warm up longer
  (after rolling back to the last good state). Clipping bounds each step but does not cure it:
  AdamW's step is ~lr whatever the gradient's size (lesson 16 measures it).
- Numerical overflow (fp16). Loss inf/nan at one step, healthy before; grad norm inf/nan (the
  scaler's found_inf); the scale halves at each bad step (a scale falling to a floor means the
  forward itself overflows). Lever: the GradScaler skips the step; z-loss keeps logits and log Z
  small; bf16 has fp32's exponent range and needs no scaler.
- Corrupted batch (random ids, one repeated token, a bad shard). An isolated jump in the loss and
  in the grad norm (10-100x typical), back to normal on the next good batch; the fp16 scale is
  unchanged unless the jump overflows. Lever: skip the batch (this detector), or roll back and
  skip it; norm or value clipping limits the damage.
A single bad batch is local in time (skip it); a too-high lr is persistent (skipping only delays
it: lower the lr); an overflow lives in the number format (scale, z-loss, bf16). Value clipping
(`clip.clip_grad_value`) also bounds the step but changes its direction; norm clipping keeps it.

SpikeDetector choices (what a careful practitioner wants, each tested in tests/test_stability.py):
- Spikes are NOT added to the window (finite ones included): the window is the baseline of
  healthy training. Adding them would let a burst of spikes raise the median until the burst
  looks normal. A lasting level shift is therefore flagged at every step: `consecutive` counts
  them so the caller can stop after a few (a persistent spike is a divergence, not noise).
- A finite loss is never a spike before `min_history` healthy losses are known (default 1: the
  first finite loss only sets the baseline); a non-finite loss is always a spike.
- The median (not the mean) is the baseline: one outlier in the window cannot move it much.
- `state_dict()` / `load_state_dict()` let a resumed run continue with the same window.

When it helps: z-loss for long runs, big vocabularies, fp16/bf16; the detector whenever a run is
unattended (never train on, or save, a non-finite model).

Common bugs: averaging the z-loss over ignored (padding, -100) positions, which dilutes it by the
padding fraction; computing logsumexp in fp16 (it overflows exactly where the z-loss matters: we
upcast half/bf16 logits to fp32); a spike detector whose threshold multiplies a mean that the
spike itself already raised; judging a spike before any baseline exists (step 0 has the largest
loss of the run and is not a spike).
"""
import math
import numbers
import statistics
from collections import deque

import torch

__all__ = ["z_loss", "SpikeDetector"]


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)  # int, float, numpy scalars


def z_loss(logits, *, weight=1e-4, targets=None, ignore_index=-100):
    """`weight * mean(logsumexp(logits, -1) ** 2)` over the positions whose target is not ignored.

    logits: (..., V) floating tensor; targets: integer tensor of shape logits.shape[:-1] or None.
    Returns a differentiable 0-dim tensor (float32 for half/bf16 logits, else logits' dtype).
    When every target is `ignore_index` the z-loss is defined as 0 with a zero gradient (never
    nan): no position counts, so there is nothing to penalize. Ignored positions never reach the
    gradient, even if their logits are inf.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        got = ((logits.dtype, tuple(logits.shape)) if isinstance(logits, torch.Tensor)
               else type(logits).__name__)
        raise ValueError(f"logits must be a floating tensor of shape (..., V), got {got}")
    if logits.shape[-1] < 1:
        raise ValueError("logits must have at least one class in its last dimension (V >= 1)")
    if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0 (PaLM used 1e-4), got {weight!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # logsumexp in fp32: fp16 overflows where the z-loss matters
    if targets is None:
        lse = torch.logsumexp(logits, dim=-1)  # (...)
        return weight * (lse ** 2).mean()
    if not isinstance(targets, torch.Tensor) or targets.shape != logits.shape[:-1]:
        got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a tensor of shape {tuple(logits.shape[:-1])} "
                         f"(logits.shape[:-1]), got {got}")
    if targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor of class ids, got {targets.dtype}")
    keep = targets != ignore_index  # (...) bool
    # Ignored rows are replaced by zeros BEFORE logsumexp, so an inf/nan there cannot reach the
    # value or the gradient (masking afterwards would give 0 * inf = nan in backward). No boolean
    # indexing and no .item(): nothing waits for the GPU.
    safe = torch.where(keep.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype,
                                                                device=logits.device))  # (..., V)
    lse = torch.logsumexp(safe, dim=-1)  # (...)
    count = keep.sum().clamp(min=1)  # all ignored: 0 / 1 = 0, with a zero gradient
    return weight * (lse ** 2 * keep).sum() / count


class SpikeDetector:
    """Flags loss spikes: non-finite, or above `threshold` x the median of the last `window`
    healthy (finite, non-spike) losses. See the module docstring for the choices and why.

    Attributes: `losses` (deque of the healthy losses in the window), `n_spikes` (total flagged),
    `consecutive` (spikes in a row up to the last update), `median` (None before any value).
    """

    def __init__(self, window=50, threshold=3.0, *, min_history=1):
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window must be an int >= 1 (how many recent losses form the "
                             f"baseline, e.g. 50), got {window!r}")
        if not _is_number(threshold) or not math.isfinite(threshold) or threshold <= 1:
            raise ValueError(f"threshold must be a finite number > 1 (a spike is a loss above "
                             f"threshold x the median, e.g. 3.0), got {threshold!r}")
        if (not isinstance(min_history, int) or isinstance(min_history, bool)
                or not 1 <= min_history <= window):
            raise ValueError(f"min_history must be an int in [1, window={window}] (healthy "
                             "losses needed before a finite loss can be a spike), got "
                             f"{min_history!r}")
        self.window, self.threshold, self.min_history = window, float(threshold), min_history
        self.losses = deque(maxlen=window)
        self.n_spikes = 0
        self.consecutive = 0

    @property
    def median(self):
        """The baseline: median of the healthy losses in the window (None while it is empty)."""
        return statistics.median(self.losses) if self.losses else None

    def is_spike(self, loss):
        """Would `loss` be a spike now? (Pure: changes nothing.)"""
        loss = _as_float(loss)
        if not math.isfinite(loss):
            return True
        if len(self.losses) < self.min_history:
            return False  # no baseline yet
        return loss > self.threshold * self.median

    def update(self, loss):
        """Judge `loss` (a float or a one-element tensor); healthy losses join the window."""
        spike = self.is_spike(loss)
        if spike:
            self.n_spikes += 1
            self.consecutive += 1
        else:
            self.losses.append(_as_float(loss))
            self.consecutive = 0
        return spike

    def state_dict(self):
        return {"window": self.window, "threshold": self.threshold,
                "min_history": self.min_history, "losses": list(self.losses),
                "n_spikes": self.n_spikes, "consecutive": self.consecutive}

    def load_state_dict(self, state):
        if state.get("window") != self.window:
            raise ValueError(f"state has window={state.get('window')!r} but this detector has "
                             f"window={self.window}; build SpikeDetector(window=...) to match")
        self.threshold, self.min_history = float(state["threshold"]), int(state["min_history"])
        self.losses = deque((float(x) for x in state["losses"]), maxlen=self.window)
        self.n_spikes, self.consecutive = int(state["n_spikes"]), int(state["consecutive"])


def _as_float(loss):
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a number or a one-element tensor, got a tensor of "
                             f"shape {tuple(loss.shape)}; pass loss.item() of the mean loss")
        return float(loss.item())
    if not _is_number(loss):
        raise ValueError(f"loss must be a number or a one-element tensor, got {loss!r}")
    return float(loss)
