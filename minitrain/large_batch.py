"""Large batches: scale the learning rate, and give every layer its own step size (LARS, LAMB).

What. A k-times larger batch gives a gradient with k-times less noise, so you can take larger
steps -- but how much larger, and does one global lr suit every layer?
- `scaled_lr(base_lr, base_batch, batch, rule=...)`: the two classic rules.
      linear (Goyal et al. 2017, "ImageNet in 1 hour"):   lr = base_lr * batch / base_batch
      sqrt   (Krizhevsky 2014; Hoffer et al. 2017):       lr = base_lr * sqrt(batch / base_batch)
  Linear keeps "lr x (number of steps)" constant for SGD; sqrt keeps the update's noise variance
  constant and is the usual choice for Adam-type optimizers. Both need warmup at large batch.
- LARS (You, Gitman, Ginsburg 2017) = SGD with momentum whose step is rescaled PER LAYER by a
  trust ratio, so no layer moves by more than a fixed fraction of its own weight norm:
      d      = g + wd * w
      trust  = eta * ||w|| / (||g|| + wd * ||w|| + eps)      (1 if ||w|| or ||g|| is 0)
      buf    = momentum * buf + trust * d                     (buf = trust * d at the first step)
      w     -= lr * buf
- LAMB (You et al. 2019, "76 minutes BERT") = the same idea on top of AdamW:
      m, v   = Adam moments of g;  m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)
      r      = m_hat / (sqrt(v_hat) + eps);   u = r + wd * w
      trust  = ||w|| / ||u||                                  (1 if ||w|| or ||u|| is 0)
      w     -= lr * trust * u
"Per layer" means per parameter tensor here (each weight matrix, each bias).

The reductions the tests prove: with `trust_ratio=False` (trust forced to 1) LARS is exactly
`torch.optim.SGD(momentum=..., weight_decay=...)` and LAMB is exactly `torch.optim.AdamW` (the
same floating-point operations in the same order, so the same bits, step after step).

When it helps: batch sizes far beyond where the linear rule still works (thousands of
sequences); on the tiny GPT here AdamW at moderate batch is hard to beat (lesson 26 measures it).

Common bugs: applying the trust ratio to the whole model at once (it is per layer: one global
ratio is just another lr); dividing by a zero norm (a freshly zero-initialized bias has
||w|| = 0: the ratio must fall back to 1, not become nan or 0 forever); scaling the lr with the
batch but not the warmup (large-batch runs diverge in the first steps without it).
"""
import math

import torch


def scaled_lr(base_lr, base_batch, batch, *, rule="linear"):
    """The learning rate for `batch` given `base_lr` tuned at `base_batch` (rule linear | sqrt)."""
    if not (isinstance(base_lr, (int, float)) and base_lr > 0 and math.isfinite(base_lr)):
        raise ValueError(f"base_lr must be a finite number > 0, got {base_lr!r}")
    for name, value in (("base_batch", base_batch), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    if rule == "linear":
        return base_lr * batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / base_batch)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")


def _check(lr, eps, weight_decay):
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def _ratio(numerator, denominator):
    """numerator / denominator as a 0-dim tensor, 1 where either norm is 0 (no division by 0)."""
    ok = (numerator > 0) & (denominator > 0)
    return torch.where(ok, numerator / torch.where(ok, denominator, 1.0), 1.0)


class LARS(torch.optim.Optimizer):
    """SGD + momentum with a per-layer trust ratio (see the module docstring for the formula)."""

    def __init__(self, params, lr, *, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 eps=1e-8, trust_ratio=True):
        _check(lr, eps, weight_decay)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps,
                                      trust_ratio=trust_ratio))

    @staticmethod
    def trust(w, g, group):
        """eta * ||w|| / (||g|| + wd ||w|| + eps) for one tensor; 1 if a norm is 0."""
        w_norm, g_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(g)
        denom = g_norm + group["weight_decay"] * w_norm + group["eps"]
        return _ratio(group["trust_coefficient"] * w_norm * (g_norm > 0), denom)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"] != 0:
                    d = d.add(p, alpha=group["weight_decay"])  # same op as torch's SGD
                if group["trust_ratio"]:
                    d = d * self.trust(p, p.grad, group)
                state = self.state[p]
                if group["momentum"] != 0:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.detach().clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-group["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """AdamW with a per-layer trust ratio ||w|| / ||update|| (see the module docstring)."""

    def __init__(self, params, lr, *, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 trust_ratio=True):
        _check(lr, eps, weight_decay)
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, trust_ratio=trust_ratio))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.lerp_(g, 1 - beta1)  # m = b1 m + (1 - b1) g, as torch's Adam writes it
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1, bias2_sqrt = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
                denom = (v.sqrt() / bias2_sqrt).add_(group["eps"])  # sqrt(v_hat) + eps
                if not group["trust_ratio"]:  # exactly torch.optim.AdamW's operations
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(m, denom, value=-lr / bias1)
                    continue
                update = (m / bias1) / denom  # r = m_hat / (sqrt(v_hat) + eps)
                if wd != 0:
                    update = update.add(p, alpha=wd)  # u = r + wd w
                ratio = _ratio(torch.linalg.vector_norm(p), torch.linalg.vector_norm(update))
                p.sub_(update * (lr * ratio))
        return loss
