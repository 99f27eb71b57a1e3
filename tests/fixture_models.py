"""Build our models from a reference-fixture folder: every size comes from its ``tiny_config.json``.

The fixture tests build their models only through :func:`build_unet`, :func:`build_autoencoder`,
:func:`build_sg_network`, :func:`build_controlled_unet`, :func:`build_vlmdiff` and (for CLIs)
:func:`write_model_config`, so they pass on any fixture folder of the same kind, whatever its widths,
heads, context width or autoencoder sizes; ``tests/test_fixture_models.py`` checks both. The noise
schedule comes from the folder's ``schedule_and_misc.json``. ``tiny_config.json`` has no text-encoder
section (the fixtures feed contexts directly), so the text tower is a one-layer, one-head CLIP
stand-in of the UNet's context width with random weights, never compared with a reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ldm.config import AutoencoderConfig, CLIPTextArch, DiffusionConfig, TextEncoderConfig, UNetConfig, to_dict
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.unet import UNetModel
from vlmdiff.config import ControlConfig, VLMDiffConfig
from vlmdiff.model import ControlledUNet, VLMDiff
from vlmdiff.sg_network import SGNetwork

UNET_PREFIX = "model.diffusion_model."
SGN_PREFIX = "control_model."
AE_PREFIX = "first_stage_model."


def read_tiny_config(folder: Path) -> dict:
    """The folder's ``tiny_config.json``."""
    return json.loads((Path(folder) / "tiny_config.json").read_text())


def _unet_config(tiny: dict, attention: str = "sdpa") -> UNetConfig:
    u = tiny["unet_and_sgn"]
    return UNetConfig(
        in_channels=u["in_channels"],
        out_channels=u["out_channels"],
        model_channels=u["model_channels"],
        channel_mult=tuple(u["channel_mult"]),
        num_res_blocks=u["num_res_blocks"],
        attention_resolutions=tuple(u["attention_resolutions"]),
        num_heads=u["num_heads"],
        num_head_channels=u.get("num_head_channels", -1),
        transformer_depth=u["transformer_depth"],
        context_dim=u["context_dim"],
        norm_groups=tiny["groupnorm_groups"],
        use_linear_in_transformer=u.get("use_linear_in_transformer", False),
        attention=attention,
    )


def _autoencoder_config(tiny: dict) -> AutoencoderConfig:
    a = tiny["autoencoder"]
    return AutoencoderConfig(
        embed_dim=a["embed_dim"],
        z_channels=a["z_channels"],
        double_z=a["double_z"],
        resolution=a["resolution"],
        in_channels=a["in_channels"],
        out_ch=a["out_ch"],
        ch=a["ch"],
        ch_mult=tuple(a["ch_mult"]),
        num_res_blocks=a["num_res_blocks"],
        attn_resolutions=tuple(a["attn_resolutions"]),
        dropout=a["dropout"],
        norm_groups=tiny["groupnorm_groups"],
    )


def model_config(folder: Path, attention: str = "sdpa") -> VLMDiffConfig:
    """The whole VLMDiff config of a fixture folder (``attention``: "sdpa" or "math")."""
    folder = Path(folder)
    tiny = read_tiny_config(folder)
    misc = json.loads((folder / "schedule_and_misc.json").read_text())
    unet = _unet_config(tiny, attention)
    tokens = tiny["e2e"]["L"]
    text = TextEncoderConfig(
        max_length=tokens,
        clip_arch=CLIPTextArch(
            hidden_size=unet.context_dim,
            intermediate_size=2 * unet.context_dim,
            num_hidden_layers=1,
            num_attention_heads=1,
            max_position_embeddings=tokens,
        ),
    )
    diffusion = DiffusionConfig(
        timesteps=misc["num_timesteps"],
        linear_start=misc["linear_start"],
        linear_end=misc["linear_end"],
        scale_factor=misc["scale_factor"],
    )
    return VLMDiffConfig(
        image_size=tiny["e2e"]["H"],
        unet=unet,
        autoencoder=_autoencoder_config(tiny),
        text_encoder=text,
        diffusion=diffusion,
        control=ControlConfig(hint_channels=tiny["unet_and_sgn"]["hint_channels"]),
    )


def vlmdiff_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The merged tiny UNet + SG-network state dict (upstream names)."""
    sd: dict[str, torch.Tensor] = {}
    for name in (
        "tiny_unet_weights_1of2.pt",
        "tiny_unet_weights_2of2.pt",
        "tiny_sgn_weights_1of2.pt",
        "tiny_sgn_weights_2of2.pt",
    ):
        sd.update(torch.load(Path(folder) / name))
    return sd


def autoencoder_weights_path(folder: Path) -> Path:
    """The tiny autoencoder's plain state dict (``encoder.*``, ``decoder.*``, ...)."""
    return Path(folder) / "tiny_ae_weights.pt"


def sub_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def build_unet(folder: Path, attention: str = "sdpa", weights: bool = True) -> UNetModel:
    """The folder's UNet in eval mode, with its weights unless ``weights`` is False."""
    unet = UNetModel(model_config(folder, attention).unet).eval()
    if weights:
        unet.load_state_dict(sub_state_dict(vlmdiff_weights(folder), UNET_PREFIX), strict=True)
    return unet


def build_controlled_unet(folder: Path, weights: bool = True) -> ControlledUNet:
    unet = ControlledUNet(model_config(folder).unet).eval()
    if weights:
        unet.load_state_dict(sub_state_dict(vlmdiff_weights(folder), UNET_PREFIX), strict=True)
    return unet


def build_sg_network(folder: Path, weights: bool = True) -> SGNetwork:
    cfg = model_config(folder)
    sgn = SGNetwork(cfg.unet, cfg.control).eval()
    if weights:
        sgn.load_state_dict(sub_state_dict(vlmdiff_weights(folder), SGN_PREFIX), strict=True)
    return sgn


def build_autoencoder(folder: Path, weights: bool = True) -> AutoencoderKL:
    ae = AutoencoderKL(model_config(folder).autoencoder).eval()
    if weights:
        ae.load_state_dict(torch.load(autoencoder_weights_path(folder)), strict=True)
    return ae


def build_vlmdiff(folder: Path, weights: bool = True) -> VLMDiff:
    """The whole model; with ``weights``, the UNet, SG network and autoencoder hold the folder's tensors
    (the text tower keeps its random initialisation)."""
    model = VLMDiff(model_config(folder)).eval()
    if weights:
        own = model.state_dict()
        own.update(vlmdiff_weights(folder))
        own.update({AE_PREFIX + k: v for k, v in torch.load(autoencoder_weights_path(folder)).items()})
        model.load_state_dict(own, strict=True)
    return model


def write_model_config(folder: Path, path: Path) -> Path:
    """The folder's model config as a YAML file that the CLIs' ``--config`` reads; returns ``path``."""
    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(model_config(folder)), sort_keys=False))
    return path


def assert_close(actual: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float, what: str = "") -> float:
    """|actual - ref| <= atol + rtol |ref| elementwise; returns the max abs error."""
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a, r = actual.detach().double(), ref.detach().double()
    err = (a - r).abs()
    bound = atol + rtol * r.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: max error {err.max().item():.3g} exceeds tolerance (by {worst:.3g})"
    return err.max().item()
