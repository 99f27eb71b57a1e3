"""A run folder is tied to the inputs named on the command line: the checkpoint's weights, the test captions and
each test image's bytes. A folder made from other inputs is refused by name, never resumed or evaluated."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_script
from ldm.checkpoint import DIGEST_KEY, load_checkpoint, stored_digest, weights_digest
from tests import datagen
from tests.tinyckpt import demo_data_and_model
from utils.errors import UserError
from vlmdiff.data import index_dataset
from vlmdiff.evaluation.map_store import MapStore

FAST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "2",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--batch_size",
    "4",
    "--num_workers",
    "0",
    "--no_report",
]


def _bmp(picture: np.ndarray) -> bytes:
    """An uncompressed picture: its file size depends on its width and height only."""
    import io

    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="BMP")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """8 test images (2 classes x (2 good + 2 defect)), the first one stored uncompressed, and a tiny model."""
    tmp, data, ckpt = demo_data_and_model(
        tmp_path_factory.mktemp("identity"), n_train=1, n_test_good=2, n_test_defect=2
    )
    records = sorted(index_dataset("mvtec", data, "test"), key=lambda r: r.id)
    assert len(records) == 8
    first = Path(records[0].image_path)
    first.write_bytes(_bmp(np.asarray(Image.open(first).convert("RGB"))))  # BMP bytes, read by content
    return tmp, data, ckpt, records


def _args(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--data_set", "mvtec", "--data_path", str(data), "--resume_path", str(ckpt), "--output_dir", str(out)] + [
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def clean(setup):
    """A complete run folder (8 maps) made from the intact inputs."""
    tmp, data, ckpt, _ = setup
    out = tmp / "clean"
    test_script.main(_args(data, ckpt, out))
    assert len(MapStore(out / "maps").scored_ids()) == 8
    return out


@pytest.fixture()
def copies(setup, clean, tmp_path):
    """Copies of the data, the checkpoint and the clean run folder, to change one of them."""
    _, data, ckpt, _ = setup
    data_copy = Path(shutil.copytree(data, tmp_path / "data"))
    ckpt_copy = Path(shutil.copy(ckpt, tmp_path / "vlmdiff.ckpt"))
    out = Path(shutil.copytree(clean, tmp_path / "out"))
    return data_copy, ckpt_copy, out


def _head_tail(path: Path) -> tuple[int, str]:
    """The identity the manifest used to record: file size and a sha256 of the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return size, h.hexdigest()


