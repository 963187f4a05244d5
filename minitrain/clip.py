"""Gradient clipping: cap the size of an update when a batch produces a huge gradient.

What: treat every gradient of the model as one long vector g. `clip_grad_norm` measures its
p-norm and, if it exceeds `max_norm`, scales every gradient by the same factor so the norm
becomes `max_norm` (the direction is kept). `clip_grad_value` instead clamps each element to
[-clip_value, clip_value] (this changes the direction; rarely used for transformers).

The formula (what `torch.nn.utils.clip_grad_norm_` computes, reproduced exactly):

    per-tensor norms  n_i = ||g_i||_p                     (p = inf: max |g_i|)
    total norm        N   = ||(n_1, ..., n_k)||_p          == ||concat(g_1..g_k)||_p
    coefficient       c   = min(1, max_norm / (N + 1e-6))  (the 1e-6 avoids dividing by 0)
    every gradient    g_i <- c * g_i

Why: one unlucky batch (a rare token, a long repeated string, a bad fp16 step) can produce a
gradient 10-100x the usual size. Adam partly normalizes it away, but the first moment still
carries it for ~1/(1-beta1) steps and the weights jump: a loss spike. Clipping bounds the step.

When it helps: large learning rates, early training, deep or post-LN models; clip_norm = 1.0 is
the common default for LLMs. Too aggressive (max_norm far below the typical norm) turns every
step into a fixed-length step: SGD with a smaller lr in disguise, training slows (lesson 04).

Common bugs:
- Logging the norm *after* clipping (always <= max_norm, so spikes become invisible). Log the
  value these functions return: the norm *before* clipping.
- Clipping scaled fp16 gradients: with a GradScaler, call `scaler.unscale_(optimizer)` first,
  otherwise the norm is 65536x too large and every step is clipped to nothing.
- Clipping each parameter separately (per-tensor norms) instead of the global norm: changes the
  update direction between layers.
- A non-finite norm (inf/nan) scales every gradient by 0 or nan; `error_if_nonfinite=True`
  raises instead. (With a GradScaler the step is skipped anyway.)
"""
import torch

__all__ = ["grad_norm", "clip_grad_norm", "clip_grad_value"]


def _as_list(parameters):
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    return list(parameters)                   # a generator would be exhausted after one pass


@torch.no_grad()
def grad_norm(parameters, norm_type=2.0):
    """The p-norm of all gradients taken as one vector (0-dim tensor); params without .grad skipped."""
    norm_type = float(norm_type)
    grads = [p.grad for p in _as_list(parameters) if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    # The norm of the per-tensor norms equals the norm of the concatenation, for every p
    # (sum_i sum_j |g_ij|^p = sum_i n_i^p; for p = inf, max of maxes), without building the
    # concatenated vector.
    per_tensor = [torch.linalg.vector_norm(g, norm_type) for g in grads]          # k x ()
    first_device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in per_tensor]),
                                    norm_type)                                       # ()


@torch.no_grad()
def clip_grad_norm(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale all gradients in place by min(1, max_norm / (norm + 1e-6)); return the norm BEFORE."""
    parameters = _as_list(parameters)
    max_norm = float(max_norm)
    total_norm = grad_norm(parameters, norm_type)
    if error_if_nonfinite and (total_norm.isnan() or total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return total_norm
    # Multiply even when coef == 1: no data-dependent `if` (on a GPU that would force a sync).
    clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)                 # ()
    for g in grads:
        g.mul_(clip_coef.to(g.device))
    return total_norm


@torch.no_grad()
def clip_grad_value(parameters, clip_value):
    """Clamp every gradient element in place to [-clip_value, clip_value]."""
    clip_value = float(clip_value)
    for p in _as_list(parameters):
        if p.grad is not None:
            p.grad.clamp_(min=-clip_value, max=clip_value)
