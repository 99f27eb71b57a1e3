"""Finetuning the KL autoencoder (first stage) as a LightningModule, and reading its checkpoints.

State-dict names equal upstream's finetuned first-stage checkpoints: ``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*`` and the loss ``loss.*`` (LPIPS, PatchGAN, ``logvar``).
Lightning 2 has no automatic optimisation with two optimisers, so the generator (autoencoder) and
the discriminator are stepped by hand, with gradient accumulation done here:

* one generator update = ``accumulate_grad_batches`` batches (or fewer at the end of an epoch, as
  Lightning 1.x did); ``ae_steps`` counts these updates and is the step that ``disc_start``,
  ``max_steps``, image logging and periodic checkpoints refer to (upstream's ``global_step``);
* one forward pass per batch serves both losses (upstream ran the autoencoder once per optimiser,
  the discriminator's pass after the generator's update at window ends);
* before ``disc_start`` the discriminator is neither run nor stepped. Upstream ran it and stepped
  Adam with zero gradients, which changes only BatchNorm running statistics (unused in training
  mode) and Adam's step count (bias correction of the first updates after ``disc_start``).

:func:`autoencoder_state_dict` reads the autoencoder weights out of any accepted checkpoint format;
``build_model.py`` uses it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ldm.checkpoint import describe_mismatch, load_into, state_dict_of
from ldm.config import AutoencoderConfig, to_dict
from ldm.modules.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.modules.losses import AutoencoderLossConfig, LPIPSWithDiscriminator
from utils.errors import UserError

log = logging.getLogger(__name__)

AE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
SD_PREFIX = "first_stage_model."
LOSS_PREFIX = "loss."
STEP_KEY = "autoencoder_steps"  # our entry in Lightning checkpoints: generator updates so far


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """Finetuning hyper-parameters (``configs/autoencoder.yaml``). Learning rate = base_lr x batch_size.

    The budget is ``max_steps`` generator updates and/or ``max_epochs`` (-1: no limit of that kind).
    """

    base_lr: float = 4.5e-5
    betas: tuple[float, ...] = (0.5, 0.9)
    batch_size: int = 1
    accumulate_grad_batches: int = 8
    max_steps: int = 60001  # reaches the PatchGAN phase (disc_start 50001) for 10,000 updates
    max_epochs: int = -1
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)

    @property
    def learning_rate(self) -> float:
        """Upstream's rule: base_lr x batch size (per device), not scaled by accumulation or devices."""
        return self.base_lr * self.batch_size


def validate_train_config(cfg: AutoencoderTrainConfig, where: str = "finetuning config") -> None:
    if cfg.batch_size < 1 or cfg.accumulate_grad_batches < 1:
        raise UserError(f"{where}: batch_size and accumulate_grad_batches must be >= 1")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise UserError(f"{where}: betas must be two numbers in [0, 1), got {list(cfg.betas)}")
    if cfg.base_lr <= 0:
        raise UserError(f"{where}: base_lr must be > 0, got {cfg.base_lr}")
    if cfg.max_steps <= 0 and cfg.max_epochs <= 0:
        raise UserError(f"{where}: give a budget: max_steps > 0 or max_epochs > 0 (both are -1)")


def load_train_config(name: str = "autoencoder", overrides: Sequence[str] = ()) -> AutoencoderTrainConfig:
    """Read ``configs/{name}.yaml`` (or a YAML path) strictly as :class:`AutoencoderTrainConfig`."""
    from ldm.config import load_config, preset_path

    cfg = load_config(name, AutoencoderTrainConfig, overrides)
    validate_train_config(cfg, str(preset_path(name)))
    return cfg


# ---------------------------------------------------------------------------------------------
# Checkpoint formats


