"""Map store: round trip, resume, duplicates, corrupt chunks, float16, streaming evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from utils.errors import UserError
from vlmdiff.evaluation import metrics
from vlmdiff.evaluation.map_store import MapStore, SourceFiles, masks_to_uint8, original_name, safe_name


@pytest.fixture(scope="module")
def data(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "metrics_inputs.npz") as d:
        out = {k: d[k] for k in d.files}
    n = len(out["preds"])
    if "filename" in out:
        out["ids"] = np.asarray([str(f) for f in out["filename"]])
    else:
        out["ids"] = np.asarray([f"img{i:05d}" for i in range(n)])
    out["labels"] = (out["masks"].reshape(n, -1).max(axis=1) > 0).astype(np.int8)
    out["scores"] = np.linspace(0.0, 1.0, n)
    return out


def _write_in_batches(
    store: MapStore, data: dict[str, np.ndarray], batch: int, order: np.ndarray | None = None, stop: int | None = None
) -> None:
    idx = np.arange(len(data["ids"])) if order is None else order
    for b, start in enumerate(range(0, len(idx) if stop is None else stop, batch)):
        sel = idx[start : start + batch]
        store.write(
            f"batch{b:04d}",
            data["ids"][sel],
            data["clsname"][sel],
            data["preds"][sel].astype(np.float32),
            data["masks"][sel],
            data["labels"][sel],
            data["scores"][sel],
        )


def test_round_trip_sorted_by_id(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = MapStore(tmp_path / "maps")
    rng = np.random.default_rng(0)
    _write_in_batches(store, data, batch=5, order=rng.permutation(len(data["ids"])))  # batches mix classes
    assert store.classes() == sorted(set(data["clsname"].tolist()))
    seen = 0
    for cls, arrays in store.iter_classes():
        sel = np.flatnonzero(data["clsname"] == cls)
        sel = sel[np.argsort(data["ids"][sel])]
        assert list(arrays["ids"]) == sorted(data["ids"][sel].tolist())
        assert arrays["maps"].dtype == np.float32
        np.testing.assert_array_equal(arrays["maps"], data["preds"][sel].astype(np.float32))
        np.testing.assert_array_equal(arrays["masks"], data["masks"][sel])
        np.testing.assert_array_equal(arrays["labels"], data["labels"][sel])
        np.testing.assert_array_equal(arrays["image_scores"], data["scores"][sel])
        seen += len(sel)
    assert seen == len(data["ids"])


def test_resume_and_rewrite(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = MapStore(tmp_path)
    assert store.scored_ids() == set() and store.classes() == []
    _write_in_batches(store, data, batch=4, stop=12)  # a run that crashed after three batches
    assert store.scored_ids() == set(data["ids"][:12].tolist())
    # a leftover temporary file of an interrupted write is ignored
    cls_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    (cls_dir / ".batch0099.npz.abc.tmp").write_bytes(b"partial")
    _write_in_batches(store, data, batch=4)  # the resumed run redoes batches with the same names
    assert store.scored_ids() == set(data["ids"].tolist())
    assert sum(len(a["ids"]) for _, a in store.iter_classes()) == len(data["ids"])


def test_duplicate_ids_across_chunks(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = MapStore(tmp_path)
    _write_in_batches(store, data, batch=6)
    sel = slice(0, 2)
    store.write(
        "rerun",
        data["ids"][sel],
        data["clsname"][sel],
        data["preds"][sel],
        data["masks"][sel],
        data["labels"][sel],
        data["scores"][sel],
    )
    with pytest.raises(UserError, match=r"stored twice: in .*batch0000\.npz and in .*rerun\.npz"):
        store.scored_ids()
    with pytest.raises(UserError, match="stored twice"):
        next(store.iter_classes())


def test_corrupt_chunk_is_named(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = MapStore(tmp_path)
    _write_in_batches(store, data, batch=6)
    victim = sorted(tmp_path.glob("*/batch0001.npz"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(UserError, match=f"{victim.name}.*corrupt or truncated"):
        store.scored_ids()


def test_sources_are_stored_per_image_and_chunks_without_them_are_listed(tmp_path: Path) -> None:
    store = MapStore(tmp_path)
    sources = [SourceFiles(1234, "0123456789abcdef"), SourceFiles(99, "")]
    store.write(
        "c0",
        ["a/1.png", "b/2.png"],
        ["a", "b"],
        np.zeros((2, 2, 2), np.float32),
        np.zeros((2, 2, 2), bool),
        [1, 0],
        [0.5, 0.1],
        sources,
    )
    store.write("c2", ["a/3.png"], ["a"], np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), bool), [0], [0.0])
    known, unknown = store.sources()
    assert known == {"a/1.png": sources[0], "b/2.png": sources[1]}  # ints and strings, not numpy scalars
    assert type(known["a/1.png"].image_size) is int and unknown == [tmp_path / "a" / "c2.npz"]
    arrays = dict(store.iter_classes())  # the evaluation reader still sees only its arrays
    assert set(arrays["a"]) == {"ids", "maps", "masks", "labels", "image_scores"}
    assert store.read_images("a", ["a/1.png"])["a/1.png"]["map"].shape == (2, 2)
    with pytest.raises(UserError, match=r"sources \(1\) do not match"):
        store.write(
            "c3",
            ["a/4.png", "a/5.png"],
            ["a", "a"],
            np.zeros((2, 2, 2)),
            np.zeros((2, 2, 2)),
            [0, 0],
            [0.0, 0.0],
            sources[:1],
        )


def test_float16_option(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = MapStore(tmp_path, dtype="float16")
    maps = torch.from_numpy(data["preds"].astype(np.float32) + 0.1234567)
    n = len(maps)
    store.write(
        "all",
        data["ids"],
        data["clsname"],
        maps,
        torch.from_numpy(data["masks"]),
        torch.from_numpy(data["labels"]),
        torch.from_numpy(data["scores"]),
    )
    for cls, arrays in store.iter_classes():
        assert arrays["maps"].dtype == np.float16
        sel = np.flatnonzero(data["clsname"] == cls)
        sel = sel[np.argsort(data["ids"][sel])]
        np.testing.assert_array_equal(arrays["maps"], maps.numpy()[sel].astype(np.float16))
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.npz")) < 0.8 * (n * maps[0].numel() * 4)
    with pytest.raises(UserError, match="float32"):
        store.write(
            "big",
            data["ids"][:1],
            data["clsname"][:1],
            np.full((1, 4, 4), 1e6, np.float32),
            np.zeros((1, 4, 4), np.uint8),
            [0],
            [0.0],
        )
    with pytest.raises(UserError, match="dtype"):
        MapStore(tmp_path, dtype="bfloat16")


def test_class_names_are_made_safe(tmp_path: Path) -> None:
    names = ["screw", "metal_nut", "a/b c", "..", "%41", "caf\u00e9"]
    for name in names:
        folder = safe_name(name)
        assert all(c.isalnum() or c in "_-%" for c in folder) and not folder.startswith(".")
        assert original_name(folder) == name
    assert len({safe_name(n) for n in names}) == len(names)
    store = MapStore(tmp_path)
    n = len(names)
    store.write(
        "c0",
        [f"id{i}" for i in range(n)],
        names,
        np.zeros((n, 2, 2), np.float32),
        np.zeros((n, 2, 2), bool),
        np.zeros(n),
        np.zeros(n),
    )
    assert store.classes() == sorted(names)
    assert sorted(p.parent.parent for p in tmp_path.rglob("*.npz")) == [tmp_path] * n
    with pytest.raises(UserError, match="chunk name"):
        store.write("../x", ["a"], ["screw"], np.zeros((1, 2, 2)), np.zeros((1, 2, 2)), [0], [0.0])


def test_masks_to_uint8_keeps_positives() -> None:
    m = np.array([[0.0, 0.001, 0.5, 1.0]])
    assert masks_to_uint8(m).tolist() == [[0, 1, 128, 255]]
    assert masks_to_uint8(m > 0.2).tolist() == [[0, 0, 255, 255]]
    with pytest.raises(UserError):
        masks_to_uint8(np.array([[0, 3]], dtype=np.int32))


def test_streaming_evaluation_equals_in_memory(tmp_path: Path, data: dict[str, np.ndarray]) -> None:
    store = MapStore(tmp_path)
    _write_in_batches(store, data, batch=7, order=np.random.default_rng(1).permutation(len(data["ids"])))
    streamed = metrics.evaluate_stream(((c, a["maps"], a["masks"]) for c, a in store.iter_classes()), protocol="both")
    in_memory = metrics.evaluate(data["preds"], data["masks"], data["clsname"], protocol="both")
    for protocol, res in in_memory.items():
        assert streamed[protocol]["mean"] == pytest.approx(res["mean"], abs=1e-12)
        for cls, row in res["per_class"].items():
            assert streamed[protocol]["per_class"][cls] == pytest.approx(row, abs=1e-12)
