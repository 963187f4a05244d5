"""Attention from scratch: the textbook O(T^2)-memory version, and FlashAttention-2 in tiles.

What: out = softmax(q k^T * scale + mask) v, with q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv)
and scale = 1/sqrt(D) unless given. Both functions equal
torch.nn.functional.scaled_dot_product_attention (SDPA), forward and backward.

naive_attention materializes the (Tq, Tk) score matrix S and probability matrix P. Autograd
stores P for backward: memory grows as T^2 (T=4096, 4 heads, fp32: 256 MiB per matrix).

flash_attention never holds S or P whole. It walks over tiles of `block_size` queries x
`block_size` keys and keeps, per query row, three running quantities (the "online softmax"):
    m  = the largest score seen so far                      (running max)
    l  = sum_j exp(s_j - m) over keys seen so far           (running sum)
    acc = sum_j exp(s_j - m) v_j                            (un-normalized output)
When a new tile raises the max from m to m', everything accumulated so far is rescaled by
exp(m - m'), so no score is ever exponentiated twice. At the end out = acc / l, and
    L = m + log(l) = log sum_j exp(s_j)                     (the log-sum-exp per row)
is the only thing saved besides out. Backward recomputes each tile's probabilities exactly as
P_ij = exp(s_ij - L_i) and uses D_i = sum_d dO_id O_id (= rowsum(dO * O)):
    dV_j += P^T dO,   dP = dO V^T,   dS = P * (dP - D),   dQ += dS K * scale,   dK += dS^T Q * scale
Memory: O(T * block) instead of O(T^2); compute: the same matmuls plus one recomputation of S.

Causal masking is top-left aligned, as SDPA(is_causal=True): query i sees keys j <= i, also when
Tq != Tk. Key tiles entirely right of the diagonal are skipped outright (about half the work).
With top-left alignment no causal row is ever empty (key 0 is always visible); a row can
only be fully masked by an attn_mask (naive) or by Tk == 0. SDPA returns zeros for such rows (and
zero gradients), so both functions here do too.

Speed in pure PyTorch: every tile costs about ten tensor ops, and each op costs microseconds
of Python and dispatch, so the tile count decides the overhead: block 64 at T=4096 (causal) is
2080 tiles of 64x64, block 128 is 528 tiles. Three choices keep each tile to one matmul per
product and as few passes over the (bq, bk) tile as possible:
  - only the diagonal tile needs the causal mask (tiles left of it are fully visible, tiles
    right of it are skipped), and its mask is one precomputed (block, block) -inf triangle;
  - the scale and the shifts are folded into the matmul: backward computes s - L and dP - D as
    baddbmm(-L, Q, K^T, alpha=scale) and baddbmm(-D, dO, V^T), instead of a matmul and then a
    subtraction (and no scaled copy of Q is made: dK is scaled once per key tile at the end);
  - the first tile of each loop writes instead of adding: forward's first key tile sets m, l
    and acc (nothing to rescale yet), backward's first query tile sets dK and dV (no zeros);
  - block 128 (not 64): big enough to amortize the per-op cost, small enough that a tile
    (4 heads x 128 x 128 fp32 = 256 KiB) stays in cache through its ~10 passes.
Batching all query tiles of one key block into one (N, T, bk) slab (fewer, larger ops) was
measured too: fewer ops, but the slab (8 MiB at T=4096) leaves the cache between passes and
the whole pass got slower (1.7-2.0x SDPA against 1.4x for the per-tile loop, same run, fp32,
1 thread, B=1 H=4 D=64), so the tile loop stays.

When it helps: long sequences, where T^2 memory dominates. On a GPU the real FlashAttention also
wins time by keeping tiles in on-chip SRAM; on a CPU the same tiling buys cache locality, and
the Python tile loop costs time that SDPA's fused C++ kernel does not pay
(benchmarks/bench_attention.py measures by how much).

Common bugs: forgetting to rescale acc AND l by exp(m - m') when the max grows; exp(-inf - -inf) =
nan for a row whose every score so far is masked (guard the max); bottom-right instead of top-left
causal alignment when Tq != Tk; saving P "just for backward", which brings back the T^2 memory.
"""
import math

