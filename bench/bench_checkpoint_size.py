"""Checkpoint disk sizes: train.py's Lightning checkpoints vs the weights-only export (vlmdiff.export).

(a) Computed for any preset (SD-1.5 included) from the model built on the meta device, nothing
allocated: the export holds every weight and buffer of the state dict (float32); a Lightning
checkpoint adds AdamW's two moments of every trainable weight (2 x 4 bytes each). Run totals for
upstream's schedule: 100 epochs with a checkpoint every 20 (Real-IAD, COCO-AD) or 300 every 25
(MVTec-AD, VisA), all kept, plus last.ckpt.
(b) Measured on the tiny preset: one real Lightning training step on random images,
``trainer.save_checkpoint``, then ``python -m vlmdiff.export``; the file sizes are compared with (a).

    python bench/bench_checkpoint_size.py                    # sd15, mid, tiny + the tiny measurement
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import table, write_results  # noqa: E402
from vlmdiff.cli import load_train_recipe  # noqa: E402
from vlmdiff.config import load_model_config  # noqa: E402
from vlmdiff.model import VLMDiff  # noqa: E402

MB, GB = 1e6, 1e9


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="sd15,mid,tiny", help="presets to compute (comma list)")
    p.add_argument("--no_measure", action="store_true", help="skip the measured tiny run")
    p.add_argument("--output", default=None, help="results JSON (default bench/results/checkpoint_size.json)")
    return p.parse_args(argv)


def computed_sizes(config: str) -> dict[str, Any]:
    """Bytes of the export and of a Lightning checkpoint, from the meta-device model's parameter counts."""
    with torch.device("meta"):
        model = VLMDiff(load_model_config(config), load_pretrained_text=False)
    state = model.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adamw = sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    runs = {}
    recipe = load_train_recipe()  # configs/train.yaml: epochs and checkpoint period per dataset
    for dataset in ("realiad", "mvtec"):
        periodic = recipe.max_epochs[dataset] // recipe.save_every_n_epochs[dataset]
        runs[dataset] = {"periodic_checkpoints": periodic, "run_bytes": (periodic + 1) * (weights + adamw)}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": trainable,
        "export_bytes": weights,
        "lightning_bytes": weights + adamw,
        "runs": runs,
    }


def measure_tiny(folder: Path) -> dict[str, int]:
    """File sizes of a real tiny Lightning checkpoint after one step and of its export."""
    import lightning.pytorch as pl

    from vlmdiff.export import export_weights

    torch.manual_seed(0)
    model = VLMDiff(load_model_config("tiny"), load_pretrained_text=False)
    size = model.cfg.image_size
    images = [torch.randn(3, size, size) for _ in range(2)]
    data = [{"image": x, "hint": x, "caption": ""} for x in images]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    ckpt = folder / "last.ckpt"
    trainer.save_checkpoint(ckpt)  # with the resolved config, as train.py's checkpoints
    out = export_weights(ckpt, folder / "weights.safetensors")
    return {"lightning_bytes": ckpt.stat().st_size, "export_bytes": out.stat().st_size}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    computed = {c: computed_sizes(c) for c in args.configs.split(",") if c}
    out: dict[str, Any] = {"computed": computed}
    print(
        table(
            [
                "preset",
                "params M",
                "trainable M",
                "export GB",
                "Lightning ckpt GB",
                "run GB (Real-IAD: 5 + last)",
                "run GB (MVTec: 12 + last)",
            ],
            [
                [
                    c,
                    r["parameters"] / 1e6,
                    r["trainable"] / 1e6,
                    r["export_bytes"] / GB,
                    r["lightning_bytes"] / GB,
                    r["runs"]["realiad"]["run_bytes"] / GB,
                    r["runs"]["mvtec"]["run_bytes"] / GB,
                ]
                for c, r in computed.items()
            ],
        )
    )
    if not args.no_measure:
        with tempfile.TemporaryDirectory() as tmp:
            measured = measure_tiny(Path(tmp))
        predicted = computed.get("tiny") or computed_sizes("tiny")
        out["measured_tiny"] = {
            **measured,
            "predicted_export_bytes": predicted["export_bytes"],
            "predicted_lightning_bytes": predicted["lightning_bytes"],
        }
        print(
            table(
                ["tiny, measured", "file MB", "computed MB"],
                [
                    ["Lightning checkpoint", measured["lightning_bytes"] / MB, predicted["lightning_bytes"] / MB],
                    ["weights-only export", measured["export_bytes"] / MB, predicted["export_bytes"] / MB],
                ],
            )
        )
    path = write_results("checkpoint_size", out, args.output)
    print(f"results: {path}")
    return out


if __name__ == "__main__":
    main()
