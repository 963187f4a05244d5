"""Dynamic loss scaling for fp16 training: PyTorch's GradScaler, rebuilt in plain Python.

What: fp16 represents magnitudes from ~6e-8 (the smallest subnormal) to 65504. Gradients of an
LLM are often 1e-8..1e-5; in fp16 the small ones round to 0 ("underflow": the dead zone below
2^-24 ~ 6e-8, and precision already thins out below 2^-14 ~ 6e-5). Multiply the loss by a large
scale S before backward and, by the chain rule, every gradient is S times larger and lands in
fp16's range; divide the gradients by S ("unscale") before the optimizer uses them.

The dynamics (identical to `torch.amp.GradScaler`):
    scale(loss)   -> loss * S                          S starts at init_scale = 2^16
    unscale_(opt) -> g <- g * (1/S) for every grad;  found_inf = any grad has inf or nan
    step(opt)     -> unscale_ if not done yet; run opt.step() only if not found_inf
                     (a skipped step returns None and leaves the parameters untouched)
    update()      -> found_inf:  S <- S * backoff_factor (0.5), tracker <- 0
                     otherwise:  tracker += 1; if tracker == growth_interval (2000):
                                 S <- S * growth_factor (2.0) unless that overflows fp32,
                                 tracker <- 0
S is kept in float32, as the built-in keeps it in a float32 tensor: each update rounds to fp32.
So S settles just below the largest value that does not overflow: it halves on an overflow and
doubles again after `growth_interval` clean steps, a saw-tooth (animations/gradscaler_dynamics.py).

Per-optimizer state: within one iteration each optimizer is READY -> UNSCALED -> STEPPED, and
`update()` resets all of them. Misuse raises the built-in's errors: `unscale_` twice before
`update` (the second would divide by S twice), `unscale_` after `step`, `step` twice before
`update`; calling `unscale_`/`step`/`update` before any `scale()` is an AssertionError (the scale
is created lazily by the first `scale()`, like the built-in).

When it helps: fp16 autocast (older GPUs, CPU fp16). bf16 has fp32's exponent range, so it needs
no scaler (lesson 05 shows it). On CPU: `with torch.autocast("cpu", dtype=torch.float16): ...`.

Common bugs: clipping before `unscale_` (the norm is S times too large); `unscale_` twice;
stepping the lr schedule only on successful steps (the built-ins advance it anyway, and so does
our trainer: the schedule counts iterations); checkpointing `state_dict()` before `update()`;
reading a skipped step's loss as a real one. Differences from the built-in: bad constructor
arguments raise ValueError (the built-in raises AssertionError); optimizers with
`_step_supports_amp_scaling` (fused Adam) are driven like any other optimizer (we unscale and
skip ourselves rather than passing `grad_scale`/`found_inf` into the fused kernel).
"""
from collections import abc

import numpy as np
import torch

__all__ = ["GradScaler"]

READY, UNSCALED, STEPPED = "ready", "unscaled", "stepped"


def _fp32(x):
    """Round a Python float to the nearest float32 (inf when it overflows), as a Python float."""
    with np.errstate(over="ignore"):
        return float(np.float32(x))


def _fresh_state():
    return {"stage": READY, "found_inf": None}    # found_inf: None until grads were inspected


