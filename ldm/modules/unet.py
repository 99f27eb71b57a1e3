"""The SD-1 denoising UNet: residual blocks, spatial transformers, sinusoidal time embedding.

Weight names equal the CompVis ``openaimodel.UNetModel`` ones (``input_blocks.1.0.in_layers.2``,
``middle_block.1.proj_in``, ``out.2``, ...). The forward pass is split into :meth:`UNetModel.encode`
(time embedding, input blocks, middle block) and :meth:`UNetModel.decode` (output blocks with skips),
so a model that adds control signals (``vlmdiff.model``) reuses both halves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.config import UNetConfig
from ldm.modules.attention import ATTENTION_IMPLS, SpatialTransformer
from utils.errors import UserError


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f), sin(t f)] (cos first), f = exp(-ln(P) i / half); (B,) -> (B, dim).

    For odd ``dim`` a zero column is appended.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def embed_timesteps(time_embed: nn.Module, timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """time_embed(sinusoidal(t)): (B, 4*dim), or (1, 4*dim) when every t is equal (it broadcasts).

    Sampling runs one timestep for the whole batch; computing its embedding once is cheaper and keeps
    every image's result independent of the batch size (small matrix products round differently
    depending on their row count).
    """
    if timesteps.numel() > 1 and bool((timesteps == timesteps[0]).all()):
        timesteps = timesteps[:1]
    return time_embed(timestep_embedding(timesteps, dim))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (eps 1e-5), as SD's UNet does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """GN-SiLU-conv, plus a projection of the time embedding, GN-SiLU-dropout-conv; identity or 1x1 skip."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        norm_groups: int,
        dropout: float = 0.0,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(norm_groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(norm_groups, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C', H, W)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """3x3 convolution with stride 2 and padding 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose residual blocks get the time embedding and transformers the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def validate_unet_config(cfg: UNetConfig, where: str = "unet") -> None:
    """Reject sizes the architecture cannot take, naming the key; called by every builder."""
    if cfg.attention not in ATTENTION_IMPLS:
        raise UserError(f"{where}.attention must be one of {', '.join(ATTENTION_IMPLS)}, got '{cfg.attention}'")
    widths = {cfg.model_channels * m for m in cfg.channel_mult}
    for w in sorted(widths):
        if w % cfg.norm_groups:
            raise UserError(
                f"{where}: channel width {w} (model_channels {cfg.model_channels} x channel_mult) is not divisible "
                f"by norm_groups {cfg.norm_groups}; change {where}.norm_groups or {where}.model_channels"
            )
        heads, dim_head = attention_heads(cfg, w)
        if heads * dim_head != w:
            raise UserError(f"{where}: channel width {w} is not divisible into {heads} heads; change {where}.num_heads")


def attention_heads(cfg: UNetConfig, channels: int) -> tuple[int, int]:
    """(heads, head dim) of a spatial transformer with ``channels`` channels."""
    if cfg.num_head_channels == -1:
        return cfg.num_heads, channels // cfg.num_heads
    return channels // cfg.num_head_channels, cfg.num_head_channels


def build_input_blocks(cfg: UNetConfig, time_embed_dim: int) -> tuple[nn.ModuleList, list[int], int, int]:
    """The encoder half: returns (input_blocks, channels after each block, final channels, final ds)."""
    mc = cfg.model_channels
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    chans = [mc]
    ch, ds = mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [
                ResBlock(ch, time_embed_dim, mult * mc, cfg.norm_groups, cfg.dropout, cfg.use_checkpoint)
            ]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(_transformer(cfg, ch))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
            ds *= 2
    return blocks, chans, ch, ds


def build_middle_block(cfg: UNetConfig, ch: int, time_embed_dim: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(
        ResBlock(ch, time_embed_dim, ch, cfg.norm_groups, cfg.dropout, cfg.use_checkpoint),
        _transformer(cfg, ch),
        ResBlock(ch, time_embed_dim, ch, cfg.norm_groups, cfg.dropout, cfg.use_checkpoint),
    )


def build_time_embed(model_channels: int) -> nn.Sequential:
    dim = model_channels * 4
    return nn.Sequential(nn.Linear(model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def _transformer(cfg: UNetConfig, ch: int) -> SpatialTransformer:
    heads, dim_head = attention_heads(cfg, ch)
    return SpatialTransformer(
        ch,
        heads,
        dim_head,
        cfg.transformer_depth,
        cfg.context_dim,
        cfg.norm_groups,
        cfg.dropout,
        cfg.use_linear_in_transformer,
        cfg.use_checkpoint,
        cfg.attention,
    )


class UNetModel(nn.Module):
    """The SD-1 UNet: ``forward(x (B,4,h,w), timesteps (B,), context (B,L,D)) -> eps (B,4,h,w)``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        validate_unet_config(cfg)
        self.cfg = cfg
        mc = cfg.model_channels
        temb = mc * 4
        self.time_embed = build_time_embed(mc)
        self.input_blocks, chans, ch, ds = build_input_blocks(cfg, temb)
        self.middle_block = build_middle_block(cfg, ch, temb)
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                skip_ch = chans.pop()
                layers: list[nn.Module] = [
                    ResBlock(ch + skip_ch, temb, mc * mult, cfg.norm_groups, cfg.dropout, cfg.use_checkpoint)
                ]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1)
        )

    def embed_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) integer timesteps -> (B or 1, 4*model_channels); see :func:`embed_timesteps`."""
        return embed_timesteps(self.time_embed, timesteps, self.cfg.model_channels)

    def encode(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input blocks and middle block: returns the middle-block output and the 12 skip tensors."""
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        return self.middle_block(h, emb, context), hs

    def decode(
        self,
        h: torch.Tensor,
        hs: Sequence[torch.Tensor],
        emb: torch.Tensor,
        context: torch.Tensor,
        skip_controls: Sequence[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """Output blocks: block j concatenates [h, skip 11-j (+ control 11-j when given)]; then ``out``."""
        n = len(hs)
        for j, block in enumerate(self.output_blocks):
            skip = hs[n - 1 - j]
            if skip_controls is not None and skip_controls[n - 1 - j] is not None:
                skip = skip + skip_controls[n - 1 - j]
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.embed_time(timesteps)  # (B or 1, 4*mc)
        h, hs = self.encode(x, emb, context)
        return self.decode(h, hs, emb, context)
