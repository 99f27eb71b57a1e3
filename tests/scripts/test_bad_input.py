"""Bad input to the five stage scripts: one table of cases, each run in-process through ``run_main``.

Every failing case must end with exit code 2, exactly one ``error:`` line that names the path or
flag at fault, no traceback, no temporary file left behind, and every file written before the run
unchanged (bytes and mtime). A few inputs that look odd but are valid (grayscale, RGBA and 16-bit
images; non-binary masks; a trusted legacy pickle with its flag) must work: exit 0.

The cases are listed as test ids (``pytest -v -k bad_input``) and, with the error line each one
produced, as a table printed by the last test of this module.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import datagen, mounts
from utils.cli import run_main

TEST_FAST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "1",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--device",
    "cpu",
]
TRAIN_FAST = [
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
AE_FAST = [
    "--config",
    "tiny",
    "--image_size",
    "32",
    "--batch_size",
    "2",
    "--max_steps",
    "1",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--perceptual_weight",
    "0",
    "--log_images_every_n_steps",
    "0",
]
ERROR_LINE = re.compile(r"^(?:\S+: )?error: ")


class LegacyThing:
    """A class pickled into a 'legacy' checkpoint: loading it runs this module's code (an unsafe pickle)."""

    def __init__(self, note: str = "hyper-parameters") -> None:
        self.note = note


@dataclass
class Run:
    """One script invocation and what must hold afterwards."""

    script: str
    argv: list[str]
    names: tuple[str, ...] = ()  # substrings the error line must contain (paths, flags); () = must succeed
    protect: tuple[Path, ...] = ()  # files/folders written before the run that must not change
    disk_full: bool = False  # utils.io writes fail with ENOSPC
    check: Callable[[], None] | None = None  # extra assertions on what the run left behind
    env: dict[str, str] = field(default_factory=dict)  # environment variables set for the run
    cleanup: Callable[[], None] | None = None  # undoes what the case set up (e.g. unmounts), run last