class GradScaler:
    """Dynamic loss scaler with the API and the exact dynamics of `torch.amp.GradScaler("cpu")`."""

    def __init__(self, init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        self._enabled = bool(enabled)
        if self._enabled:
            if growth_factor <= 1.0:
                raise ValueError(f"growth_factor must be > 1.0, got {growth_factor}")
            if backoff_factor >= 1.0:
                raise ValueError(f"backoff_factor must be < 1.0, got {backoff_factor}")
            if int(growth_interval) < 1:
                raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self._init_scale = float(init_scale)
        self._scale = None                       # float32 value (Python float), created lazily
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._init_growth_tracker = 0
        self._growth_tracker = None              # consecutive clean steps since last change
        self._per_optimizer_states = {}          # id(optimizer) -> {"stage", "found_inf"}
        self.last_step_skipped = False           # extra: did the last step() skip?
        self.skipped_steps = 0                   # extra: how many step() calls skipped so far

    # ---- helpers -------------------------------------------------------------------------
    def _state(self, optimizer):
        return self._per_optimizer_states.setdefault(id(optimizer), _fresh_state())

    def _check_initialized(self, funcname):
        if self._scale is None or self._growth_tracker is None:
            raise AssertionError(
                f"Attempted {funcname} but _scale is None.  This may indicate your script did "
                "not use scaler.scale(loss or outputs) earlier in the iteration.")

    def _scale_tensor(self, device):
        return torch.tensor(self._scale, dtype=torch.float32, device=device)          # ()

    # ---- the API -------------------------------------------------------------------------
    def scale(self, outputs):
        """Multiply a tensor (or nested list/tuple/iterable of tensors) by the current scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, torch.Tensor):
            if self._scale is None:              # lazy init on first use, like the built-in
                self._scale = _fp32(self._init_scale)
                self._growth_tracker = self._init_growth_tracker
            return outputs * self._scale_tensor(outputs.device)
        if isinstance(outputs, abc.Iterable):
            scaled = map(self.scale, outputs)
            return type(outputs)(scaled) if isinstance(outputs, (list, tuple)) else scaled
        raise ValueError("outputs must be a Tensor or an iterable of Tensors")

    @torch.no_grad()
    def _unscale_grads(self, optimizer, inv_scale, allow_fp16):
        """Multiply every grad by inv_scale in place; return 1.0/0.0 found_inf, None if no grads."""
        found_inf = None
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not allow_fp16 and param.grad.dtype == torch.float16:
                    raise ValueError("Attempting to unscale FP16 gradients.")
                if param.grad.is_sparse:
                    if param.grad.dtype is torch.float16:
                        param.grad = param.grad.coalesce()
                    grad = param.grad._values()
                else:
                    grad = param.grad
                bad = not bool(torch.isfinite(grad).all())
                found_inf = max(found_inf or 0.0, 1.0 if bad else 0.0)
                if inv_scale != 1.0:             # inf * (1/S) stays inf: still detected above
                    grad.mul_(torch.tensor(inv_scale, dtype=torch.float32, device=grad.device))
        return found_inf

    def unscale_(self, optimizer):
        """Divide this optimizer's grads by the scale (once per iteration) and look for inf/nan."""
        if not self._enabled:
            return
        self._check_initialized("unscale_")
        state = self._state(optimizer)
        if state["stage"] == UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] == STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inv_scale = _fp32(1.0 / self._scale)     # reciprocal in double, rounded to fp32
        state["found_inf"] = self._unscale_grads(optimizer, inv_scale, allow_fp16=False)
        state["stage"] = UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """Unscale if needed, then `optimizer.step()` unless inf/nan was found (returns None then)."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_initialized("step")
        state = self._state(optimizer)
        if state["stage"] == STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] == READY:
            self.unscale_(optimizer)
        if state["found_inf"] is None:
            raise AssertionError("No inf checks were recorded for this optimizer.")
        retval = None
        self.last_step_skipped = bool(state["found_inf"])
        if self.last_step_skipped:
            self.skipped_steps += 1              # parameters untouched: the update is dropped
        else:
            retval = optimizer.step(*args, **kwargs)
        state["stage"] = STEPPED
        return retval

    def update(self, new_scale=None):
        """End of iteration: back off on inf/nan, grow after growth_interval clean steps."""
        if not self._enabled:
            return
        self._check_initialized("update")
        if new_scale is not None:
            if isinstance(new_scale, torch.Tensor):
                if (new_scale.device.type != "cpu" or new_scale.numel() != 1
                        or new_scale.requires_grad):
                    raise AssertionError(
                        "new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                        "torch.FloatTensor with requires_grad=False.")
                new_scale = new_scale.item()
            self._scale = _fp32(new_scale)       # the tracker is left as it is (as the built-in)
        else:
            found = [s["found_inf"] for s in self._per_optimizer_states.values()
                     if s["found_inf"] is not None]
            if not found:
                raise AssertionError("No inf checks were recorded prior to update.")
            if sum(found) != 0:
                self._scale = _fp32(self._scale * self._backoff_factor)
                self._growth_tracker = 0
            else:
                successful = self._growth_tracker + 1
                if successful == self._growth_interval:
                    grown = _fp32(self._scale * self._growth_factor)
                    if np.isfinite(grown):       # growth that would overflow fp32 is dropped
                        self._scale = grown
                    self._growth_tracker = 0
                else:
                    self._growth_tracker = successful
        self._per_optimizer_states = {}

    def get_scale(self):
        """The current scale as a Python float (1.0 when disabled)."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else self._scale

    def _get_growth_tracker(self):
        if not self._enabled:
            return 0
        return self._init_growth_tracker if self._growth_tracker is None else self._growth_tracker

    @property
    def growth_tracker(self):
        """Consecutive clean (not skipped) iterations since the scale last changed."""
        return self._get_growth_tracker()

    def get_growth_factor(self):
        return self._growth_factor

    def get_backoff_factor(self):
        return self._backoff_factor

    def get_growth_interval(self):
        return self._growth_interval

    def is_enabled(self):
        return self._enabled

    def state_dict(self):
        """The built-in's five keys; {} when disabled. Take it after update()."""
        if not self._enabled:
            return {}
        return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._get_growth_tracker()}

    def load_state_dict(self, state_dict):
        """Restore scale, factors, interval and tracker (a no-op when disabled)."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        self._init_scale = float(state_dict["scale"])
        if self._scale is not None:
            self._scale = _fp32(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._growth_tracker is not None:
            self._growth_tracker = int(state_dict["_growth_tracker"])
