"""DDIM sampling (Song et al. 2021) as a function over a denoise callable.

The sampler knows nothing about networks: ``denoise(x, t) -> eps`` is any callable (a UNet, a guided
UNet, a controlled UNet). Timestep grid and alphas follow the CompVis ``DDIMSampler`` exactly: the
uniform grid is ``range(0, T, T // S) + 1`` (so 1, 101, ..., 901 for S = 10), alpha-bar values are
the model's float32 buffer entries, and the step after the smallest grid time uses alpha-bar[0]
(0.99915 for SD), not 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The uniform DDIM grid in ascending order: [1, 1 + c, 1 + 2c, ...] with c = T // S, S entries.

    For S dividing T this is the reference grid; otherwise the reference code would produce S + 1
    entries, the last one out of range (T), so the grid is cut to its first S entries.
    """
    if not 1 <= num_steps < num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps - 1}, got {num_steps}")
    c = num_train_timesteps // num_steps
    return [t + 1 for t in range(0, num_train_timesteps, c)][:num_steps]


def ddim_parameters(alphas_cumprod: torch.Tensor, grid: Sequence[int], eta: float = 0.0) -> dict[str, torch.Tensor]:
    """alpha-bar, previous alpha-bar and sigma for each grid time (ascending), float64 copies of float32 values.

    sigma_i = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) (Song et al. 2021, eq. 16).
    """
    ac32 = alphas_cumprod.detach().cpu().to(torch.float32)
    idx = torch.as_tensor(list(grid), dtype=torch.long)
    alphas = ac32[idx].double()
    alphas_prev = torch.cat([ac32[:1], ac32[idx[:-1]]]).double()
    one_minus = (1 - ac32[idx]).double()  # taken in float32, as the reference sampler does
    sigmas = eta * torch.sqrt((1 - alphas_prev) / one_minus * (1 - alphas / alphas_prev))
    return {"timesteps": idx, "alphas": alphas, "alphas_prev": alphas_prev, "sigmas": sigmas}


def steps_up_to(grid: Sequence[int], t_max: int) -> list[int]:
    """Indices of the grid times <= t_max, largest first: the steps a run noised to ``t_max`` takes."""
    return [i for i in range(len(grid) - 1, -1, -1) if grid[i] <= t_max]


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    grid: Sequence[int],
    steps: Sequence[int] | None = None,
    eta: float = 0.0,
    noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run DDIM from ``x`` over grid indices ``steps`` (default: the whole grid, largest time first).

    Per step with alpha-bar a, previous a_prev and sigma s (all float32):
    eps = denoise(x, t); x0 = (x - sqrt(1 - a) eps) / sqrt(a);
    x <- sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z.
    ``noise_fn(step_index, like)`` supplies z when eta > 0 (default ``torch.randn_like``);
    ``callback(step_index, x_prev, pred_x0)`` sees every step.
    """
    p = ddim_parameters(alphas_cumprod, grid, eta)
    steps = list(range(len(grid) - 1, -1, -1)) if steps is None else list(steps)
    b = x.shape[0]
    for i in steps:
        a_t = torch.tensor(float(p["alphas"][i]), dtype=torch.float32, device=x.device)
        a_prev = torch.tensor(float(p["alphas_prev"][i]), dtype=torch.float32, device=x.device)
        sigma = torch.tensor(float(p["sigmas"][i]), dtype=torch.float32, device=x.device)
        t = torch.full((b,), int(grid[i]), dtype=torch.long, device=x.device)
        eps = denoise(x, t)
        pred_x0 = (x - torch.sqrt(1.0 - a_t) * eps) / a_t.sqrt()
        x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma**2).sqrt() * eps
        if eta > 0:
            z = noise_fn(i, x) if noise_fn is not None else torch.randn_like(x)
            x_prev = x_prev + sigma * z
        if callback is not None:
            callback(i, x_prev, pred_x0)
        x = x_prev
    return x