class Workspace:
    """Inputs shared by the cases, each made on first use (so ``-k`` on one case builds only its inputs)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @cached_property
    def mvtec(self) -> Path:
        return datagen.make_mvtec(
            self.root / "mvtec",
            classes=("bottle",),
            n_train=2,
            n_test_good=1,
            defects=("crack",),
            n_per_defect=1,
            size=32,
            gray_classes=(),
        )

    @cached_property
    def sd(self) -> Path:
        from tests.tinyckpt import write_sd_checkpoint

        return write_sd_checkpoint(self.root / "sd.ckpt", ema=False)

    @cached_property
    def ae(self) -> Path:
        from tests.tinyckpt import write_ae_checkpoint

        return write_ae_checkpoint(self.root / "ae.ckpt")

    @cached_property
    def vlmdiff(self) -> Path:
        import build_model

        out = self.root / "vlmdiff.ckpt"
        build_model.main(
            ["--sd_path", str(self.sd), "--ae_path", str(self.ae), "--output", str(out), "--config", "tiny"]
        )
        return out

    @cached_property
    def vlmdiff_nan(self) -> Path:
        ckpt = torch.load(self.vlmdiff, weights_only=True)
        ckpt["state_dict"]["control_model.input_hint_block.0.weight"][0, 0, 0, 0] = float("nan")
        path = self.root / "vlmdiff_nan.ckpt"
        torch.save(ckpt, path)
        return path

    def mvtec_copy(self, dest: Path) -> Path:
        return Path(shutil.copytree(self.mvtec, dest))


def truncated(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def snapshot(paths: tuple[Path, ...]) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file under ``paths``."""
    out = {}
    for p in paths:
        for f in [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()):
            out[str(f)] = (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    assert out, f"nothing to protect under {paths}"
    return out


# ------------------------------------------------------------------------------------------------ cases

CASES: list[tuple[str, Callable[[Workspace, Path], Run]]] = []


def case(description: str):
    def register(fn: Callable[[Workspace, Path], Run]) -> Callable[[Workspace, Path], Run]:
        CASES.append((description, fn))
        return fn

    return register


def captioner(root: Path, *extra: str, data_set: str = "mvtec") -> list[str]:
    return ["--data_set", data_set, "--data_path", str(root), "--vlm_model", "template", *extra]


@case("captioner: a dataset root that does not exist")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("captioner", captioner(tmp / "nowhere"), names=(str(tmp / "nowhere"), "does not exist"))


@case("captioner: an empty MVTec-AD root")
def _(ws: Workspace, tmp: Path) -> Run:
    (tmp / "empty").mkdir()
    return Run("captioner", captioner(tmp / "empty"), names=(str(tmp / "empty"), "no classes"))


@case("captioner: a VisA root in MVTec-AD layout (wrong --data_set)")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_visa(tmp / "visa", classes=("candle",), n_train=1, n_test_good=1, n_test_anomaly=1)
    return Run("captioner", captioner(root), names=(str(root), "MVTec-AD layout"))


@case("captioner: a VisA root without split_csv/1cls.csv")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_visa(tmp / "visa", classes=("candle",), n_train=1, n_test_good=1, n_test_anomaly=1)
    (root / "split_csv" / "1cls.csv").unlink()
    return Run("captioner", captioner(root, data_set="visa"), names=(str(root / "split_csv" / "1cls.csv"),))


@case("captioner: a Real-IAD root without its JSON files")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_realiad(tmp / "riad", classes=("toy",), views=1)
    shutil.rmtree(tmp / "riad" / "real_iad_jsons")
    expected = tmp / "riad" / "real_iad_jsons" / "realiad_jsons" / "toy.json"
    return Run("captioner", captioner(root, data_set="real_iad"), names=(str(expected),))


@case("captioner: a COCO-AD root without meta_20_*.json")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_coco_ad(tmp / "coco", n_train=1, n_test_normal=1, n_test_anomaly=1)
    (root / "meta_20_0.json").unlink()
    return Run("captioner", captioner(root, data_set="coco"), names=(str(root / "meta_20_0.json"),))


@case("captioner: a corrupt image (random bytes named .png); earlier captions kept")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    bad = root / "bottle" / "train" / "good" / "001.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    out = tmp / "captions"

    def check_progress() -> None:  # the image before the corrupt one was captioned and stays on disk
        lines = [json.loads(x) for p in (out / "progress").glob("*.jsonl") for x in p.read_text().splitlines()]
        assert [r["id"] for r in lines] == ["bottle/train/good/000.png"]

    return Run("captioner", captioner(root, "--output", str(out)), names=(str(bad), "corrupt"), check=check_progress)


@case("captioner: a truncated PNG")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    bad = root / "bottle" / "test" / "good" / "000.png"
    truncated(bad, bad)
    return Run("captioner", captioner(root, "--output", str(tmp / "captions")), names=(str(bad), "truncated"))


@case("captioner: grayscale, RGBA and 16-bit PNGs work (exit 0)")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    rng = np.random.default_rng(1)
    good = root / "bottle" / "train" / "good"
    gray = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    deep = (rng.integers(0, 65536, (32, 32))).astype(np.uint16)
    (good / "000.png").write_bytes(png_bytes(gray))
    (good / "001.png").write_bytes(png_bytes(rgba))
    (good / "002.png").write_bytes(png_bytes(deep))
    modes = {p.name: Image.open(p).mode for p in sorted(good.glob("*.png"))}
    assert modes == {"000.png": "L", "001.png": "RGBA", "002.png": "I;16"}, modes
    out = tmp / "captions"

    def check() -> None:
        from vlmdiff.data import build_dataset, load_captions

        caps = load_captions(out, "train", "mvtec")
        assert sorted(caps) == [f"bottle/train/good/00{i}.png" for i in range(3)]
        items = build_dataset("mvtec", root, "train", image_size=32)
        for i in range(3):
            img = items[i]["image"]
            assert img.shape == (3, 32, 32) and torch.isfinite(img).all()
        # 16-bit is scaled to 8 bits (not clipped): the decoded image spans the value range
        spread = items[2]["image"].amax() - items[2]["image"].amin()
        assert spread > 3.0, spread

    return Run("captioner", captioner(root, "--output", str(out), "--split", "train"), check=check)


@case("captioner: --start_ind 7 greater than --end_ind 3")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "captioner",
        captioner(ws.mvtec, "--output", str(tmp / "c"), "--start_ind", "7", "--end_ind", "3"),
        names=("--start_ind 7", "--end_ind 3"),
    )


@case("captioner: unknown --data_set mvtech")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("captioner", captioner(ws.mvtec, data_set="mvtech"), names=("--data_set", "mvtech"))


@case("captioner: an output folder that holds another run's captions (other --prompt_type)")
def _(ws: Workspace, tmp: Path) -> Run:
    import captioner as script

    out = tmp / "captions"
    script.main(captioner(ws.mvtec, "--output", str(out), "--split", "test"))
    progress = next((out / "progress").glob("*.jsonl"))
    return Run(
        "captioner",
        captioner(ws.mvtec, "--output", str(out), "--prompt_type", "pa"),
        names=(str(progress), "another run", "--output"),
        protect=(out,),
    )


@case("finetune_autoencoder: a Real-IAD JSON that lists missing images")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_realiad(tmp / "riad", classes=("toy",), views=2)
    json_path = tmp / "riad" / "real_iad_jsons" / "realiad_jsons" / "toy.json"
    victim = root / "toy" / json.loads(json_path.read_text())["train"][1]["image_path"]
    victim.unlink()
    return Run(
        "finetune_autoencoder",
        [
            "--data_set",
            "realiad",
            "--data_path",
            str(root),
            "--resume_path",
            "none",
            "--output_dir",
            str(tmp / "run"),
            *AE_FAST,
        ],
        names=(str(json_path), str(victim)),
    )


