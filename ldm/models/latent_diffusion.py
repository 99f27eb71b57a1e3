"""Latent diffusion (Rombach et al. 2022) as a LightningModule: the eps-prediction training objective.

Submodule names give the state-dict names of CompVis / Stable Diffusion checkpoints:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (KL autoencoder),
``cond_stage_model.transformer.*`` (text encoder) and the 13 schedule buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import load_into
from ldm.config import LatentDiffusionConfig, to_dict
from ldm.diffusion.schedule import SCHEDULE_BUFFERS, q_sample, register_schedule
from ldm.modules.autoencoder import AutoencoderKL
from ldm.modules.text_encoder import TextEncoder, build_text_encoder, canonical_clip_names
from ldm.modules.unet import UNetModel
from utils.errors import UserError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adam")


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the name Stable Diffusion checkpoints use)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


def freeze(module: nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


class LatentDiffusion(pl.LightningModule):
    """eps-prediction latent diffusion: loss = || eps - eps_theta(sqrt(a_t) z + sqrt(1-a_t) eps, t, c) ||^2.

    ``trainable`` lists parameter-name prefixes that the optimiser updates; everything else is frozen
    (requires_grad False). The autoencoder and the text encoder are always frozen.
    """

    def __init__(
        self,
        cfg: LatentDiffusionConfig,
        *,
        trainable: Sequence[str] = ("model.diffusion_model.",),
        learning_rate: float = 1e-5,
        weight_decay: float = 0.01,
        optimizer: str = "adamw",
        fused_optimizer: bool = False,
        load_pretrained_text: bool = True,
        text_encoder: TextEncoder | None = None,
        unet: UNetModel | None = None,
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
        self.cfg = cfg
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.fused_optimizer = fused_optimizer
        self.scale_factor = cfg.diffusion.scale_factor
        self.num_timesteps = cfg.diffusion.timesteps
        self.first_stage_factor = 2 ** (len(cfg.autoencoder.ch_mult) - 1)  # image side / latent side
        self.model = DiffusionWrapper(unet if unet is not None else UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.autoencoder)
        self.cond_stage_model = text_encoder or build_text_encoder(cfg.text_encoder, load_pretrained_text)
        if self.cond_stage_model.hidden_size != cfg.unet.context_dim:
            raise UserError(
                f"unet.context_dim is {cfg.unet.context_dim} but the text encoder's hidden size is "
                f"{self.cond_stage_model.hidden_size}; set unet.context_dim={self.cond_stage_model.hidden_size}"
            )
        register_schedule(self, cfg.diffusion)
        freeze(self.first_stage_model)
        freeze(self.cond_stage_model)
        self.trainable_prefixes = tuple(trainable)
        self.set_trainable(self.trainable_prefixes)

    # --- parameters -------------------------------------------------------------------------
    def set_trainable(self, prefixes: Sequence[str]) -> None:
        """requires_grad True exactly for parameters whose name starts with one of ``prefixes``."""
        frozen = ("first_stage_model.", "cond_stage_model.")
        matched = set()
        for name, p in self.named_parameters():
            hit = [pre for pre in prefixes if name.startswith(pre)]
            p.requires_grad_(bool(hit) and not name.startswith(frozen))
            matched.update(hit)
        unmatched = [p for p in prefixes if p not in matched]
        if unmatched:
            raise UserError(f"trainable prefix '{unmatched[0]}' matches no parameter of the model")

    def load_weights(
        self, sd: Mapping[str, torch.Tensor], path: str = "checkpoint", hint: str = "", assign: bool = False
    ) -> None:
        """Load a full state dict strictly (CLIP weights under either transformers naming).

        ``assign`` (for a model built on the meta device) uses the given tensors instead of copying.
        """
        if self.cond_stage_model.kind == "clip":
            sd = canonical_clip_names(dict(sd))
        sd = self._exact_schedule(sd, path)
        load_into(self, sd, path, hint=hint, assign=assign)
        if assign:
            self.set_trainable(self.trainable_prefixes)
            freeze(self.first_stage_model)
            freeze(self.cond_stage_model)
            left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.device.type == "meta"]
            if left:
                raise UserError(f"{path} does not fill {left[0]} ({len(left)} tensors left uninitialised)")

    def _exact_schedule(self, sd: Mapping[str, torch.Tensor], path: str) -> Mapping[str, torch.Tensor]:
        """``sd`` with its schedule buffers recomputed if the file stores them in half precision.

        bf16 rounds alphas_cumprod[0] = 0.99915 to 1.0 (and fp16 loses digits elsewhere), which turns the
        DDIM step into a division by zero; the buffers are a function of the config, so they are recomputed.
        """
        half = [k for k in SCHEDULE_BUFFERS if k in sd and sd[k].dtype in (torch.float16, torch.bfloat16)]
        if not half:
            return sd
        holder = nn.Module()
        register_schedule(holder, self.cfg.diffusion)
        log.info(
            "%s: the schedule buffers are stored in %s: using freshly computed float32 ones", path, sd[half[0]].dtype
        )
        fresh = holder.state_dict()
        return {**sd, **{k: fresh[k] for k in SCHEDULE_BUFFERS if k in sd}}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    # --- first stage and conditioning -------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(
        self, x: torch.Tensor, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = scale_factor * sample of the posterior q(z | x): (B,3,H,W) -> (B,4,H/8,W/8)."""
        return self.scale_factor * self.first_stage_model.encode(x).sample(noise=noise, generator=generator)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Image from latent: decode((1 / scale_factor) * z), multiplying by the reciprocal as SD does."""
        return self.first_stage_model.decode((1.0 / self.scale_factor) * z)

    @torch.no_grad()
    def get_learned_conditioning(self, texts: Sequence[str]) -> torch.Tensor:
        return self.cond_stage_model(texts)  # (B, L, D)

    def get_conditions(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The condition dict for :meth:`apply_model`; here only the caption context."""
        return {"context": self.get_learned_conditioning(batch["caption"])}

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """eps prediction (B,4,h,w); subclasses add control signals."""
        return self.model.diffusion_model(x_noisy, t, cond["context"])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, x0, t, noise)

    # --- training ------------------------------------------------------------------------------
    def diffusion_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        x = batch["image"]
        z = self.encode_first_stage(x)
        cond = self.get_conditions(batch)
        t = torch.randint(0, self.num_timesteps, (z.shape[0],), device=z.device)
        noise = torch.randn_like(z)
        eps = self.apply_model(self.q_sample(z, t, noise), t, cond)
        return F.mse_loss(eps.float(), noise.float())

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=batch["image"].shape[0],
            sync_dist=False,
        )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.trainable_parameters()
        if not params:
            raise UserError("no trainable parameters: check the trainable prefixes")
        cls = torch.optim.AdamW if self.optimizer_name == "adamw" else torch.optim.Adam
        kwargs: dict[str, Any] = {"lr": self.learning_rate}
        if self.optimizer_name == "adamw":
            kwargs["weight_decay"] = self.weight_decay
        if self.fused_optimizer:
            kwargs["fused"] = True
        return cls(params, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["config"] = to_dict(self.cfg)
