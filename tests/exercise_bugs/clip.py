"""A learner's gradient clipping with a classic bug: it returns the norm AFTER clipping.

tests/test_exercises.py copies this file into a workspace and runs `make check NAME=clip` on it:
the report must show the failing property with Hypothesis's minimal counterexample.
"""
import torch


def grad_norm(parameters, norm_type=2.0):
    """The p-norm of all gradients taken as one vector."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.cat(grads), float(norm_type))


@torch.no_grad()
def clip_grad_norm(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale all gradients by min(1, max_norm / (norm + 1e-6))."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    norm = grad_norm(params, norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError("the total norm is non-finite")
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
    return grad_norm(params, norm_type)   # BUG: the norm after clipping hides every spike


@torch.no_grad()
def clip_grad_value(parameters, clip_value):
    """Clamp every gradient element to [-clip_value, clip_value]."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for p in params:
        if p.grad is not None:
            p.grad.clamp_(-clip_value, clip_value)
