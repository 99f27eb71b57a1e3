"""The core modules reproduce the upstream reference tensors (fixture README tolerances)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion.ddim import ddim_parameters, ddim_timesteps
from ldm.diffusion.schedule import q_sample, register_schedule, schedule_arrays
from ldm.modules.attention import CrossAttention
from ldm.modules.autoencoder import DiagonalGaussian
from ldm.modules.unet import timestep_embedding
from tests.fixture_models import assert_close, build_autoencoder, build_unet


@pytest.fixture(scope="module")
def misc(fixtures_dir):
    return torch.load(fixtures_dir / "schedule_and_misc.pt"), json.loads(
        (fixtures_dir / "schedule_and_misc.json").read_text()
    )


def _diffusion_cfg(meta: dict) -> DiffusionConfig:
    return DiffusionConfig(
        timesteps=meta["num_timesteps"],
        linear_start=meta["linear_start"],
        linear_end=meta["linear_end"],
        scale_factor=meta["scale_factor"],
    )


def test_autoencoder_reproduces_fixture(fixtures_dir):
    ref = torch.load(fixtures_dir / "autoencoder_forward.pt")
    ae = build_autoencoder(fixtures_dir)
    tol = dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        enc = ae.encoder(ref["x"])
        assert_close(enc, ref["encoder_out"], **tol, what="encoder_out")
        moments = ae.quant_conv(enc)
        assert_close(moments, ref["moments"], **tol, what="moments")
        post = ae.encode(ref["x"])
        for name, ours in [
            ("posterior_mean", post.mean),
            ("posterior_logvar", post.logvar),
            ("posterior_std", post.std),
            ("posterior_var", post.var),
            ("mode", post.mode()),
        ]:
            assert_close(ours, ref[name], **tol, what=name)
        assert_close(post.sample(noise=ref["sample_eps"]), ref["posterior_sample"], **tol, what="posterior_sample")
        assert_close(ae.decode(post.mean), ref["decoded_mean"], **tol, what="decoded_mean")
        assert_close(ae(ref["x"], sample_posterior=False)[0], ref["decoded_mean"], **tol, what="forward")
    clamp = DiagonalGaussian(ref["clamp_test_moments"])
    for name, ours in [
        ("clamp_test_mean", clamp.mean),
        ("clamp_test_logvar", clamp.logvar),
        ("clamp_test_std", clamp.std),
        ("clamp_test_var", clamp.var),
    ]:
        assert_close(ours, ref[name], atol=1e-4, rtol=1e-4, what=name)
    assert clamp.logvar.min() >= -30 and clamp.logvar.max() <= 20


def test_unet_without_control_reproduces_fixture(fixtures_dir):
    ref = torch.load(fixtures_dir / "unet_forward.pt")
    unet = build_unet(fixtures_dir)
    with torch.no_grad():
        eps = unet(ref["x"], ref["timesteps"], ref["context"])
    assert_close(eps, ref["eps_no_control"], atol=1e-4, rtol=1e-4, what="eps_no_control")


def test_unet_math_attention_matches_sdpa(fixtures_dir):
    ref = torch.load(fixtures_dir / "unet_forward.pt")
    outs = []
    for impl in ("sdpa", "math"):
        unet = build_unet(fixtures_dir, attention=impl)
        with torch.no_grad():
            outs.append(unet(ref["x"], ref["timesteps"], ref["context"]))
    assert_close(outs[1], ref["eps_no_control"], atol=1e-4, rtol=1e-4, what="math attention")
    assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5, what="sdpa vs math")


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_cross_attention_shared_context(impl):
    """A context that is one row broadcast over the batch (the empty caption at test time: keys and
    values computed once, all queries in one call) gives every image the same result whatever the
    batch size, and what per-image copies of the context give."""
    torch.manual_seed(0)
    attn = CrossAttention(16, 12, heads=2, dim_head=8, impl=impl).eval()
    x = torch.randn(3, 10, 16)  # (B, N, query_dim)
    row = torch.randn(1, 7, 12)  # (1, M, context_dim)
    with torch.no_grad():
        shared = attn(x, row.expand(3, -1, -1))
        pair, single = attn(x[1:], row.expand(2, -1, -1)), attn(x[:1], row)
        copies = attn(x, row.repeat(3, 1, 1))
    assert shared.shape == (3, 10, 16)
    assert torch.equal(shared[1:], pair) and torch.equal(shared[:1], single)
    assert_close(shared, copies, atol=1e-6, rtol=1e-6, what=f"{impl}: shared context vs copies")


def test_schedule_buffers_exact(misc):
    ref, meta = misc
    cfg = _diffusion_cfg(meta)
    arrays = schedule_arrays(cfg)
    np.testing.assert_allclose(arrays["betas"], ref["betas_f64"].numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(arrays["alphas_cumprod"], ref["alphas_cumprod_f64"].numpy(), rtol=0, atol=1e-12)
    holder = torch.nn.Module()
    register_schedule(holder, cfg)
    buffers = dict(holder.named_buffers())
    expected = {k[len("buffer.") :]: v for k, v in ref.items() if k.startswith("buffer.")}
    assert set(buffers) == set(expected)
    for name, v in expected.items():
        assert buffers[name].dtype == v.dtype == torch.float32
        assert torch.equal(buffers[name], v), name
    assert abs(float(arrays["alphas_cumprod"][999]) - meta["alphas_cumprod_999_f64"]) < 1e-15
    assert float(buffers["sqrt_alphas_cumprod"][999]) == pytest.approx(meta["sqrt_alphas_cumprod_999_f32"], abs=0)


def test_q_sample_and_scaling(misc):
    ref, meta = misc
    holder = torch.nn.Module()
    register_schedule(holder, _diffusion_cfg(meta))
    out = q_sample(
        holder.sqrt_alphas_cumprod,
        holder.sqrt_one_minus_alphas_cumprod,
        ref["q_sample_x0"],
        ref["q_sample_t"],
        ref["q_sample_noise"],
    )
    assert_close(out, ref["q_sample_out"], atol=1e-7, rtol=0, what="q_sample")
    assert torch.equal(holder.sqrt_alphas_cumprod[ref["q_sample_t"]], ref["q_sample_coef_x0"])
    assert torch.equal(holder.sqrt_one_minus_alphas_cumprod[ref["q_sample_t"]], ref["q_sample_coef_noise"])
    s = meta["scale_factor"]
    assert_close(s * ref["scale_z"], ref["scale_encode_out"], atol=1e-7, rtol=0, what="encode scale")
    assert_close((1.0 / s) * ref["scale_z"], ref["scale_decode_in"], atol=1e-7, rtol=0, what="decode scale")


def test_timestep_embedding(misc):
    """[cos, sin] embedding equals the reference to 1e-7, apart from one float32 rounding of exp().

    float32 exp() differs by one ulp between CPU vector units (AVX2 vs AVX-512); at t = 999 one ulp
    of a frequency f moves the angle t*f by up to t*f*2^-23, so that is allowed on top of 1e-7.
    """
    ref, _ = misc
    t = ref["temb_t"].double()
    for key in [k for k in ref if k.startswith("temb_dim")]:
        dim = ref[key].shape[1]
        ours = timestep_embedding(ref["temb_t"], dim)
        half = dim // 2
        freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        slack = (t[:, None] * freqs[None] * 2.0**-23).repeat(1, 2)
        if dim % 2:
            slack = torch.cat([slack, torch.zeros_like(slack[:, :1])], dim=1)
        err = (ours.double() - ref[key].double()).abs()
        assert (err <= 1e-7 + slack).all(), f"{key}: max error {err.max():.3g}"
        small_t = ref["temb_t"] <= 1
        assert_close(ours[small_t], ref[key][small_t], atol=1e-7, rtol=0, what=f"{key} at t<=1")
        assert torch.equal(
            ours[:, :half][ref["temb_t"] == 0],
            torch.ones_like(ours[:1, :half]).expand(int((ref["temb_t"] == 0).sum()), -1),
        )


def test_ddim_timesteps_and_alphas(misc):
    ref, meta = misc
    holder = torch.nn.Module()
    register_schedule(holder, _diffusion_cfg(meta))
    for run, grid_ref in meta["ddim_timesteps"].items():
        steps = len(grid_ref)
        eta = float(run.split("eta")[1])
        grid = ddim_timesteps(steps, meta["num_timesteps"])
        assert grid == grid_ref
        assert torch.equal(torch.tensor(grid), ref[f"{run}.timesteps"])
        p = ddim_parameters(holder.alphas_cumprod, grid, eta)
        for name in ("alphas", "alphas_prev", "sigmas"):
            # eta > 0 sigmas: the reference mixes numpy float64 and torch float32 in a way that leaves a
            # 1e-8 relative difference (eta is 0 everywhere in the method); everything else is exact.
            rtol = 1e-7 if (name == "sigmas" and eta > 0) else 0
            np.testing.assert_allclose(
                p[name].numpy(), ref[f"{run}.{name}"].numpy(), rtol=rtol, atol=1e-12, err_msg=f"{run}.{name}"
            )
