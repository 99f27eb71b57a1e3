"""Upstream's per-image visual files (test.py --save_visuals writes them to log_image_{exp_name}/)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from vlmdiff.evaluation.visuals import IMAGENET_MEAN, IMAGENET_STD, write_upstream_visuals


def _normalised(grey: float, size: int) -> torch.Tensor:
    """An ImageNet-normalised (1, 3, size, size) image of one grey level in [0, 1]."""
    return (torch.full((1, 3, size, size), grey) - IMAGENET_MEAN) / IMAGENET_STD


def test_files_names_and_jet_overlay(tmp_path):
    size = 16
    image = _normalised(128 / 255, size)
    ramp = torch.linspace(2.0, 7.0, size).expand(size, size)[None]  # (1, H, W): min at x=0, max at x=15
    write_upstream_visuals(
        tmp_path, ["bottle/test/broken/000.png"], image, _normalised(0.0, size), _normalised(1.0, size), ramp
    )
    stem = "bottle__test__broken__000"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{stem}-{k}" for k in ("input.jpg", "reconstruction.jpg", "samples.jpg", "features.jpg", "heatmap.png")
    )
    read = {p.name[len(stem) + 1 :]: np.asarray(Image.open(p).convert("RGB")).astype(int) for p in tmp_path.iterdir()}
    assert all(a.shape == (size, size, 3) for a in read.values())
    assert np.abs(read["input.jpg"] - 128).max() <= 2
    assert read["reconstruction.jpg"].max() <= 2 and read["samples.jpg"].min() >= 253
    features = read["features.jpg"][..., 0]
    assert features[:, 0].max() <= 3 and features[:, -1].min() >= 252  # min-max normalised per image
    heat = read["heatmap.png"]
    # JET: the minimum is dark blue (0, 0, 128), the maximum dark red (128, 0, 0); blended 0.5/0.5 with grey 128
    np.testing.assert_allclose(heat[:, 0], np.tile([64, 64, 128], (size, 1)), atol=1)
    np.testing.assert_allclose(heat[:, -1], np.tile([128, 64, 64], (size, 1)), atol=1)
    assert heat[0, size // 2, 1] > heat[0, 0, 1]  # green rises towards the middle of the range
