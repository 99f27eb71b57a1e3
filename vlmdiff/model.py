"""The controlled UNet and the VLMDiff LightningModule.

The UNet's time embedding, input blocks and middle block run frozen and without autograd; the SG
network's last control tensor is added to the middle-block output; the output blocks get skip +
control — with ``only_mid_control`` (the paper's setting) only those of the lowest-resolution level
(controls 11, 10, 9 for SD-1.5), otherwise all of them. Trainable: SG network, UNet output blocks and
the final ``out`` layer; everything else is frozen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.models.latent_diffusion import LatentDiffusion
from ldm.modules.text_encoder import TextEncoder
from ldm.modules.unet import UNetModel
from vlmdiff.config import VLMDiffConfig
from vlmdiff.sg_network import SGNetwork

TRAINABLE = ("control_model.", "model.diffusion_model.output_blocks.", "model.diffusion_model.out.")


class ControlledUNet(UNetModel):
    """A UNet whose decoder takes the SG network's control tensors (same weights/names as the UNet)."""

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        control: Sequence[torch.Tensor] | None = None,
        only_mid_control: bool = True,
    ) -> torch.Tensor:
        with torch.no_grad():
            emb = self.embed_time(timesteps)  # (B or 1, 4*mc)
            h, hs = self.encode(x, emb, context)  # frozen encoder half
        if control is None:
            return self.decode(h, hs, emb, context)
        h = h + control[-1]
        n = len(hs)
        if only_mid_control:
            low = self.cfg.num_res_blocks + 1  # output blocks of the lowest-resolution level
            skip_controls = [control[i] if i >= n - low else None for i in range(n)]
        else:
            skip_controls = list(control[:n])
        return self.decode(h, hs, emb, context, skip_controls)


class VLMDiff(LatentDiffusion):
    """Latent diffusion with an SG network guided by the input image and caption cross-attention.

    Batches are dicts with ``image`` (B,3,H,W) ImageNet-normalised, ``hint`` (the same image) and
    ``caption`` (B strings; "" when captions are not used).
    """

    def __init__(
        self,
        cfg: VLMDiffConfig,
        *,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.01,
        optimizer: str = "adamw",
        fused_optimizer: bool = False,
        load_pretrained_text: bool = True,
        text_encoder: TextEncoder | None = None,
    ):
        super().__init__(
            cfg,
            trainable=TRAINABLE[1:],
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            optimizer=optimizer,
            fused_optimizer=fused_optimizer,
            load_pretrained_text=load_pretrained_text,
            text_encoder=text_encoder,
            unet=ControlledUNet(cfg.unet),
        )
        self.only_mid_control = cfg.control.only_mid_control
        self.control_model = SGNetwork(cfg.unet, cfg.control)
        self.trainable_prefixes = TRAINABLE
        self.set_trainable(TRAINABLE)

    def set_trainable(self, prefixes: Sequence[str]) -> None:
        """As in LatentDiffusion, minus the zero convolutions whose control the UNet never reads.

        With ``only_mid_control`` the controls of the higher-resolution input blocks are unused, so their
        zero convolutions get no gradient (and AdamW leaves them untouched); freezing them keeps DDP from
        waiting for their gradients.
        """
        super().set_trainable(prefixes)
        if hasattr(self, "control_model"):
            for i in self.unused_controls():
                self.control_model.zero_convs[i].requires_grad_(False)

    def unused_controls(self) -> list[int]:
        """Indices of control tensors that do not reach the UNet (empty unless ``only_mid_control``)."""
        if not self.only_mid_control:
            return []
        n = len(self.control_model.zero_convs)
        read = set(range(n - (self.cfg.unet.num_res_blocks + 1), n)) | set(self.control_model.sources)
        return [i for i in range(n) if i not in read]

    def get_conditions(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return {"context": self.get_learned_conditioning(batch["caption"]), "hint": batch["hint"]}

    @torch.no_grad()
    def sampling_condition(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``cond`` plus ``guided_hint`` (the SG hint block's output), which stays the same at every sampling step.

        :meth:`apply_model` then skips the hint block (bit-identical result, one hint block per run
        instead of one per step).
        """
        return {**cond, "guided_hint": self.control_model.embed_hint(cond["hint"])}

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """eps (B,4,h,w) from the SG network's controls and the controlled UNet; ``cond``: context, hint
        and optionally guided_hint (:meth:`sampling_condition`)."""
        control = self.control_model(
            x_noisy, cond["hint"], t, cond["context"], cond.get("guided_hint"), skip=self.unused_controls()
        )  # unread controls are None
        return self.model.diffusion_model(x_noisy, t, cond["context"], control, self.only_mid_control)