@case("finetune_autoencoder: a truncated --resume_path")
def _(ws: Workspace, tmp: Path) -> Run:
    bad = truncated(ws.ae, tmp / "ae_half.ckpt")
    return Run(
        "finetune_autoencoder",
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(ws.mvtec),
            "--resume_path",
            str(bad),
            "--output_dir",
            str(tmp / "run"),
            *AE_FAST,
        ],
        names=(str(bad), "complete"),
    )


@case("finetune_autoencoder: --resume_path with a NaN weight")
def _(ws: Workspace, tmp: Path) -> Run:
    ckpt = torch.load(ws.ae, weights_only=False)
    ckpt["state_dict"]["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    bad = tmp / "ae_nan.ckpt"
    torch.save(ckpt, bad)
    return Run(
        "finetune_autoencoder",
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(ws.mvtec),
            "--resume_path",
            str(bad),
            "--unsafe_legacy_pickle",
            "--output_dir",
            str(tmp / "run"),
            *AE_FAST,
        ],
        names=(str(bad), "NaN"),
    )


@case("finetune_autoencoder: an --output_dir that holds another run")
def _(ws: Workspace, tmp: Path) -> Run:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ws.ae, run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("seed: 7\n")
    return Run(
        "finetune_autoencoder",
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(ws.mvtec),
            "--resume_path",
            "none",
            "--output_dir",
            str(run),
            *AE_FAST,
        ],
        names=(str(run), "--resume"),
        protect=(run,),
    )


def build(
    ws: Workspace, tmp: Path, *extra: str, sd: Path | None = None, ae: Path | None = None, output: Path | None = None
) -> list[str]:
    return [
        "--sd_path",
        str(sd or ws.sd),
        "--ae_path",
        str(ae or ws.ae),
        "--output",
        str(output or tmp / "out.ckpt"),
        "--config",
        "tiny",
        *extra,
    ]


@case("build_model: an --sd_path that does not exist")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "build_model", build(ws, tmp, sd=tmp / "v1-5-pruned.ckpt"), names=("--sd_path", str(tmp / "v1-5-pruned.ckpt"))
    )


@case("build_model: a truncated --ae_path")
def _(ws: Workspace, tmp: Path) -> Run:
    bad = truncated(ws.ae, tmp / "ae_half.ckpt")
    return Run("build_model", build(ws, tmp, ae=bad), names=(str(bad),))


@case("build_model: an --ae_path autoencoder of another config")
def _(ws: Workspace, tmp: Path) -> Run:
    from tests.tinyckpt import write_ae_checkpoint

    other = write_ae_checkpoint(tmp / "ae_ch64.ckpt", overrides=("autoencoder.ch=64",))
    return Run("build_model", build(ws, tmp, ae=other), names=(str(other),))


@case("build_model: an --sd_path with a NaN weight")
def _(ws: Workspace, tmp: Path) -> Run:
    ckpt = torch.load(ws.sd, weights_only=True)
    key = "model.diffusion_model.out.2.weight"
    ckpt["state_dict"][key][0, 0, 0, 0] = float("nan")
    bad = tmp / "sd_nan.ckpt"
    torch.save(ckpt, bad)
    return Run("build_model", build(ws, tmp, sd=bad), names=(str(bad), key, "NaN"))


def _legacy_ae(ws: Workspace, tmp: Path) -> Path:
    """The workspace's autoencoder checkpoint with a pickled object of arbitrary code beside the weights."""
    ckpt = torch.load(ws.ae, weights_only=False)
    ckpt["hyper_parameters"] = LegacyThing()
    legacy = tmp / "legacy_ae.ckpt"
    torch.save(ckpt, legacy)
    return legacy


@case("build_model: a legacy pickle with code objects, without --unsafe_legacy_pickle")
def _(ws: Workspace, tmp: Path) -> Run:
    legacy = _legacy_ae(ws, tmp)
    return Run("build_model", build(ws, tmp, ae=legacy), names=(str(legacy), "--unsafe_legacy_pickle"))


@case("build_model: the same legacy pickle with --unsafe_legacy_pickle works (exit 0)")
def _(ws: Workspace, tmp: Path) -> Run:
    legacy = _legacy_ae(ws, tmp)
    out = tmp / "out.ckpt"

    def check() -> None:
        from ldm.checkpoint import load_checkpoint

        assert "first_stage_model.decoder.conv_out.weight" in load_checkpoint(out)["state_dict"]

    return Run("build_model", build(ws, tmp, "--unsafe_legacy_pickle", ae=legacy, output=out), check=check)


@case("build_model: disk full while writing --output (the previous file stays, no temp file)")
def _(ws: Workspace, tmp: Path) -> Run:
    out = tmp / "models" / "vlmdiff.ckpt"
    out.parent.mkdir()
    shutil.copy(ws.vlmdiff, out)
    return Run(
        "build_model", build(ws, tmp, output=out), names=(str(out), "disk"), protect=(out.parent,), disk_full=True
    )


def train(ws: Workspace, tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["--data_set", "mvtec", "--data_path", str(data or ws.mvtec), "--output_root", str(tmp), *TRAIN_FAST, *extra]


@case("train: a --resume_path that does not exist")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(tmp / "models" / "vlmdiff.ckpt")),
        names=(str(tmp / "models" / "vlmdiff.ckpt"),),
    )


