"""finetune_autoencoder.py, the first-stage LightningModule and its loss (LPIPS + PatchGAN).

CLI runs are in-process through ``main(argv)`` on the tiny preset, 64x64 demo images and a few
generator steps. No weight file is downloaded: the VGG16 file is random weights saved to a temp folder
under torchvision's names; the LPIPS linear layers are the ones the ``lpips`` package ships.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import finetune_autoencoder
from ldm.checkpoint import load_checkpoint, load_into, save_checkpoint
from ldm.config import AutoencoderConfig, LatentDiffusionConfig, load_config
from ldm.models.autoencoder import AutoencoderTrainConfig, AutoencoderTraining, autoencoder_state_dict, loss_state_dict
from ldm.modules.autoencoder import AutoencoderKL, DiagonalGaussian
from ldm.modules.losses import AutoencoderLossConfig, LPIPSWithDiscriminator, NLayerDiscriminator, hinge_d_loss
from ldm.modules.lpips import LPIPS, load_perceptual_weights, packaged_lpips_weights, vgg16_features_from_torchvision
from tests.fixture_models import autoencoder_weights_path, model_config, write_model_config
from utils.errors import UserError
from vlmdiff.data.demo import generate_demo_dataset

SIZE = 32  # VGG16 and the autoencoder on a 2-core CPU: keep images small
AE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def tiny_ae() -> AutoencoderConfig:
    return load_config("tiny", LatentDiffusionConfig, only_own_sections=True).autoencoder


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture_keys(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "sd15_autoencoder_keys.json").read_text())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(
        root, classes=["china"], n_train=4, n_test_good=0, n_test_defect=0, image_size=SIZE, seed=0
    )


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random VGG16 ``features.*`` weights under torchvision's names and shapes (no classifier: 59 MB less)."""
    import torchvision

    with torch.device("meta"):
        names = {k: v.shape for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {
        k: torch.randn(s, generator=gen) * (0.05 if k.endswith("weight") else 0.01)
        for k, s in names.items()
        if k.startswith("features.")
    }
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(sd, path)
    return path


def run_cli(data_root: Path, out: Path, *extra: str, config: str) -> Path:
    finetune_autoencoder.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data_root),
            "--config",
            config,
            "--image_size",
            str(SIZE),
            "--batch_size",
            "2",
            "--accumulate_grad_batches",
            "2",
            "--max_steps",
            "2",
            "--num_workers",
            "0",
            "--output_dir",
            str(out),
            "--no_progress_bar",
            "--log_images_every_n_steps",
            "1",
            "--log_every_n_steps",
            "1",
            *extra,
        ]
    )
    return out


