"""Test-time DDIM reconstruction reproduces upstream's trajectory and end-to-end pipeline."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.ddim import ddim_parameters, ddim_sample, ddim_timesteps, steps_up_to
from ldm.diffusion.guidance import classifier_free_guidance
from tests.fixture_models import assert_close, build_vlmdiff
from vlmdiff.reconstruction import ReconstructionSettings, per_image_noise, reconstruct, reconstruct_latent

LATENT_TOL = dict(atol=1e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return build_vlmdiff(fixtures_dir)


def test_ddim_trajectory(fixtures_dir, model):
    ref = torch.load(fixtures_dir / "ddim_trajectory.pt")
    t = int(ref["t_noise"][0])
    x_noisy = model.q_sample(ref["z0"], ref["t_noise"], ref["noise"])
    assert_close(x_noisy, ref["x_noisy"], atol=1e-6, rtol=1e-6, what="x_noisy")
    grid = ddim_timesteps(len(ref["ddim_timesteps"]), model.num_timesteps)
    assert grid == ref["ddim_timesteps"].tolist()
    steps = steps_up_to(grid, t)
    assert [grid[i] for i in steps] == ref["ddim_timesteps_used"].tolist()
    p = ddim_parameters(model.alphas_cumprod, grid)
    assert torch.equal(p["alphas"], ref["ddim_alphas"]) and torch.equal(p["alphas_prev"], ref["ddim_alphas_prev"])
    assert torch.equal(p["sigmas"], ref["ddim_sigmas"])
    # one float32 ulp apart in one entry (rounding of the reference's mixed numpy/torch arithmetic)
    assert_close(
        torch.sqrt(1 - p["alphas"].float()),
        ref["ddim_sqrt_one_minus_alphas"],
        atol=1e-7,
        rtol=0,
        what="sqrt(1 - alpha)",
    )
    assert torch.equal(model.alphas_cumprod, ref["alphas_cumprod_f32"])
    hint = ref["hint"]
    with torch.no_grad():
        eps = model.apply_model(
            x_noisy, torch.full((1,), grid[steps[0]]), {"context": ref["context_cond"], "hint": hint}
        )
    assert_close(eps, ref["eps_first_step_no_cfg"], atol=1e-4, rtol=1e-4, what="first eps")
    for run, uncond in (("same_uncond", ref["context_cond"]), ("diff_uncond", ref["context_uncond_diff"])):
        seq, x0s = [x_noisy], []
        denoise = classifier_free_guidance(
            model.apply_model, {"context": ref["context_cond"], "hint": hint}, {"context": uncond, "hint": hint}, 9.0
        )
        final = ddim_sample(
            denoise,
            x_noisy,
            model.alphas_cumprod,
            grid,
            steps,
            callback=lambda i, x, x0: (seq.append(x), x0s.append(x0)),  # noqa: B023 (called at once)
        )
        assert_close(torch.stack(seq), ref[f"{run}.x_seq"], **LATENT_TOL, what=f"{run}.x_seq")
        assert_close(torch.stack(x0s), ref[f"{run}.pred_x0_seq"], **LATENT_TOL, what=f"{run}.pred_x0_seq")
        assert_close(final, ref[f"{run}.final"], **LATENT_TOL, what=f"{run}.final")


def test_end_to_end_reconstruction(fixtures_dir, model):
    ref = torch.load(fixtures_dir / "ddim_e2e_test_pipeline.pt")
    image = ref["image"]
    empty, caption = ref["context_empty_prompt"][None], ref["context_caption"][None]
    settings = ReconstructionSettings()
    for run, context in (("empty", empty), ("caption", caption)):
        out = reconstruct_latent(
            model,
            image,
            empty if run == "empty" else context,
            empty,
            ref[f"{run}.posterior_eps"],
            ref[f"{run}.noise"],
            settings,
        )
        assert_close(out["z"], ref[f"{run}.z"], atol=1e-4, rtol=1e-4, what=f"{run}.z")
        assert_close(out["x_noisy"], ref[f"{run}.x_noisy"], atol=1e-4, rtol=1e-4, what=f"{run}.x_noisy")
        assert_close(out["final_latent"], ref[f"{run}.final_latent"], **LATENT_TOL, what=f"{run}.final_latent")
        samples = model.decode_first_stage(out["final_latent"]).double()
        if f"{run}.samples" in ref:
            assert_close(samples, ref[f"{run}.samples"], atol=1e-3, rtol=1e-4, what=f"{run}.samples")
        check = torch.stack([samples.sum(), samples.pow(2).sum()])
        if f"{run}.samples_f64_checksum" in ref:
            assert torch.allclose(check, ref[f"{run}.samples_f64_checksum"], rtol=1e-5, atol=0), run


def test_batch_of_images_equals_one_by_one(model):
    """Per-image generators: batch size and order do not change an image's reconstruction."""
    torch.manual_seed(0)
    images = torch.randn(3, 3, 128, 128)
    ids = ["a/1.png", "b/2.png", "c/3.png"]
    settings = ReconstructionSettings(ddim_steps=4)
    batched = reconstruct(model, images, [""] * 3, ids, settings)["sample"]
    for i in (2, 0):
        single = reconstruct(model, images[i : i + 1], [""], ids[i : i + 1], settings)["sample"]
        assert torch.allclose(single, batched[i : i + 1], atol=1e-4, rtol=1e-4)
    eps1, _ = per_image_noise(ids, 1, (4, 2, 2))
    eps2, _ = per_image_noise(ids[::-1], 1, (4, 2, 2))
    assert torch.equal(eps1, eps2.flip(0))
    assert not torch.equal(per_image_noise(ids, 2, (4, 2, 2))[0], eps1)
