"""The README's stages on tiny trees of VisA, Real-IAD and COCO-AD: captions -> train -> test.

MVTec-AD runs through the same scripts in the other tests and in `make demo`. COCO-AD exercises the
caption-guided test path (two guidance passes: the test images' own captions vs the empty caption).
"""

from __future__ import annotations

import json

import pytest

import captioner
import test as test_script
import train
from tests import datagen
from tests.tinyckpt import build_tiny_vlmdiff

FAST_TRAIN = [
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
    "--save_every_n_steps",
    "1",
]
FAST_TEST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "2",
    "--num_workers",
    "0",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--batch_size",
    "4",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_vlmdiff(tmp_path_factory.mktemp("pipe"))


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["visa", "real_iad", "coco"])
def test_stages_on_each_dataset_layout(dataset, ckpt, tmp_path):
    if dataset == "visa":
        root = datagen.make_visa(tmp_path / "visa")
        data = ["--data_set", "visa", "--data_path", str(root)]
    elif dataset == "real_iad":
        root = datagen.make_realiad(tmp_path, classes=("toy",))
        data = ["--data_set", "real_iad", "--data_path", str(root)]
    else:
        root = datagen.make_coco_ad(tmp_path / "coco", part=1)
        data = ["--data_set", "coco", "--data_path", str(root), "--coco_part", "1"]
    captioner.main([*data, "--vlm_model", "template"])
    if dataset == "coco":
        caption_flags = ["--use_captions", "--vlm_model", "template", "--caption_model", "_template"]
    else:
        name = "realiad" if dataset == "real_iad" else dataset
        caption_flags = [
            "--use_captions",
            "--vlm_model",
            "template",
            "--caption_folder",
            str(root.resolve().parent / f"{name}_captions_template_pd"),
        ]
    ckpt_dir = train.main(
        [*data, *caption_flags, "--resume_path", str(ckpt), "--output_root", str(tmp_path), *FAST_TRAIN]
    )
    test_flags = caption_flags if dataset == "coco" else []  # the paper's recipe: "" for the other test sets
    result = test_script.main(
        [
            *data,
            *test_flags,
            "--resume_path",
            str(ckpt_dir / "last.ckpt"),
            "--output_dir",
            str(tmp_path / "results"),
            *FAST_TEST,
        ]
    )
    mean = result["official"]["mean"]
    assert set(mean) == {"auroc_image", "ap_image", "f1max_image", "auroc_pixel", "ap_pixel", "f1max_pixel", "aupro"}
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    assert manifest["data"]["test_captions"] is (dataset == "coco")
