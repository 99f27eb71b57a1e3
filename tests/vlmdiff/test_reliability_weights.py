"""Weight files: half-precision inputs, the right kind of file in each slot, and what stays in memory.

* fp16/bf16 Stable Diffusion, autoencoder and VLMDiff files (``.ckpt`` and ``.safetensors``) load into a
  float32 model: build_model writes float32 only (schedule buffers recomputed), train and test run on them.
* build_model refuses a VLMDiff checkpoint as ``--sd_path``; the VLMDiff loader names the kind of file it got.
* Loading releases what the stage does not need (optimiser state), resume does not keep the first load
  alive through the fit, safetensors are written without a copy of the file in memory.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

import build_model
import test as test_script
import train
from ldm.checkpoint import load_checkpoint, save_checkpoint
from tests.tinyckpt import demo_data_and_model, write_ae_checkpoint, write_sd_checkpoint
from utils.errors import UserError
from vlmdiff.checkpoint import load_vlmdiff

HALF = [torch.float16, torch.bfloat16]
TRAIN = [
    "--data_set",
    "mvtec",
    "--accelerator",
    "cpu",
    "--devices",
    "1",
    "--num_workers",
    "0",
    "--batch_size",
    "2",
    "--accumulate_grad_batches",
    "1",
    "--no_progress_bar",
    "--max_steps",
    "1",
]
TEST = [
    "--data_set",
    "mvtec",
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "1",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--batch_size",
    "2",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return demo_data_and_model(tmp_path_factory.mktemp("weights"), n_train=2, n_test_good=1, n_test_defect=1)


def as_half(src: Path, dest: Path, dtype: torch.dtype) -> Path:
    """``src`` re-saved with every floating tensor in ``dtype`` (as ``.ckpt`` or ``.safetensors`` by suffix)."""
    ckpt = load_checkpoint(src)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    if dest.suffix == ".safetensors":
        save_checkpoint(dest, sd, config=ckpt.get("config"))
    else:
        torch.save({"state_dict": sd, **({"config": ckpt["config"]} if "config" in ckpt else {})}, dest)
    return dest


def float_dtypes(sd: dict) -> set[torch.dtype]:
    return {v.dtype for v in sd.values() if v.is_floating_point()}


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_build_model_casts_half_precision_inputs_to_float32(setup, tmp_path, dtype, ext):
    tmp, _, reference = setup
    sd = as_half(write_sd_checkpoint(tmp_path / "sd32.ckpt"), tmp_path / f"sd-half{ext}", dtype)
    ae = as_half(write_ae_checkpoint(tmp_path / "ae32.ckpt"), tmp_path / f"ae-half{ext}", dtype)
    out = tmp_path / "vlmdiff.ckpt"
    build_model.main(["--sd_path", str(sd), "--ae_path", str(ae), "--output", str(out), "--config", "tiny"])
    built = load_checkpoint(out)["state_dict"]
    assert float_dtypes(built) == {torch.float32}
    full = load_checkpoint(reference)["state_dict"]  # the same inputs in float32
    for k in ("alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "posterior_variance"):
        assert torch.equal(built[k], full[k]), k  # recomputed, not the rounded half copy
    w = "model.diffusion_model.out.2.weight"
    assert torch.equal(built[w], full[w].to(dtype).float())


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_half_precision_vlmdiff_file_trains_and_tests(setup, tmp_path, dtype, ext, caplog):
    tmp, data, start = setup
    half = as_half(start, tmp_path / f"vlmdiff-half{ext}", dtype)
    model, _ = load_vlmdiff(half)
    assert {p.dtype for p in model.state_dict().values() if p.is_floating_point()} == {torch.float32}
    name = str(dtype).removeprefix("torch.")
    with caplog.at_level("INFO"):
        ckpt_dir = train.main(
            [
                *TRAIN,
                "--data_path",
                str(data),
                "--resume_path",
                str(half),
                "--output_root",
                str(tmp_path),
                "--exp_name",
                "half",
            ]
        )
    assert f"stored as {name}, cast to float32" in caplog.text
    trained = load_checkpoint(ckpt_dir / "last.ckpt")
    assert trained["global_step"] == 1 and float_dtypes(trained["state_dict"]) == {torch.float32}
    if ext == ".safetensors":  # one full test run per dtype is enough
        result = test_script.main(
            [*TEST, "--data_path", str(data), "--resume_path", str(half), "--output_dir", str(tmp_path / "results")]
        )
        assert result["official"]["mean"]["auroc_image"] >= 0


def test_half_precision_autoencoder_starts_finetuning(tmp_path):
    from ldm.config import LatentDiffusionConfig, load_config
    from ldm.models.autoencoder import AutoencoderTraining, load_train_config
    from tests.tinyckpt import tiny_ldm

    ae = tmp_path / "ae-fp16.safetensors"
    save_checkpoint(ae, {k: v.half() for k, v in tiny_ldm().first_stage_model.state_dict().items()})
    cfg = load_config("tiny", LatentDiffusionConfig, only_own_sections=True).autoencoder
    module = AutoencoderTraining(cfg, load_train_config("autoencoder", ["loss.perceptual_weight=0"]))
    module.load_starting_weights(load_checkpoint(ae), ae)
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    x = torch.randn(1, 3, 32, 32)
    rec, _ = module(x)
    assert rec.dtype == torch.float32 and torch.isfinite(rec).all()


def test_build_model_refuses_a_vlmdiff_checkpoint_as_sd_path(setup, tmp_path):
    tmp, _, start = setup
    ae = write_ae_checkpoint(tmp_path / "ae.ckpt")
    out = tmp_path / "out.ckpt"
    with pytest.raises(UserError, match=r"--sd_path .* is a VLMDiff checkpoint .*control_model.*--resume_path"):
        build_model.main(["--sd_path", str(start), "--ae_path", str(ae), "--output", str(out), "--config", "tiny"])
    assert not out.exists()
    with pytest.raises(UserError, match=r"--sd_path .* is an autoencoder checkpoint.*--ae_path"):
        build_model.main(["--sd_path", str(ae), "--ae_path", str(ae), "--output", str(out), "--config", "tiny"])


def test_vlmdiff_loader_names_the_kind_of_file(tmp_path):
    sd = write_sd_checkpoint(tmp_path / "sd.ckpt")
    with pytest.raises(
        UserError, match=r"sd\.ckpt is a Stable Diffusion checkpoint.*not a VLMDiff checkpoint.*build_model"
    ):
        load_vlmdiff(sd)
    ae = write_ae_checkpoint(tmp_path / "ae.ckpt")
    with pytest.raises(UserError, match=r"ae\.ckpt is an autoencoder checkpoint.*not a VLMDiff checkpoint"):
        load_vlmdiff(ae)


def _trained(setup) -> Path:
    tmp, data, start = setup
    ckpt_dir = tmp / "ckpt_mem"
    if not (ckpt_dir / "last.ckpt").is_file():
        train.main(
            [
                *TRAIN,
                "--data_path",
                str(data),
                "--resume_path",
                str(start),
                "--output_root",
                str(tmp),
                "--exp_name",
                "mem",
            ]
        )
    return ckpt_dir / "last.ckpt"


def _watch_optimizer_state(monkeypatch) -> list[weakref.ref]:
    """Weak references to the optimiser-state tensors of every checkpoint ``load_checkpoint`` returns."""
    import ldm.checkpoint

    refs: list[weakref.ref] = []
    real = ldm.checkpoint.load_checkpoint

    def spy(*args, **kwargs):
        ckpt = real(*args, **kwargs)
        for opt in ckpt.get("optimizer_states", []):
            refs.extend(
                weakref.ref(t) for s in opt["state"].values() for t in s.values() if isinstance(t, torch.Tensor)
            )
        return ckpt

    monkeypatch.setattr(ldm.checkpoint, "load_checkpoint", spy)
    return refs


def test_test_time_load_drops_the_optimizer_state(setup, monkeypatch):
    last = _trained(setup)
    refs = _watch_optimizer_state(monkeypatch)
    model, info = load_vlmdiff(last)
    gc.collect()
    assert refs and all(r() is None for r in refs)  # released, although the model is still alive
    assert "optimizer_states" not in info and "state_dict" not in info and info["global_step"] == 1
    assert model.control_model is not None


def test_resume_does_not_keep_the_first_load_alive_during_the_fit(setup, monkeypatch):
    import lightning.pytorch as pl

    tmp, data, _ = setup
    last = _trained(setup)
    refs = _watch_optimizer_state(monkeypatch)
    alive_at_fit: list[int] = []
    real_fit = pl.Trainer.fit

    def fit(self, *args, **kwargs):
        gc.collect()
        alive_at_fit.append(sum(r() is not None for r in refs))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    train.main(
        [
            *TRAIN,
            "--data_path",
            str(data),
            "--resume",
            "--output_root",
            str(tmp),
            "--exp_name",
            "mem",
            "--max_steps",
            "2",
        ]
    )
    assert refs and alive_at_fit == [0]
    assert load_checkpoint(last)["global_step"] == 2


def test_missing_feature_weights_are_reported_before_the_checkpoint_is_read(setup, tmp_path):
    tmp, data, _ = setup
    garbage = tmp_path / "huge.ckpt"
    garbage.write_bytes(b"\0" * 4096)  # reading it would fail with "not a readable checkpoint"
    missing = tmp_path / "dino.pth"
    with pytest.raises(UserError, match="dino.pth.*not found.*--feature_weights"):
        test_script.main(
            [
                *TEST,
                "--data_path",
                str(data),
                "--resume_path",
                str(garbage),
                "--feature_weights",
                str(missing),
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )


def test_safetensors_are_written_without_a_copy_in_memory(tmp_path):
    from bench.common import MemoryMeter

    tensors = {f"w{i}": torch.randn(1024, 1024) for i in range(64)}  # 256 MiB
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    save_checkpoint(tmp_path / "w.safetensors", tensors, config={"a": 1})
    extra = meter.peak_mib()
    assert extra < 64, f"writing 256 MiB of tensors took {extra:.0f} MiB more memory"
    back = load_checkpoint(tmp_path / "w.safetensors")
    assert torch.equal(back["state_dict"]["w7"], tensors["w7"]) and back["config"] == {"a": 1}
