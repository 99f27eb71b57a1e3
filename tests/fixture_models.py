"""Build our models from a reference-fixture folder's ``tiny_config.json`` and load its weights.

Sizes always come from the fixture folder, so the tests pass on any folder of the same kind.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.config import AutoencoderConfig, UNetConfig


def unet_config(tiny: dict) -> UNetConfig:
    u = tiny["unet_and_sgn"]
    return UNetConfig(
        in_channels=u["in_channels"], out_channels=u["out_channels"], model_channels=u["model_channels"],
        channel_mult=tuple(u["channel_mult"]), num_res_blocks=u["num_res_blocks"],
        attention_resolutions=tuple(u["attention_resolutions"]), num_heads=u["num_heads"],
        num_head_channels=u.get("num_head_channels", -1), transformer_depth=u["transformer_depth"],
        context_dim=u["context_dim"], norm_groups=tiny["groupnorm_groups"],
        use_linear_in_transformer=u.get("use_linear_in_transformer", False),
    )


def autoencoder_config(tiny: dict) -> AutoencoderConfig:
    a = tiny["autoencoder"]
    return AutoencoderConfig(
        embed_dim=a["embed_dim"], z_channels=a["z_channels"], double_z=a["double_z"], resolution=a["resolution"],
        in_channels=a["in_channels"], out_ch=a["out_ch"], ch=a["ch"], ch_mult=tuple(a["ch_mult"]),
        num_res_blocks=a["num_res_blocks"], attn_resolutions=tuple(a["attn_resolutions"]), dropout=a["dropout"],
        norm_groups=tiny["groupnorm_groups"],
    )


def vlmdiff_weights(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    """The merged tiny UNet + SG-network state dict (upstream names)."""
    sd: dict[str, torch.Tensor] = {}
    for name in ("tiny_unet_weights_1of2.pt", "tiny_unet_weights_2of2.pt",
                 "tiny_sgn_weights_1of2.pt", "tiny_sgn_weights_2of2.pt"):
        sd.update(torch.load(fixtures_dir / name))
    return sd


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def assert_close(actual: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, what: str = "") -> float:
    """|actual - ref| <= atol + rtol |ref| elementwise; returns the max abs error."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a, r = actual.detach().double(), ref.detach().double()
    err = (a - r).abs()
    bound = atol + rtol * r.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds tolerance (by {worst:.3g})"
    return err.max().item()