@case("train: a class whose train/good folder is empty")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    for p in (root / "bottle" / "train" / "good").iterdir():
        p.unlink()
    return Run(
        "train", train(ws, tmp, "--resume_path", str(ws.vlmdiff), data=root), names=(str(root / "bottle" / "train"),)
    )


@case("train: --use_captions with caption ids that match no image")
def _(ws: Workspace, tmp: Path) -> Run:
    folder = tmp / "caps"
    ids = ["bottle/train/good/000.png", "bottle/train/good/007.png"]
    (cap,) = datagen.write_upstream_captions(folder, "train", "mvtec", "internvl", ids, ["a bottle", "another"])
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--use_captions", "--caption_folder", str(folder)),
        names=(str(cap), "bottle/train/good/007.png"),
        protect=(folder,),
    )


@case("train: --use_captions with caption and label files of different lengths")
def _(ws: Workspace, tmp: Path) -> Run:
    folder = tmp / "caps"
    ids = ["bottle/train/good/000.png", "bottle/train/good/001.png"]
    (cap,) = datagen.write_upstream_captions(folder, "train", "mvtec", "internvl", ids, ["a bottle", "another"])
    cap.write_text(json.dumps(["only one caption"]))
    labels = folder / "train_labels_mvtec_internvl.json"
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--use_captions", "--caption_folder", str(folder)),
        names=(str(cap), str(labels)),
        protect=(folder,),
    )


@case("train: --caption_folder naming a VisA caption file")
def _(ws: Workspace, tmp: Path) -> Run:
    folder = tmp / "visa_captions_internvl_pd"
    (cap,) = datagen.write_upstream_captions(
        folder, "train", "visa", "internvl", ["candle/Data/Images/Normal/0000.JPG"], ["a candle"]
    )
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--use_captions", "--caption_folder", str(cap)),
        names=(str(cap), "another dataset"),
        protect=(folder,),
    )


@case("train: a checkpoint of another config (--config tiny unet.num_heads=2)")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--config", "tiny", "unet.num_heads=2"),
        names=(str(ws.vlmdiff), "--config", "num_heads"),
    )


@case("train: a --resume_path with a NaN weight")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff_nan)),
        names=(str(ws.vlmdiff_nan), "control_model.input_hint_block.0.weight", "NaN"),
    )


@case("train: an experiment folder that holds another run")
def _(ws: Workspace, tmp: Path) -> Run:
    ckpt_dir = tmp / "ckpt_exp"
    ckpt_dir.mkdir()
    shutil.copy(ws.vlmdiff, ckpt_dir / "last.ckpt")
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--exp_name", "exp"),
        names=(str(ckpt_dir), "--resume", "--exp_name"),
        protect=(ckpt_dir,),
    )


@case("train: --data_set coco without --coco_part")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        ["--data_set", "coco", "--data_path", str(tmp), "--resume_path", str(tmp / "x.ckpt"), *TRAIN_FAST],
        names=("--coco_part",),
    )


@case("train: a corrupt image read by a DataLoader worker process (--num_workers 1)")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    bad = root / "bottle" / "train" / "good" / "000.png"
    bad.write_bytes(b"not a png at all")
    argv = train(ws, tmp, "--resume_path", str(ws.vlmdiff), data=root)
    argv[argv.index("--num_workers") + 1] = "1"
    return Run("train", argv, names=(str(bad), "corrupt"))


@case("train: disk full while saving a checkpoint (no partial checkpoint, no temp file)")
def _(ws: Workspace, tmp: Path) -> Run:
    ckpt_dir = tmp / "ckpt_full"

    def check_nothing_half_written() -> None:
        assert not list(ckpt_dir.glob("*.ckpt")), sorted(ckpt_dir.iterdir())

    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--exp_name", "full", "--save_every_n_steps", "1"),
        names=(str(ckpt_dir / "step=0000001.ckpt"), "disk"),
        disk_full=True,
        check=check_nothing_half_written,
        protect=(ws.vlmdiff,),
    )


def scoring_args(
    ws: Workspace, out: Path, *extra: str, data: Path | None = None, ckpt: Path | None = None
) -> list[str]:
    return [
        "--data_set",
        "mvtec",
        "--data_path",
        str(data or ws.mvtec),
        "--resume_path",
        str(ckpt or ws.vlmdiff),
        "--output_dir",
        str(out),
        *TEST_FAST,
        *extra,
    ]


@case("test: a mask whose size differs from its image")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    mask.write_bytes(png_bytes(np.zeros((16, 24), dtype=np.uint8)))
    image = root / "bottle" / "test" / "crack" / "000.png"
    return Run("test", scoring_args(ws, tmp / "out", data=root), names=(str(mask), str(image), "24x16"))


