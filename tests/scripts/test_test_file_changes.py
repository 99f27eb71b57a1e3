"""test.py when test files break or change: a truncated image or mask stops the run with one line naming it,
the repaired run resumes to a clean run's maps, and files changed after their maps were stored are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import test as test_script
from tests.tinyckpt import demo_data_and_model
from utils.cli import run_main
from utils.errors import UserError
from vlmdiff.data import index_dataset
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.run_inputs import check_manifest

FAST = [
    "--feature_extractor",
    "efficientnet_lite0",
    "--ddim_steps",
    "3",
    "--no_progress_bar",
    "--device",
    "cpu",
    "--batch_size",
    "2",
    "--num_workers",
    "2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # 2 classes x (2 good + 3 defect) = 10 test images, 5 batches of 2
    return demo_data_and_model(tmp_path_factory.mktemp("changes"), n_train=1, n_test_good=2, n_test_defect=3)


def _args(data: Path, ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data_set",
        "mvtec",
        "--data_path",
        str(data),
        "--resume_path",
        str(ckpt),
        "--output_dir",
        str(out),
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def clean(setup):
    """A run on the intact data: its folder and metrics."""
    tmp, data, ckpt = setup
    out = tmp / "clean"
    return out, test_script.main(_args(data, ckpt, out))


def _records(data: Path):
    return sorted(index_dataset("mvtec", data, "test"), key=lambda r: r.id)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _same_maps(a: Path, b: Path) -> None:
    left, right = dict(MapStore(a / "maps").iter_classes()), dict(MapStore(b / "maps").iter_classes())
    assert left.keys() == right.keys()
    for cls in left:
        assert np.array_equal(left[cls]["ids"], right[cls]["ids"])
        for key in ("maps", "masks", "labels", "image_scores"):
            assert np.array_equal(left[cls][key], right[cls][key]), (cls, key)


def _metric_values(result: dict) -> np.ndarray:
    return np.array(
        [
            v
            for p in sorted(result)
            for row in [*result[p]["per_class"].values(), result[p]["mean"]]
            for v in row.values()
        ],
        dtype=float,
    )


@pytest.mark.parametrize("which", ["image", "mask"])
def test_truncated_file_in_a_middle_batch_stops_by_name_and_the_repaired_run_resumes(
    setup, clean, tmp_path, capsys, which
):
    _, data, ckpt = setup
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    fourth = _records(copy)[3]  # in the second batch (images 2 and 3) of five
    assert fourth.mask_path is not None
    broken = Path(fourth.image_path if which == "image" else fourth.mask_path)
    intact = broken.read_bytes()
    broken.write_bytes(intact[: len(intact) // 2])
    out = tmp_path / "out"
    capsys.readouterr()

    assert run_main(test_script.main, _args(copy, ckpt, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = _error_lines(err)
    assert len(errors) == 1 and str(broken) in errors[0], err[-3000:]
    assert err.strip().splitlines()[-1] == errors[0]
    kept = MapStore(out / "maps").scored_ids()
    assert {r.id for r in _records(copy)[:2]} <= kept and fourth.id not in kept  # the first batch's maps are kept
    assert (out / "maps" / "brick" / "00000000.npz").is_file()

    broken.write_bytes(intact)  # repaired: it never got a map, so the run resumes
    assert run_main(test_script.main, _args(copy, ckpt, out)) == 0
    err = capsys.readouterr().err  # the scripts log to stderr
    assert f"{len(kept)} of 10 images already have maps: resuming" in err and not _error_lines(err)
    _same_maps(out, clean[0])
    resumed = test_script.main(_args(copy, ckpt, out, "--run_eval_only"))
    np.testing.assert_allclose(_metric_values(resumed), _metric_values(clean[1]), atol=1e-6, equal_nan=True)


@pytest.fixture()
def scored_copy(setup, clean, tmp_path):
    """A copy of the data and a complete run folder made from it (the clean run's folder, copied)."""
    _, data, ckpt = setup
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    out = Path(shutil.copytree(clean[0], tmp_path / "out"))
    return copy, ckpt, out


def test_an_image_changed_after_its_map_was_stored_is_refused_by_name(scored_copy):
    copy, ckpt, out = scored_copy
    records = _records(copy)
    image = Path(records[0].image_path)
    image.write_bytes(image.read_bytes() + b"\0")  # another file of another size
    for argv in (_args(copy, ckpt, out), _args(copy, ckpt, out, "--run_eval_only")):  # resuming; evaluating
        with pytest.raises(UserError, match="test image brick/test/good/000.png changed since its map") as e:
            test_script.main(argv)
        assert f"its image file {image} is" in str(e.value) and f"remove {out / 'maps'}" in str(e.value)
    Path(records[1].image_path).write_bytes(Path(records[1].image_path).read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"brick/test/good/000.png changed .*\(2 images with maps changed\)"):
        test_script.main(_args(copy, ckpt, out, "--run_eval_only"))


def test_a_mask_changed_after_its_map_was_stored_is_refused_by_name(scored_copy):
    copy, ckpt, out = scored_copy
    record = _records(copy)[2]
    mask = Path(record.mask_path)
    raw = mask.read_bytes()
    from PIL import Image

    Image.fromarray(255 - np.asarray(Image.open(mask))).save(mask)  # relabelled
    assert raw != mask.read_bytes()
    for argv in (_args(copy, ckpt, out), _args(copy, ckpt, out, "--run_eval_only")):
        with pytest.raises(
            UserError, match=f"test image {record.id} changed since its map .*its mask file {mask} has another content"
        ):
            test_script.main(argv)


def test_a_changed_label_or_image_set_is_refused(scored_copy):
    copy, ckpt, out = scored_copy
    extra = copy / "brick" / "test" / "good" / "002.png"
    shutil.copy(copy / "brick" / "test" / "good" / "000.png", extra)
    with pytest.raises(UserError, match="the test set changed since the maps .* were stored .*image ids or labels"):
        test_script.main(_args(copy, ckpt, out, "--run_eval_only"))
    with pytest.raises(UserError, match="the test set changed since the maps"):
        test_script.main(_args(copy, ckpt, out))


def test_older_manifests_and_chunks_are_named_as_such(scored_copy, capsys):
    copy, ckpt, out = scored_copy
    manifest = json.loads((out / "manifest.json").read_text())
    older = {**manifest, "data": {**manifest["data"], "fingerprint": {"images": "0" * 16, "masks": "1" * 16}}}
    (out / "manifest.json").write_text(json.dumps(older))
    with pytest.raises(UserError, match="written by an older version of test.py"):
        check_manifest(out, manifest)
    # chunks of an older version: no per-image file identities; evaluating them warns and goes on
    store = MapStore(out / "maps")
    for cls, arrays in list(store.iter_classes()):
        for chunk in (out / "maps" / cls).glob("*.npz"):
            chunk.unlink()
        store.write(
            "00000000",
            arrays["ids"],
            [cls] * len(arrays["ids"]),
            arrays["maps"],
            arrays["masks"],
            arrays["labels"],
            arrays["image_scores"],
        )
    capsys.readouterr()
    test_script.main(_args(copy, ckpt, out, "--run_eval_only"))
    err = capsys.readouterr().err
    assert "data fingerprint is an older version's" in err
    assert "2 map chunk(s)" in err and "were written by an older version" in err
