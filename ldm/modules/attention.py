"""Attention layers of the SD-1 UNet: cross-attention, GEGLU feed-forward, spatial transformer.

Weight names equal the CompVis ``ldm.modules.attention`` ones (``to_q``, ``ff.net.0.proj``, ...), so
Stable Diffusion checkpoints load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

ATTENTION_IMPLS = ("sdpa", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa") -> torch.Tensor:
    """Multi-head attention softmax(q k^T / sqrt(d)) v on (B, heads, N, d) tensors.

    ``sdpa`` uses PyTorch's fused kernels; ``math`` is the explicit float32 softmax(QK^T)V that the
    upstream code runs (kept for the benchmarks that compare the two).
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    sim = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale  # (B, h, N, M)
    return torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1).to(v.dtype), v)


class CrossAttention(nn.Module):
    """Attention of ``x`` to ``context`` (to itself when no context is given)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None,
        heads: int,
        dim_head: int,
        dropout: float = 0.0,
        impl: str = "sdpa",
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.impl = impl
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, N, query_dim), ``context`` (B, M, context_dim) or None -> (B, N, query_dim).

        A context that is one row broadcast over the batch (``expand``, batch stride 0: the empty
        caption of every image at test time) gets its keys and values computed once, for that row,
        and the batch's B*N queries attend to them as one sequence (one attention call of B*N rows
        instead of B calls' worth of N rows against copies of the same keys). Every query row's
        result is the same as with per-image keys, whatever the batch size.
        """
        b, n, _ = x.shape
        if context is not None and b > 1 and context.stride(0) == 0:
            x, context = x.reshape(1, b * n, -1), context[:1]  # (1, B*N, query_dim), (1, M, context_dim)
        src = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(src), self.to_v(src)  # (B|1, N|B*N, h*d), (B|1, N|M, h*d) twice
        q, k, v = (
            t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v)
        )  # (B|1, h, ., d)
        out = attention(q, k, v, self.impl)  # (B|1, h, N|B*N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Linear to 2*dim_out, then value * GELU(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, GEGLU feed-forward; residual each."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
        impl: str = "sdpa",
    ):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, impl)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, impl)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the (H*W) tokens -> proj_out, plus the input."""

    def __init__(
        self,
        in_channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        norm_groups: int = 32,
        dropout: float = 0.0,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        impl: str = "sdpa",
    ):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_groups, in_channels, eps=1e-6, affine=True)
        self.use_linear = use_linear
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner)
            self.proj_out = nn.Linear(inner, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, kernel_size=1)
            self.proj_out = nn.Conv2d(inner, in_channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, use_checkpoint, impl)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C')
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C', H, W)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
