"""Caption files in upstream's and our formats, matched to images by id (never by position)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests import datagen
from utils.errors import UserError
from vlmdiff.data import build_dataset, index_dataset, load_captions, match_captions


def _cap(i: str) -> str:
    return f"caption of {i}"


def test_sharded_shuffled_upstream_pairs_match_by_id(tmp_path: Path) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("bottle", "grid"))
    ids = [r.id for r in index_dataset("mvtec", root, "train")]
    folder = tmp_path / "mvtec_captions_internvl_pd"
    datagen.write_upstream_captions(
        folder, "train", "mvtec", "internvl", ids, [_cap(i) for i in ids], shards=3, shuffle_seed=0
    )
    caps = load_captions(folder, "train", "mvtec")
    assert len(caps) == len(ids)
    ds = build_dataset("mvtec", root, "train", image_size=16, captions=folder, require_captions=True)
    for i in range(len(ds)):
        item = ds[i]
        assert item["caption"] == _cap(item["filename"])
    # the test split has no files in that folder
    with pytest.raises(UserError, match="no test captions for mvtec"):
        load_captions(folder, "test", "mvtec")
    # a folder for another dataset
    with pytest.raises(UserError, match="no train captions for visa"):
        load_captions(folder, "train", "visa")


def test_blank_captions_count_as_missing_and_empty_caption_files_as_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("grid",))
    ids = [r.id for r in index_dataset("mvtec", root, "train")]
    folder = tmp_path / "caps"
    datagen.write_upstream_captions(folder, "train", "mvtec", "internvl", ids, [" \n "] + [_cap(i) for i in ids[1:]])
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("mvtec", root, "train", captions=folder, image_size=16)
    assert f"1 of {len(ids)} train images have an empty caption in {folder}, e.g. {ids[0]}" in caplog.text
    assert ds[0]["caption"] == ""  # white space alone is the empty caption
    with pytest.raises(UserError, match=f"1 of {len(ids)} train images have an empty caption .*{ids[0]}"):
        build_dataset("mvtec", root, "train", captions=folder, require_captions=True)
    datagen.write_upstream_captions(folder, "train", "mvtec", "internvl", [], [])  # files that hold no caption
    assert load_captions(folder, "train", "mvtec") == {}
    with pytest.raises(
        UserError,
        match=f"{folder}: no train captions in it, but --use_captions needs one for each "
        f"of the {len(ids)} train images",
    ):
        build_dataset("mvtec", root, "train", captions=folder, require_captions=True)


def test_length_mismatch_names_both_files(tmp_path: Path) -> None:
    folder = tmp_path / "caps"
    datagen.write_upstream_captions(folder, "train", "mvtec", "blip", ["a.png", "b.png"], ["x", "y"])
    (folder / "train_labels_mvtec_blip.json").write_text(json.dumps(["a.png"]))
    with pytest.raises(UserError) as e:
        load_captions(folder, "train", "mvtec")
    msg = str(e.value)
    assert "train_captions_mvtec_blip.json has 2 captions" in msg and "train_labels_mvtec_blip.json has 1" in msg
    (folder / "train_labels_mvtec_blip.json").unlink()
    with pytest.raises(UserError, match="has no label file: expected .*train_labels_mvtec_blip.json"):
        load_captions(folder, "train", "mvtec")


def test_unknown_ids_and_other_dataset_are_caught(tmp_path: Path) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("bottle",))
    ids = [r.id for r in index_dataset("mvtec", root, "train")]
    folder = tmp_path / "caps"
    datagen.write_upstream_captions(
        folder, "train", "mvtec", "internvl", ids + ["bottle/train/good/999.png"], [_cap(i) for i in ids] + ["ghost"]
    )
    with pytest.raises(UserError) as e:
        build_dataset("mvtec", root, "train", captions=folder)
    assert "train_captions_mvtec_internvl.json" in str(e.value) and "bottle/train/good/999.png" in str(e.value)
    visa = datagen.make_visa(tmp_path / "visa", classes=("candle",))
    other = tmp_path / "caps2"
    datagen.write_upstream_captions(other, "train", "visa", "internvl", ids, [_cap(i) for i in ids])
    with pytest.raises(UserError, match="matches no image"):
        build_dataset("visa", visa, "train", captions=other)


def test_realiad_absolute_ids_from_another_machine(tmp_path: Path) -> None:
    root = datagen.make_realiad(tmp_path, classes=("toy",))
    recs = index_dataset("realiad", root, "test")
    upstream_ids = [f"/mnt/data/Real-IAD/realiad_1024/{r.id}" for r in recs]
    upstream_ids[0] = upstream_ids[0].replace("/", "\\")  # written on Windows
    folder = tmp_path / "realiad_captions_internvl_pd"
    datagen.write_upstream_captions(
        folder, "test", "realiad", "internvl", upstream_ids[::-1], [_cap(r.id) for r in recs][::-1]
    )
    matched = match_captions(recs, load_captions(folder, "test", "real_iad"), root=root)
    assert matched == {r.id: _cap(r.id) for r in recs}


def test_class_filter_and_missing_captions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = datagen.make_mvtec(tmp_path / "mvtec", classes=("bottle", "grid"))
    ids = [r.id for r in index_dataset("mvtec", root, "test")]
    folder = tmp_path / "caps"
    keep = [i for i in ids if not i.endswith("crack/000.png")]
    datagen.write_upstream_captions(folder, "test", "mvtec", "internvl", keep, [_cap(i) for i in keep])
    with caplog.at_level(logging.WARNING):
        ds = build_dataset("mvtec", root, "test", classes=["grid"], captions=folder, image_size=16)
    assert f"1 of 4 test images have no caption in {folder}, e.g. grid/test/crack/000.png" in caplog.text
    assert ds[0]["filename"] == "grid/test/crack/000.png" and ds[0]["caption"] == ""
    assert ds[1]["caption"] == _cap(ds[1]["filename"])
    with pytest.raises(
        UserError,
        match=r"1 of 4 test images have no caption .*\(caption them with captioner.py "
        r"--split test, or run without --use_captions\)",
    ):
        build_dataset("mvtec", root, "test", classes=["grid"], captions=folder, require_captions=True)
    # captions of the test split given for the train split: nothing matches
    (folder / "test_captions_mvtec_internvl.json").rename(folder / "train_captions_mvtec_internvl.json")
    (folder / "test_labels_mvtec_internvl.json").rename(folder / "train_labels_mvtec_internvl.json")
    with pytest.raises(UserError, match="none of the .* captions"):
        build_dataset("mvtec", root, "train", captions=folder)


def test_coco_caption_format_concatenates_in_order(tmp_path: Path) -> None:
    root = datagen.make_coco_ad(tmp_path / "coco", part=0)
    doc = {
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A cat. "},
            {"id": 2, "image_id": 2, "caption": "Two dogs."},
            {"id": 3, "image_id": 1, "caption": "It sleeps."},
        ]
    }
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2017_internvl.json").write_text(json.dumps(doc))
    caps = load_captions(root, "train", "coco")
    assert caps == {"train2017/000000000001.jpg": "A cat. It sleeps.", "train2017/000000000002.jpg": "Two dogs."}
    ds = build_dataset("coco", root, "train", coco_part=0, captions=caps, image_size=16)
    assert ds[0]["caption"] == "A cat. It sleeps."
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="several COCO caption files.*--caption_model"):
        load_captions(root, "train", "coco")
    assert len(load_captions(root, "train", "coco", caption_model="_internvl")) == 2
    with pytest.raises(UserError, match="captions_train2017_blip.json"):
        load_captions(root, "train", "coco", caption_model="blip")


def test_jsonl_records_partial_last_line_and_bad_line(tmp_path: Path) -> None:
    folder = tmp_path / "mvtec_captions_template_pd" / "progress"
    folder.mkdir(parents=True)
    recs = [
        {
            "id": f"bottle/train/good/{i:03d}.png",
            "caption": f"c{i}",
            "split": "train",
            "dataset": "mvtec",
            "vlm": "template",
            "prompt_type": "pd",
        }
        for i in range(3)
    ]
    text = "".join(json.dumps(r) + "\n" for r in recs)
    (folder / "train_0_3.jsonl").write_text(text + '{"id": "bottle/train/good/003.png", "cap')
    caps = load_captions(folder.parent, "train", "mvtec")
    assert caps == {r["id"]: r["caption"] for r in recs}
    assert caps.sources[recs[0]["id"]].endswith("train_0_3.jsonl")
    with pytest.raises(UserError, match=r"no test captions for mvtec in .*progress file\(s\) without them"):
        load_captions(folder.parent, "test", "mvtec")  # progress files of the train split only
    (folder / "train_0_3.jsonl").write_text("{broken\n" + text)
    with pytest.raises(UserError, match="train_0_3.jsonl line 1: not valid JSON"):
        load_captions(folder.parent, "train", "mvtec")
    (folder / "train_0_3.jsonl").write_text(text.replace('"mvtec"', '"visa"'))
    with pytest.raises(UserError, match="holds captions of dataset 'visa'"):
        load_captions(folder.parent, "train", "mvtec")


def test_failed_lookup_names_the_files_it_looked_for(tmp_path: Path) -> None:
    folder = tmp_path / "mvtec_captions_internvl_pd"
    folder.mkdir()
    with pytest.raises(UserError) as err:
        load_captions(folder, "test", "mvtec", vlm="internvl")
    for tried in (folder / "test_captions_mvtec_internvl*.json", folder / "*.jsonl", folder / "progress" / "*.jsonl"):
        assert str(tried) in str(err.value)
    with pytest.raises(UserError) as err:
        load_captions(tmp_path, "train", "coco", caption_model="_blip")
    for tried in (tmp_path / "annotations" / "captions_train2017_blip.json", tmp_path / "captions_train2017_blip.json"):
        assert str(tried) in str(err.value)
    with pytest.raises(UserError, match=f"caption file or folder {tmp_path / 'absent'} not found"):
        load_captions(tmp_path / "absent", "train", "mvtec")


def test_relative_caption_folder_is_found_beside_the_dataset_root(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from vlmdiff.cli import caption_source

    root = datagen.make_mvtec(tmp_path / "D" / "mvtec", classes=("bottle",))
    beside = tmp_path / "D" / "mvtec_captions_internvl_pd"
    beside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args = argparse.Namespace(
        data_set="mvtec",
        data_path=str(root),
        caption_folder="mvtec_captions_internvl_pd",
        vlm_model="internvl",
        prompt_type="pd",
    )
    assert caption_source(args) == beside.resolve()
    (work / "mvtec_captions_internvl_pd").mkdir()  # one in the working folder comes first
    assert caption_source(args) == Path("mvtec_captions_internvl_pd")
    args.caption_folder = "visa_captions_internvl_pd"
    with pytest.raises(UserError, match=r"visa_captions_internvl_pd.*working folder.*beside the dataset root"):
        caption_source(args)


def test_captions_of_another_model_name_the_file_looked_for_and_the_files_there(tmp_path: Path) -> None:
    """Template captions (with the captioner's progress/ folder) read as internvl's: the error says both."""
    folder = tmp_path / "mvtec_captions_template_pd"
    datagen.write_upstream_captions(folder, "train", "mvtec", "template", ["bottle/train/good/000.png"], ["a bottle"])
    (folder / "progress").mkdir()
    with pytest.raises(UserError) as err:
        load_captions(folder, "train", "mvtec", vlm="internvl")
    message = str(err.value)
    assert str(folder / "train_captions_mvtec_internvl*.json") in message
    assert "the folder holds train_captions_mvtec_template.json" in message and "--vlm_model template" in message
    assert load_captions(folder, "train", "mvtec", vlm="template") == {"bottle/train/good/000.png": "a bottle"}
