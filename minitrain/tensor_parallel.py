"""Tensor parallelism (Megatron-LM): split every big matmul's weight over N ranks.

What: each of N ranks keeps 1/N of a layer's weight and computes 1/N of its work; a few
all-reduces stitch the pieces together so every rank ends with the unsharded layer's result.
    ColumnParallelLinear  Y = X A,  A = [A_0 | ... | A_{N-1}] split by OUTPUT features:
                          rank r holds A_r (out/N rows of nn.Linear.weight), computes Y_r = X A_r
                          x (B, T, in) replicated -> y_r (B, T, out/N), a slice of Y
    RowParallelLinear     Z = Y B,  B split by INPUT features (rows of B): rank r holds B_r
                          (in/N columns of nn.Linear.weight); Z = sum_r Y_r B_r (an all-reduce)
                          y_r (B, T, in/N) -> partial z_r (B, T, out) -> all-reduce -> Z
Because GELU is elementwise, GELU(X A)_r = GELU(X A_r): the column -> row pair computes
    linear2(act(linear1(x))) = all_reduce_r( act(x A_r) B_r ) + b2
with no communication between the two matmuls.

Why: data parallelism and ZeRO split the batch and the state, but every rank still runs whole
layers. When one layer is too big (or too slow) for one device, split the layer itself.

The two conjugate operators (autograd.Functions), the only places that communicate:
    f  (before a column layer): forward identity,   backward all-reduce (the grad of x)
    g  (after a row layer):     forward all-reduce, backward identity
x is used by all N shards, so its gradient is the SUM of the N partial gradients (f's backward);
Z is the sum of the partial outputs (g's forward) and each partial output's gradient is just dZ.
Hence one all-reduce forward (g) and one backward (f) per column -> row pair; Y_r stays local.
Everything outside the pairs (LayerNorm, residual, position embedding) is replicated: every rank
computes it on the same full tensors and gets the same gradients, so those need no all-reduce.

The GPT, per rank (B, T, C; n_head heads; N ranks; vocab V), built from these layers by
`parallelize_gpt` (it lives in minitrain/tensor_parallel_gpt.py with ParallelSelfAttention,
TensorParallelGPT, gather_full, comm_bytes_per_rank and the torch DTensor reference; all of them
still import from here):
    wte     VocabParallelEmbedding  rows [r V/N, (r+1) V/N): out-of-shard tokens give 0, then g
    attn    c_attn column-parallel BY HEADS: rank r keeps the q, k and v rows of heads
            [r nh/N, (r+1) nh/N) (`num_chunks=3`: a plain contiguous split of the fused qkv
            weight would hand rank 0 all of q and half of k), attention runs on its nh/N heads,
            y (B, T, C/N); c_proj row-parallel -> g
    mlp     c_fc column-parallel (B, T, 4C/N), GELU, c_proj row-parallel -> g
    lm_head column-parallel, its weight IS the wte shard (the tie survives: same rows, same
            Parameter), logits shard (B, T, V/N); never gathered:
    loss    vocab_parallel_cross_entropy: all-reduce MAX of the row max, all-reduce SUM of
            sum exp(l - max), all-reduce SUM of the target's logit (only its owner has it, the
            others add 0): loss = log(sum_exp) - target_logit. Backward needs no communication:
            d loss / d l_shard = softmax_shard - onehot_shard (over the counted positions).
Communication per step, with D = B*T*C elements (all-reduce = ring: 2(N-1)/N * D * bytes sent):
    per block: 2 all-reduces of D forward (attn g, mlp g), 2 backward (attn f, mlp f)
    embedding: 1 of D forward; head: 1 of D backward; loss: 3 of B*T (V/C times less than
    gathering the (B, T, V) logits would cost).
`comm_bytes_per_rank(...)` computes it; lesson 19 counts it from the real calls.
Memory: every block's weight is 1/N per rank; LayerNorms, wpe and the row biases are replicated.

When it helps: layers too big for one GPU, inside a node (NVLink): 4 all-reduces of the
activations per block per step are much more traffic than DDP's one gradient all-reduce.

Common bug: the fused qkv split (above), and adding the row layer's bias on every rank before
the all-reduce (it gets counted N times); here the bias is added once, after g.
Never a hang: every collective runs in the caller's process group and inherits its timeout
(`init_process_group(timeout=...)`, which minitrain.distributed_utils.launch sets); a dead peer
makes gloo raise at once ("Connection closed by peer").
Limits: dropout must be 0 (dropout inside the split region needs a per-rank RNG, Megatron's
"model-parallel RNG tracker"); the returned logits are this rank's vocabulary shard.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _rank_world(group):
    if not dist.is_initialized():
        raise ValueError("tensor parallelism needs torch.distributed initialised: launch with "
                         "torchrun --nproc_per_node N (or minitrain.distributed_utils.launch)")
    return dist.get_rank(group), dist.get_world_size(group)


def _divisible(name, value, world, fix):
    if value % world != 0:
        raise ValueError(f"{name} ({value}) must be divisible by the world size ({world}): {fix}")


def _all_gather_cat(x, dim, group, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _CopyToParallel(torch.autograd.Function):  # f
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # never edit autograd's buffer
        dist.all_reduce(grad, group=ctx.group)  # x fed all N shards: sum their gradients
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):  # g
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)  # sum of the N partial outputs
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):  # forward all-gather, backward keep own slice
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.world = group, *_rank_world(group)
        ctx.size = x.size(-1)
        return _all_gather_cat(x, -1, group, ctx.world)

    @staticmethod
    def backward(ctx, grad):
        return grad.narrow(-1, ctx.rank * ctx.size, ctx.size).contiguous(), None


class _ScatterLastDim(torch.autograd.Function):  # forward keep own slice, backward all-gather
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, (rank, ctx.world) = group, _rank_world(group)
        size = x.size(-1) // ctx.world
        return x.narrow(-1, rank * size, size).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_cat(grad, -1, ctx.group, ctx.world), None


def copy_to_parallel(x, group=None):
    """f: identity forward, all-reduce of the gradient backward."""
    return _CopyToParallel.apply(x, group)


def reduce_from_parallel(x, group=None):
    """g: all-reduce forward, identity backward."""
    return _ReduceFromParallel.apply(x, group)


def _shard_rows(t, rank, world, num_chunks):
    """Rank r's rows of t (dim 0 = num_chunks equal chunks, e.g. q, k, v; each split in N)."""
    k, n = num_chunks, t.size(0) // (num_chunks * world)
    return t.reshape(k, world, n, *t.shape[1:])[:, rank].reshape(k * n, *t.shape[1:])


