"""Learning-rate warmup + cosine decay, as a pure function of the step and as a scheduler object.

What: the lr rises linearly for `warmup_steps` steps, then follows half a cosine from `max_lr`
down to `min_lr` at `total_steps`, and stays at `min_lr` after that.

Why: at step 0 the weights are random and Adam's second-moment estimates are built from a
handful of gradients, so a full-size step can throw the model into a bad region (a loss spike
it may never recover from). A short linear warmup lets the statistics settle. Late in training a
large lr keeps the loss bouncing around a minimum; the cosine decay shrinks the steps smoothly so
the loss settles lower.

The formula (step counts optimizer steps, starting at 0):

    step <  W:  lr = max_lr * (step + 1) / W
    step >= W:  p  = min(1, (step - W) / max(1, T - W))
                lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * p))

with W = warmup_steps, T = total_steps. The last warmup step (step W-1) reaches max_lr; step W is
max_lr again (cos(0) = 1); step T is exactly min_lr.

It equals PyTorch's `SequentialLR([LinearLR(start_factor=1/W, end_factor=1, total_iters=W-1),
CosineAnnealingLR(T_max=max(1, T-W), eta_min=min_lr)], milestones=[W])` at every step in [0, T]
(the built-in computes the cosine *recursively*, lr_t from lr_{t-1}, so it agrees up to a few
float roundings; this module uses the closed form).

When it helps: almost always for transformers trained with Adam(W); warmup matters most with
large lr, large batches and post-LN models; the decay is worth a few percent of final loss.

Classic bugs this module guards against:
- A miscomputed total step count: T counted in micro-batches (x accum_steps) or in epochs
  instead of optimizer steps. The cosine then barely decays (T too large) or reaches min_lr
  halfway and idles there (T too small). Lesson 03 shows it.
- An lr of 0 on the first step: `max_lr * step / W` wastes step 0 (Adam moves nothing useful,
  and some versions divide by it). Here step 0 already uses max_lr / W.
- A second cosine cycle after the end: `cos(pi * step / T)` keeps oscillating for step > T, so
  the lr climbs back to max_lr. Here p is clamped at 1, so the lr stays at min_lr.
- One-step shifts between course versions: warmup "from 0" (lr_0 = 0), "from max_lr/W"
  (lr_0 = max_lr/W, this module) and "from an initial_lr" (a LinearLR start_factor), and whether
  the scheduler is stepped before or after the first optimizer step. They differ by one step;
  compare two runs only with the same convention. Call `scheduler.step()` AFTER
  `optimizer.step()` (the torch convention): the optimizer's first step then uses lr_0.
- A skipped fp16 step (GradScaler found inf/nan) still advances the schedule, as with the
  built-ins: the schedule is a function of the iteration, not of successful updates.
"""
import math

__all__ = ["warmup_cosine", "set_lr", "WarmupCosine", "step_decay", "one_cycle", "LambdaSchedule",
           "ReduceOnPlateau"]


def _check(step, max_lr, total_steps, warmup_steps, min_lr):
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if max_lr < 0:
        raise ValueError(f"max_lr must be >= 0, got {max_lr}")
    if min_lr < 0:
        raise ValueError(f"min_lr must be >= 0, got {min_lr}")
    if min_lr > max_lr:
        raise ValueError(f"min_lr must be <= max_lr, got min_lr={min_lr} > max_lr={max_lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (count optimizer steps), got {total_steps}")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps} > "
            f"total_steps={total_steps}: lower warmup_steps or raise total_steps"
        )


def warmup_cosine(step, *, max_lr, total_steps, warmup_steps=0, min_lr=0.0):
    """The lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr, then flat."""
    _check(step, max_lr, total_steps, warmup_steps, min_lr)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps       # step 0 -> max_lr / W, never 0
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))  # clamped: one cycle
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(optimizer, lr):
    """Write `lr` into every param group of `optimizer` (what a scheduler does each step)."""
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    for group in optimizer.param_groups:
        group["lr"] = lr


class WarmupCosine:
    """`warmup_cosine` as a scheduler object with the torch call pattern.

        sched = WarmupCosine(opt, total_steps=T, warmup_steps=W, min_lr=m)  # sets lr for step 0
        for step in range(T):
            loss.backward(); opt.step(); opt.zero_grad()
            sched.step()                                                    # lr for step + 1

    `max_lr` of each param group is that group's lr at construction (so groups may have different
    peaks; `min_lr` is shared). Construct it once per optimizer: a second construction on the same
    optimizer would read the already-warmed-down lr as max_lr.
    `last_epoch` is the step whose lr is currently in the optimizer (0 after construction), the
    name torch uses, so the state_dict reads like a torch scheduler's.
    """

    def __init__(self, optimizer, *, total_steps, warmup_steps=0, min_lr=0.0):
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_lr = float(min_lr)
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        for max_lr in self.base_lrs:                     # validate once, with real values
            _check(0, max_lr, self.total_steps, self.warmup_steps, self.min_lr)
        self.last_epoch = -1
        self._last_lr = []
        self.step()                                      # lr for step 0, like torch schedulers

    def lr_at(self, step):
        """The lr of every param group at `step`."""
        return [warmup_cosine(step, max_lr=m, total_steps=self.total_steps,
                              warmup_steps=self.warmup_steps, min_lr=self.min_lr)
                for m in self.base_lrs]

    def step(self):
        """Advance one optimizer step and write the new lr into the optimizer."""
        self.last_epoch += 1
        lrs = self.lr_at(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def get_last_lr(self):
        """The lrs this scheduler last wrote, one per param group."""
        return list(self._last_lr)

    def state_dict(self):
        """Plain Python numbers only (loads with `torch.load(weights_only=True)`)."""
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "_last_lr": list(self._last_lr),
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state_dict):
        """Restore the step and schedule, and write the restored lr back into the optimizer."""
        missing = {"last_epoch", "base_lrs", "total_steps", "warmup_steps", "min_lr"} - set(state_dict)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}: pass WarmupCosine.state_dict()")
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(x) for x in state_dict["base_lrs"]]
        self.total_steps = int(state_dict["total_steps"])
        self.warmup_steps = int(state_dict["warmup_steps"])
        self.min_lr = float(state_dict["min_lr"])
        lrs = self.lr_at(self.last_epoch)
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = list(lrs)


