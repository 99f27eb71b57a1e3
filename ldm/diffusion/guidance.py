"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a conditional denoiser.

eps = eps_u + s * (eps_c - eps_u). When the conditional and unconditional inputs are the same
(same tensors, or equal values), the guided result equals eps_c and one pass is enough: the wrapper
then skips the second pass (half the work, the same result up to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

CondDenoiser = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]


def same_condition(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two condition dicts hold the same objects or equal tensors/strings."""
    if a is b:
        return True
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x is y:
            continue
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def classifier_free_guidance(
    model: CondDenoiser, cond: Mapping[str, Any], uncond: Mapping[str, Any], scale: float, skip_same: bool = True
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``denoise(x, t)`` callable for :func:`ldm.diffusion.ddim.ddim_sample`.

    ``model(x, t, cond)`` returns eps; tensors in the condition dicts have the batch first. The
    two-pass case evaluates one concatenated batch [uncond; cond], as the reference code does.
    ``skip_same=False`` runs both passes even when the conditions are equal (the reference code's
    behaviour, kept for benchmarks that time it).
    """
    if scale == 1.0 or (skip_same and same_condition(cond, uncond)):
        return lambda x, t: model(x, t, cond)

    both = {k: torch.cat([uncond[k], cond[k]]) if isinstance(cond[k], torch.Tensor) else cond[k] for k in cond}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e_u, e_c = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return e_u + scale * (e_c - e_u)

    return denoise
