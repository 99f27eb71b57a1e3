"""The weights digest: stored by every writer (save_checkpoint, Lightning's AtomicCheckpointIO), read back without
the weights, the same for the same weights in either format; exports get the umask's file mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import (
    DIGEST_KEY,
    checkpoint_digest,
    file_digest,
    load_checkpoint,
    save_checkpoint,
    stored_digest,
    weights_digest,
)
from ldm.checkpoint_io import AtomicCheckpointIO


def _weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "b.weight": torch.randn(4, 3),
        "a.bias": torch.randn(4),
        "steps": torch.tensor(3),
        "h": torch.ones(2).half(),
    }


def test_the_digest_covers_names_dtypes_shapes_and_every_byte():
    sd = _weights()
    d = weights_digest(sd)
    assert len(d) == 64 and d == weights_digest(dict(reversed(sd.items())))  # order of entries does not count
    assert weights_digest({**sd, "extra": "not a tensor"}) == d
    changed = {**sd, "b.weight": sd["b.weight"].clone()}
    changed["b.weight"][2, 1] += 1e-6  # one value in the middle
    assert weights_digest(changed) != d
    assert weights_digest({**sd, "b.weight": sd["b.weight"].reshape(3, 4)}) != d
    assert weights_digest({**sd, "h": sd["h"].bfloat16()}) != d
    assert weights_digest({("c" + k[1:] if k == "a.bias" else k): v for k, v in sd.items()}) != d
    assert weights_digest({**sd, "b.weight": sd["b.weight"].t().contiguous().t()}) == d  # layout does not count


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_checkpoint_stores_the_digest_and_it_is_read_without_the_weights(tmp_path, suffix):
    sd = _weights()
    path = tmp_path / f"w{suffix}"
    save_checkpoint(path, sd, config={"x": 1})
    assert stored_digest(path) == weights_digest(sd) == file_digest(path)
    loaded = load_checkpoint(path)
    assert loaded[DIGEST_KEY] == weights_digest(sd) == checkpoint_digest(loaded, path)


def test_a_file_without_a_stored_digest_is_identified_by_its_weights(tmp_path):
    sd = _weights()
    torch.save({"state_dict": sd}, tmp_path / "upstream.ckpt")
    assert stored_digest(tmp_path / "upstream.ckpt") is None
    assert file_digest(tmp_path / "upstream.ckpt") == weights_digest(sd)


def test_a_stale_stored_digest_gives_way_to_the_weights(tmp_path, caplog):
    sd = _weights()
    ckpt = {"state_dict": {**sd, "b.weight": sd["b.weight"] + 1}, DIGEST_KEY: weights_digest(sd)}
    assert checkpoint_digest(ckpt, "edited.ckpt") == weights_digest(ckpt["state_dict"])
    assert "edited.ckpt: its weights are not the ones it was written with" in caplog.text


def test_lightning_checkpoints_store_the_digest_of_their_state_dict(tmp_path):
    sd = _weights()
    io = AtomicCheckpointIO()
    checkpoint = {"state_dict": sd, "epoch": 3, "optimizer_states": []}
    io.save_checkpoint(checkpoint, tmp_path / "last.ckpt")
    assert DIGEST_KEY not in checkpoint  # the caller's dict is left as it was
    assert stored_digest(tmp_path / "last.ckpt") == weights_digest(sd)
    assert io.load_checkpoint(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 3
    import pickle

    assert pickle.loads(pickle.dumps(io)).__class__ is AtomicCheckpointIO  # DDP launchers pickle the plugins


@pytest.mark.parametrize("umask", [0o002, 0o022])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_written_files_get_the_umask_mode(tmp_path, umask, suffix):
    old = os.umask(umask)
    try:
        path = tmp_path / f"w{suffix}"
        save_checkpoint(path, _weights())
        save_checkpoint(path, _weights())  # replacing an existing file too
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path(path).stat().st_mode) == 0o666 & ~umask
