"""The KL autoencoder (first stage): encoder, decoder and diagonal Gaussian posterior.

Weight names equal the CompVis ``AutoencoderKL`` ones (``encoder.down.0.block.1.conv2``,
``decoder.mid.attn_1.q``, ``quant_conv``, ...). The model sees ImageNet-normalised images in this
project, but nothing here depends on the normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import AutoencoderConfig
from utils.errors import UserError


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))) (x through the 1x1 shortcut when the width changes).

        The activations and the residual sum are computed in place, into the norm and conv outputs
        made just before (same values, autograd included): at image resolution every extra
        (B, C, H, W) buffer is fresh memory the system has to map and zero, about a tenth of the
        autoencoder's time at batch 4.
        """
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, C', H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))  # (B, C', H, W)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return h.add_(x) if h.dtype == x.dtype else x + h  # under autocast x may be wider than h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (scale c^-0.5) with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))  # (B,1,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad right and bottom by one zero, then a 3x3 stride-2 convolution without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups, dropout)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups, dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The residual blocks of one resolution level, each followed by its attention block if any."""
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1,) + tuple(cfg.ch_mult)
        res = cfg.resolution
        block_in = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_in = cfg.ch * in_mult[level]
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, cfg.ch * mult, g, cfg.dropout))
                block_in = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                res //= 2
            self.down.append(stage)
        self.mid = _mid(block_in, g, cfg.dropout)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = _run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, g, cfg.dropout)
        stages: list[nn.Module] = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, g, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != 0:
                stage.upsample = Upsample(block_in)
                res *= 2
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)  # up[i] is level i; run from the last level down
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            h = _run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) from 2*C moment channels; logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, with ``eps`` given or drawn from ``generator``."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to N(0, I), summed over C, H, W: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def validate_autoencoder_config(cfg: AutoencoderConfig, where: str = "autoencoder") -> None:
    for mult in (1,) + tuple(cfg.ch_mult):
        if (cfg.ch * mult) % cfg.norm_groups:
            raise UserError(
                f"{where}: channel width {cfg.ch * mult} (ch {cfg.ch} x ch_mult) is not divisible by norm_groups "
                f"{cfg.norm_groups}; change {where}.norm_groups or {where}.ch"
            )


class AutoencoderKL(nn.Module):
    """Image (B,3,H,W) <-> latent (B,embed_dim,H/f,W/f) with f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        validate_autoencoder_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