# --- the notebook's other schedules -------------------------------------------------------------
# Each is a pure function of the step (or, for the plateau rule, a small object fed the metric),
# proven equal to its torch scheduler in tests/test_schedules_compared.py. Lesson 27 runs all five.
#   step decay   lr = lr0 * gamma ** (step // step_size)                     (torch StepLR)
#   one-cycle    warm up from max_lr/div to max_lr over pct_start of the run, then anneal to
#                max_lr/(div*final_div)                                      (torch OneCycleLR)
#   lambda       lr = lr0 * fn(step), any function you write                 (torch LambdaLR)
#   plateau      lr *= factor when the metric has not improved for `patience` evaluations
#                                                                            (ReduceLROnPlateau)

def step_decay(step, *, lr, step_size, gamma=0.1):
    """StepLR: the lr is multiplied by gamma every step_size steps."""
    if step < 0 or step_size < 1 or lr < 0 or gamma < 0:
        raise ValueError(f"need step >= 0, step_size >= 1, lr >= 0, gamma >= 0; got step={step}, "
                         f"step_size={step_size}, lr={lr}, gamma={gamma}")
    return lr * gamma ** (step // step_size)


def one_cycle(step, *, max_lr, total_steps, pct_start=0.3, div_factor=25.0,
              final_div_factor=1e4, anneal="cos"):
    """OneCycleLR (two phases): initial = max_lr/div_factor rises to max_lr at step
    pct_start*total_steps - 1, then falls to initial/final_div_factor at step total_steps - 1."""
    if not 0 <= step <= total_steps:
        raise ValueError(f"step must be in [0, total_steps={total_steps}], got {step}")
    if not 0 < pct_start < 1:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
    initial = max_lr / div_factor
    phases = [(float(pct_start * total_steps) - 1, initial, max_lr),
              (total_steps - 1, max_lr, initial / final_div_factor)]
    start = 0.0
    for i, (end, lr_from, lr_to) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            pct = (step - start) / (end - start)
            if anneal == "linear":
                return (lr_to - lr_from) * pct + lr_from
            return lr_to + (lr_from - lr_to) / 2.0 * (math.cos(math.pi * pct) + 1)
        start = end


class LambdaSchedule:
    """Any pure schedule as a scheduler object: lr = base_lr * fn(step) (torch's LambdaLR), with
    the same call pattern as WarmupCosine (lr of step 0 set at construction, .step() after
    optimizer.step())."""

    def __init__(self, optimizer, fn):
        self.optimizer, self.fn = optimizer, fn
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def step(self):
        self.last_epoch += 1
        factor = self.fn(self.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state):
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.last_epoch = int(state["last_epoch"]) - 1
        self.step()


class ReduceOnPlateau:
    """Multiply every group's lr by `factor` when `metric` (lower is better for mode="min") has
    not improved by more than `threshold` (relative or absolute) for more than `patience` calls
    of `.step(metric)`; then wait `cooldown` calls. Never below `min_lr`; changes smaller than
    `eps` are ignored. The rule of torch.optim.lr_scheduler.ReduceLROnPlateau."""

    def __init__(self, optimizer, *, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8):
        if not 0 <= factor < 1:
            raise ValueError(f"factor must be in [0, 1), got {factor}")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"mode must be min|max and threshold_mode rel|abs, got {mode!r}, "
                             f"{threshold_mode!r}")
        self.optimizer, self.mode, self.factor, self.patience = optimizer, mode, factor, patience
        self.threshold, self.threshold_mode, self.cooldown = threshold, threshold_mode, cooldown
        self.min_lr, self.eps = min_lr, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.bad_steps, self.cooldown_left = 0, 0

    def _improved(self, value):
        sign = 1.0 if self.mode == "min" else -1.0  # "max" mode: improving means going up
        if self.threshold_mode == "rel":
            return sign * value < sign * self.best * (1.0 - sign * self.threshold)
        return sign * value < sign * self.best - self.threshold

    def step(self, metric):
        value = float(metric)
        if self._improved(value):
            self.best, self.bad_steps = value, 0
        else:
            self.bad_steps += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_steps = 0  # bad evaluations during the cooldown do not count
        if self.bad_steps > self.patience:
            for group in self.optimizer.param_groups:
                new_lr = max(float(group["lr"]) * self.factor, self.min_lr)
                if group["lr"] - new_lr > self.eps:
                    group["lr"] = new_lr
            self.cooldown_left, self.bad_steps = self.cooldown, 0

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]
