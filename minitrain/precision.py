"""Precision objects: the one choice of number format the trainer's loop asks everything of.

What. `choose_precision(precision, device)` returns, once at start-up,
- `FullPrecision` for fp32, or bf16 autocast (bf16 has fp32's exponent range: no scaling), or
- `ScaledFp16` for fp16 autocast + minitrain's GradScaler,
and the loop calls the same methods whatever it got:

    with precision.autocast(): loss = lm_loss(model(x), y)   # bf16/fp16 matmuls
    accumulate_gradients(..., scaler=precision.scaler)        # fp16: backward of loss * scale
    precision.unscale_(optimizer)                             # true gradients before clipping
    skipped = precision.step(optimizer)                       # fp16: inf/nan -> skip, halve scale

Why one object. Without it every line of the loop grows an `if fp16:` branch, and the common
fp16 bug (clipping or logging scaled gradients) hides between them.

Formula (fp16): backward of loss * S gives S * g; unscale_ divides by S (a reciprocal rounded
to fp32) and looks for inf/nan; a step with inf/nan is skipped and S halved, else S doubles
after `growth_interval` clean steps (`minitrain.grad_scaler`).

When it helps: fp16 on GPUs without bf16; bf16 where it exists (no scaler, same range as fp32).

Common bug: clipping before `unscale_` (the threshold then applies to S * g and means nothing),
or asking "was this step skipped?" by comparing scales (asked of the scaler instead:
`GradScaler.last_step_skipped`).
"""
import contextlib

import torch

from minitrain.grad_scaler import GradScaler

__all__ = ["autocast_context", "FullPrecision", "ScaledFp16", "choose_precision"]


def autocast_context(precision, device):
    """torch.autocast for bf16/fp16 on `device`'s type; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(torch.device(device).type, dtype=dtype)


class FullPrecision:
    """fp32, or bf16 autocast: bf16 has fp32's exponent range, so gradients need no scaling."""

    scaler = None  # what accumulate_gradients multiplies each loss by before backward

    def __init__(self, precision, device):
        self.precision, self.device = precision, device

    def autocast(self):
        return autocast_context(self.precision, self.device)

    def loss_scale(self):
        return 1.0

    def unscale_(self, optimizer):
        """Turn the gradients back into true gradients (nothing to do without a scaler)."""

    def step(self, optimizer):
        """optimizer.step(); returns whether the step was skipped."""
        optimizer.step()
        return False

    def drop(self, optimizer):
        """End a step without updating (the trainer caught a non-finite loss or a spike)."""

    def below_floor(self, floor):
        return False  # no scale, no floor

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


class ScaledFp16(FullPrecision):
    """fp16 autocast + minitrain's GradScaler: the loss is multiplied by the scale before
    backward, gradients are unscaled before they are measured, and a step whose gradients hold
    inf/nan is skipped (the scaler says so: `last_step_skipped`) and the scale halved."""

    def __init__(self, precision, device):
        super().__init__(precision, device)
        self.scaler = GradScaler()

    def loss_scale(self):
        return self.scaler.get_scale()

    def unscale_(self, optimizer):
        self.scaler.unscale_(optimizer)

    def step(self, optimizer):
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.last_step_skipped

    def drop(self, optimizer):
        self.scaler.update()  # it still learns from this step's inf check (and may back off)

    def below_floor(self, floor):
        """The scale fell below `floor`: even unscaled, the fp16 gradients overflow."""
        return self.scaler.get_scale() < floor

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state)


def choose_precision(precision, device):
    return (ScaledFp16 if precision == "fp16" else FullPrecision)(precision, device)
