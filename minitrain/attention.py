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
2080 tiles of 64x64, block 128 is 528 tiles. The choices that keep each tile cheap:
  - only the diagonal tile needs the causal mask (tiles left of it are fully visible, tiles
    right of it are skipped), and its mask is one precomputed (block, block) -inf triangle;
  - Q is scaled once (one pass over (N, T, D)), so a score tile is one bmm; backward's shifts
    ride in the matmul: s - L and dP - D are baddbmm(-L, Q, K^T) and baddbmm(-D, dO, V^T);
  - the first tile of each loop writes instead of adding: forward's first key tile sets m, l
    and acc (nothing to rescale yet), backward's first query tile sets dK and dV (no zeros);
  - THE tile is one scratch buffer: every score / probability / dS tile is written (out=) into
    the same (N, block, block) memory, as the real kernel reuses its SRAM. A fresh tensor per
    tile is fresh memory the kernel may have to fault in, depending on what ran before (T=1024
    with naive attention in the same rounds: 1.23x SDPA with a tensor per tile, 1.16x with the
    scratch buffer). The buffers are O(block^2), so the memory stays O(T * block);
  - the diagonal tile's masked (-inf) entries are clamped before the exp and zeroed after: MKL's
    exp takes a slow path for every input that underflows (_exp_tile_ has the numbers);
  - dQ accumulates in contiguous (N, block, D) tiles: an in-place matmul into a strided slice
    of (N, T, D) falls back to one small matmul per head;
  - block 128 (not 64): big enough to amortize the per-op cost, small enough that a tile
    (4 heads x 128 x 128 fp32 = 256 KiB) stays in cache through its ~10 passes (T=1024, same
    rounds: block 128 1.23x SDPA, 192 1.32x, 256 1.51x).
Batching all query tiles of one key block into one (N, T, bk) slab (fewer, larger ops) was
measured too: fewer ops, but the slab (8 MiB at T=4096) leaves the cache between passes and
the whole pass got slower (1.7-2.0x SDPA against 1.4x for the per-tile loop, same run, fp32,
1 thread, B=1 H=4 D=64), so the tile loop stays.

When it helps: long sequences, where T^2 memory dominates. On a GPU the real FlashAttention also
wins time by keeping tiles in on-chip SRAM; on a CPU the same tiling buys cache locality, and
the Python tile loop costs time that SDPA's fused C++ kernel does not pay
(benchmarks/bench_attention.py measures by how much).