@pytest.fixture(scope="module")
def plain_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two generator steps without LPIPS, from a random start."""
    return run_cli(
        data_root,
        tmp_path_factory.mktemp("runs") / "p0",
        "--perceptual_weight",
        "0",
        "--resume_path",
        "none",
        config="tiny",
    )


# --- weight names and shapes ------------------------------------------------------------------------


def test_sd15_size_state_dict_equals_upstream_finetuned_checkpoint(fixture_keys: dict) -> None:
    ref = {**fixture_keys["autoencoder"], **fixture_keys["lightning_checkpoint_loss_keys"]}
    ae_cfg = load_config("sd15", LatentDiffusionConfig, only_own_sections=True).autoencoder
    with torch.device("meta"):
        module = AutoencoderTraining(ae_cfg, AutoencoderTrainConfig())
        no_lpips = AutoencoderTraining(ae_cfg, AutoencoderTrainConfig(loss=AutoencoderLossConfig(perceptual_weight=0)))
    sd = module.state_dict()
    ours = {k: list(v.shape) for k, v in sd.items()}
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert len(fixture_keys["autoencoder"]) == 248 and len(fixture_keys["lightning_checkpoint_loss_keys"]) == 56
    assert sd["loss.discriminator.main.3.num_batches_tracked"].dtype == torch.int64
    assert shapes(module.autoencoder_weights()) == {k: tuple(v) for k, v in fixture_keys["autoencoder"].items()}
    # Without LPIPS: the same keys minus the perceptual network (documented choice).
    expected = {k for k in ref if not k.startswith("loss.perceptual_loss.")}
    assert set(no_lpips.state_dict()) == expected


# --- loss parts -----------------------------------------------------------------------------------


def test_lpips_equals_the_reference_package_and_loads_local_files(vgg_file: Path) -> None:
    import lpips

    lin_file = packaged_lpips_weights()
    assert lin_file is not None and lin_file.name == "vgg.pth"
    ours = LPIPS()
    load_perceptual_weights(ours, vgg_file, lin_file)
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()  # packaged linear layers
    ref.net.load_state_dict(vgg16_features_from_torchvision(torch.load(vgg_file)))
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), ref(x, y), rtol=1e-5, atol=1e-7)
    ours.train()
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())


def test_vgg_file_of_another_architecture_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(UserError, match=r"resnet\.pth.*not torchvision VGG16.*conv1\.weight.*vgg16-397923af"):
        load_perceptual_weights(LPIPS(), bad, packaged_lpips_weights())
    with torch.device("meta"):
        names = {f"features.{i}.weight": torch.empty(0) for i in (0, 2)}
    with pytest.raises(UserError, match="missing"):
        load_perceptual_weights(LPIPS(), _save(tmp_path / "part.pth", names), packaged_lpips_weights())


def _save(path: Path, sd: dict) -> Path:
    torch.save({k: torch.zeros(v.shape) for k, v in sd.items()}, path)
    return path


def test_patchgan_layout_initialisation_and_hinge() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, 3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    bn = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3 and all(torch.all(m.bias == 0) for m in bn)
    assert abs(torch.cat([m.weight for m in bn]).mean().item() - 1.0) < 0.01
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert abs(convs[2].weight.std().item() - 0.02) < 0.002
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))


def test_generator_loss_formula_and_adaptive_weight() -> None:
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(AutoencoderLossConfig(perceptual_weight=0, disc_start=5))
    x = torch.randn(2, 3, 32, 32)
    last = torch.nn.Conv2d(3, 3, 3, padding=1)
    h = torch.randn(2, 3, 32, 32)
    post = DiagonalGaussian(torch.randn(2, 8, 4, 4))
    rec = last(h)
    before, logs = loss.generator_loss(x, rec, post, step=4, last_layer=last.weight)
    expected = (x - rec).abs().sum() / 2 + 1e-6 * post.kl().sum() / 2
    torch.testing.assert_close(before, expected)
    assert logs["d_weight"].item() == 0.0 and logs["disc_factor"].item() == 0.0
    after, logs = loss.generator_loss(x, rec, post, step=5, last_layer=last.weight)
    nll = (x - rec).abs().sum() / 2
    g = -loss.discriminator(rec).mean()
    gn = torch.autograd.grad(nll, last.weight, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last.weight, retain_graph=True)[0].norm()
    w = 0.5 * torch.clamp(gn / (gg + 1e-4), 0, 1e4)
    torch.testing.assert_close(logs["d_weight"], w)
    torch.testing.assert_close(after, expected + w * g, rtol=1e-4, atol=1e-3)


# --- the CLI --------------------------------------------------------------------------------------


def metrics_rows(run: Path) -> list[dict]:
    with open(run / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_run_without_perceptual_weights_writes_readable_checkpoints(plain_run: Path, fixture_keys: dict) -> None:
    ckpt = load_checkpoint(plain_run / "autoencoder.ckpt")
    sd = ckpt["state_dict"]
    expected_ae = shapes(AutoencoderKL(tiny_ae()).state_dict())
    assert shapes({k: v for k, v in sd.items() if not k.startswith("loss.")}) == expected_ae
    loss_ref = {k for k in fixture_keys["lightning_checkpoint_loss_keys"] if not k.startswith("loss.perceptual_loss.")}
    assert {k for k in sd if k.startswith("loss.")} == loss_ref
    assert ckpt["config"]["autoencoder"]["ch"] == 32 and ckpt["config"]["image_size"] == SIZE
    assert ckpt["config"]["finetune"]["loss"]["perceptual_weight"] == 0.0 and ckpt["global_step"] == 2
    ae = AutoencoderKL(tiny_ae())
    load_into(ae, autoencoder_state_dict(ckpt, "autoencoder.ckpt"), "autoencoder.ckpt")  # what build_model does
    losses = [float(r["train/total_loss_step"]) for r in metrics_rows(plain_run) if r.get("train/total_loss_step")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    last = torch.load(plain_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["autoencoder_steps"] == 2 and len(last["optimizer_states"]) == 2
    grid = Image.open(plain_run / "images" / "step_0000002.png")
    assert grid.size == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2)  # 2 inputs over 2 reconstructions
    assert (plain_run / "config.yaml").is_file()
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        run_cli(
            plain_run.parent.parent / "unused",
            plain_run,
            "--perceptual_weight",
            "0",
            "--resume_path",
            "none",
            config="tiny",
        )


def disc_weights(sd: dict) -> dict:
    """Trained discriminator tensors (not the BatchNorm running statistics)."""
    return {
        k: v
        for k, v in sd.items()
        if k.startswith("loss.discriminator.") and v.is_floating_point() and "running" not in k
    }


def test_discriminator_trained_from_disc_start(plain_run: Path, data_root: Path, tmp_path: Path) -> None:
    start = plain_run / "autoencoder.ckpt"  # a finetuned checkpoint as starting weights: AE + discriminator
    before = load_checkpoint(start)["state_dict"]
    run = run_cli(
        data_root,
        tmp_path / "gan",
        "--perceptual_weight",
        "0",
        "--resume_path",
        str(start),
        "--disc_start",
        "1",
        config="tiny",
    )
    after = load_checkpoint(run / "autoencoder.ckpt")["state_dict"]
    assert all(not torch.equal(v, before[k]) for k, v in disc_weights(after).items())
    assert not torch.equal(after["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    rows = [r for r in metrics_rows(run) if r.get("train/d_weight")]
    assert [float(r["train/disc_factor"]) for r in rows] == [0.0, 0.0, 1.0, 1.0]  # generator steps 0, 0, 1, 1
    assert all(float(r["train/d_weight"]) > 0 for r in rows[2:]) and all(r.get("train/disc_loss") for r in rows[2:])


def test_run_with_perceptual_weights_from_local_files(
    data_root: Path,
    vgg_file: Path,
    fixtures_dir: Path,
    fixture_keys: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    start = autoencoder_weights_path(fixtures_dir)  # a plain AutoencoderKL state dict, sizes in the folder's config
    config = write_model_config(fixtures_dir, tmp_path / "fixture_model.yaml")
    run = run_cli(
        data_root,
        tmp_path / "lpips",
        "--vgg_weights",
        str(vgg_file),
        "--resume_path",
        str(start),
        "--accumulate_grad_batches",
        "1",
        config=str(config),
    )
    ckpt = load_checkpoint(run / "autoencoder.ckpt")
    sd = ckpt["state_dict"]
    assert shapes({k: v for k, v in sd.items() if k.startswith("loss.")}) == {
        k: tuple(v) for k, v in fixture_keys["lightning_checkpoint_loss_keys"].items()
    }
    vgg = torch.load(vgg_file)
    torch.testing.assert_close(sd["loss.perceptual_loss.net.slice3.12.weight"], vgg["features.12.weight"])
    lin = torch.load(packaged_lpips_weights(), map_location="cpu")
    torch.testing.assert_close(sd["loss.perceptual_loss.lin4.model.1.weight"], lin["lin4.model.1.weight"])
    first = autoencoder_state_dict(load_checkpoint(start))
    delta = (sd["decoder.conv_in.weight"] - first["decoder.conv_in.weight"]).abs().max().item()
    assert 0 < delta < 1e-3  # started from the file, moved by two Adam steps of lr 9e-5
    losses = [float(r["train/p_loss"]) for r in metrics_rows(run) if r.get("train/p_loss")]
    assert losses and all(v > 0 for v in losses)
    # Starting from a checkpoint that carries the LPIPS weights (like kl-f8's model.ckpt): no files needed.
    monkeypatch.chdir(tmp_path)  # no models/vgg16-397923af.pth here
    module = AutoencoderTraining(model_config(fixtures_dir).autoencoder, AutoencoderTrainConfig())
    finetune_autoencoder._load_starting_weights(
        module,
        finetune_autoencoder.parse_args(
            ["--data_set", "mvtec", "--data_path", ".", "--resume_path", str(run / "autoencoder.ckpt")]
        ),
    )
    torch.testing.assert_close(
        module.loss.perceptual_loss.state_dict()["net.slice3.12.weight"],
        sd["loss.perceptual_loss.net.slice3.12.weight"],
    )


def test_missing_perceptual_weight_files_say_which_and_where(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = tmp_path / "nowhere.pth"
    with pytest.raises(UserError) as info:
        run_cli(data_root, tmp_path / "a", "--resume_path", "none", "--vgg_weights", str(nowhere), config="tiny")
    msg = str(info.value)
    assert str(nowhere) in msg and "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert "--perceptual_weight 0" in msg
    monkeypatch.chdir(tmp_path)  # the default location models/vgg16-397923af.pth is relative to the working folder
    with pytest.raises(UserError, match=r"models/vgg16-397923af\.pth not found \(the default location"):
        run_cli(data_root, tmp_path / "b", "--resume_path", "none", config="tiny")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "vgg16-397923af.pth").write_bytes(b"")
    with pytest.raises(UserError, match=r"lin\.pth not found \(--lpips_weights\).*--perceptual_weight 0"):
        run_cli(
            data_root,
            tmp_path / "c",
            "--resume_path",
            "none",
            "--lpips_weights",
            str(tmp_path / "lin.pth"),
            config="tiny",
        )
    with pytest.raises(UserError, match=r"models/autoencoders\.ckpt not found.*kl-f8\.zip.*--resume_path none"):
        run_cli(data_root, tmp_path / "d", "--perceptual_weight", "0", config="tiny")


def test_flags_override_the_train_config_and_an_epoch_budget_replaces_the_step_budget() -> None:
    def cfg(*flags: str) -> AutoencoderTrainConfig:
        return finetune_autoencoder.train_config_from_args(
            finetune_autoencoder.parse_args(["--data_set", "mvtec", "--data_path", ".", *flags])
        )

    default = cfg()
    assert (default.base_lr, default.batch_size, default.accumulate_grad_batches, default.max_steps) == (
        4.5e-5,
        1,
        8,
        60001,
    )
    assert (default.loss.disc_start, default.loss.kl_weight, default.loss.disc_weight) == (50001, 1e-6, 0.5)
    assert cfg("--batch_size", "4").learning_rate == pytest.approx(1.8e-4)  # not scaled by accumulation
    assert (cfg("--max_epochs", "3").max_steps, cfg("--max_epochs", "3").max_epochs) == (-1, 3)
    assert cfg("--max_epochs", "3", "--max_steps", "7").max_steps == 7
    with pytest.raises(UserError, match="budget"):
        cfg("--max_steps", "-1")


def test_default_budget_reaches_the_patchgan_phase(capsys: pytest.CaptureFixture) -> None:
    """configs/autoencoder.yaml: updates 0..50000 without the GAN loss, 50001..60000 with it; --help says so."""

    def cfg(*flags: str) -> AutoencoderTrainConfig:
        return finetune_autoencoder.train_config_from_args(
            finetune_autoencoder.parse_args(["--data_set", "mvtec", "--data_path", ".", *flags])
        )

    default = cfg()
    assert AutoencoderTrainConfig() == default  # the dataclass defaults are the file's
    loss = LPIPSWithDiscriminator(dataclasses.replace(default.loss, perceptual_weight=0.0))
    last = default.max_steps - 1  # generator updates are numbered 0 .. max_steps - 1
    active = [
        s for s in (0, default.loss.disc_start - 1, default.loss.disc_start, last) if loss.discriminator_active(s)
    ]
    assert active == [50001, 60000]
    assert finetune_autoencoder.loss_phases(default) == (
        "L1 + LPIPS + KL for generator updates 0..50000, plus the PatchGAN loss for updates 50001..60000",
        True,
    )
    text, with_gan = finetune_autoencoder.loss_phases(cfg("--max_steps", "5000", "--perceptual_weight", "0"))
    assert not with_gan and text.startswith(
        "L1 + KL (no LPIPS) only: the PatchGAN loss starts at generator update 50001"
    )
    assert finetune_autoencoder.loss_phases(cfg("--max_steps", "5000", "--disc_start", "100"))[1]
    with pytest.raises(SystemExit):
        finetune_autoencoder.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "the PatchGAN loss runs from update disc_start on" in help_text and "config's, 60001)" in help_text
    assert "the PatchGAN loss starts at (default: the finetuning config's, 50001)" in help_text


def _module() -> AutoencoderTraining:
    return AutoencoderTraining(tiny_ae(), AutoencoderTrainConfig())


def test_resume_continues_steps_and_optimiser_state(
    plain_run: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(plain_run, run)
    with pytest.raises(UserError, match="no checkpoint to continue"):
        run_cli(data_root, tmp_path / "empty", "--perceptual_weight", "0", "--resume", config="tiny")
    with pytest.raises(UserError, match="does not fit this run.*perceptual_weight"):
        run_cli(data_root, run, "--resume", "--vgg_weights", "unused.pth", config="tiny")
    first_events = sorted(p.name for p in (run / "tensorboard").glob("events.out.tfevents.*"))
    capsys.readouterr()
    run_cli(
        data_root, run, "--perceptual_weight", "0", "--resume", "--max_steps", "3", "--log_interval", "0", config="tiny"
    )
    err = capsys.readouterr().err  # --no_progress_bar: plain lines, counting generator updates from the resumed one
    assert re.search(
        r"train epoch \d+: step 3/3 \(100%\) \| total_loss [\d.]+ \| rec_loss [\d.]+ \| .* \| ETA 0:00", err
    )
    assert f"done after 3 generator steps: {run / 'autoencoder.ckpt'}" in err
    before_rows, rows = metrics_rows(plain_run), metrics_rows(run)  # the logs keep the first run's rows
    assert len(rows) > len(before_rows) > 0
    assert [{k: r[k] for k in before_rows[0]} for r in rows[: len(before_rows)]] == before_rows
    assert max(float(r["train/ae_step"]) for r in rows if r.get("train/ae_step")) == 3
    events = sorted(p.name for p in (run / "tensorboard").glob("events.out.tfevents.*"))
    assert first_events and set(first_events) < set(events)
    ckpt = load_checkpoint(run / "autoencoder.ckpt")
    assert ckpt["global_step"] == 3
    before = load_checkpoint(plain_run / "autoencoder.ckpt")["state_dict"]
    # disc_start 50001 > every step: the discriminator never moves, the autoencoder does.
    assert all(torch.equal(v, before[k]) for k, v in disc_weights(ckpt["state_dict"]).items())
    assert not torch.equal(ckpt["state_dict"]["decoder.conv_out.weight"], before["decoder.conv_out.weight"])
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["autoencoder_steps"] == 3
    assert max(s["step"].item() for s in last["optimizer_states"][0]["state"].values()) == 3


# --- checkpoint formats -----------------------------------------------------------------------------


def test_autoencoder_state_dict_reads_every_accepted_format(plain_run: Path, tmp_path: Path) -> None:
    ours = load_checkpoint(plain_run / "autoencoder.ckpt")
    ae_sd = autoencoder_state_dict(ours)
    assert all(k.startswith(AE_PARTS) for k in ae_sd) and loss_state_dict(ours)
    sd_style = {"model.diffusion_model.x": torch.zeros(1), **{"first_stage_model." + k: v for k, v in ae_sd.items()}}
    torch.save({"state_dict": sd_style, "global_step": 1}, tmp_path / "sd.ckpt")
    save_checkpoint(tmp_path / "ae.safetensors", ae_sd)
    torch.save(ae_sd, tmp_path / "plain.pt")
    for name in ("sd.ckpt", "ae.safetensors", "plain.pt"):
        got = autoencoder_state_dict(load_checkpoint(tmp_path / name), name)
        assert set(got) == set(ae_sd) and all(torch.equal(got[k], ae_sd[k]) for k in ae_sd)
        load_into(AutoencoderKL(tiny_ae()), got, name)
    with pytest.raises(UserError, match="ambiguous"):
        autoencoder_state_dict({"state_dict": {**sd_style, **ae_sd}}, "both.ckpt")
    with pytest.raises(UserError, match="no autoencoder weights"):
        autoencoder_state_dict({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, "unet.ckpt")


def test_starting_weights_of_another_size_fail_in_one_line(plain_run: Path) -> None:
    wide = AutoencoderConfig(**{**tiny_ae().__dict__, "ch": 64})
    module = AutoencoderTraining(wide, AutoencoderTrainConfig(loss=AutoencoderLossConfig(perceptual_weight=0)))
    with pytest.raises(UserError, match=r"p0/autoencoder\.ckpt does not fit.*another shape.*--config") as info:
        module.load_starting_weights(load_checkpoint(plain_run / "autoencoder.ckpt"), plain_run / "autoencoder.ckpt")
    assert "\n" not in str(info.value)
    partial = {
        "state_dict": {
            **load_checkpoint(plain_run / "autoencoder.ckpt")["state_dict"],
            "loss.perceptual_loss.lin0.model.1.weight": torch.zeros(1, 64, 1, 1),
        }
    }
    module = _module()
    with pytest.raises(UserError, match="perceptual_loss.*incomplete"):
        module.load_starting_weights(partial, "partial.ckpt")
