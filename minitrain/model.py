"""The tiny GPT: a decoder-only transformer in one file, read top to bottom (nanoGPT style).

What: token embedding + learned position embedding -> n_layer Blocks -> final LayerNorm -> a
linear head whose weight IS the token embedding (weight tying). Each Block is pre-norm:
    x = x + attn(ln_1(x))        # tokens look at earlier tokens
    x = x + mlp(ln_2(x))         # each token thinks on its own
Trained on bytes (vocab 256), it predicts the next byte; loss = cross-entropy.

Why these choices:
- Pre-norm residual blocks keep a clean identity path from the loss to the embeddings, so
  gradients reach the first layer even with many layers (post-norm GPT-1 needed careful warmup).
- GPT-2 initialization: every weight ~ N(0, 0.02); the projections that write INTO the residual
  stream (attn.c_proj, mlp.c_proj) use 0.02 / sqrt(2 * n_layer), because 2 * n_layer of them add
  up along the residual path and the sum's variance would otherwise grow with depth. A fresh
  model therefore predicts nearly uniform logits: loss ~= ln(vocab_size) = ln 256 ~= 5.55. A
  fresh loss far above that means a broken init (the most common bug: a head with std 1).
- Swappable parts with identical parameters: `native_layers` picks PyTorch's nn.LayerNorm/nn.GELU
  or the from-scratch versions below; `gelu` picks GPT-2's tanh approximation (the default) or
  the exact erf form (a slightly different function: 5e-4 apart at most; on this CPU the
  "approximation" is the slower one: PyTorch's erf kernel is vectorized, measured 0.6 ms vs
  1.6 ms forward+backward on (1024, 512), a 7% faster tiny-GPT step at B=8, T=128); `attention`
  picks "sdpa" (the built-in fused kernel), "naive" or "flash" (both from scratch, minitrain.attention). Parameter names never change, so a
  state_dict loads into every variant and they all compute the same function - that is what
  makes the speed ladder a fair comparison. (One difference: with dropout > 0 while training,
  only "sdpa" also drops attention probabilities; "naive"/"flash" drop on the residual paths only.)
- `activation_checkpointing=True` runs each Block through minitrain.recompute.checkpoint while
  training: only each Block's input is stored, its inside is recomputed in backward.

Formulas:
    LayerNorm(x) = (x - mean) / sqrt(var + eps) * weight + bias    (biased var, eps = 1e-5)
    GELU_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    GELU(x)      = 0.5 x (1 + erf(x / sqrt(2)))                   (the exact form)
    attention    = softmax(q k^T / sqrt(head_dim) + causal mask) v

Common bug: using the unbiased variance (torch.var default) in a hand-written LayerNorm; it
differs from nn.LayerNorm by a factor n/(n-1) inside the sqrt.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LAYER_NORM_EPS = 1e-5  # the same eps for nn.LayerNorm and the from-scratch version
ATTENTION_KINDS = ("sdpa", "naive", "flash")
GELU_KINDS = ("tanh", "exact")


class LayerNorm(nn.Module):
    """From-scratch LayerNorm over the last dim; same parameter names as nn.LayerNorm."""

    def __init__(self, n_embd, eps=LAYER_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd))

    def forward(self, x):  # x: (B, T, C)
        mean = x.mean(dim=-1, keepdim=True)  # (B, T, 1)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased variance, as nn.LayerNorm
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class TanhGELU(nn.Module):
    """GELU with the tanh approximation written out (GPT-2's activation)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class ExactGELU(nn.Module):
    """GELU in its exact form, x * Phi(x) with Phi the standard normal CDF, written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def make_gelu(kind, native):
    if native:
        return nn.GELU(approximate="tanh" if kind == "tanh" else "none")
    return TanhGELU() if kind == "tanh" else ExactGELU()


def make_layer_norm(n_embd, native):
    return nn.LayerNorm(n_embd, eps=LAYER_NORM_EPS) if native else LayerNorm(n_embd)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; the kernel is chosen by config.attention."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attention = config.attention
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # writes into the residual stream
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # x: (B, T, C)
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.attention == "sdpa":
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            # The from-scratch kernels have no attention-probability dropout; dropout on the
            # residual path below still applies. With dropout=0 all three are the same function.
            from minitrain import attention as attn_lib

            if self.attention == "naive":
                y = attn_lib.naive_attention(q, k, v, causal=True)
            else:
                y = attn_lib.flash_attention(q, k, v, causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> GELU -> C."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = make_gelu(config.gelu, config.native_layers)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)  # writes into the residual
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # x: (B, T, C)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_layer_norm(config.n_embd, config.native_layers)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_layer_norm(config.n_embd, config.native_layers)
        self.mlp = MLP(config)

    def forward(self, x):  # x: (B, T, C)
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256  # the longest context the model accepts
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    attention: str = "sdpa"  # "naive" | "flash" | "sdpa"
    native_layers: bool = True
    activation_checkpointing: bool = False
    gelu: str = "tanh"  # "tanh" (GPT-2's approximation) | "exact" (erf)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "pick n_head that divides n_embd"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.gelu not in GELU_KINDS:
            raise ValueError(f"gelu must be one of {GELU_KINDS}, got {self.gelu!r}")


class GPT(nn.Module):
    """Token + position embeddings, n_layer Blocks, final LayerNorm, tied lm head."""

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ValueError(f"config must be a GPTConfig, got {type(config).__name__}")
        config.__post_init__()  # re-validate: fields may have been changed after construction
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=make_layer_norm(config.n_embd, config.native_layers),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix, two uses
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameter count (the tied matrix counted once); optionally without position embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None):  # idx: (B, T) int64
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"idx has length {T} > block_size {self.config.block_size}: "
                "crop the context or build the model with a larger block_size"
            )
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B,T,C)
        use_recompute = self.config.activation_checkpointing and self.training
        if use_recompute:
            from minitrain.recompute import checkpoint
        for block in self.transformer.h:
            x = checkpoint(block, x) if use_recompute else block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, *, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T); returns (B, T + max_new_tokens)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (use 1.0 for plain)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # crop to what the model accepts
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature  # (B, vocab): only the last position
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx
