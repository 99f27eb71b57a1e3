"""LPIPS (VGG16, v0.1), the perceptual distance of the first-stage loss, and its weights from local files.

Written from the published definition: Zhang et al., "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", CVPR 2018, eq. 1, VGG16 variant v0.1:
d(x, y) = sum_l mean_hw || w_l * (f_l(x) - f_l(y)) ||^2, with f_l the channel-normalised relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3 activations of an ImageNet VGG16 and w_l learned non-negative 1x1
convolutions ("linear layers").

Module and parameter names give the state-dict names of upstream finetuned checkpoints under
``perceptual_loss.`` (``net.slice1.0.weight``, ``lin0.model.1.weight``, ...). The weights are read
from local files (:func:`load_perceptual_weights`); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import describe_mismatch, load_into, load_state_dict
from utils.errors import UserError

log = logging.getLogger(__name__)

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
DEFAULT_VGG16_PATH = Path("models") / VGG16_FILE
LPIPS_LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

# torchvision's VGG16 ``features``: an int is a 3x3 conv (padding 1) to that width followed by ReLU,
# "M" a 2x2 max-pool. Layer i of this list is torchvision's ``features.i``.
VGG16_LAYOUT: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
VGG16_SLICE_ENDS = (4, 9, 16, 23, 30)  # slice k ends after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS v0.1 input scaling: (x - shift) / scale maps [-1, 1] images to ImageNet statistics.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class ScalingLayer(nn.Module):
    """(x - shift) / scale per channel, as LPIPS v0.1 does before VGG."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGG16Features(nn.Module):
    """torchvision VGG16 ``features[0:30]`` split into five slices; layer names keep torchvision's index."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU()]
                c_in = int(v)
        start = 0
        for k, end in enumerate(VGG16_SLICE_ENDS, 1):
            block = nn.Sequential()
            for i in range(start, end):
                block.add_module(str(i), layers[i])
            self.add_module(f"slice{k}", block)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B,3,H,W) -> five maps: (B,64,H,W), (B,128,H/2,W/2), (B,256,H/4,.), (B,512,H/8,.), (B,512,H/16,.)."""
        feats = []
        for k in range(1, len(VGG16_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            feats.append(x)
        return feats


class NetLinLayer(nn.Module):
    """LPIPS "linear layer": dropout then a bias-free 1x1 conv to one channel (``model.1.weight``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each feature vector (over channels) by its L2 norm."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16, frozen: ``forward(x, y)`` -> distance (B,1,1,1).

    Always in eval mode (dropout off, whatever ``train()`` is called with): the distance is
    deterministic. Upstream's training put the whole loss module in train mode, so its LPIPS
    dropout (p = 0.5, rescaled) was active; that changes the noise of the loss, not its expectation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        for k, c in enumerate(VGG16_CHANNELS):
            self.add_module(f"lin{k}", NetLinLayer(c))
        self.requires_grad_(False)
        self.eval()

    def lin_layers(self) -> list[NetLinLayer]:
        return [getattr(self, f"lin{k}") for k in range(len(VGG16_CHANNELS))]

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of images (B,3,H,W) expected in [-1, 1] (eq. 1 of Zhang et al.) -> (B,1,1,1)."""
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = None
        for lin, a, b in zip(self.lin_layers(), fx, fy, strict=True):
            d = (_unit_channels(a) - _unit_channels(b)) ** 2  # (B, C_l, H_l, W_l)
            term = lin(d).mean(dim=(2, 3), keepdim=True)  # (B, 1, 1, 1)
            total = term if total is None else total + term
        return total


# ---------------------------------------------------------------------------------------------
# Perceptual weights from local files


def packaged_lpips_weights() -> Path | None:
    """``lpips/weights/v0.1/vgg.pth`` inside the installed ``lpips`` package (found without importing it)."""
    spec = importlib.util.find_spec("lpips")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "weights" / "v0.1" / "vgg.pth"
        if path.is_file():
            return path
    return None


def resolve_perceptual_weight_files(
    vgg_weights: str | os.PathLike | None = None, lpips_weights: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """The VGG16 and LPIPS linear-layer files to read; a missing one is a UserError saying where to get it."""
    skip = "or pass --perceptual_weight 0 to train without the perceptual (LPIPS) term"
    vgg = Path(vgg_weights) if vgg_weights is not None else DEFAULT_VGG16_PATH
    if not vgg.is_file():
        where = (
            "given by --vgg_weights"
            if vgg_weights is not None
            else "the default location; --vgg_weights PATH sets another"
        )
        raise UserError(
            f"perceptual loss needs the torchvision VGG16 ImageNet weights {VGG16_FILE}: {vgg} not found "
            f"({where}). Download {VGG16_URL} to {vgg}, {skip}"
        )
    if lpips_weights is not None:
        lin = Path(lpips_weights)
        if not lin.is_file():
            raise UserError(
                f"LPIPS linear-layer weights {lin} not found (--lpips_weights); the lpips package ships "
                f"them as lpips/weights/v0.1/vgg.pth (pip install lpips) or get {LPIPS_LIN_URL}; {skip}"
            )
        return vgg, lin
    lin = packaged_lpips_weights()
    if lin is None:
        raise UserError(
            "LPIPS linear-layer weights not found: looked for lpips/weights/v0.1/vgg.pth in the installed "
            f"lpips package (pip install lpips), or download {LPIPS_LIN_URL} and pass --lpips_weights PATH; "
            f"{skip}"
        )
    return vgg, lin


def vgg16_features_from_torchvision(
    sd: Mapping[str, torch.Tensor], path: str | os.PathLike = "VGG16 weights"
) -> dict[str, torch.Tensor]:
    """Rename torchvision VGG16 weights to :class:`VGG16Features`'s names.

    ``features.i.*`` are renamed; ``classifier.*`` is ignored.
    """
    slice_of = {}
    start = 0
    for k, end in enumerate(VGG16_SLICE_ENDS, 1):
        slice_of.update({i: k for i in range(start, end)})
        start = end
    out: dict[str, torch.Tensor] = {}
    stray = []
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "classifier":
            continue
        if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit() and int(parts[1]) in slice_of:
            out[f"slice{slice_of[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
        elif not (len(parts) == 3 and parts[0] == "features" and parts[1] == "30"):
            stray.append(key)
    if stray:
        raise UserError(
            f"{path}: not torchvision VGG16 weights (unexpected key '{stray[0]}'); expected {VGG16_FILE} "
            f"from {VGG16_URL}"
        )
    return out


def load_perceptual_weights(lpips: LPIPS, vgg_path: str | os.PathLike, lin_path: str | os.PathLike) -> None:
    """Load VGG16 (torchvision file) and the LPIPS linear layers (lpips v0.1 ``vgg.pth``) strictly."""
    vgg_sd = vgg16_features_from_torchvision(load_state_dict(vgg_path), vgg_path)
    expected = {k: v.shape for k, v in lpips.net.state_dict().items()}
    problem = describe_mismatch(expected, vgg_sd)
    if problem:
        raise UserError(
            f"{vgg_path}: not torchvision VGG16 weights ({problem}); expected {VGG16_FILE} from {VGG16_URL}"
        )
    load_into(lpips.net, vgg_sd, vgg_path)
    lins = nn.Module()
    for k, layer in enumerate(lpips.lin_layers()):
        lins.add_module(f"lin{k}", layer)
    load_into(
        lins,
        load_state_dict(lin_path),
        lin_path,
        hint="expected the LPIPS v0.1 VGG linear layers (lpips/weights/v0.1/vgg.pth)",
    )
    log.info("LPIPS: VGG16 from %s, linear layers from %s", vgg_path, lin_path)
