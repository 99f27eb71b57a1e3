"""The first-stage training loss: a PatchGAN discriminator and the LPIPS-with-discriminator loss.

Written from the published definitions:

* PatchGAN discriminator (Isola et al., "Image-to-Image Translation with Conditional Adversarial
  Networks", CVPR 2017): 4x4 convolutions, BatchNorm, LeakyReLU(0.2), one logit per patch.
* The first-stage objective of latent diffusion (Rombach et al. 2022, appendix G; Esser et al.
  2021 for the adaptive GAN weight, eq. 7): NLL = (|x - x̂| + w_p LPIPS) / exp(s) + s with a learned
  scalar log-variance s, plus kl_weight * KL(q(z|x) || N(0, I)), plus, from ``disc_start`` on,
  lambda * disc_factor * (-mean D(x̂)) with lambda = ||grad NLL|| / (||grad G|| + 1e-4) at the
  decoder's last layer, clamped to [0, 1e4], times ``disc_weight``; the discriminator minimises the
  hinge loss. LPIPS is :class:`ldm.modules.lpips.LPIPS`.

Module and parameter names give the state-dict names of upstream finetuned checkpoints
(``perceptual_loss.net.slice1.0.weight``, ``perceptual_loss.lin0.model.1.weight``,
``discriminator.main.3.running_mean``, ``logvar``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.autoencoder import DiagonalGaussian
from ldm.modules.lpips import LPIPS
from utils.errors import UserError

DISC_LOSSES = ("hinge", "vanilla")


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """Settings of :class:`LPIPSWithDiscriminator`; defaults are upstream's.

    ``disc_start`` counts generator optimiser updates (upstream's Lightning ``global_step``).
    """

    disc_start: int = 50001
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    logvar_init: float = 0.0
    disc_in_channels: int = 3
    disc_num_layers: int = 3
    disc_channels: int = 64
    disc_loss: str = "hinge"


def validate_loss_config(cfg: AutoencoderLossConfig, where: str = "loss") -> None:
    if cfg.disc_loss not in DISC_LOSSES:
        raise UserError(f"{where}.disc_loss must be one of {', '.join(DISC_LOSSES)}, got '{cfg.disc_loss}'")
    for name in ("kl_weight", "disc_weight", "disc_factor", "perceptual_weight"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{where}.{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.disc_start < 0 or cfg.disc_num_layers < 1 or cfg.disc_channels < 1:
        raise UserError(f"{where}: disc_start must be >= 0, disc_num_layers and disc_channels >= 1")


# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B,C,H,W) -> patch logits (B,1,H',W') (30x30 for 256x256 input with 3 layers)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden conv keeps the resolution
            layers += [
                nn.Conv2d(channels * prev, channels * mult, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(channels * mult),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(channels * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        init_discriminator_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def init_discriminator_weights(module: nn.Module) -> None:
    """The DCGAN initialisation PatchGAN uses: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0.

    Conv biases keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


# ---------------------------------------------------------------------------------------------
# The first-stage objective


class LPIPSWithDiscriminator(nn.Module):
    """Reconstruction NLL (L1 + LPIPS, learned log-variance) + KL + adaptive-weight PatchGAN loss.

    ``perceptual_loss`` is None when ``perceptual_weight`` is 0: no VGG is built and the state dict
    has no ``perceptual_loss.*`` keys (every other key equals upstream's). Images are whatever the
    autoencoder sees: in this project ImageNet-normalised, fed to LPIPS unchanged as upstream does,
    although LPIPS was defined for [-1, 1] images.
    """

    def __init__(self, cfg: AutoencoderLossConfig) -> None:
        super().__init__()
        validate_loss_config(cfg)
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.full((), float(cfg.logvar_init)))
        # Upstream's generator optimiser never includes logvar, so it stays at logvar_init; we freeze it.
        self.logvar.requires_grad_(False)
        self.perceptual_loss = LPIPS() if cfg.perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(cfg.disc_in_channels, cfg.disc_channels, cfg.disc_num_layers)
        self._d_loss = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms count at generator step ``step`` (upstream's adopt_weight)."""
        return self.cfg.disc_factor > 0 and step >= self.cfg.disc_start

    def adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """disc_weight * clamp(||dNLL/dW|| / (||dG/dW|| + 1e-4), 0, 1e4) at ``last_layer`` W; no gradient."""
        nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        ratio = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return torch.clamp(ratio, 0.0, 1e4).detach() * self.cfg.disc_weight

    def generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussian,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the autoencoder for images (B,3,H,W) and their reconstructions; scalars to log.

        Sums run over pixels and channels and are divided by the batch size (upstream's scaling), so
        LPIPS (one value per image) is broadcast over every pixel before the sum.
        """
        b = inputs.shape[0]
        rec = (inputs - reconstructions).abs()  # (B, 3, H, W)
        p_loss = torch.zeros((), device=inputs.device)
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(inputs, reconstructions)  # (B, 1, 1, 1)
            rec = rec + self.cfg.perceptual_weight * p_loss
        nll = rec / torch.exp(self.logvar) + self.logvar
        nll_loss = nll.sum() / b
        kl_loss = posterior.kl().sum() / b
        loss = nll_loss + self.cfg.kl_weight * kl_loss
        d_weight = torch.zeros((), device=inputs.device)
        g_loss = torch.zeros((), device=inputs.device)
        if self.discriminator_active(step):
            g_loss = -self.discriminator(reconstructions).mean()
            if torch.is_grad_enabled() and last_layer is not None:
                d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
            loss = loss + d_weight * self.cfg.disc_factor * g_loss
        logs = {
            "total_loss": loss,
            "nll_loss": nll_loss,
            "rec_loss": rec.mean(),
            "p_loss": p_loss.mean(),
            "kl_loss": kl_loss,
            "logvar": self.logvar,
            "g_loss": g_loss,
            "d_weight": d_weight,
            "disc_factor": torch.tensor(self.cfg.disc_factor if self.discriminator_active(step) else 0.0),
        }
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor * hinge(D(x), D(x̂)) on detached images (0 before ``disc_start``)."""
        logits_real = self.discriminator(inputs.detach())
        logits_fake = self.discriminator(reconstructions.detach())
        factor = self.cfg.disc_factor if self.discriminator_active(step) else 0.0
        d_loss = factor * self._d_loss(logits_real, logits_fake)
        logs = {"disc_loss": d_loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return d_loss, {k: v.detach() for k, v in logs.items()}
