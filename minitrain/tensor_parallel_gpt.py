"""Tensor parallelism for the whole GPT: minitrain.tensor_parallel's layers, put together.

What: `parallelize_gpt(model)` splits a minitrain GPT in place over the ranks of a process group:
attention by heads (`ParallelSelfAttention`: c_attn column-parallel with `num_chunks=3`, c_proj
row-parallel), the MLP column -> row, the tied embedding / lm_head by vocabulary rows, and the
loss `vocab_parallel_cross_entropy` (`TensorParallelGPT.forward`). `gather_full` un-shards the
parameters or gradients for comparison; `comm_bytes_per_rank` predicts the traffic per step.
The reference: `torch_parallelize_gpt` / `torch_gather_full` do the same split with torch's
DTensor API (`parallelize_module`, ColwiseParallel / RowwiseParallel), for tests, lesson 19 and
the benchmark.

Why a separate file: minitrain/tensor_parallel.py teaches the building blocks (the f / g
operators, the column and row layers, the vocabulary-parallel embedding and loss), and its
docstring explains this file's layout and communication count too. Every name here is still
importable from `minitrain.tensor_parallel` (`from minitrain.tensor_parallel import
parallelize_gpt` keeps working).

Common bug: splitting the fused qkv weight of c_attn contiguously (rank 0 would get all of q and
half of k); `num_chunks=3` here, `qkv_rank_order` for torch's plain contiguous Shard(0).
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from minitrain.model import GPT, CausalSelfAttention
from minitrain.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                       VocabParallelEmbedding, _all_gather_cat, _divisible,
                                       _rank_world, _shard_rows, _unshard_rows,
                                       vocab_parallel_cross_entropy)


class ParallelSelfAttention(nn.Module):
    """Causal self-attention on this rank's n_head/N heads: c_attn (C -> 3C/N, q|k|v of my
    heads), attention, c_proj (C/N -> C, all-reduced). Works with any c_attn/c_proj modules that
    produce those local shapes (minitrain's, or torch's parallelize_module'd nn.Linear)."""

    def __init__(self, c_attn, c_proj, *, n_local_head, head_size, attention="sdpa"):
        super().__init__()
        self.c_attn, self.c_proj = c_attn, c_proj
        self.n_local_head, self.head_size, self.attention = n_local_head, head_size, attention

    @classmethod
    def from_attention(cls, attn, *, group=None):
        if not isinstance(attn, CausalSelfAttention):
            raise ValueError(f"attn must be a CausalSelfAttention, got {type(attn).__name__}")
        _, world = _rank_world(group)
        _divisible("n_head", attn.n_head, world, "pick n_head divisible by the world size")
        return cls(ColumnParallelLinear.from_linear(attn.c_attn, group=group, num_chunks=3),
                   RowParallelLinear.from_linear(attn.c_proj, group=group),
                   n_local_head=attn.n_head // world, head_size=attn.n_embd // attn.n_head,
                   attention=attn.attention)

    def forward(self, x):  # x: (B, T, C) replicated
        B, T, _ = x.shape
        nh, hs = self.n_local_head, self.head_size
        q, k, v = self.c_attn(x).split(nh * hs, dim=2)  # 3 x (B, T, C/N)
        q, k, v = (a.view(B, T, nh, hs).transpose(1, 2) for a in (q, k, v))  # (B, nh/N, T, hs)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            from minitrain import attention as attn_lib

            kernel = attn_lib.naive_attention if self.attention == "naive" else \
                attn_lib.flash_attention
            y = kernel(q, k, v, causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, nh * hs))  # (B, T, C) after g


class TensorParallelGPT(GPT):
    """The GPT after parallelize_gpt: forward returns (logits shard (B, T, V/N), loss)."""

    def forward(self, idx, targets=None):  # idx: (B, T) int64, the same on every rank
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"idx has length {T} > block_size {self.config.block_size}")
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(T, device=idx.device))  # (B, T, C) replicated
        use_recompute = self.config.activation_checkpointing and self.training
        if use_recompute:
            from minitrain.recompute import checkpoint
        for block in tr.h:
            x = checkpoint(block, x) if use_recompute else block(x)  # (B, T, C)
        logits = self.lm_head(tr.ln_f(x))  # (B, T, V/N): this rank's vocabulary shard
        loss = None if targets is None else vocab_parallel_cross_entropy(
            logits, targets, group=self.lm_head.group)
        return logits, loss