def _sg_network_changed(ckpt: Path) -> int:
    """Change SG-network tensors in the middle of the file in place, byte by byte (same size, same header).

    The n-th tensor of the state dict is the zip entry ``archive/data/n``: those more than 1 MiB from either
    end of the file get other values; the stored digest and the zip's checksums stay as they were, as they
    would after a hand edit. Returns the number of tensors changed."""
    import struct
    import zipfile

    entries = {Path(i.filename).name: i.header_offset for i in zipfile.ZipFile(ckpt).infolist()}
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    size, changed = ckpt.stat().st_size, 0
    with open(ckpt, "r+b") as f:
        for n, (k, v) in enumerate(sd.items()):
            if not (k.startswith("control_model.") and v.dtype == torch.float32 and v.numel() > 1):
                continue
            f.seek(entries[str(n)] + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            start = entries[str(n)] + 30 + name_len + extra_len
            if 1 << 20 < start and start + 4 * v.numel() < size - (1 << 20):
                f.seek(start)
                f.write((v.contiguous() + 0.01).numpy().tobytes())
                changed += 1
    return changed


def test_a_checkpoint_changed_in_the_middle_is_refused_by_name(copies, capsys):
    data, ckpt, out = copies
    before, weights = _head_tail(ckpt), weights_digest(load_checkpoint(ckpt)["state_dict"])
    assert _sg_network_changed(ckpt) > 10
    assert weights_digest(load_checkpoint(ckpt)["state_dict"]) != weights
    assert _head_tail(ckpt) == before  # size, first and last MiB: what used to identify it, unchanged
    with pytest.raises(UserError) as e:
        test_script.main(_args(data, ckpt, out))
    message = str(e.value)
    assert f"{out} holds maps of another run, made from other weights than those of {ckpt}" in message
    assert "\n" not in message and "another --output_dir" in message
    assert f"{ckpt}: its weights are not the ones it was written with" in capsys.readouterr().err


def test_a_re_export_at_another_epoch_is_refused_and_the_same_weights_resume(copies, tmp_path):
    """An export of other weights under the old file's name: the digest it stores tells them apart."""
    from ldm.checkpoint import save_checkpoint

    data, ckpt, out = copies
    obj = load_checkpoint(ckpt)
    same = tmp_path / "same.safetensors"
    save_checkpoint(same, obj["state_dict"], config=obj["config"])
    assert stored_digest(same) == weights_digest(obj["state_dict"])  # same weights: same identity in any format
    test_script.main(_args(data, same, out, "--run_eval_only"))  # evaluating the stored maps needs no checkpoint
    later = {
        k: (v + 0.01 if k.startswith("control_model.") and v.is_floating_point() else v)
        for k, v in obj["state_dict"].items()
    }
    save_checkpoint(ckpt, later, config=obj["config"])
    assert stored_digest(ckpt) == weights_digest(later) != weights_digest(obj["state_dict"])
    with pytest.raises(UserError, match=f"made from other weights than those of {ckpt}"):
        test_script.main(_args(data, ckpt, out))


def test_an_uncompressed_image_replaced_by_another_picture_of_the_same_size_is_refused(copies, setup):
    data, ckpt, out = copies
    record = setup[3][0]
    image = data / record.id
    old = image.read_bytes()
    other = _bmp(255 - np.asarray(Image.open(image).convert("RGB")))
    assert len(other) == len(old) and other != old
    image.write_bytes(other)
    for argv in (_args(data, ckpt, out), _args(data, ckpt, out, "--run_eval_only")):  # resuming; evaluating
        with pytest.raises(UserError, match=f"test image {record.id} changed since its map") as e:
            test_script.main(argv)
        assert f"its image file {image} is another picture now (same size" in str(e.value)


def test_other_test_captions_are_refused_by_name(setup, tmp_path):
    _, data, ckpt, records = setup
    ids = [r.id for r in records]
    datagen.write_upstream_captions(tmp_path / "caps_a", "test", "mvtec", "template", ids, ["a"] * 8)
    datagen.write_upstream_captions(tmp_path / "caps_b", "test", "mvtec", "template", ids, ["a"] * 7 + ["b"])
    out = tmp_path / "out"

    def argv(folder: str) -> list[str]:
        captions = ["--use_captions", "--caption_folder", str(tmp_path / folder), "--vlm_model", "template"]
        return _args(data, ckpt, out, "--end_ind", "2", *captions)

    test_script.main(argv("caps_a"))  # a shard of two images: maps to resume
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["captions"]["n"] == 8 and manifest["data"]["captions"]["path"].startswith(
        str(tmp_path / "caps_a" / "test_captions_mvtec_template")
    )
    test_script.main(argv("caps_a"))  # the same captions resume
    with pytest.raises(UserError) as e:
        test_script.main(argv("caps_b"))
    first_file = tmp_path / "caps_a" / "test_captions_mvtec_template"
    assert f"{out} holds maps of another run, made with other test captions ({first_file}" in str(e.value)
    assert str(tmp_path / "caps_b") in str(e.value)
    with pytest.raises(UserError, match="other test captions .*none \\(empty captions\\) now"):
        test_script.main(_args(data, ckpt, out, "--end_ind", "2"))  # no captions at all


def test_threshold_from_a_run_of_other_weights_is_refused_naming_the_checkpoint(clean, tmp_path):
    from vlmdiff.evaluation.thresholds import load_thresholds

    manifest = json.loads((clean / "manifest.json").read_text())
    assert load_thresholds(clean, "paper", manifest)["image"]["overall"] is not None
    other = {**manifest, "checkpoint": {"path": str(tmp_path / "last.ckpt"), DIGEST_KEY: "0" * 64}}
    with pytest.raises(UserError, match=f"made with other weights than {tmp_path / 'last.ckpt'}"):
        load_thresholds(clean, "paper", other)
    older = json.loads((clean / "thresholds.json").read_text())
    older["scores_depend_on"]["checkpoint"] = {"size": 1, "sha256_head_tail": "0" * 16}
    (tmp_path / "thresholds.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match="older version of test.py"):
        load_thresholds(tmp_path, "paper", manifest)


def test_an_export_stores_the_digest_of_the_weights_it_was_made_from(setup, tmp_path):
    from vlmdiff.export import main as export_main

    _, _, ckpt, _ = setup
    out = export_main([str(ckpt), str(tmp_path / "w.safetensors")])
    assert stored_digest(out) == stored_digest(ckpt) == weights_digest(load_checkpoint(ckpt)["state_dict"])


@pytest.mark.parametrize(
    "flags,named",
    [
        (
            ["--mask_order", "binarize_first"],
            "--mask_order binarize_first: the maps in {out} were made with --mask_order resize_first",
        ),
        (["--sigma", "4"], "--sigma 4.0: the maps in {out} were made with --sigma 5.0"),
        (["--map_dtype", "float16"], "--map_dtype float16: the maps in {out} were made with --map_dtype float32"),
        (["--ddim_steps", "3"], "--ddim_steps 3: the maps in {out} were made with --ddim_steps 2"),
        (
            ["--use_dino"],
            "--feature_extractor dino_v1s8: the maps in {out} were made with --feature_extractor efficientnet_lite0",
        ),
        (
            ["--classes", "brick"],
            "--classes brick: the maps in {out} are of all classes and --run_eval_only evaluates them all",
        ),
    ],
)
def test_eval_only_refuses_a_setting_baked_into_the_stored_maps(copies, flags, named):
    data, ckpt, out = copies
    argv = _args(data, ckpt, out, "--run_eval_only")
    if "--ddim_steps" in flags:
        argv = [a for i, a in enumerate(argv) if "--ddim_steps" not in argv[i - 1 : i + 1]]
    if "--use_dino" in flags:
        argv = [a for i, a in enumerate(argv) if "--feature_extractor" not in argv[i - 1 : i + 1]]
    metrics_before = (out / "metrics.json").read_bytes()
    with pytest.raises(UserError) as e:
        test_script.main(argv + flags)
    assert named.format(out=out) in str(e.value) and "another --output_dir" in str(e.value)
    assert (out / "metrics.json").read_bytes() == metrics_before


def test_eval_only_applies_and_records_evaluation_settings_and_checks_a_named_checkpoint(copies, tmp_path):
    from ldm.checkpoint import save_checkpoint

    data, ckpt, out = copies
    flags = ["--image_pooling", "max", "--mask_threshold", "0.5", "--metrics_protocol", "legacy"]
    test_script.main(_args(data, ckpt, out, "--run_eval_only", *flags))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"] == {"protocol": "legacy", "image_pooling": "max", "mask_threshold": 0.5}
    assert metrics["maps"]["mask_order"] == "resize_first" and metrics["maps"]["sigma"] == 5.0
    assert metrics["maps"]["feature_extractor"] == "efficientnet_lite0" and metrics["maps"]["ddim_steps"] == 2
    obj = load_checkpoint(ckpt)
    other = tmp_path / "other.safetensors"
    save_checkpoint(
        other, {k: v + 1 if v.is_floating_point() else v for k, v in obj["state_dict"].items()}, obj["config"]
    )
    with pytest.raises(UserError, match=f"--resume_path {other}: the maps in {out} were made from other weights"):
        test_script.main(_args(data, other, out, "--run_eval_only"))
