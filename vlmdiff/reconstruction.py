"""Test-time reconstruction: encode, noise almost completely, denoise with DDIM under SG guidance, decode.

Per image: z = 0.18215 * sample of q(z|x); x_T = q_sample(z, T = 999);
10 DDIM steps over 901, 801, ..., 1 (upstream noises to 999 but starts at 901; reproduced); classifier-
free guidance with scale 9, the unconditional branch being the empty caption with the same hint --
when every caption is empty the two branches are identical and one pass is run; decode.

Randomness is per image: the posterior sample and the q_sample noise come from a generator seeded by
(seed, image id), so results do not depend on batch size, shard, rank or restarts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ldm.diffusion.ddim import ddim_sample, ddim_timesteps, steps_up_to
from ldm.diffusion.guidance import classifier_free_guidance
from utils.errors import UserError


@dataclass(frozen=True)
class ReconstructionSettings:
    ddim_steps: int = 10
    noise_t: int = 999
    guidance_scale: float = 9.0
    eta: float = 0.0
    seed: int = 1

    def check(self, num_timesteps: int) -> None:
        if not 1 <= self.ddim_steps < num_timesteps:
            raise UserError(f"--ddim_steps must be in 1..{num_timesteps - 1}, got {self.ddim_steps}")
        if not 0 <= self.noise_t < num_timesteps:
            raise UserError(f"--noise_t must be in 0..{num_timesteps - 1}, got {self.noise_t}")
        grid = ddim_timesteps(self.ddim_steps, num_timesteps)
        if not steps_up_to(grid, self.noise_t):
            raise UserError(f"--noise_t {self.noise_t} is below every DDIM step ({grid[0]}..{grid[-1]}); raise it")


def image_seed(seed: int, image_id: str) -> int:
    """A stable 63-bit seed from (run seed, image id): the same on every machine, process and run."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def per_image_noise(ids: Sequence[str], seed: int, latent_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior eps, q_sample noise), each (B, *latent_shape), drawn on the CPU from each image's generator."""
    eps, noise = [], []
    for image_id in ids:
        g = torch.Generator().manual_seed(image_seed(seed, image_id))
        eps.append(torch.randn(tuple(latent_shape), generator=g))
        noise.append(torch.randn(tuple(latent_shape), generator=g))
    return torch.stack(eps), torch.stack(noise)


@torch.no_grad()
def reconstruct_latent(
    model,
    image: torch.Tensor,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    posterior_eps: torch.Tensor,
    noise: torch.Tensor,
    settings: ReconstructionSettings,
    *,
    two_passes: bool = False,
) -> dict[str, torch.Tensor]:
    """The reconstruction of a batch given its contexts and noises; returns z, x_noisy and the final latent.

    ``model`` is a VLMDiff (anything with encode_first_stage, q_sample, sampling_condition, apply_model,
    alphas_cumprod). ``context`` and ``uncond_context`` (B, L, D): pass the same tensor object when
    they are equal. The hint block runs once per call, not once per step (:meth:`VLMDiff.sampling_condition`).
    ``two_passes=True`` runs the unconditional pass even when it equals the conditional one, as the
    reference code does (same result; for benchmarks of that way only).
    """
    z = model.encode_first_stage(image, noise=posterior_eps.to(image.device, image.dtype))  # (B, 4, h, w)
    t = torch.full((z.shape[0],), settings.noise_t, dtype=torch.long, device=z.device)
    x_noisy = model.q_sample(z, t, noise.to(z.device, z.dtype))
    cond = model.sampling_condition({"context": context, "hint": image})
    uncond = cond if uncond_context is context else {**cond, "context": uncond_context}
    denoise = classifier_free_guidance(
        model.apply_model, cond, uncond, settings.guidance_scale, skip_same=not two_passes
    )
    grid = ddim_timesteps(settings.ddim_steps, model.num_timesteps)
    final = ddim_sample(
        denoise, x_noisy, model.alphas_cumprod, grid, steps_up_to(grid, settings.noise_t), eta=settings.eta
    )
    return {"z": z, "x_noisy": x_noisy, "final_latent": final}


@torch.no_grad()
def reconstruct(
    model,
    image: torch.Tensor,
    captions: Sequence[str],
    ids: Sequence[str],
    settings: ReconstructionSettings,
    *,
    decode_autoencoder: bool = True,
    two_passes: bool = False,
) -> dict[str, torch.Tensor]:
    """Reconstruct a batch (B,3,H,W): returns ``sample`` (decoded diffusion output) and ``autoencoder``.

    ``autoencoder`` is the plain autoencoder reconstruction decode(z) of the same latent sample, for
    visual inspection only: ``decode_autoencoder=False`` leaves it out (a second decoder pass, about
    a fifth of the work at the ``mid`` preset). ``two_passes``: see :func:`reconstruct_latent`.
    """
    b = image.shape[0]
    latent = [
        model.cfg.autoencoder.embed_dim,
        image.shape[2] // model.first_stage_factor,
        image.shape[3] // model.first_stage_factor,
    ]
    eps, noise = per_image_noise(ids, settings.seed, latent)
    uncond = model.get_learned_conditioning([""]).expand(b, -1, -1)
    context = uncond if all(c == "" for c in captions) else model.get_learned_conditioning(list(captions))
    if settings.eta > 0:
        raise UserError("--eta > 0 is not supported at test time (the method uses deterministic DDIM, eta 0)")
    out = reconstruct_latent(model, image, context, uncond, eps, noise, settings, two_passes=two_passes)
    rec = {"sample": model.decode_first_stage(out["final_latent"])}
    if decode_autoencoder:
        rec["autoencoder"] = model.decode_first_stage(out["z"])
    return rec
