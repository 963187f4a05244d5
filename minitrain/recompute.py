"""Activation checkpointing (recomputation) from scratch: trade compute for memory.

What: `y = checkpoint(function, *args)` computes `function(*args)` WITHOUT recording the graph
(under torch.no_grad), so none of the intermediate activations inside `function` are kept - only
the inputs `args`. In backward it runs `function(*args)` a second time with grad enabled, which
rebuilds exactly those activations, and backpropagates the incoming gradient through them.

Why: in a transformer most memory during training is activations (every Block stores its
LayerNorm outputs, q/k/v, attention probabilities, the 4C-wide MLP hidden...). Checkpointing every
Block keeps one (B, T, C) tensor per Block instead, at the price of one extra forward pass
(about +33% compute: forward 1x, backward 2x, recomputation 1x).

The formula is the chain rule, unchanged: dL/dargs = (d function / d args)^T dL/dy; only WHEN the
local Jacobian's ingredients exist differs. Gradients are therefore equal to running without
checkpointing (bit for bit on CPU in practice, same operations in the same order).

Randomness: dropout inside `function` must drop the SAME units in the recomputation, or the
gradient belongs to a different network. So the RNG state (CPU, and CUDA for CUDA inputs) is
saved before the first run and restored, inside torch.random.fork_rng so the global stream is
left untouched, before the second. Autocast state is replayed the same way.

When it helps: memory-bound training (long T, big batch, deep model) where a larger batch or
longer context is worth ~1/3 more compute. It never makes a step faster.

Common bugs: (1) forgetting the RNG state -> dropout masks differ -> silently wrong gradients;
(2) the classic "reentrant" pitfall: if no input requires grad (e.g. the first block's input is
a plain tensor), the autograd Function's output does not require grad and the parameters inside
get no gradient at all - we pass a dummy tensor that requires grad to prevent it; (3) this
reentrant design accumulates parameter grads with torch.autograd.backward, so use loss.backward(),
not torch.autograd.grad, through a checkpointed region.
"""
import torch


def _autocast_states():
    """(device_type, enabled, dtype) for cpu and (if present) cuda, to replay in backward."""
    states = []
    for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        states.append(
            (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        )
    return states


class CheckpointFunction(torch.autograd.Function):
    """forward: run under no_grad, save inputs + RNG state. backward: restore, re-run, backprop."""

    @staticmethod
    def forward(ctx, function, _requires_grad_anchor, *args):
        ctx.function = function
        ctx.cpu_rng_state = torch.get_rng_state()
        ctx.cuda_devices = sorted(
            {a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda}
        )
        ctx.cuda_rng_states = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        ctx.autocast_states = _autocast_states()
        # Tensors go through save_for_backward (version-checked); everything else is kept as is.
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        ctx.other_args = [None if isinstance(a, torch.Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        with torch.no_grad():
            outputs = function(*args)  # intermediates are freed as soon as they are used
        return outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        args = list(ctx.other_args)
        for i, saved in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = saved.detach().requires_grad_(saved.requires_grad)  # fresh leaf
        with torch.random.fork_rng(devices=ctx.cuda_devices):
            torch.set_rng_state(ctx.cpu_rng_state)
            for device, state in zip(ctx.cuda_devices, ctx.cuda_rng_states):
                torch.cuda.set_rng_state(state, device)
            with torch.enable_grad():
                autocasts = [
                    torch.autocast(device_type=dev, dtype=dtype, enabled=enabled)
                    for dev, enabled, dtype in ctx.autocast_states
                ]
                for ac in autocasts:
                    ac.__enter__()
                try:
                    outputs = ctx.function(*args)  # the second forward, this time recorded
                finally:
                    for ac in reversed(autocasts):
                        ac.__exit__(None, None, None)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        pairs = [
            (out, grad)
            for out, grad in zip(outputs, grad_outputs)
            if isinstance(out, torch.Tensor) and out.requires_grad and grad is not None
        ]
        if pairs:
            # Parameters inside `function` receive their .grad here (accumulated, as usual).
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = [
            a.grad if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args
        ]
        return (None, None, *input_grads)


def checkpoint(function, *args):
    """Run function(*args) keeping only args; recompute its inside in backward (same RNG state).

    Outside grad mode (evaluation, generation) it simply calls function(*args).
    """
    if not callable(function):
        raise ValueError(f"function must be callable, got {type(function).__name__}")
    if not torch.is_grad_enabled():
        return function(*args)
    # A tensor that requires grad guarantees the output is part of the graph, so backward reaches
    # the parameters inside `function` even when no input requires grad (common bug 2).
    anchor = torch.empty(0, requires_grad=True)
    return CheckpointFunction.apply(function, anchor, *args)