@case("test: non-binary mask values (0, 1, 2 as in raw VisA masks) work (exit 0), ground truth = mask > 0")
def _(ws: Workspace, tmp: Path) -> Run:
    root = ws.mvtec_copy(tmp / "mvtec")
    raw = np.zeros((32, 32), dtype=np.uint8)
    raw[8:16, 8:16], raw[20:28, 4:12] = 1, 2
    (root / "bottle" / "ground_truth" / "crack" / "000_mask.png").write_bytes(png_bytes(raw))
    out = tmp / "out"

    def check() -> None:
        from vlmdiff.evaluation.map_store import MapStore

        arrays = dict(MapStore(out / "maps").iter_classes())["bottle"]
        row = list(arrays["ids"]).index("bottle/test/crack/000.png")
        mask = arrays["masks"][row]
        assert mask.shape == (128, 128) and mask.max() == 255
        assert 2 * 32 * 32 < (mask > 0).sum() < 3 * 32 * 32  # both regions (2 x 8x8 of 32x32, scaled to 128)
        assert json.loads((out / "metrics.json").read_text())["metrics"]["official"]["mean"]

    return Run("test", scoring_args(ws, out, data=root), check=check)


@case("test: an --output_dir that holds another run's maps")
def _(ws: Workspace, tmp: Path) -> Run:
    from vlmdiff.evaluation.map_store import MapStore

    out = tmp / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"checkpoint": {"path": "/elsewhere/model.ckpt"}}))
    MapStore(out / "maps").write(
        "00000000",
        ["bottle/test/good/000.png"],
        ["bottle"],
        np.zeros((1, 8, 8)),
        np.zeros((1, 8, 8), dtype=np.uint8),
        [0],
        [0.0],
    )
    return Run("test", scoring_args(ws, out), names=(str(out), "another run", "--output_dir"), protect=(out,))


@case("test: --start_ind 7 greater than --end_ind 3")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "test",
        scoring_args(ws, tmp / "out", "--start_ind", "7", "--end_ind", "3"),
        names=("--start_ind 7", "--end_ind 3"),
    )


@case("test: an autoencoder checkpoint given as the VLMDiff --resume_path")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "test",
        scoring_args(ws, tmp / "out", ckpt=ws.ae),
        names=(str(ws.ae), "an autoencoder checkpoint", "not a VLMDiff checkpoint"),
    )


@case("test: a truncated --resume_path")
def _(ws: Workspace, tmp: Path) -> Run:
    bad = truncated(ws.vlmdiff, tmp / "half.ckpt")
    return Run("test", scoring_args(ws, tmp / "out", ckpt=bad), names=(str(bad),))


@case("test: a COCO-AD meta file that lists missing masks")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_coco_ad(tmp / "coco", n_train=1, n_test_normal=1, n_test_anomaly=1)
    shutil.rmtree(root / "val2017_mask_ad_20_0")
    argv = scoring_args(ws, tmp / "out", data=root)
    argv[argv.index("--data_set") + 1] = "coco"
    return Run("test", argv + ["--coco_part", "0"], names=(str(root / "meta_20_0.json"), "masks"))


@case("test: a VisA split csv without its mask column")
def _(ws: Workspace, tmp: Path) -> Run:
    root = datagen.make_visa(tmp / "visa", classes=("candle",), n_train=1, n_test_good=1, n_test_anomaly=1)
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.write_text("\n".join(",".join(r.split(",")[:4]) for r in csv_path.read_text().splitlines()) + "\n")
    argv = scoring_args(ws, tmp / "out", data=root)
    argv[argv.index("--data_set") + 1] = "visa"
    return Run("test", argv, names=(str(csv_path), "mask"))


@case("test: disk full while writing metrics.json (the previous metrics stay, no temp file)")
def _(ws: Workspace, tmp: Path) -> Run:
    import test as script
    from vlmdiff.data import index_dataset
    from vlmdiff.evaluation.map_store import MapStore

    out = tmp / "out"
    records = sorted(index_dataset("mvtec", ws.mvtec, "test"), key=lambda r: r.id)
    masks = np.stack([np.full((64, 64), 255 * r.label, dtype=np.uint8) for r in records])
    maps = np.random.default_rng(0).random((len(records), 64, 64)).astype(np.float32) + masks / 255.0
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    MapStore(out / "maps").write(
        "00000000",
        [r.id for r in records],
        [r.class_name for r in records],
        maps,
        masks,
        [r.label for r in records],
        maps.max(axis=(1, 2)),
    )
    argv = ["--data_set", "mvtec", "--data_path", str(ws.mvtec), "--output_dir", str(out), "--run_eval_only"]
    script.main(argv)  # a complete earlier evaluation
    assert (out / "metrics.json").is_file()
    return Run("test", argv, names=(str(out / "metrics.json"), "disk"), protect=(out,), disk_full=True)


@case("build_model: a VLMDiff checkpoint as --sd_path (its SG network would be overwritten)")
def _(ws: Workspace, tmp: Path) -> Run:
    out = tmp / "out.ckpt"
    return Run(
        "build_model",
        build(ws, tmp, sd=ws.vlmdiff, output=out),
        names=("--sd_path", str(ws.vlmdiff), "VLMDiff"),
        check=lambda: None if not out.exists() else pytest.fail(f"{out} was written"),
    )


