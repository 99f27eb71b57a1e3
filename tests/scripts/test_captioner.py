"""captioner.py end to end: template backend, a tiny random HF VLM (no download), shards, resume, kill."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner import main
from tests import datagen
from tests.tiny_vlms import tiny_llava
from utils.errors import UserError
from vlmdiff.captioning import PROMPTS, derive_vlm_name, prompt_for
from vlmdiff.data import build_dataset, index_dataset, load_captions

ROOT = Path(__file__).resolve().parents[2]


def _progress_lines(folder: Path) -> list[dict]:
    out = []
    for p in sorted((folder / "progress").glob("*.jsonl")):
        out += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return out


def test_prompts_are_upstreams() -> None:
    assert PROMPTS["pd"] == (
        "Describe the visual features of image in detail with a focus on the main object, with "
        "around 60 words and maybe 4 or 5 sentences."
    )
    assert PROMPTS["pa"] == (
        "Be a pixel level visual defect inspector, and describe whether there is a defect or not "
        "on the main object itself, with around 60 words and maybe 4 or 5 sentences."
    )
    assert prompt_for("coco", "pa") == (
        "Describe the visual features of image in detail, with around 60 words and maybe 4 or 5 sentences."
    )
    assert derive_vlm_name("OpenGVLab/InternVL2-8B", "hf") == "internvl"
    assert derive_vlm_name("Salesforce/blip2-flan-t5-xxl", "hf") == "blip"
    assert derive_vlm_name("/models/llava-1.5-7b-hf/", "hf") == "llava157bhf"
    assert derive_vlm_name("OpenGVLab/InternVL3-8B-hf", "hf") == "internvl38bhf"  # not upstream's InternVL2-8B
    assert [derive_vlm_name(m, "hf") for m in ("deepseek", "llava", "models/blip2-flan-t5-xxl")] == [
        "deepseekvl",
        "llava",
        "blip",
    ]


def test_template_backend_shards_merge_and_read_back(tmp_path: Path) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("bottle", "grid"))
    base = ["--data_set", "mvtec", "--data_path", str(root), "--vlm_model", "template"]
    main(base + ["--start_ind", "0", "--end_ind", "5"])
    out = tmp_path / "mvtec_captions_template_pd"
    assert not (out / "train_captions_mvtec_template.json").exists()  # train incomplete: nothing merged yet
    with pytest.raises(UserError, match="have no caption yet"):
        main(base + ["--merge"])
    with pytest.raises(UserError, match="--start_ind 7 is greater than --end_ind 3"):
        main(base + ["--start_ind", "7", "--end_ind", "3"])
    main(base + ["--start_ind", "5"])
    lines = _progress_lines(out)
    assert len(lines) == 14 and len({(r["split"], r["id"]) for r in lines}) == 14
    assert set(lines[0]) == {"id", "caption", "split", "dataset", "vlm", "prompt_type"}
    labels = json.loads((out / "test_labels_mvtec_template.json").read_text())
    assert labels == sorted(r.id for r in index_dataset("mvtec", root, "test"))
    ds = build_dataset("mvtec", root, "train", captions=out, require_captions=True, image_size=16)
    cap = ds[0]["caption"]
    assert "bottle" in cap and 30 <= len(cap.split()) <= 70
    main(base + ["--prompt_type", "pa", "--split", "test"])
    pa = load_captions(tmp_path / "mvtec_captions_template_pa", "test", "mvtec")
    assert "defect" in pa["grid/test/hole/000.png"]
    with pytest.raises(UserError, match="holds captions of another run"):
        main(base + ["--output", str(out), "--prompt_type", "pa"])


def test_output_that_is_not_a_terminal_gets_progress_lines_and_a_summary(tmp_path: Path, capsys) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    out = tmp_path / "caps"
    main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(root),
            "--vlm_model",
            "template",
            "--output",
            str(out),
            "--log_interval",
            "0",
        ]
    )
    err = capsys.readouterr().err  # pytest captures stderr: not a terminal
    n = len(_progress_lines(out))
    counts = re.findall(rf"captioning: img (\d+)/{n} \(\d+%\) \| [\d.]+ (?:img/s|s/img) \| elapsed [\d:]+ \| ETA", err)
    assert counts == [str(i) for i in range(1, n + 1)]
    assert f"wrote {out / 'test_captions_mvtec_template.json'} and {out / 'test_labels_mvtec_template.json'}" in err
    assert f"done: {n} images captioned by this process (progress files in {out / 'progress'})" in err
    assert "caption files of train and test written" in err


def test_realiad_absolute_ids_and_coco_caption_format(tmp_path: Path) -> None:
    root = datagen.make_realiad(tmp_path / "riad", classes=("toy",), views=2)
    main(["--data_set", "real_iad", "--data_path", str(root), "--vlm_model", "template", "--split", "test"])
    out = tmp_path / "riad" / "realiad_captions_template_pd"
    labels = json.loads((out / "test_labels_realiad_template.json").read_text())
    assert all(os.path.isabs(i) and Path(i).is_file() for i in labels)
    assert len(build_dataset("realiad", root, "test", captions=out, require_captions=True))

    coco = datagen.make_coco_ad(tmp_path / "coco", part=1)
    main(["--data_set", "coco", "--data_path", str(coco), "--vlm_model", "template", "--coco_part", "1"])
    doc = json.loads((coco / "annotations" / "captions_val2017_template.json").read_text())
    assert len(doc["annotations"]) == 4 and doc["annotations"][0]["image_id"] == 100
    caps = load_captions(coco, "test", "coco", caption_model="_template")
    ds = build_dataset("coco", coco, "test", coco_part=1, captions=caps, require_captions=True, image_size=16)
    assert ds[0]["caption"].startswith("The image shows a scene")


def test_tiny_random_hf_vlm_end_to_end(tmp_path: Path) -> None:
    model = tiny_llava(tmp_path / "tiny-llava")
    root = datagen.make_visa(tmp_path / "visa", classes=("candle",), n_train=3, n_test_good=1, n_test_anomaly=2)
    main(
        [
            "--data_set",
            "visa",
            "--data_path",
            str(root),
            "--vlm_model",
            str(model),
            "--backend",
            "hf",
            "--batch_size",
            "2",
            "--max_new_tokens",
            "6",
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    out = tmp_path / "visa_captions_tinyllava_pd"
    for split, n in (("train", 3), ("test", 3)):
        caps = load_captions(out, split, "visa")
        assert len(caps) == n and all(isinstance(c, str) for c in caps.values())
        assert all(len(c.split()) <= 6 for c in caps.values())  # only the new tokens are decoded
        assert not any("USER" in c or "Describe" in c for c in caps.values())
        assert len(build_dataset("visa", root, split, captions=out, require_captions=True)) == n
    assert any(c for c in load_captions(out, "train", "visa").values())

    from vlmdiff.vlm_backends import HFBackend

    backend = HFBackend(str(model), PROMPTS["pd"], device="cpu", max_new_tokens=4)
    assert backend.text == f"USER: <image> {PROMPTS['pd']} ASSISTANT:"
    from vlmdiff.data import load_rgb

    img = load_rgb(root / "candle/Data/Images/Normal/0000.JPG")
    assert backend([img, img], ["candle"] * 2) == backend([img], ["candle"]) * 2  # greedy and batch-independent


def test_missing_model_is_one_clear_error(tmp_path: Path) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    with pytest.raises(UserError, match="no such model folder"):
        main(["--data_set", "mvtec", "--data_path", str(root), "--vlm_model", str(tmp_path / "no-such-model")])


@pytest.mark.slow
def test_killed_run_resumes_with_every_image_once(tmp_path: Path) -> None:
    root = datagen.make_mvtec(
        tmp_path / "mvtec",
        classes=("bottle", "grid"),
        n_train=4,
        n_test_good=2,
        defects=("crack", "hole"),
        n_per_defect=2,
    )  # 20 images
    args = [
        sys.executable,
        str(ROOT / "captioner.py"),
        "--data_set",
        "mvtec",
        "--data_path",
        str(root),
        "--vlm_model",
        "template",
        "--delay_per_image",
        "0.2",
    ]
    out = tmp_path / "mvtec_captions_template_pd"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(_progress_lines(out)) < 6:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n_before = len(_progress_lines(out))
    assert 6 <= n_before < 20, n_before
    shard = next((out / "progress").glob("*.jsonl"))
    with open(shard, "a") as f:
        f.write('{"id": "bottle/train/good/99')  # a write torn by the kill
    main(args[2:-2])
    lines = _progress_lines(out)
    keys = [(r["split"], r["id"]) for r in lines]
    assert len(keys) == 20 and len(set(keys)) == 20
    assert len(json.loads((out / "train_labels_mvtec_template.json").read_text())) == 8
    assert len(json.loads((out / "test_labels_mvtec_template.json").read_text())) == 12
