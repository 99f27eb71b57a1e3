"""Each stored map records the sha256 of its image file: a changed picture of the same size is caught, while the
chunks of the previous version (sizes only) stay readable and are checked by size, with a warning."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from utils.errors import UserError
from vlmdiff.evaluation.map_store import MapStore
from vlmdiff.evaluation.run_inputs import check_sources, source_files


def _records(tmp_path: Path, n: int = 3) -> list[SimpleNamespace]:
    out = []
    for i in range(n):
        image = tmp_path / "img" / f"{i}.bmp"
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(bytes([i]) * 100)
        out.append(SimpleNamespace(id=f"c/{i}.bmp", image_path=image, mask_path=None, class_name="c"))
    return out


def _store(tmp_path: Path, records, sources) -> MapStore:
    store = MapStore(tmp_path / "maps")
    n = len(records)
    store.write(
        "00000000",
        [r.id for r in records],
        ["c"] * n,
        np.zeros((n, 2, 2), np.float32),
        np.zeros((n, 2, 2), bool),
        [0] * n,
        [0.0] * n,
        [sources[r.id] for r in records],
    )
    return store


def test_images_are_identified_by_their_bytes(tmp_path):
    records = _records(tmp_path)
    sources = source_files(records)
    assert len({s.image_sha256 for s in sources.values()}) == 3 and all(
        len(s.image_sha256) == 16 for s in sources.values()
    )
    assert source_files(records, workers=1) == sources  # threads or not, the same
    store = _store(tmp_path, records, sources)
    assert store.sources()[0] == sources
    check_sources(store, records, source_files(records))  # unchanged: fine
    records[1].image_path.write_bytes(b"\x07" * 100)  # another picture, same size
    with pytest.raises(UserError, match=r"test image c/1.bmp changed since its map .*another picture now \(same size"):
        check_sources(store, records, source_files(records))


def test_chunks_of_the_previous_version_are_checked_by_size_with_a_warning(tmp_path, caplog):
    records = _records(tmp_path)
    store = _store(tmp_path, records, source_files(records))
    chunk = tmp_path / "maps" / "c" / "00000000.npz"
    with np.load(chunk) as z:
        arrays = {k: z[k] for k in z.files if k != "image_sha256"}  # as the previous version wrote it
    with open(chunk, "wb") as f:
        np.savez(f, **arrays)
    assert all(s.image_sha256 == "" for s in store.sources()[0].values())
    records[0].image_path.write_bytes(b"\x07" * 100)  # same size: not noticed in an old chunk, but said so
    with caplog.at_level(logging.WARNING):
        check_sources(store, records, source_files(records))
    assert "3 image(s) with maps" in caplog.text and "identified images by file size" in caplog.text
    records[0].image_path.write_bytes(b"\x07" * 101)
    with pytest.raises(UserError, match="its image file .* is 101 bytes now, 100 then"):
        check_sources(store, records, source_files(records))


def test_an_unreadable_image_is_named(tmp_path):
    records = _records(tmp_path)
    records[2].image_path.unlink()
    with pytest.raises(UserError, match=f"cannot read {records[2].image_path}"):
        source_files(records)