def autoencoder_state_dict(ckpt: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The :class:`AutoencoderKL` weights in a loaded checkpoint (``ldm.checkpoint.load_checkpoint``).

    Accepted: a finetuned first-stage checkpoint (ours or upstream's: ``encoder.*`` ... plus
    ``loss.*``, which is dropped), the original ``kl-f8`` ``model.ckpt``, a plain autoencoder state
    dict, or a Stable Diffusion checkpoint (``first_stage_model.*``; the rest is ignored). Keys are
    not checked against a model here: load the result with ``ldm.checkpoint.load_into``.
    """
    sd = state_dict_of(ckpt, path)
    own = {k: v for k, v in sd.items() if k.split(".", 1)[0] in AE_PARTS}
    sd_style = {k[len(SD_PREFIX) :]: v for k, v in sd.items() if k.startswith(SD_PREFIX)}
    if own and sd_style:
        raise UserError(
            f"{path} holds both {SD_PREFIX}* and bare encoder.*/decoder.* weights: which autoencoder "
            "is meant is ambiguous; extract one of them"
        )
    found = own or sd_style
    if not found:
        raise UserError(
            f"{path} holds no autoencoder weights: expected encoder.*, decoder.*, quant_conv.*, "
            f"post_quant_conv.* (a first-stage checkpoint) or {SD_PREFIX}* (a Stable Diffusion checkpoint)"
        )
    return found


def loss_state_dict(ckpt: Mapping[str, Any], path: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``loss.*`` weights of a first-stage checkpoint, prefix removed (empty if it has none)."""
    return {k[len(LOSS_PREFIX) :]: v for k, v in state_dict_of(ckpt, path).items() if k.startswith(LOSS_PREFIX)}


# ---------------------------------------------------------------------------------------------
# The LightningModule


class AutoencoderTraining(pl.LightningModule):
    """KL autoencoder + LPIPS/PatchGAN loss, trained with manual optimisation (two Adam optimisers).

    Batches are dicts with ``image`` (B,3,H,W) as the autoencoder should see it (ImageNet-normalised
    in this project). ``run_config`` is plain data stored beside the configs in checkpoints.
    """

    def __init__(
        self, ae_cfg: AutoencoderConfig, train_cfg: AutoencoderTrainConfig, run_config: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        validate_train_config(train_cfg)
        self.automatic_optimization = False
        self.ae_cfg = ae_cfg
        self.train_cfg = train_cfg
        self.run_config = dict(run_config or {})
        ae = AutoencoderKL(ae_cfg)  # its parts sit at the top level, as in upstream's checkpoints
        self.encoder = ae.encoder
        self.decoder = ae.decoder
        self.quant_conv = ae.quant_conv
        self.post_quant_conv = ae.post_quant_conv
        self.loss = LPIPSWithDiscriminator(train_cfg.loss)
        self.ae_steps = 0  # generator updates so far (saved in checkpoints under STEP_KEY)
        self._accumulated = 0  # batches whose gradients wait for the next update

    # --- autoencoder --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2*embed_dim, h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (B, 3, H, W)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def autoencoder_parts(self) -> nn.Module:
        """A container whose state dict is exactly the :class:`AutoencoderKL` one (shares the modules)."""
        parts = nn.Module()
        for name in AE_PARTS:
            parts.add_module(name, getattr(self, name))
        return parts

    def autoencoder_weights(self) -> dict[str, torch.Tensor]:
        return dict(self.autoencoder_parts().state_dict())

    def resolved_config(self) -> dict[str, Any]:
        return {"autoencoder": to_dict(self.ae_cfg), "finetune": to_dict(self.train_cfg), **self.run_config}

    # --- starting weights ---------------------------------------------------------------------
    def load_starting_weights(
        self, ckpt: Mapping[str, Any], path: str | os.PathLike, use_file_perceptual: bool = True
    ) -> list[str]:
        """Load the autoencoder strictly, and the parts of the loss that the file holds completely.

        Like upstream's (non-strict) load, a ``kl-f8`` ``model.ckpt`` also provides the
        discriminator and ``logvar``; its LPIPS copy is used when ``use_file_perceptual``. A loss
        part present only in part, or with other shapes, is an error. Returns what was loaded.
        """
        load_into(
            self.autoencoder_parts(),
            autoencoder_state_dict(ckpt, path),
            path,
            hint="is --config the preset this autoencoder was made with?",
        )
        loaded = ["autoencoder"]
        file_loss = loss_state_dict(ckpt, path)
        stray = sorted(k for k in file_loss if k.split(".", 1)[0] not in ("discriminator", "logvar", "perceptual_loss"))
        if stray:
            raise UserError(f"{path}: unexpected loss weight 'loss.{stray[0]}' (not an LPIPS-with-discriminator loss)")
        if "logvar" in file_loss:
            if file_loss["logvar"].numel() != 1:
                raise UserError(f"{path}: loss.logvar should be a scalar, has shape {tuple(file_loss['logvar'].shape)}")
            with torch.no_grad():
                self.loss.logvar.copy_(file_loss["logvar"].reshape(()))
            loaded.append("logvar")
        modules: dict[str, nn.Module] = {"discriminator": self.loss.discriminator}
        if self.loss.perceptual_loss is not None and use_file_perceptual:
            modules["perceptual_loss"] = self.loss.perceptual_loss
        for name, module in modules.items():
            part = {k[len(name) + 1 :]: v for k, v in file_loss.items() if k.startswith(name + ".")}
            if part:
                load_into(
                    module, part, path, hint=f"the file's loss.{name}.* weights are incomplete or of another shape"
                )
                loaded.append(name)
        return loaded

    # --- training -------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr, betas = self.train_cfg.learning_rate, tuple(self.train_cfg.betas)
        opt_g = torch.optim.Adam(self.autoencoder_parts().parameters(), lr=lr, betas=betas)
        opt_d = torch.optim.Adam(self.loss.discriminator.parameters(), lr=lr, betas=betas)
        return [opt_g, opt_d]

    def _budget_spent(self) -> bool:
        return 0 < self.train_cfg.max_steps <= self.ae_steps

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self._budget_spent():
            self.trainer.should_stop = True
            return -1  # skip the rest of the epoch
        return None

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        x = batch["image"]  # (B, 3, H, W)
        opt_g, opt_d = self.optimizers()
        accumulate = self.train_cfg.accumulate_grad_batches
        reconstructions, posterior = self(x)  # (B, 3, H, W)

        self.toggle_optimizer(opt_g)  # no gradients for the discriminator from the generator's loss
        g_loss, logs = self.loss.generator_loss(
            x, reconstructions, posterior, self.ae_steps, last_layer=self.decoder.conv_out.weight
        )
        self.manual_backward(g_loss / accumulate)
        self.untoggle_optimizer(opt_g)

        disc_active = self.loss.discriminator_active(self.ae_steps)
        if disc_active:
            self.toggle_optimizer(opt_d)
            d_loss, d_logs = self.loss.discriminator_loss(x, reconstructions.detach(), self.ae_steps)
            self.manual_backward(d_loss / accumulate)
            self.untoggle_optimizer(opt_d)
            logs.update(d_logs)

        self._accumulated += 1
        stepped = self._accumulated >= accumulate or self.trainer.is_last_batch
        if stepped:
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            if disc_active:
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
            self._accumulated = 0
            self.ae_steps += 1
            if self._budget_spent():
                self.trainer.should_stop = True
        logs["ae_step"] = torch.tensor(float(self.ae_steps))
        self.log_dict(
            {f"train/{k}": v for k, v in logs.items() if k not in ("total_loss", "rec_loss")},
            on_step=True,
            on_epoch=False,
            batch_size=x.shape[0],
        )
        self.log_dict(
            {"train/total_loss": logs["total_loss"], "train/rec_loss": logs["rec_loss"]},
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=x.shape[0],
        )
        return {
            "loss": g_loss.detach(),
            "stepped": stepped,
            "inputs": x.detach(),
            "reconstructions": reconstructions.detach(),
        }

    def on_train_epoch_start(self) -> None:
        self._accumulated = 0

    # --- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STEP_KEY] = self.ae_steps
        checkpoint["config"] = self.resolved_config()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: the file must come from a run with the same architecture and loss parts."""
        stored = (checkpoint.get("config") or {}).get("autoencoder")
        if stored is not None and stored != to_dict(self.ae_cfg):
            raise UserError(
                "the checkpoint to resume was made with another autoencoder config; use the run's "
                f"--config (checkpoint: {stored})"
            )
        sd = checkpoint.get("state_dict", {})
        problem = describe_mismatch({k: v.shape for k, v in self.state_dict().items()}, sd)
        if problem:
            hint = ""
            if any(k.startswith("loss.perceptual_loss.") for k in list(sd) + list(self.state_dict())):
                hint = " (was the run started with another --perceptual_weight?)"
            raise UserError(f"the checkpoint to resume does not fit this run: {problem}{hint}")
        self.ae_steps = int(checkpoint.get(STEP_KEY, 0))
        self._accumulated = 0