import torch

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def _default_scale(q, scale):
    if scale is None:
        return 1.0 / math.sqrt(q.size(-1))
    return float(scale)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            raise ValueError(f"{name} must be a tensor of shape (..., T, D), got {type(t).__name__}")
    if q.size(-1) != k.size(-1):
        raise ValueError(f"q and k must share the last dim D: q {q.size(-1)} vs k {k.size(-1)}")
    if k.size(-2) != v.size(-2):
        raise ValueError(f"k and v must have the same length Tk: {k.size(-2)} vs {v.size(-2)}")


def causal_mask(Tq, Tk, device=None):
    """(Tq, Tk) bool, True = may attend: key j visible to query i iff j <= i (top-left aligned)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril()


def naive_attention(q, k, v, *, causal=False, attn_mask=None, scale=None):
    """softmax(q k^T * scale + mask) v, materializing the (..., Tq, Tk) matrices.

    attn_mask: bool (True = attend) or additive float, broadcastable to (..., Tq, Tk); may be
    combined with causal. Rows with no visible key give zeros, as SDPA does.
    """
    _check_qkv(q, k, v)
    scale = _default_scale(q, scale)
    Tq, Tk = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., Tq, Tk)  <- the O(T^2) matrix
    if causal:
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(scores.dtype)
    # Softmax written out so a fully masked row gives 0 instead of 0/0 = nan (forward and grad).
    if Tk == 0:  # no keys at all: every row is empty, the output is zeros
        return scores.sum(dim=-1, keepdim=True) * v.sum(dim=-2, keepdim=True)  # (..., Tq, Dv) zeros
    row_max = scores.amax(dim=-1, keepdim=True).detach()  # (..., Tq, 1); a constant shift
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)  # (..., Tq, Tk)
    row_sum = weights.sum(dim=-1, keepdim=True)  # (..., Tq, 1)
    probs = weights / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    return probs @ v  # (..., Tq, Dv)


def _diagonal_bias(causal, block_size, device, dtype):
    """(block, block) additive causal mask of a diagonal tile: 0 where j <= i, -inf above.

    With q and k tiles cut at the same multiples of block_size, the diagonal tile (q_start ==
    k_start) is the only one the causal line crosses: tiles left of it need no mask at all, tiles
    right of it are skipped. Its slice [:bq, :bk] also fits a smaller last tile."""
    if not causal:
        return None
    return torch.full((block_size, block_size), float("-inf"), device=device, dtype=dtype).triu_(1)


def _tile_scores(q_tile, k_tile, scale, shift, diag_bias, on_diagonal):
    """shift + scale * q_tile k_tile^T (+ the causal mask on a diagonal tile), (N, bq, bk).

    One baddbmm: the scale is the matmul's alpha, and the shift (a (N, bq, 1) column, or None)
    and the mask are folded into the matmul's output initialisation, so no extra pass over the
    tile is spent on any of them.
    """
    bq, bk = q_tile.size(-2), k_tile.size(-2)
    if on_diagonal:
        shift = diag_bias[:bq, :bk] if shift is None else diag_bias[:bq, :bk] + shift
    if shift is None:  # beta=0: the input is ignored, only its (broadcast) shape matters
        return torch.baddbmm(q_tile.new_zeros(1, 1, 1), q_tile, k_tile.transpose(-2, -1),
                             beta=0, alpha=scale)
    return torch.baddbmm(shift, q_tile, k_tile.transpose(-2, -1), alpha=scale)


def _flash_forward(q, k, v, causal, scale, block_size, trace=None):
    """q (N, Tq, D), k (N, Tk, D), v (N, Tk, Dv) -> out (N, Tq, Dv), lse (N, Tq)."""
    N, Tq, _ = q.shape
    Tk, Dv = k.size(1), v.size(2)
    out = q.new_empty(N, Tq, Dv)
    lse = q.new_empty(N, Tq)
    diag_bias = _diagonal_bias(causal, block_size, q.device, q.dtype)
    for q_start in range(0, Tq, block_size):
        q_end = min(q_start + block_size, Tq)
        q_tile = q[:, q_start:q_end]  # (N, bq, D)
        # Causal: key tiles that start after this tile's last query are all masked -> skipped.
        k_stop = min(Tk, q_end) if causal else Tk
        m = l = acc = None  # running max (N, bq), sum of exp(s - m) (N, bq), sum of exp(s - m) v
        for k_start in range(0, k_stop, block_size):
            k_end = min(k_start + block_size, Tk)
            on_diagonal = causal and k_start == q_start  # the only tile that needs the mask
            s = _tile_scores(q_tile, k[:, k_start:k_end], scale, None, diag_bias, on_diagonal)
            if m is None:  # the first key tile: nothing to rescale yet
                m = s.amax(dim=-1)  # (N, bq)
                p = s.sub_(m[..., None]).exp_()
                l = p.sum(dim=-1)
                acc = torch.bmm(p, v[:, k_start:k_end])  # (N, bq, Dv)
            else:
                # m_new is finite: every row sees key 0 in its first tile (top-left causal), so
                # the classic exp(-inf - -inf) = nan cannot happen here (finite inputs).
                m_new = torch.maximum(m, s.amax(dim=-1))  # (N, bq)
                p = s.sub_(m_new[..., None]).exp_()  # exp(s - m_new), in place, (N, bq, bk)
                rescale = torch.exp(m - m_new)  # (N, bq): shrinks what was summed under the old max
                l.mul_(rescale).add_(p.sum(dim=-1))  # l = l * rescale + rowsum(p)
                acc.mul_(rescale[..., None]).baddbmm_(p, v[:, k_start:k_end])  # acc*rescale + p v
                m = m_new
            if trace is not None:
                trace(q_start, q_end, k_start, k_end, m.clone(), l.clone())
        if m is None:  # Tk == 0: no key at all
            m = q.new_full((N, q_end - q_start), float("-inf"))
            l = q.new_zeros(N, q_end - q_start)
            acc = q.new_zeros(N, q_end - q_start, Dv)
        # l == 0 only when there is no key at all (Tk == 0): output 0 and L = -inf, as SDPA.
        l_safe = torch.where(l == 0, torch.ones_like(l), l)
        out[:, q_start:q_end] = acc / l_safe[..., None]
        lse[:, q_start:q_end] = torch.where(l == 0, m, m + torch.log(l_safe))
    return out, lse


def _flash_backward(q, k, v, out, lse, d_out, causal, scale, block_size):
    """FlashAttention-2 backward: outer loop over key tiles, inner over query tiles."""
    N, Tq, _ = q.shape
    Tk = k.size(1)
    dq, dk, dv = torch.zeros_like(q), torch.empty_like(k), torch.empty_like(v)  # dq accumulates
    delta = (d_out * out).sum(dim=-1)  # D_i = rowsum(dO * O), (N, Tq)
    neg_lse, neg_delta = -lse[..., None], -delta[..., None]  # (N, Tq, 1) shifts for baddbmm
    diag_bias = _diagonal_bias(causal, block_size, q.device, q.dtype)
    for k_start in range(0, Tk, block_size):
        k_end = min(k_start + block_size, Tk)
        k_tile, v_tile = k[:, k_start:k_end], v[:, k_start:k_end]  # (N, bk, D), (N, bk, Dv)
        dk_tile = dv_tile = None  # (N, bk, D), (N, bk, Dv): set by the first query tile
        # Causal: query tiles whose last row is above this key tile's first column are skipped.
        q_first = k_start if causal else 0
        for q_start in range(q_first, Tq, block_size):
            q_end = min(q_start + block_size, Tq)
            q_tile, do_tile = q[:, q_start:q_end], d_out[:, q_start:q_end]  # (N, bq, D|Dv)
            on_diagonal = causal and q_start == k_start
            p = _tile_scores(q_tile, k_tile, scale, neg_lse[:, q_start:q_end], diag_bias, on_diagonal)
            p.exp_()  # P = exp(s - L), recomputed, (N, bq, bk)
            # dS = P * (dP - D) with dP = dO V^T: the -D shift rides in the matmul, (N, bq, bk)
            dp_minus_d = torch.baddbmm(neg_delta[:, q_start:q_end], do_tile, v_tile.transpose(-2, -1))
            ds = dp_minus_d.mul_(p)
            dq[:, q_start:q_end].baddbmm_(ds, k_tile, alpha=scale)  # dQ += scale * dS K
            if dv_tile is None:  # the first query tile writes, the later ones add
                dv_tile = torch.bmm(p.transpose(-2, -1), do_tile)  # dV = P^T dO, (N, bk, Dv)
                dk_tile = torch.bmm(ds.transpose(-2, -1), q_tile)  # dK = dS^T (scale * Q)
            else:
                dv_tile.baddbmm_(p.transpose(-2, -1), do_tile)  # dV += P^T dO
                dk_tile.baddbmm_(ds.transpose(-2, -1), q_tile)  # dK += dS^T (scale * Q)
        if dv_tile is None:  # no query sees this key tile (Tq == 0, or causal with Tq <= k_start)
            dk[:, k_start:k_end], dv[:, k_start:k_end] = 0.0, 0.0
            continue
        dk[:, k_start:k_end] = dk_tile.mul_(scale)
        dv[:, k_start:k_end] = dv_tile
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Saves only q, k, v (the inputs), out and the log-sum-exp: no (Tq, Tk) tensor is kept."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_size):  # q (N, Tq, D) k (N, Tk, D) v (N, Tk, Dv)
        out, lse = _flash_forward(q, k, v, causal, scale, block_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.block_size = causal, scale, block_size
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(
            q, k, v, out, lse, d_out.contiguous(), ctx.causal, ctx.scale, ctx.block_size
        )
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, *, causal=False, scale=None, block_size=64):
    """Tiled attention with online softmax (FlashAttention-2), forward and backward from scratch.

    Leading dims of q, k, v broadcast against each other. float16/bfloat16 inputs are computed in
    float32 (as the real kernel accumulates in fp32) and returned in the input dtype.
    """
    _check_qkv(q, k, v)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    scale = _default_scale(q, scale)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    Tq, Tk, D, Dv = q.size(-2), k.size(-2), q.size(-1), v.size(-1)
    in_dtype = q.dtype
    work = torch.float32 if in_dtype in REDUCED_PRECISION else in_dtype
    N = math.prod(batch)  # all leading dims (batch, heads, ...) flattened into one
    q3 = q.expand(*batch, Tq, D).reshape(N, Tq, D).to(work)  # (N, Tq, D)
    k3 = k.expand(*batch, Tk, D).reshape(N, Tk, D).to(work)  # (N, Tk, D)
    v3 = v.expand(*batch, Tk, Dv).reshape(N, Tk, Dv).to(work)  # (N, Tk, Dv)
    out = FlashAttentionFunction.apply(q3, k3, v3, bool(causal), scale, block_size)
    return out.reshape(*batch, Tq, Dv).to(in_dtype)


def flash_attention_traced(q, k, v, trace, *, causal=False, scale=None, block_size=64):
    """Forward only, calling trace(q_start, q_end, k_start, k_end, running_max, running_sum)
    after every tile: the hook the flash_tiling animation uses to show real running values."""
    _check_qkv(q, k, v)
    scale = _default_scale(q, scale)
    N = math.prod(q.shape[:-2])
    q3, k3, v3 = (t.reshape(N, t.size(-2), t.size(-1)) for t in (q, k, v))
    with torch.no_grad():
        out, _ = _flash_forward(q3, k3, v3, bool(causal), scale, block_size, trace=trace)
    return out.reshape(*q.shape[:-1], v.size(-1))
