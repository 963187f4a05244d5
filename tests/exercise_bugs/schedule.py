"""A learner's warmup + cosine schedule with a classic bug: the warmup starts at lr 0.

Only warmup_cosine is written so far; the scheduler object is still minitrain's (so only the
properties of warmup_cosine itself can catch the bug).
"""
import math

from minitrain.schedule import WarmupCosine, set_lr  # noqa: F401  not written yet


def warmup_cosine(step, *, max_lr, total_steps, warmup_steps=0, min_lr=0.0):
    """Linear warmup, then cosine to min_lr, then flat."""
    for name, value in (("step", step), ("max_lr", max_lr), ("min_lr", min_lr),
                        ("warmup_steps", warmup_steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0")
    if min_lr > max_lr:
        raise ValueError("min_lr must be <= max_lr")
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    if warmup_steps > total_steps:
        raise ValueError("warmup_steps must be <= total_steps")
    if step < warmup_steps:
        return max_lr * step / warmup_steps          # BUG: step 0 gets lr 0, a wasted step
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