@case("train: a Stable Diffusion checkpoint as --resume_path")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train", train(ws, tmp, "--resume_path", str(ws.sd)), names=(str(ws.sd), "Stable Diffusion", "build_model")
    )


@case("test: a missing --feature_weights is reported before the checkpoint is read")
def _(ws: Workspace, tmp: Path) -> Run:
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"\0" * 4096)
    missing = tmp / "dino_deitsmall8_pretrain.pth"
    argv = scoring_args(ws, tmp / "out", "--feature_weights", str(missing), ckpt=garbage)
    return Run("test", argv, names=(str(missing), "--feature_weights"))


@case("train: a missing --data_path is reported before the checkpoint is read")
def _(ws: Workspace, tmp: Path) -> Run:
    garbage = tmp / "garbage.ckpt"
    garbage.write_bytes(b"\0" * 4096)
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(garbage), data=tmp / "mvtec"),
        names=("--data_path", str(tmp / "mvtec")),
    )


# Reliability of runs and inputs: write paths, flags checked at start, locks, stale ground truth, file names.


@case("test: a read-only --output_dir (a read-only mount)")
def _(ws: Workspace, tmp: Path) -> Run:
    stack = contextlib.ExitStack()
    ro = stack.enter_context(mounts.tmpfs(tmp / "ro", readonly=True))
    return Run("test", scoring_args(ws, ro / "out"), names=(str(ro / "out"), "Read-only"), cleanup=stack.close)


@case("build_model: an --output whose parent folder is a file")
def _(ws: Workspace, tmp: Path) -> Run:
    (tmp / "models").write_text("not a folder")
    return Run(
        "build_model",
        build(ws, tmp, output=tmp / "models" / "vlmdiff.ckpt"),
        names=(str(tmp / "models"), "is a file"),
        protect=(tmp / "models",),
    )


@case("test: a read-only tokenizer cache (XDG_CACHE_HOME on a read-only mount)")
def _(ws: Workspace, tmp: Path) -> Run:
    stack = contextlib.ExitStack()
    cache = stack.enter_context(mounts.tmpfs(tmp / "cache", readonly=True))
    return Run(
        "test",
        scoring_args(ws, tmp / "out"),
        names=(str(cache), "XDG_CACHE_HOME"),
        env={"XDG_CACHE_HOME": str(cache)},
        cleanup=stack.close,
    )


@case("train: a really full disk (1 MiB tmpfs) while saving a checkpoint (torch's RuntimeError; no partial file)")
def _(ws: Workspace, tmp: Path) -> Run:
    stack = contextlib.ExitStack()
    small = stack.enter_context(mounts.tmpfs(tmp / "small", size="1m"))
    ckpt_dir = small / "ckpt_full"

    def check_nothing_half_written() -> None:
        assert not list(ckpt_dir.glob("*.ckpt")) and not list(ckpt_dir.glob(".*.tmp")), sorted(ckpt_dir.iterdir())

    argv = [
        "--data_set",
        "mvtec",
        "--data_path",
        str(ws.mvtec),
        "--output_root",
        str(small),
        *TRAIN_FAST,
        "--resume_path",
        str(ws.vlmdiff),
        "--exp_name",
        "full",
        "--save_every_n_steps",
        "1",
    ]
    return Run(
        "train",
        argv,
        names=(str(ckpt_dir / "step=0000001.ckpt"), "disk space"),
        check=check_nothing_half_written,
        cleanup=stack.close,
    )


@case("train: --batch_size 0")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train", train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--batch_size", "0"), names=("--batch_size 0",)
    )


@case("train: --accumulate_grad_batches 0")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--accumulate_grad_batches", "0"),
        names=("--accumulate_grad_batches 0",),
    )


@case("train: --devices 0")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("train", train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--devices", "0"), names=("--devices 0",))


@case("train: --devices 0,0 (a device twice)")
def _(ws: Workspace, tmp: Path) -> Run:
    argv = train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--devices", "0,0")
    argv[argv.index("--accelerator") + 1] = "auto"
    return Run("train", argv, names=("--devices 0,0",))


@case("train: --lr 0")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("train", train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--lr", "0"), names=("--lr 0",))


@case("train: --max_epochs 0 with --max_steps 5")
def _(ws: Workspace, tmp: Path) -> Run:
    argv = train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--max_epochs", "0")
    argv[argv.index("--max_steps") + 1] = "5"
    return Run("train", argv, names=("--max_epochs 0", "--max_steps 5", "--max_epochs -1"))


@case("train: a config override image_size=100 that the model's downsampling (64) does not divide")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "image_size=100"),
        names=(str(ws.vlmdiff), "image_size=100", "multiple of 64"),
    )


@case("test: --sigma -1")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("test", scoring_args(ws, tmp / "out", "--sigma", "-1"), names=("--sigma -1",))