Common bugs: forgetting to rescale acc AND l by exp(m - m') when the max grows; reusing one
scratch buffer for two tiles that are alive at once (acc and the score tile); exp(-inf - -inf) =
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


def _diagonal_keep(diag_bias):
    """The diagonal tile's 0/1 mask (1 where j <= i), for _exp_tile_; None when not causal."""
    return None if diag_bias is None else (diag_bias == 0).to(diag_bias.dtype)


EXP_FLOOR = -87.0  # e^-87 = 1.6e-38, the bottom of float32's normal range (see _exp_tile_)


def _exp_tile_(x, keep):
    """exp(x) in place. `keep`: None, or a diagonal tile's (bq, bk) 0/1 causal mask.

    Why the detour on the diagonal: torch's CPU exp here is MKL's vector exp, and an input
    whose result underflows (below about -87.3 in float32, -inf included) goes through its
    rare-case path (perf shows vsexp_cout_rare and mkl_vml_kernel_sError): measured 155 us for
    a 4x128x128 tile whose upper triangle is -inf, against 21 us for the same tile without it,
    and 31 us for clamp + exp. So the masked entries are clamped to
    EXP_FLOOR (the visible ones too: a visible term below e^-87 is invisible next to the row's
    max term, e^0 = 1) and set to exactly 0 after the exp."""
    if keep is None:
        return x.exp_()
    return x.clamp_(min=EXP_FLOOR).exp_().mul_(keep)


def _tile_scores(q_tile, k_t, shift, diag_bias, on_diagonal, out):
    """shift + q_tile @ k_t (+ the causal mask on a diagonal tile), written into `out`.

    q_tile (N, bq, D) is already scaled, k_t (N, D, bk) is a K tile seen transposed, `out` is a
    (N, bq, bk) view of a scratch buffer the caller reuses for every tile. The shift (a (N, bq, 1)
    column, or None) and the mask ride in the matmul's output initialisation (baddbmm), so no
    extra pass over the tile is spent on them.
    """
    bq, bk = out.size(1), out.size(2)
    if on_diagonal:
        shift = diag_bias[:bq, :bk] if shift is None else diag_bias[:bq, :bk] + shift
    if shift is None:
        return torch.bmm(q_tile, k_t, out=out)
    return torch.baddbmm(shift, q_tile, k_t, out=out)


def _flash_forward(q, k, v, causal, scale, block_size, trace=None):
    """q (N, Tq, D), k (N, Tk, D), v (N, Tk, Dv) -> out (N, Tq, Dv), lse (N, Tq)."""
    N, Tq, _ = q.shape
    Tk, Dv = k.size(1), v.size(2)
    out = q.new_empty(N, Tq, Dv)
    lse = q.new_empty(N, Tq, 1)
    diag_bias = _diagonal_bias(causal, block_size, q.device, q.dtype)
    diag_keep = _diagonal_keep(diag_bias)
    k_t_tiles = k.transpose(1, 2).split(block_size, dim=2)  # views (N, D, bk), cut once
    v_tiles = v.split(block_size, dim=1)  # views (N, bk, Dv)
    bq_max, bk_max = min(block_size, Tq), min(block_size, Tk)  # a block may exceed T
    s_buf = q.new_empty(N, bq_max, bk_max)  # THE score tile, reused by every tile
    acc_buf = q.new_empty(N, bq_max, Dv)  # THE output accumulator, reused by every q tile
    q_tiles = (q * scale).split(block_size, dim=1)  # one pass over Q: each score is one bmm
    out_tiles, lse_tiles = out.split(block_size, dim=1), lse.split(block_size, dim=1)
    for i in range(-(-Tq // block_size)):  # every query tile (none when Tq == 0)
        q_tile = q_tiles[i]  # (N, bq, D)
        bq = q_tile.size(1)
        q_start, q_end = i * block_size, i * block_size + bq
        # Causal: key tiles that start after this tile's last query are all masked -> skipped.
        n_k = -(-(min(Tk, q_end) if causal else Tk) // block_size)  # ceil: tiles with keys
        m = l = acc = None  # running max (N, bq, 1), sum of exp(s - m) (N, bq, 1), sum of exp(s - m) v
        for j in range(n_k):
            v_tile = v_tiles[j]
            on_diagonal = causal and j == i  # the only tile that needs the mask
            bk = v_tile.size(1)
            s = _tile_scores(q_tile, k_t_tiles[j], None, diag_bias, on_diagonal,
                             out=s_buf[:, :bq, :bk])  # (N, bq, bk)
            keep = diag_keep[:bq, :bk] if on_diagonal else None
            if m is None:  # the first key tile: nothing to rescale yet
                m = s.amax(dim=-1, keepdim=True)
                p = _exp_tile_(s.sub_(m), keep)  # exp(s - m), in place
                l = p.sum(dim=-1, keepdim=True)
                acc = torch.bmm(p, v_tile, out=acc_buf[:, :bq])  # (N, bq, Dv)
            else:
                # m_new is finite: every row sees key 0 in its first tile (top-left causal), so
                # the classic exp(-inf - -inf) = nan cannot happen here (finite inputs).
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                p = _exp_tile_(s.sub_(m_new), keep)  # exp(s - m_new), in place
                rescale = torch.exp(m - m_new)  # shrinks what was summed under the old max
                l.mul_(rescale).add_(p.sum(dim=-1, keepdim=True))  # l * rescale + rowsum(p)
                acc.mul_(rescale).baddbmm_(p, v_tile)  # acc * rescale + p v
                m = m_new
            if trace is not None:
                k_start = j * block_size
                trace(q_start, q_end, k_start, k_start + bk, m[..., 0].clone(),
                      l[..., 0].clone())
        if m is None:  # Tk == 0: no key at all
            m = q.new_full((N, bq, 1), float("-inf"))
            l = q.new_zeros(N, bq, 1)
            acc = q.new_zeros(N, bq, Dv)
        # l == 0 only when there is no key at all (Tk == 0): output 0 and L = -inf, as SDPA.
        l_safe = torch.where(l == 0, torch.ones_like(l), l)
        torch.div(acc, l_safe, out=out_tiles[i])
        torch.where(l == 0, m, m + torch.log(l_safe), out=lse_tiles[i])
    return out, lse[..., 0]


def _flash_backward(q, k, v, out, lse, d_out, causal, scale, block_size):
    """FlashAttention-2 backward: outer loop over key tiles, inner over query tiles."""
    N, Tq, D = q.shape
    Tk, Dv = k.size(1), v.size(2)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = (d_out * out).sum(dim=-1, keepdim=True)  # D_i = rowsum(dO * O), (N, Tq, 1)
    diag_bias = _diagonal_bias(causal, block_size, q.device, q.dtype)
    diag_keep = _diagonal_keep(diag_bias)
    q_tiles = (q * scale).split(block_size, dim=1)  # scaled Q tiles (N, bq, D)
    do_tiles = d_out.split(block_size, dim=1)  # (N, bq, Dv)
    neg_lse, neg_delta = (-lse[..., None]).split(block_size, dim=1), (-delta).split(block_size, dim=1)
    n_q = -(-Tq // block_size)  # (split returns one empty tile for a 0-length dim)
    # dQ tile i accumulates in dq_buf[i], contiguous: an in-place matmul into a strided slice of
    # (N, Tq, D) falls back to one small matmul per head (measured ~10% slower overall).
    bq_max, bk_max = min(block_size, Tq), min(block_size, Tk)  # a block may exceed T
    dq_buf = q.new_zeros(n_q, N, bq_max, D)
    p_buf, ds_buf = q.new_empty(N, bq_max, bk_max), q.new_empty(N, bq_max, bk_max)  # THE tiles
    dk_buf, dv_buf = q.new_empty(N, bk_max, D), q.new_empty(N, bk_max, Dv)
    k_tiles, v_tiles = k.split(block_size, dim=1), v.split(block_size, dim=1)  # (N, bk, D|Dv)
    dk_tiles, dv_tiles = dk.split(block_size, dim=1), dv.split(block_size, dim=1)
    for j in range(-(-Tk // block_size)):  # every key tile (none when Tk == 0)
        k_tile, v_tile = k_tiles[j], v_tiles[j]
        k_t, v_t = k_tile.transpose(1, 2), v_tile.transpose(1, 2)  # (N, D, bk), (N, Dv, bk)
        bk = k_tile.size(1)
        dk_tile = dv_tile = None  # (N, bk, D), (N, bk, Dv): set by the first query tile
        # Causal: query tiles whose last row is above this key tile's first column are skipped.
        for i in range(j if causal else 0, n_q):
            q_tile, do_tile = q_tiles[i], do_tiles[i]
            bq = q_tile.size(1)
            on_diagonal = causal and i == j
            p = _exp_tile_(_tile_scores(q_tile, k_t, neg_lse[i], diag_bias, on_diagonal,
                                        out=p_buf[:, :bq, :bk]),
                           diag_keep[:bq, :bk] if on_diagonal else None)  # P = exp(s - L)
            # dS = P * (dP - D) with dP = dO V^T: the -D shift rides in the matmul, (N, bq, bk)
            ds = torch.baddbmm(neg_delta[i], do_tile, v_t, out=ds_buf[:, :bq, :bk]).mul_(p)
            dq_buf[i, :, :bq].baddbmm_(ds, k_tile, alpha=scale)  # dQ += scale * dS K
            if dv_tile is None:  # the first query tile writes, the later ones add
                dv_tile = torch.bmm(p.transpose(1, 2), do_tile, out=dv_buf[:, :bk])  # P^T dO
                dk_tile = torch.bmm(ds.transpose(1, 2), q_tile, out=dk_buf[:, :bk])  # dS^T (scale Q)
            else:
                dv_tile.baddbmm_(p.transpose(1, 2), do_tile)  # dV += P^T dO
                dk_tile.baddbmm_(ds.transpose(1, 2), q_tile)  # dK += dS^T (scale Q)
        if dv_tile is None:  # no query sees this key tile (Tq == 0, or causal with Tq <= k_start)
            dk_tiles[j].zero_()
            dv_tiles[j].zero_()
        else:
            dk_tiles[j].copy_(dk_tile)
            dv_tiles[j].copy_(dv_tile)
    dq = dq_buf.transpose(0, 1).reshape(N, n_q * bq_max, D)[:, :Tq]  # (N, Tq, D)
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