def _unshard_rows(parts, num_chunks):
    """Inverse of _shard_rows: a list of N rank shards -> the full tensor in the original order."""
    k, n = num_chunks, parts[0].size(0) // num_chunks
    stacked = torch.stack([p.reshape(k, n, *p.shape[1:]) for p in parts], dim=1)  # (k, N, n, ...)
    return stacked.reshape(k * len(parts) * n, *parts[0].shape[1:])


class ColumnParallelLinear(nn.Module):
    """nn.Linear split by output features: weight (out/N, in), bias (out/N,) on each rank."""

    def __init__(self, in_features, out_features, *, bias=True, gather_output=False,
                 num_chunks=1, group=None, dtype=None):
        super().__init__()
        self.rank, self.world = _rank_world(group)
        _divisible("out_features", out_features, self.world * num_chunks,
                   f"pick out_features divisible by world size x num_chunks ({num_chunks})")
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.num_chunks, self.group = gather_output, num_chunks, group
        local = out_features // self.world
        self.weight = nn.Parameter(torch.empty(local, in_features, dtype=dtype))  # (out/N, in)
        self.bias = nn.Parameter(torch.zeros(local, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear, *, gather_output=False, group=None, num_chunks=1):
        """This rank's output rows of `linear` (all ranks must hold the same `linear`)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                gather_output=gather_output, num_chunks=num_chunks, group=group,
                dtype=linear.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(_shard_rows(linear.weight, m.rank, m.world, num_chunks))
            if m.bias is not None:
                m.bias.copy_(_shard_rows(linear.bias, m.rank, m.world, num_chunks))
        return m

    def forward(self, x):  # x: (..., in) replicated
        y = F.linear(copy_to_parallel(x, self.group), self.weight, self.bias)  # (..., out/N)
        if not self.gather_output:
            return y
        full = _GatherLastDim.apply(y, self.group)  # (..., out), rank-major
        k, n = self.num_chunks, y.size(-1) // self.num_chunks  # back to chunk-major (q|k|v)
        return full.unflatten(-1, (self.world, k, n)).transpose(-3, -2).flatten(-3)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features} (local {self.weight.size(0)}), "
                f"gather_output={self.gather_output}, num_chunks={self.num_chunks}")


class RowParallelLinear(nn.Module):
    """nn.Linear split by input features: weight (out, in/N), full bias added once after g."""

    def __init__(self, in_features, out_features, *, bias=True, input_is_parallel=True,
                 group=None, dtype=None):
        super().__init__()
        self.rank, self.world = _rank_world(group)
        _divisible("in_features", in_features, self.world, "pick in_features divisible by it")
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.group = input_is_parallel, group
        self.weight = nn.Parameter(torch.empty(out_features, in_features // self.world,
                                               dtype=dtype))  # (out, in/N)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear, *, input_is_parallel=True, group=None):
        """This rank's input columns of `linear` (all ranks must hold the same `linear`)."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                input_is_parallel=input_is_parallel, group=group, dtype=linear.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(_shard_rows(linear.weight.t(), m.rank, m.world, 1).t())
            if m.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x):  # x: (..., in/N), or (..., in) replicated when not input_is_parallel
        if not self.input_is_parallel:
            x = _ScatterLastDim.apply(x, self.group)  # (..., in/N)
        z = reduce_from_parallel(F.linear(x, self.weight), self.group)  # (..., out) full sum
        return z if self.bias is None else z + self.bias

    def extra_repr(self):
        return (f"in={self.in_features} (local {self.weight.size(1)}), out={self.out_features}, "
                f"input_is_parallel={self.input_is_parallel}")


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding split by vocabulary rows: rank r holds ids [r V/N, (r+1) V/N)."""

    def __init__(self, num_embeddings, embedding_dim, *, group=None, dtype=None):
        super().__init__()
        self.rank, self.world = _rank_world(group)
        _divisible("num_embeddings (vocab_size)", num_embeddings, self.world,
                   "pad the vocabulary to a multiple of it (Megatron pads to 128 x N)")
        self.num_embeddings, self.group = num_embeddings, group
        local = num_embeddings // self.world
        self.vocab_start, self.vocab_end = self.rank * local, (self.rank + 1) * local
        self.weight = nn.Parameter(torch.empty(local, embedding_dim, dtype=dtype))  # (V/N, C)

    @classmethod
    def from_embedding(cls, emb, *, group=None):
        if not isinstance(emb, nn.Embedding) or emb.padding_idx is not None or emb.max_norm:
            raise ValueError("emb must be a plain nn.Embedding (no padding_idx, no max_norm)")
        m = cls(emb.num_embeddings, emb.embedding_dim, group=group, dtype=emb.weight.dtype)
        with torch.no_grad():
            m.weight.copy_(emb.weight[m.vocab_start:m.vocab_end])
        return m

    def forward(self, idx):  # idx: (B, T) int64, replicated
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.num_embeddings):
            raise ValueError(f"idx must be in [0, {self.num_embeddings}), got "
                             f"[{idx.min().item()}, {idx.max().item()}]")
        outside = (idx < self.vocab_start) | (idx >= self.vocab_end)  # (B, T) not my rows
        local = (idx - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B,T,C)
        return reduce_from_parallel(out, self.group)  # exactly one rank contributed each row


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index, reduction):
        rank, world = _rank_world(group)
        v_local = logits.size(-1)
        start = rank * v_local
        lg = logits.reshape(-1, v_local)  # (M, V/N), M = B*T positions
        t = targets.reshape(-1)  # (M,)
        row_max = lg.max(dim=-1).values  # (M,) softmax is shift-invariant: no grad through it
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        exp = (lg - row_max.unsqueeze(1)).exp_()  # (M, V/N), every entry <= 1
        sum_exp = exp.sum(dim=-1)  # (M,)
        dist.all_reduce(sum_exp, group=group)
        counted = t != ignore_index
        mine = counted & (t >= start) & (t < start + v_local)  # this rank owns the target
        local_t = (t - start).masked_fill(~mine, 0)
        target_logit = (lg.gather(1, local_t.unsqueeze(1)).squeeze(1) - row_max) * mine
        dist.all_reduce(target_logit, group=group)  # only the owner added a non-zero
        per_pos = (sum_exp.log() - target_logit).masked_fill(~counted, 0.0)  # (M,)
        count = counted.sum()
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(1)), local_t, mine, counted, count)
        ctx.reduction, ctx.shape = reduction, logits.shape
        if reduction == "none":
            return per_pos.view(targets.shape)
        return per_pos.sum() / count if reduction == "mean" else per_pos.sum()

    @staticmethod
    def backward(ctx, grad_out):
        softmax, local_t, mine, counted, count = ctx.saved_tensors  # softmax: (M, V/N)
        grad = softmax.clone()
        rows = torch.arange(grad.size(0))
        grad[rows, local_t] -= mine.to(grad.dtype)  # softmax - onehot, on this shard only
        weight = counted.to(grad.dtype)  # (M,) ignored positions get no gradient
        if ctx.reduction == "none":
            weight = weight * grad_out.reshape(-1)
        else:
            weight = weight * (grad_out / count if ctx.reduction == "mean" else grad_out)
        return (grad * weight.unsqueeze(1)).view(ctx.shape), None, None, None, None


def vocab_parallel_cross_entropy(logits_shard, targets, *, group=None, ignore_index=-100,
                                 reduction="mean"):
    """F.cross_entropy over the FULL vocabulary, from this rank's (..., V/N) logits shard.
    `targets` (...) holds global ids in [0, V) or `ignore_index`; reduction mean | sum | none."""
    _, world = _rank_world(group)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if targets.shape != logits_shard.shape[:-1]:
        raise ValueError(f"targets must have shape {tuple(logits_shard.shape[:-1])} (logits "
                         f"without the vocab dim), got {tuple(targets.shape)}")
    vocab = logits_shard.size(-1) * world
    real = targets[targets != ignore_index]
    if real.numel() and (real.min() < 0 or real.max() >= vocab):
        raise ValueError(f"targets must be in [0, {vocab}) or {ignore_index}, got "
                         f"[{real.min().item()}, {real.max().item()}]")
    return _VocabParallelCrossEntropy.apply(logits_shard, targets, group, ignore_index, reduction)


# ---- the whole GPT split lives in minitrain/tensor_parallel_gpt.py; its names import from here
_GPT_NAMES = ("ParallelSelfAttention", "TensorParallelGPT", "parallelize_gpt", "gather_full",
              "comm_bytes_per_rank", "qkv_rank_order", "torch_parallelize_gpt", "torch_gather_full")


def __getattr__(name):
    """`from minitrain.tensor_parallel import parallelize_gpt` still works: the GPT part is
    loaded on first use (PEP 562), so the two files never import each other in a circle."""
    if name in _GPT_NAMES:
        from minitrain import tensor_parallel_gpt
        return getattr(tensor_parallel_gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_GPT_NAMES])
