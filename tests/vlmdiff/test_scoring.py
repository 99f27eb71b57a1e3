"""Anomaly maps and image scores against scipy, torch's pooling and the upstream fixture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from utils.errors import UserError
from vlmdiff import scoring


@pytest.fixture(scope="module")
def scoring_ref(fixtures_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(fixtures_dir / "anomaly_scoring.pt")


def _levels(ref: dict[str, torch.Tensor], family: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    n = sum(1 for k in ref if k.startswith(f"{family}.fs."))
    assert n > 0, f"fixture has no {family}.fs.* levels"
    return [ref[f"{family}.fs.{i}"] for i in range(n)], [ref[f"{family}.ft.{i}"] for i in range(n)]


@pytest.mark.parametrize("shape", [(3, 20, 13), (2, 64, 48), (1, 7, 5)])
@pytest.mark.parametrize("sigma", [0.7, 2.3, 5.0])
def test_gaussian_blur_equals_scipy(shape: tuple[int, int, int], sigma: float) -> None:
    # includes radii larger than the axis (reflection repeats) and non-square maps
    x = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = scoring.gaussian_blur(x, sigma).numpy()
    ref = np.stack([ndimage.gaussian_filter(v, sigma, mode="reflect", truncate=4.0) for v in x.numpy()])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


def test_gaussian_blur_sigma_zero_is_identity() -> None:
    x = torch.rand(2, 9, 9, dtype=torch.float64)
    assert torch.equal(scoring.gaussian_blur(x, 0.0), x)


@pytest.mark.parametrize("family", ["resnet", "dino"])
def test_anomaly_map_matches_fixture(scoring_ref: dict[str, torch.Tensor], family: str) -> None:
    fs, ft = _levels(scoring_ref, family)
    ref = scoring_ref[f"{family}.anomaly_map_filtered"]
    out = scoring.anomaly_map(fs, ft, out_size=tuple(ref.shape), sigma=5.0)
    assert out.shape == (fs[0].shape[0], *ref.shape) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], ref, rtol=0, atol=1e-5)
    m = out[0].double()
    checksum = scoring_ref[f"{family}.anomaly_map_filtered_f64_checksum"].double()
    torch.testing.assert_close(torch.stack([m.sum(), (m * m).sum()]), checksum, rtol=1e-5, atol=0)
    raw = scoring.anomaly_map(fs, ft, out_size=tuple(ref.shape), sigma=0.0)[0].double()
    checksum = scoring_ref[f"{family}.anomaly_map_sum_f64_checksum"].double()
    torch.testing.assert_close(torch.stack([raw.sum(), (raw * raw).sum()]), checksum, rtol=1e-5, atol=0)
    if f"{family}.anomaly_map_sum" in scoring_ref:
        torch.testing.assert_close(raw.float(), scoring_ref[f"{family}.anomaly_map_sum"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["resnet", "dino"])
def test_image_score_matches_fixture(scoring_ref: dict[str, torch.Tensor], family: str) -> None:
    fs, ft = _levels(scoring_ref, family)
    ref_map = scoring_ref[f"{family}.anomaly_map_filtered"]
    out = scoring.anomaly_map(fs, ft, out_size=tuple(ref_map.shape))
    score = scoring.image_score(out, "paper")
    assert score.dtype == torch.float64 and score.shape == (fs[0].shape[0],)
    assert abs(score[0].item() - scoring_ref[f"{family}.image_score"].item()) <= 1e-6


def test_anomaly_map_every_batch_element_and_any_size(scoring_ref: dict[str, torch.Tensor]) -> None:
    fs, ft = _levels(scoring_ref, "resnet")
    # batch of 3: the fixture element, input/rec swapped, and a rolled copy; each must equal its own single map
    fs3 = [torch.cat([a, b, a.roll(1, dims=-1)]) for a, b in zip(fs, ft, strict=True)]
    ft3 = [torch.cat([b, a, b]) for a, b in zip(fs, ft, strict=True)]
    size = (96, 136)
    batched = scoring.anomaly_map(fs3, ft3, out_size=size, sigma=3.0)
    assert batched.shape == (3, *size)
    for i in range(3):
        single = scoring.anomaly_map([f[i : i + 1] for f in fs3], [f[i : i + 1] for f in ft3], out_size=size, sigma=3.0)
        torch.testing.assert_close(batched[i], single[0], rtol=0, atol=1e-6)
    assert not torch.allclose(batched[0], batched[2])
    # one level by hand: 1 - cos, align_corners bilinear, scipy blur
    d = 1 - F.cosine_similarity(fs[0], ft[0], dim=1, eps=1e-8)
    up = F.interpolate(d[:, None], size=size, mode="bilinear", align_corners=True)[0, 0].double().numpy()
    ours = scoring.anomaly_map(fs[:1], ft[:1], out_size=size, sigma=3.0)[0].numpy()
    np.testing.assert_allclose(ours, ndimage.gaussian_filter(up, 3.0), rtol=0, atol=1e-6)


def test_anomaly_map_rejects_mismatched_levels(scoring_ref: dict[str, torch.Tensor]) -> None:
    fs, ft = _levels(scoring_ref, "resnet")
    with pytest.raises(ValueError):
        scoring.anomaly_map(fs, ft[:-1] if len(ft) > 1 else [], out_size=32)
    with pytest.raises(ValueError):
        scoring.anomaly_map([fs[0]], [fs[0][:, :1]], out_size=32)


def _pool_chain(maps: torch.Tensor, kernel: int, times: int) -> torch.Tensor:
    x = maps.double()[:, None]
    for _ in range(times):
        x = F.avg_pool2d(x, kernel, stride=1)
    return x.amax(dim=(1, 2, 3))


@pytest.mark.parametrize("pooling, kernel, times", [("paper", 8, 8), ("ader", 16, 1)])
def test_image_score_equals_avg_pool_chain(pooling: str, kernel: int, times: int) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 70, 83, generator=g)
    maps[1, 30:40, 40:50] += 3.0  # a blob, so the max is not at a random spot
    torch.testing.assert_close(scoring.image_score(maps, pooling), _pool_chain(maps, kernel, times), rtol=0, atol=1e-12)


def test_image_score_max_and_errors() -> None:
    maps = torch.rand(3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(scoring.image_score(maps, "max"), maps.amax(dim=(1, 2)))
    with pytest.raises(UserError, match="smaller than"):
        scoring.image_score(torch.rand(2, 40, 40), "paper")
    with pytest.raises(UserError, match="unknown image pooling"):
        scoring.image_score(maps, "mean")
