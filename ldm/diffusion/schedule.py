"""The linear beta schedule of Stable Diffusion and the forward (noising) process.

betas = linspace(sqrt(beta_start), sqrt(beta_end), T)^2 in float64 (Ho et al. 2020 with SD's
"linear" variant); every derived array is computed in float64 and stored as float32, exactly as the
CompVis ``ldm`` code registers its buffers, so state dicts carry the same 13 schedule buffers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ldm.config import DiffusionConfig

SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def linear_betas(timesteps: int, linear_start: float, linear_end: float) -> np.ndarray:
    """SD's 'linear' schedule in float64: (T,)."""
    return (
        torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64, device="cpu").pow(2).numpy()
    )


def schedule_arrays(cfg: DiffusionConfig) -> dict[str, np.ndarray]:
    """All schedule arrays in float64, keyed by their state-dict buffer names."""
    betas = linear_betas(cfg.timesteps, cfg.linear_start, cfg.linear_end)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
    }


def register_schedule(module: nn.Module, cfg: DiffusionConfig) -> None:
    """Register the 12 schedule buffers and the all-zero ``logvar`` buffer (float32) on ``module``."""
    for name, arr in schedule_arrays(cfg).items():
        module.register_buffer(name, torch.tensor(arr, dtype=torch.float32))
    module.register_buffer("logvar", torch.full((cfg.timesteps,), cfg.logvar_init, dtype=torch.float32))


def extract(buf: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """buf[t] shaped (B, 1, ..., 1) to broadcast against a tensor with ``ndim`` dimensions."""
    return buf.gather(-1, t).reshape(t.shape[0], *([1] * (ndim - 1)))


def q_sample(
    sqrt_alphas_cumprod: torch.Tensor,
    sqrt_one_minus_alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (Ho et al. 2020, eq. 4)."""
    return extract(sqrt_alphas_cumprod, t, x0.ndim) * x0 + extract(sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
