"""The VLMDiff model configuration: a latent diffusion config plus the Semantic-Guided network's."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ldm.config import LatentDiffusionConfig, load_config
from utils.errors import UserError


@dataclass(frozen=True)
class ControlConfig:
    """The SG network's own settings (its UNet-encoder sizes are those of ``unet``)."""

    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = (16, 16, 32, 32, 96, 96, 256)  # convs before the last one
    hint_stride2_convs: tuple[int, ...] = (2, 4, 6)  # which of those convs (0-based) have stride 2
    only_mid_control: bool = True
    use_sff: bool = True


@dataclass(frozen=True)
class VLMDiffConfig(LatentDiffusionConfig):
    control: ControlConfig = field(default_factory=ControlConfig)


def load_model_config(name: str, overrides: Sequence[str] = ()) -> VLMDiffConfig:
    """A preset name (``sd15``, ``mid``, ``tiny``, ...) or a YAML path, with dotted overrides."""
    cfg = load_config(name, VLMDiffConfig, overrides)
    check_image_size(cfg, f"--config {name}" + (f" {' '.join(overrides)}" if overrides else ""))
    return cfg


def check_image_size(cfg: VLMDiffConfig, where: str) -> None:
    """The image size must be a positive multiple of the model's total downsampling.

    The autoencoder divides the image by 2 per level after its first, the UNet the latent likewise; a
    size that does not divide evenly breaks the UNet's skip connections halfway through a batch.
    """
    factor = 2 ** (len(cfg.autoencoder.ch_mult) - 1) * 2 ** (len(cfg.unet.channel_mult) - 1)
    if cfg.image_size <= 0 or cfg.image_size % factor:
        raise UserError(
            f"{where}: image_size={cfg.image_size} does not suit this model: it must be a positive "
            f"multiple of {factor} (autoencoder x UNet downsampling), e.g. "
            f"{max(factor, round(cfg.image_size / factor) * factor)}"
        )