@case("test: --mask_threshold 1.5 (refused at start, not after scoring)")
def _(ws: Workspace, tmp: Path) -> Run:
    out = tmp / "out"

    def check_nothing_scored() -> None:
        assert not out.exists(), sorted(out.rglob("*"))

    return Run(
        "test",
        scoring_args(ws, out, "--mask_threshold", "1.5"),
        names=("--mask_threshold 1.5",),
        check=check_nothing_scored,
    )


@case("test: --device gpu (not a device name)")
def _(ws: Workspace, tmp: Path) -> Run:
    argv = scoring_args(ws, tmp / "out")
    argv[argv.index("--device") + 1] = "gpu"
    return Run("test", argv, names=("--device 'gpu'", "cuda:N"))


@case("test: --batch_size 0")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("test", scoring_args(ws, tmp / "out", "--batch_size", "0"), names=("--batch_size 0",))


@case("test: a config override image_size=96 that the model's downsampling (64) does not divide")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run("test", scoring_args(ws, tmp / "out", "image_size=96"), names=(str(ws.vlmdiff), "image_size=96", "64"))


def _live_lock(folder: Path) -> tuple[subprocess.Popen, Path]:
    """A lock in ``folder`` naming a live process of this host (a sleeping child) as its job."""
    from utils.lock import _start_ticks

    holder = subprocess.Popen(["sleep", "300"])
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f".lock.{socket.gethostname()}.{holder.pid}.json"
    lock.write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "pid": holder.pid,
                "start_ticks": _start_ticks(holder.pid),
                "job": "test.py scoring",
                "span": [0, None],
                "command": "test.py --output_dir x",
                "started": "2026-01-01 00:00:00",
            }
        )
    )
    return holder, lock


def _stop(holder: subprocess.Popen) -> Callable[[], None]:
    def stop() -> None:
        holder.kill()
        holder.wait()

    return stop


@case("test: an --output_dir that a live job on this host holds (its lock names the job)")
def _(ws: Workspace, tmp: Path) -> Run:
    out = tmp / "out"
    holder, _ = _live_lock(out)
    return Run(
        "test",
        scoring_args(ws, out),
        names=(str(out), f"pid {holder.pid}", socket.gethostname(), "in use"),
        protect=(out,),
        cleanup=_stop(holder),
    )


@case("train: a checkpoint folder that a live job on this host holds")
def _(ws: Workspace, tmp: Path) -> Run:
    ckpt_dir = tmp / "ckpt_exp"
    holder, _ = _live_lock(ckpt_dir)
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--exp_name", "exp"),
        names=(str(ckpt_dir), f"pid {holder.pid}", "--exp_name"),
        protect=(ckpt_dir,),
        cleanup=_stop(holder),
    )


@case("test: --run_eval_only after the ground-truth masks changed (stored masks are stale)")
def _(ws: Workspace, tmp: Path) -> Run:
    from vlmdiff.data import index_dataset
    from vlmdiff.evaluation.map_store import MapStore
    from vlmdiff.evaluation.run_inputs import data_fingerprint, source_files

    root = ws.mvtec_copy(tmp / "mvtec")
    out = tmp / "out"
    records = sorted(index_dataset("mvtec", root, "test"), key=lambda r: r.id)
    masks = np.stack([np.full((32, 32), 255 * r.label, dtype=np.uint8) for r in records])
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"data": {"fingerprint": data_fingerprint(records)}}))
    sources = source_files(records)
    MapStore(out / "maps").write(
        "00000000",
        [r.id for r in records],
        [r.class_name for r in records],
        masks / 255.0,
        masks,
        [r.label for r in records],
        np.zeros(len(records)),
        [sources[r.id] for r in records],
    )
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    mask.write_bytes(png_bytes(np.zeros((32, 32), dtype=np.uint8)))  # relabelled
    return Run(
        "test",
        ["--data_set", "mvtec", "--data_path", str(root), "--output_dir", str(out), "--run_eval_only"],
        names=(str(out / "maps"), "bottle/test/crack/000.png", str(mask), "another content"),
        protect=(out,),
    )


@case("test: --data_set folder with a file name that is not UTF-8")
def _(ws: Workspace, tmp: Path) -> Run:
    folder = tmp / "images"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8)))
    (Path(os.fsdecode(bytes(folder) + b"/d\xe9faut.png"))).write_bytes(png_bytes(np.zeros((32, 32, 3), dtype=np.uint8)))
    argv = scoring_args(ws, tmp / "out", data=folder)
    argv[argv.index("--data_set") + 1] = "folder"
    return Run("test", argv, names=(str(folder), "d\\xe9faut.png", "not valid UTF-8"))


@case("train: --accelerator gpus (not an accelerator name)")
def _(ws: Workspace, tmp: Path) -> Run:
    argv = train(ws, tmp, "--resume_path", str(ws.vlmdiff))
    argv[argv.index("--accelerator") + 1] = "gpus"
    return Run("train", argv, names=("--accelerator 'gpus'", "cpu"))


