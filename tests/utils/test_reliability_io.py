"""Reliability of runs and inputs: file modes, write failures, folder locks, fingerprints, images, honest means.

The one-line errors of the scripts are cases of tests/scripts/test_bad_input.py; this module tests the parts
underneath and the behaviours that take more than one run (a second process, a rerun).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import test as test_script
from tests import datagen, mounts
from utils.errors import UserError
from utils.io import atomic_open, torch_save, write_bytes, write_json
from utils.lock import claim_folder

ROOT = Path(__file__).resolve().parents[2]
FAST = [
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

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def umask():
    """Set the process umask for one test; restored afterwards."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------ umask


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path: Path, umask, mask: int, expected: int) -> None:
    umask(mask)
    write_json(tmp_path / "a.json", {"x": 1})
    write_bytes(tmp_path / "sub" / "b.bin", b"123")
    torch_save({"w": torch.zeros(2)}, tmp_path / "c.ckpt")
    (tmp_path / "d.txt").write_text("old")
    os.chmod(tmp_path / "d.txt", 0o600)
    with atomic_open(tmp_path / "d.txt") as f:  # replacing a file gives the new one the umask's mode
        f.write("new")
    for name in ("a.json", "sub/b.bin", "c.ckpt", "d.txt"):
        assert mode(tmp_path / name) == expected, name


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A one-class MVTec layout and an assembled tiny VLMDiff (built once for the module)."""
    from tests.tinyckpt import write_ae_checkpoint, write_sd_checkpoint

    tmp = tmp_path_factory.mktemp("reliability")
    data = datagen.make_mvtec(
        tmp / "mvtec",
        classes=("bottle",),
        n_train=1,
        n_test_good=1,
        defects=("crack",),
        n_per_defect=1,
        size=32,
        gray_classes=(),
    )
    return tmp, data, write_sd_checkpoint(tmp / "sd.ckpt", ema=False), write_ae_checkpoint(tmp / "ae.ckpt")


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664)])
def test_outputs_of_the_stages_honour_the_umask(small_run, tmp_path: Path, umask, mask: int, expected: int) -> None:
    import build_model
    import captioner

    _, data, sd, ae = small_run
    umask(mask)
    ckpt = tmp_path / "models" / "vlmdiff.ckpt"
    build_model.main(["--sd_path", str(sd), "--ae_path", str(ae), "--output", str(ckpt), "--config", "tiny"])
    out = tmp_path / "results"
    test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--resume_path",
            str(ckpt),
            "--output_dir",
            str(out),
            "--save_visuals",
            *FAST,
        ]
    )
    captions = tmp_path / "captions"
    captioner.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(data),
            "--vlm_model",
            "template",
            "--split",
            "test",
            "--output",
            str(captions),
        ]
    )
    written = [
        ckpt,
        out / "metrics.json",
        out / "metrics.csv",
        out / "manifest.json",
        *out.glob("maps/*/*.npz"),
        *out.glob("visuals/*/*.png"),
        *[p for p in captions.rglob("*") if p.is_file()],
    ]
    assert len(written) >= 8 and any(p.suffix == ".json" for p in captions.rglob("*"))
    assert {str(p.relative_to(tmp_path)): oct(mode(p)) for p in written} == {
        str(p.relative_to(tmp_path)): oct(expected) for p in written
    }


# ------------------------------------------------------------------------------------------------ write paths


def test_temp_file_creation_fails_inside_the_error_handling(tmp_path: Path) -> None:
    target = tmp_path / "ro" / "metrics.json"
    with mounts.tmpfs(tmp_path / "ro", files={"metrics.json": b"{}"}, readonly=True):
        with pytest.raises(UserError, match=f"could not write {target}: Read-only file system"):
            write_json(target, {"new": 1})
        assert target.read_bytes() == b"{}"


def test_a_really_full_disk_during_torch_save_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    with mounts.tmpfs(tmp_path / "small", size="256k") as small:
        target = small / "model.ckpt"
        target.write_bytes(b"previous checkpoint")
        with pytest.raises(UserError, match="could not write .*model.ckpt: the write failed part-way .*MiB free") as e:
            torch_save({"w": torch.zeros(512, 512)}, target)  # 1 MiB of weights on a 256 KiB disk
        assert isinstance(e.value.__cause__, RuntimeError) and "\n" not in str(e.value)
        assert target.read_bytes() == b"previous checkpoint"
        assert sorted(p.name for p in small.iterdir()) == ["model.ckpt"]


# ------------------------------------------------------------------------------------------------ locks

HOLDER = """
import sys, time
from utils.lock import claim_folder
start, end = int(sys.argv[2]), (None if sys.argv[3] == "end" else int(sys.argv[3]))
with claim_folder(sys.argv[1], "test.py scoring", "--output_dir", (start, end)):
    print("holding", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Start a real second process that holds ``folder`` for a span; killed afterwards."""
    procs = []

    def start(folder: Path, span: tuple[int, str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder), str(span[0]), str(span[1])],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_job_is_refused_while_the_first_lives_and_takes_over_when_it_died(tmp_path: Path, holder) -> None:
    out = tmp_path / "out"
    first = holder(out, (0, "end"))
    with pytest.raises(
        UserError,
        match=rf"{out} is in use by another job: test\.py scoring \(pid {first.pid} on "
        rf"{socket.gethostname()}.*choose another --output_dir$",
    ):
        test_script.main(
            [
                "--data_set",
                "mvtec",
                "--data_path",
                str(tmp_path / "no-data"),
                "--resume_path",
                "x.ckpt",
                "--output_dir",
                str(out),
                *FAST,
            ]
        )
    first.send_signal(signal.SIGKILL)  # dies without cleaning up: its lock stays, stale
    first.wait()
    assert len(list(out.glob(".lock.*.json"))) == 1
    with claim_folder(out, "test.py scoring", "--output_dir") as mine:
        assert [p.name for p in out.glob(".lock.*.json")] == [mine.name]
        assert json.loads(mine.read_text())["pid"] == os.getpid()
    assert not list(out.glob(".lock.*.json"))  # released when the job ends


def test_shards_with_disjoint_spans_share_a_folder(tmp_path: Path, holder) -> None:
    out = tmp_path / "out"
    holder(out, (0, 5))
    with claim_folder(out, "test.py scoring", "--output_dir", (5, None)):
        pass
    with pytest.raises(UserError, match=r"images \[0, 5\)"):
        with claim_folder(out, "test.py scoring", "--output_dir", (3, 8)):
            pass
    with pytest.raises(UserError, match="in use"):  # an evaluation reads every shard
        with claim_folder(out, "test.py evaluation", "--output_dir"):
            pass


def test_processes_of_one_job_do_not_claim_and_other_hosts_locks_are_not_guessed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with claim_folder(out, "train.py", "--exp_name", holder=True):
        with claim_folder(out, "train.py", "--exp_name", holder=False) as lock:  # a DDP rank > 0
            assert lock is None
    out.mkdir(exist_ok=True)
    other = out / ".lock.elsewhere.123.json"
    other.write_text(json.dumps({"host": "elsewhere", "pid": 123, "span": [0, None], "job": "train.py"}))
    with pytest.raises(UserError, match=f"pid 123 on elsewhere.*if that job is gone, delete {other}"):
        with claim_folder(out, "train.py", "--exp_name"):
            pass


def test_a_reused_pid_is_a_stale_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    parent = os.getppid()  # alive, but not the process that wrote the lock: its start time differs
    (out / f".lock.{socket.gethostname()}.{parent}.json").write_text(
        json.dumps(
            {"host": socket.gethostname(), "pid": parent, "start_ticks": -1, "span": [0, None], "job": "train.py"}
        )
    )
    with claim_folder(out, "train.py", "--exp_name") as mine:
        assert [p.name for p in out.glob(".lock.*.json")] == [mine.name]


# ------------------------------------------------------------------------------------------------ fingerprints


def test_changed_masks_are_refused_moved_copies_accepted_and_an_empty_crash_replaced(small_run, tmp_path: Path) -> None:
    import build_model

    _, data, sd, ae = small_run
    ckpt = tmp_path / "vlmdiff.ckpt"
    build_model.main(["--sd_path", str(sd), "--ae_path", str(ae), "--output", str(ckpt), "--config", "tiny"])
    out = tmp_path / "out"
    first = test_script.main(
        ["--data_set", "mvtec", "--data_path", str(data), "--resume_path", str(ckpt), "--output_dir", str(out), *FAST]
    )
    # the same checkpoint and data at other paths (node-local copies): the stored maps are reused
    copy_data, copy_ckpt = Path(shutil.copytree(data, tmp_path / "node" / "mvtec")), tmp_path / "node" / "m.ckpt"
    shutil.copy(ckpt, copy_ckpt)
    again = test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(copy_data),
            "--resume_path",
            str(copy_ckpt),
            "--output_dir",
            str(out),
            *FAST,
        ]
    )
    assert again["official"]["mean"] == first["official"]["mean"]
    # relabelled ground truth: both a scoring rerun and an evaluation refuse the stale masks
    mask = copy_data / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(mask)
    for extra in ([], ["--run_eval_only"]):
        with pytest.raises(
            UserError,
            match="test image bottle/test/crack/000.png changed since its map .*its mask "
            "file .*000_mask.png has another content",
        ):
            test_script.main(
                [
                    "--data_set",
                    "mvtec",
                    "--data_path",
                    str(copy_data),
                    "--resume_path",
                    str(copy_ckpt),
                    "--output_dir",
                    str(out),
                    *FAST,
                    *extra,
                ]
            )
    # a run that crashed before storing any map does not block the next one
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "manifest.json").write_text(json.dumps({"checkpoint": {"size": 1}}))
    test_script.main(
        [
            "--data_set",
            "mvtec",
            "--data_path",
            str(copy_data),
            "--resume_path",
            str(copy_ckpt),
            "--output_dir",
            str(crashed),
            *FAST,
        ]
    )
    assert json.loads((crashed / "manifest.json").read_text())["checkpoint"]["size"] == copy_ckpt.stat().st_size


# ------------------------------------------------------------------------------------------------ images


def _exif_rotated(path: Path, upright: np.ndarray) -> None:
    """Store ``upright`` as a camera would: pixels turned, with EXIF orientation 6 (rotate 90 CW to view)."""
    img = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor stored
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif)


def test_exif_orientation_is_applied_to_images_and_masks_alike(tmp_path: Path) -> None:
    from vlmdiff.data.common import Record
    from vlmdiff.data.dataset import AnomalyDataset

    image = np.zeros((64, 128, 3), dtype=np.uint8)  # landscape, defect in the top-left corner
    image[:16, :32] = 255
    mask = np.zeros((64, 128), dtype=np.uint8)
    mask[:16, :32] = 255
    _exif_rotated(tmp_path / "img.jpg", image)
    _exif_rotated(tmp_path / "img_mask.png", mask)
    item = AnomalyDataset(
        [Record(tmp_path / "img.jpg", tmp_path / "img_mask.png", "c", 1, "img.jpg", "d")], image_size=64
    )[0]
    bright = item["image"].mean(0) > 1.0  # (64, 64), normalised white
    assert bright[:8, :16].all() and not bright[32:].any() and not bright[:, 40:].any()
    marked = item["mask"][0] > 127
    assert marked[:8, :16].all() and not marked[32:].any() and not marked[:, 40:].any()
    Image.fromarray(mask).save(tmp_path / "upright_mask.png")  # the same mask stored upright, no EXIF
    upright = AnomalyDataset(
        [Record(tmp_path / "img.jpg", tmp_path / "upright_mask.png", "c", 1, "img.jpg", "d")], image_size=64
    )[0]
    assert torch.equal(item["mask"], upright["mask"])


def test_folder_dataset_follows_symlinked_sub_folders_without_looping(tmp_path: Path) -> None:
    from vlmdiff.data import index_dataset

    elsewhere = tmp_path / "elsewhere" / "screws"
    elsewhere.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(elsewhere / "a.png")
    root = tmp_path / "root"
    (root / "nuts").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(root / "nuts" / "b.png")
    (root / "screws").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(root, target_is_directory=True)  # a link back up must not recurse forever
    records = index_dataset("folder", root, "test")
    assert sorted((r.class_name, r.id) for r in records) == [("nuts", "nuts/b.png"), ("screws", "screws/a.png")]


def test_images_with_one_stem_and_different_extensions_get_distinct_visuals(tmp_path: Path) -> None:
    from vlmdiff.evaluation.visuals import write_strips

    x = torch.zeros(2, 3, 8, 8)
    write_strips(tmp_path, ["good/a.png", "good/a.jpg"], ["c", "c"], x, x, x)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["good__a.jpg.png", "good__a.png"]


# ------------------------------------------------------------------------------------------------ honest means


def test_undefined_class_metrics_are_null_and_the_mean_row_says_over_how_many_classes(tmp_path: Path) -> None:
    from vlmdiff.evaluation.evaluate import evaluate_run
    from vlmdiff.evaluation.map_store import MapStore

    rng = np.random.default_rng(0)
    masks = np.zeros((5, 16, 16), dtype=np.uint8)
    masks[[1, 3, 4], 4:8, 4:8] = 255  # class "both": images 0-2; class "only_anomalous": images 3-4
    maps = rng.random((5, 16, 16)).astype(np.float32) + masks / 255.0
    labels = (masks.reshape(5, -1).max(1) > 0).astype(int)
    MapStore(tmp_path / "maps").write(
        "00000000",
        [f"i{i}" for i in range(5)],
        ["both"] * 3 + ["only_anomalous"] * 2,
        maps,
        masks,
        labels,
        maps.max(axis=(1, 2)),
    )
    (tmp_path / "manifest.json").write_text("{}")  # what the maps depend on: nothing to record here
    evaluate_run(tmp_path, "official", "max")
    saved = json.loads((tmp_path / "metrics.json").read_text())["metrics"]["official"]
    only = saved["per_class"]["only_anomalous"]
    assert only["auroc_image"] is None and only["ap_image"] is None and only["f1max_image"] is None
    assert all(only[k] is not None for k in ("auroc_pixel", "ap_pixel", "f1max_pixel", "aupro"))
    assert saved["mean"]["ap_image"] == saved["per_class"]["both"]["ap_image"]
    assert saved["mean_over"]["ap_image"] == 1 and saved["mean_over"]["aupro"] == 2
    csv_rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_rows[-1] == "official,classes in mean,1,1,1,2,2,2,2"
    assert "| only_anomalous | n/a | n/a | n/a |" in (tmp_path / "metrics.md").read_text()
    assert "| classes in mean | 1 of 2 | 1 of 2 | 1 of 2 | 2 of 2 |" in (tmp_path / "metrics.md").read_text()