def parallelize_gpt(model, *, group=None):
    """Split a minitrain GPT in place over the ranks of `group`; returns the same object.
    Every rank must pass the same weights (e.g. the same seed)."""
    if not isinstance(model, GPT) or isinstance(model, TensorParallelGPT):
        raise ValueError(f"model must be an unsplit minitrain GPT, got {type(model).__name__}")
    cfg = model.config
    _, world = _rank_world(group)
    _divisible("n_head", cfg.n_head, world, "pick n_head divisible by the world size")
    _divisible("vocab_size", cfg.vocab_size, world, "pad the vocabulary to a multiple of it")
    if cfg.dropout > 0:
        raise ValueError(f"dropout must be 0 for parallelize_gpt, got {cfg.dropout} (dropout "
                         "inside the split region needs a per-rank RNG tracker)")
    for block in model.transformer.h:
        block.attn = ParallelSelfAttention.from_attention(block.attn, group=group)
        block.mlp.c_fc = ColumnParallelLinear.from_linear(block.mlp.c_fc, group=group)
        block.mlp.c_proj = RowParallelLinear.from_linear(block.mlp.c_proj, group=group)
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, group=group)
    model.transformer.wte = VocabParallelEmbedding.from_embedding(model.transformer.wte,
                                                                  group=group)
    model.transformer.wte.weight = model.lm_head.weight  # keep the tie: the same shard Parameter
    model.__class__ = TensorParallelGPT  # swap forward (vocab-parallel loss); same parameters
    return model


def gather_full(model, *, grads=False, group=None):
    """{name: full tensor} of every parameter (or its .grad) of a split model, un-sharded with
    all-gathers; names as in the unsplit model. A collective: every rank calls it."""
    _, world = _rank_world(group)
    out, seen = {}, set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            t = (p.grad if grads else p).detach()
            if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
                parts = [torch.empty_like(t) for _ in range(world)]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = _unshard_rows(parts, getattr(mod, "num_chunks", 1))
            elif isinstance(mod, RowParallelLinear) and p_name == "weight":
                t = _all_gather_cat(t, 1, group, world)
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = t.clone()
    return out


def comm_bytes_per_rank(*, batch, seq_len, n_embd, n_layer, world, bytes_per_elem=4):
    """Bytes one rank sends per training step of the split GPT (ring all-reduce: 2(N-1)/N x
    message). Returns {"activations": blocks + embedding + head, "loss": the 3 (B, T) ones}."""
    ring = 2 * (world - 1) / world
    d = batch * seq_len * n_embd * bytes_per_elem
    return {"activations": ring * d * (4 * n_layer + 2),
            "loss": ring * 3 * batch * seq_len * bytes_per_elem}


# ---- the reference: the same split done with torch's DTensor API (tests, lesson, bench) -----
def qkv_rank_order(n_embd, world):
    """Row order of the fused c_attn weight (3C rows: q|k|v) that puts rank r's q, k and v rows in
    the r-th contiguous block: torch's ColwiseParallel is a plain contiguous Shard(0)."""
    rows = torch.arange(3 * n_embd)
    return torch.cat([_shard_rows(rows, r, world, 3) for r in range(world)])


def torch_parallelize_gpt(model, mesh):
    """Split a minitrain GPT in place with torch.distributed.tensor.parallel.parallelize_module:
    ColwiseParallel on c_attn (rows reordered by qkv_rank_order) and mlp.c_fc, RowwiseParallel on
    the c_projs, RowwiseParallel(input_layouts=Replicate()) on wte (its input ids are replicated,
    not sharded), ColwiseParallel(use_local_output=False) on lm_head (a Shard(-1) DTensor for
    loss_parallel), then the tie restored. Run forward AND backward under `loss_parallel()`."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    world = mesh.size()
    _divisible("n_head", model.config.n_head, world, "pick n_head divisible by the world size")
    _divisible("vocab_size", model.config.vocab_size, world, "pad the vocabulary")
    plan = {"transformer.wte": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(use_local_output=False)}
    for i, block in enumerate(model.transformer.h):
        a = block.attn
        c_attn = nn.Linear(a.n_embd, 3 * a.n_embd, dtype=a.c_attn.weight.dtype)
        order = qkv_rank_order(a.n_embd, world)
        with torch.no_grad():
            c_attn.weight.copy_(a.c_attn.weight[order])
            c_attn.bias.copy_(a.c_attn.bias[order])
        block.attn = ParallelSelfAttention(c_attn, a.c_proj, n_local_head=a.n_head // world,
                                           head_size=a.n_embd // a.n_head, attention=a.attention)
        p = f"transformer.h.{i}."
        plan.update({p + "attn.c_attn": ColwiseParallel(), p + "attn.c_proj": RowwiseParallel(),
                     p + "mlp.c_fc": ColwiseParallel(), p + "mlp.c_proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    model.transformer.wte.weight = model.lm_head.weight  # parallelize_module made two copies
    return model


def torch_gather_full(model, *, grads=False):
    """{name: full tensor} of a torch_parallelize_gpt model's parameters (or grads), c_attn rows
    put back in q|k|v order. A collective (DTensor.full_tensor): every rank calls it."""
    out = {}
    for name, p in model.named_parameters():
        t = (p.grad if grads else p).detach()
        if hasattr(t, "full_tensor"):  # a DTensor: all-gather its shards
            world, t = t.device_mesh.size(), t.full_tensor()
            if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
                order = qkv_rank_order(model.config.n_embd, world)
                t = torch.empty_like(t).index_copy_(0, order, t)
        out[name] = t.clone()
    return out