@case("finetune_autoencoder: --devices 0")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "finetune_autoencoder",
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(ws.mvtec),
            "--output_dir",
            str(tmp / "run"),
            *AE_FAST,
            "--devices",
            "0",
        ],
        names=("--devices 0",),
    )


@case("build_model: a config override image_size=100 that the model's downsampling (64) does not divide")
def _(ws: Workspace, tmp: Path) -> Run:
    out = tmp / "models" / "vlmdiff.ckpt"
    return Run(
        "build_model",
        build(ws, tmp, "image_size=100", output=out),
        names=("--config tiny", "image_size=100", "multiple of 64"),
    )


@case("train: an architecture override (unet.model_channels=64) on a checkpoint built with 32")
def _(ws: Workspace, tmp: Path) -> Run:
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "unet.model_channels=64"),
        names=("unet.model_channels=64", str(ws.vlmdiff), "drop the override"),
    )


@case("test: an architecture override (unet.model_channels=64) on a checkpoint built with 32")
def _(ws: Workspace, tmp: Path) -> Run:
    argv = ["--data_set", "mvtec", "--data_path", str(ws.mvtec), "--output_dir", str(tmp / "out"), *TEST_FAST]
    return Run(
        "test",
        [*argv, "--resume_path", str(ws.vlmdiff), "unet.model_channels=64"],
        names=("unet.model_channels=64", str(ws.vlmdiff), "drop the override"),
    )


@case("train: template captions (captioner --vlm_model template) read without --vlm_model template")
def _(ws: Workspace, tmp: Path) -> Run:
    import captioner as captioner_script

    folder = tmp / "captions"
    captioner_script.main(captioner(ws.mvtec, "--split", "train", "--output", str(folder), "--no_progress_bar"))
    assert (folder / "train_captions_mvtec_template.json").is_file() and (folder / "progress").is_dir()
    return Run(
        "train",
        train(ws, tmp, "--resume_path", str(ws.vlmdiff), "--use_captions", "--caption_folder", str(folder)),
        names=("train_captions_mvtec_internvl*.json", "train_captions_mvtec_template.json", "--vlm_model template"),
    )


@case("finetune_autoencoder: upstream's spelling ./models/autoencoders.ckpt of a missing kl-f8 checkpoint")
def _(ws: Workspace, tmp: Path) -> Run:
    argv = ["--data_set", "mvtec", "--data_path", str(ws.mvtec), "--output_dir", str(tmp / "run"), *AE_FAST]
    return Run(
        "finetune_autoencoder",
        [*argv, "--resume_path", "./models/autoencoders.ckpt"],
        names=("models/autoencoders.ckpt", "https://ommer-lab.com/files/latent-diffusion/kl-f8.zip"),
    )


# ------------------------------------------------------------------------------------------------ runner


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("bad_input_shared"))


@pytest.fixture(scope="module")
def table() -> dict[str, str]:
    return {}


def _invoke(script: str, argv: list[str]) -> int:
    module = importlib.import_module(script)
    try:
        return run_main(module.main, argv)
    except SystemExit as e:  # argparse: usage + one error line, exit 2
        return int(e.code or 0)


def _fail_with_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("make", [fn for _, fn in CASES], ids=[d for d, _ in CASES])
def test_bad_input(make, ws: Workspace, tmp_path: Path, capsys, monkeypatch, table, request) -> None:
    run = make(ws, tmp_path)
    if run.cleanup is not None:
        request.addfinalizer(run.cleanup)
    before = snapshot(run.protect) if run.protect else {}
    capsys.readouterr()
    with monkeypatch.context() as m:
        for key, value in run.env.items():
            m.setenv(key, value)
        if run.disk_full:
            import utils.io

            m.setattr(utils.io.os, "fsync", _fail_with_enospc)
        code = _invoke(run.script, run.argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ERROR_LINE.match(line)]
    table[request.node.callspec.id] = f"exit {code}: " + (errors[0] if errors else "(no error line)")
    assert "Traceback" not in err, err[-3000:]
    if run.names:
        assert code == 2, f"expected exit 2, got {code}; stderr:\n{err[-3000:]}"
        assert len(errors) == 1, f"expected one error line, got {errors}"
        for name in run.names:
            assert name in errors[0], f"{name!r} not named in: {errors[0]}"
    else:
        assert code == 0 and not errors, err[-3000:]
    if run.check is not None:
        run.check()
    if run.protect:
        assert snapshot(run.protect) == before, "a file written before the run was changed"
    leftovers = sorted(p for p in tmp_path.rglob("*.tmp"))
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_print_case_table(table, capsys) -> None:
    """List every case with the line it produced (a case not run in this session says so)."""
    assert len(CASES) >= 20
    width = max(len(d) for d, _ in CASES)
    lines = [f"\nbad-input cases ({len(CASES)}; {len(table)} run in this session):"]
    for description, _ in CASES:
        lines.append(f"  {description:<{width}}  | {table.get(description, 'not run')}")
    with capsys.disabled():
        print("\n".join(lines))
