"""DDIM over a denoise callable and classifier-free guidance with the one-pass shortcut."""

from __future__ import annotations

import torch

from ldm.config import DiffusionConfig
from ldm.diffusion.ddim import ddim_sample, ddim_timesteps, steps_up_to
from ldm.diffusion.guidance import classifier_free_guidance
from ldm.diffusion.schedule import register_schedule


def _alphas() -> torch.Tensor:
    holder = torch.nn.Module()
    register_schedule(holder, DiffusionConfig())
    return holder.alphas_cumprod


def test_ddim_with_exact_eps_recovers_x0():
    """If the denoiser returns the true noise, deterministic DDIM lands on x0 (up to a_bar[0] != 1)."""
    ac = _alphas()
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = 901
    xt = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * noise
    grid = ddim_timesteps(10)
    out = ddim_sample(lambda x, tt: noise.expand_as(x), xt, ac, grid)
    expected = ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * noise  # the last step goes to a_bar[0]
    assert torch.allclose(out, expected, atol=1e-4)


def test_step_subset_and_explicit_grid():
    grid = ddim_timesteps(10)
    assert [grid[i] for i in steps_up_to(grid, 999)] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert [grid[i] for i in steps_up_to(grid, 500)] == [401, 301, 201, 101, 1]
    seen = []
    ddim_sample(
        lambda x, t: (seen.append(int(t[0])), torch.zeros_like(x))[1],
        torch.zeros(1, 1),
        _alphas(),
        [1, 251, 501, 751],
        steps=[3, 1],
    )
    assert seen == [751, 251]


def test_eta_noise_is_used():
    ac = _alphas()
    x = torch.zeros(1, 4, 2, 2)
    a = ddim_sample(
        lambda x, t: torch.zeros_like(x),
        x,
        ac,
        ddim_timesteps(10),
        eta=1.0,
        noise_fn=lambda i, like: torch.ones_like(like),
    )
    b = ddim_sample(lambda x, t: torch.zeros_like(x), x, ac, ddim_timesteps(10), eta=0.0)
    assert not torch.allclose(a, b)


def test_guidance_single_pass_when_conditions_equal():
    calls = []

    def model(x, t, cond):
        calls.append(x.shape[0])
        return x * cond["context"].mean(dim=1, keepdim=True) + cond["hint"].mean(dim=1, keepdim=True)

    x, t = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    ctx, hint = torch.randn(3, 5), torch.randn(3, 2)
    same = classifier_free_guidance(model, {"context": ctx, "hint": hint}, {"context": ctx.clone(), "hint": hint}, 9.0)
    out_single = same(x, t)
    assert calls == [3]
    calls.clear()
    other = classifier_free_guidance(model, {"context": ctx, "hint": hint}, {"context": ctx + 1, "hint": hint}, 9.0)
    out = other(x, t)
    assert calls == [6]  # one concatenated batch [uncond; cond]
    e_c = model(x, t, {"context": ctx, "hint": hint})
    e_u = model(x, t, {"context": ctx + 1, "hint": hint})
    assert torch.allclose(out, e_u + 9.0 * (e_c - e_u), atol=1e-5)
    assert torch.allclose(out_single, e_c)
