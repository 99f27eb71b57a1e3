"""The Semantic-Guided (SG) network: a trainable copy of the UNet encoder that sees the input image.

It returns 13 control tensors (one per UNet input block, one for the middle block) that the
controlled UNet adds to its decoder (``vlmdiff.model``). Parts:

1. hint block: 3x3 convolutions with SiLU between them, three of them with stride 2 (image -> latent
   size); its output is added to the hidden state after input block 0;
2. a copy of the UNet input blocks and middle block, each followed by a 1x1 "zero" convolution;
3. SFF (spatial-aware feature fusion, from DiAD): stride-2 conv -> InstanceNorm -> SiLU branches
   from each control tensor at the second-lowest resolution to each one at the lowest; the latter
   become SiLU(own + sum of branches). Channel counts come from the config (upstream hard-codes
   SD-1.5's 640/1280).

All non-default initialisation (the zero convolutions) happens in :func:`zero_init`.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from ldm.config import UNetConfig
from ldm.modules.unet import (
    build_input_blocks,
    build_middle_block,
    build_time_embed,
    embed_timesteps,
    validate_unet_config,
)
from vlmdiff.config import ControlConfig


def block_resolutions(cfg: UNetConfig) -> list[int]:
    """Downsample factor of each input block's output (1, 1, 1, 2, 2, 2, 4, ... for SD-1.5)."""
    out, ds = [1], 1
    for level in range(len(cfg.channel_mult)):
        out += [ds] * cfg.num_res_blocks
        if level != len(cfg.channel_mult) - 1:
            ds *= 2
            out.append(ds)
    return out


def sff_pairs(cfg: UNetConfig) -> tuple[list[int], list[int]]:
    """(source, target) control indices of the SFF: the second-lowest and the lowest resolution."""
    res = block_resolutions(cfg)
    low = max(res)
    if low == 1:
        return [], []
    return [i for i, r in enumerate(res) if r == low // 2], [i for i, r in enumerate(res) if r == low]


class SGNetwork(nn.Module):
    """``forward(x (B,4,h,w), hint (B,3,8h,8w), timesteps (B,), context (B,L,D)) -> 13 controls``."""

    def __init__(self, unet_cfg: UNetConfig, cfg: ControlConfig):
        super().__init__()
        validate_unet_config(unet_cfg)
        self.unet_cfg = unet_cfg
        self.cfg = cfg
        mc = unet_cfg.model_channels
        self.time_embed = build_time_embed(mc)
        self.input_hint_block = _hint_block(cfg, mc)
        self.input_blocks, chans, ch, _ = build_input_blocks(unet_cfg, mc * 4)
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in chans)
        self.middle_block = build_middle_block(unet_cfg, ch, mc * 4)
        self.middle_block_out = nn.Sequential(nn.Conv2d(ch, ch, 1))
        self.sources, self.targets = sff_pairs(unet_cfg) if cfg.use_sff else ([], [])
        for i, src in enumerate(self.sources, start=1):
            for j, tgt in enumerate(self.targets, start=1):
                self.add_module(
                    f"down{i}{j}",
                    nn.Sequential(
                        nn.Conv2d(chans[src], chans[tgt], 3, stride=2, padding=1, bias=False),
                        nn.InstanceNorm2d(chans[tgt], affine=False, track_running_stats=False),
                        nn.SiLU(),
                    ),
                )
        zero_init(self)

    def sff_branch(self, i: int, j: int) -> nn.Module:
        """The branch from the i-th source to the j-th target (1-based, upstream's ``down{i}{j}``)."""
        return getattr(self, f"down{i}{j}")

    def embed_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """The hint block's output (B, mc, h, w) for images (B, 3, 8h, 8w); it does not depend on x or t."""
        return self.input_hint_block(hint)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor | None,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        guided_hint: torch.Tensor | None = None,
        skip: Collection[int] = (),
    ) -> list[torch.Tensor | None]:
        """13 controls; ``guided_hint`` = :meth:`embed_hint` of ``hint`` when already computed (``hint`` unused then).

        A sampler calls the network at every step with the same hint: computing its embedding once
        per sampling run gives the same result for less work. ``skip``: indices of controls the
        caller does not read (:meth:`vlmdiff.model.VLMDiff.unused_controls`); their zero
        convolutions are not run and their places hold None. The SFF's controls cannot be skipped.
        """
        in_sff = set(skip) & {*self.sources, *self.targets}
        if in_sff:
            raise ValueError(f"controls {sorted(in_sff)} take part in the SFF and cannot be skipped")
        emb = embed_timesteps(self.time_embed, timesteps, self.unet_cfg.model_channels)  # (B or 1, 4*mc)
        if guided_hint is None:
            guided_hint = self.embed_hint(hint)  # (B, mc, h, w)
        outs = []
        h = x
        for k, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if k == 0:
                h = h + guided_hint
            outs.append(None if k in skip else zero_conv(h))  # (B, C_k, h_k, w_k)
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        if self.targets:
            fused = []
            for j, tgt in enumerate(self.targets, start=1):
                acc = outs[tgt]
                for i, src in enumerate(self.sources, start=1):
                    acc = acc + self.sff_branch(i, j)(outs[src])  # pre-fusion sources
                fused.append(torch.nn.functional.silu(acc))
            for tgt, f in zip(self.targets, fused, strict=True):
                outs[tgt] = f
        return outs


def _hint_block(cfg: ControlConfig, model_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = cfg.hint_channels
    for k, c_out in enumerate(cfg.hint_block_channels):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, stride=2 if k in cfg.hint_stride2_convs else 1), nn.SiLU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, model_channels, 3, padding=1))
    return nn.Sequential(*layers)


def zero_initialised_modules(net: SGNetwork) -> list[nn.Conv2d]:
    """The convolutions that start at zero: last hint conv, 12 zero convs, middle-block out, SFF convs."""
    convs = [net.input_hint_block[-1], *(zc[0] for zc in net.zero_convs), net.middle_block_out[0]]
    convs += [net.sff_branch(i, j)[0] for i in range(1, len(net.sources) + 1) for j in range(1, len(net.targets) + 1)]
    return convs


def fresh_new_layers(unet_cfg: UNetConfig, cfg: ControlConfig) -> dict[str, torch.Tensor]:
    """Initial weights of the layers that have no UNet twin (hint block, zero convs, SFF), nothing else.

    The copy of the UNet encoder stays on the meta device, so at SD-1.5 size only the new layers
    (~120 M parameters, mostly the SFF) are allocated.
    """
    with torch.device("meta"):
        net = SGNetwork(unet_cfg, cfg)
    new = [net.input_hint_block, net.zero_convs, net.middle_block_out]
    new += [net.sff_branch(i, j) for i in range(1, len(net.sources) + 1) for j in range(1, len(net.targets) + 1)]
    for module in new:
        module.to_empty(device="cpu")
        for sub in module.modules():
            if isinstance(sub, nn.Conv2d):
                sub.reset_parameters()
    zero_init(net)
    return {k: v for k, v in net.state_dict().items() if v.device.type != "meta"}


@torch.no_grad()
def zero_init(net: SGNetwork) -> None:
    """All of the SG network's non-default initialisation: these layers output zero at the start."""
    for conv in zero_initialised_modules(net):
        if conv.weight.device.type == "meta":
            continue
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
