"""Peak memory of the weight-handling stages: build_model, train.py --resume and test.py, as multiples of the weights.

Each stage runs in a fresh child process (peak RSS from the kernel, ``bench.common.run_child``) on a
random-weight model of the given preset (default ``mid``: SD-1.5 structure at CPU size), 256x256 demo
images, batch 1, one training step / one DDIM step. The inputs are made first: an SD-style checkpoint
with EMA copies, an autoencoder checkpoint, the assembled model and a one-step training run whose
``last.ckpt`` (weights + AdamW state) the resume and test stages read.

Reported per stage: peak RSS, the same minus a child that only imports the stage code (interpreter,
torch, Lightning: ``baseline``), and that difference divided by the float32 VLMDiff weights. The SD-1.5
column applies that multiple to SD-1.5's weights (counted on the meta device) plus the baseline: the
memory a CPU machine needs at full size, activations at 256x256 batch 1 included.

    python bench/bench_memory.py                 # mid preset, a few minutes, up to ~4x the weights of RAM
    python bench/bench_memory.py --config tiny   # seconds (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import run_child, table, write_results  # noqa: E402

GIB = 2**30
MIB = 2**20
QUIET = ["--num_workers", "0", "--no_progress_bar"]
TRAIN = [
    "--data_set",
    "mvtec",
    "--accelerator",
    "cpu",
    "--devices",
    "1",
    "--batch_size",
    "1",
    "--accumulate_grad_batches",
    "1",
    "--save_every_n_epochs",
    "1000",
    *QUIET,
]
STAGES = {  # name -> what the README calls it
    "build_ckpt": "build_model.py -> .ckpt",
    "build_safetensors": "build_model.py -> .safetensors",
    "resume": "train.py --resume (1 step)",
    "test": "test.py (1 DDIM step)",
}


def weights_bytes(config: str) -> int:
    """Bytes of the float32 VLMDiff state dict of a preset, counted on the meta device."""
    import torch

    from vlmdiff.config import load_model_config
    from vlmdiff.model import VLMDiff

    with torch.device("meta"):
        model = VLMDiff(load_model_config(config), load_pretrained_text=False)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def child(stage: str, work: Path, config: str) -> dict[str, Any]:
    """One stage in this process (the parent measures its peak RSS)."""
    import logging

    logging.disable(logging.INFO)
    import build_model
    import test as test_script
    import train

    data = work / "data"
    if stage == "baseline":
        return {}
    if stage == "prepare":
        from tests.tinyckpt import write_ae_checkpoint, write_sd_checkpoint
        from vlmdiff.data.demo import generate_demo_dataset

        write_sd_checkpoint(work / "sd.ckpt", config)
        write_ae_checkpoint(work / "ae.ckpt", config)
        generate_demo_dataset(
            data, classes=("brick",), n_train=2, n_test_good=1, n_test_defect=1, image_size=256, seed=0
        )
        return {}
    if stage.startswith("build_"):
        out = work / f"vlmdiff.{stage.removeprefix('build_')}"
        build_model.main(
            [
                "--sd_path",
                str(work / "sd.ckpt"),
                "--ae_path",
                str(work / "ae.ckpt"),
                "--output",
                str(out),
                "--config",
                config,
            ]
        )
        return {"file_bytes": out.stat().st_size}
    if stage == "train1":
        train.main(
            [
                *TRAIN,
                "--data_path",
                str(data),
                "--resume_path",
                str(work / "vlmdiff.ckpt"),
                "--output_root",
                str(work),
                "--exp_name",
                "bench",
                "--max_steps",
                "1",
            ]
        )
        return {}
    last = work / "ckpt_bench" / "last.ckpt"
    if stage == "resume":
        train.main(
            [
                *TRAIN,
                "--data_path",
                str(data),
                "--resume",
                "--output_root",
                str(work),
                "--exp_name",
                "bench",
                "--max_steps",
                "2",
            ]
        )
        return {"file_bytes": last.stat().st_size}
    if stage == "test":
        test_script.main(
            [
                "--data_set",
                "mvtec",
                "--data_path",
                str(data),
                "--resume_path",
                str(last),
                "--feature_extractor",
                "efficientnet_lite0",
                "--ddim_steps",
                "1",
                "--batch_size",
                "1",
                "--device",
                "cpu",
                "--output_dir",
                str(work / "results"),
                *QUIET,
            ]
        )
        return {"file_bytes": last.stat().st_size}
    raise ValueError(stage)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mid", help="model preset to measure: tiny, mid")
    p.add_argument("--work", default=None, help="folder for the inputs and outputs (default: a temporary one)")
    p.add_argument("--output", default=None, help="results JSON (default bench/results/memory.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.config)))
        return {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)

        def run(stage: str) -> tuple[dict[str, Any], float]:
            return run_child(Path(__file__), ["--child", stage, "--work", str(work), "--config", args.config])

        _, baseline = run("baseline")
        run("prepare")
        measured = {}
        for stage in ("build_ckpt", "build_safetensors", "train1", "resume", "test"):
            out, peak = run(stage)
            measured[stage] = {**out, "peak_rss_mib": peak}
    weights, weights_sd15 = weights_bytes(args.config), weights_bytes("sd15")
    rows, results = [], {}
    for stage, label in STAGES.items():
        m = measured[stage]
        multiple = (m["peak_rss_mib"] - baseline) * MIB / weights
        sd15_gib = (baseline * MIB + multiple * weights_sd15) / GIB
        results[stage] = {**m, "above_baseline_x_weights": multiple, "sd15_projected_gib": sd15_gib}
        rows.append([label, m["peak_rss_mib"] / 1024, (m["peak_rss_mib"] - baseline) / 1024, multiple, sd15_gib])
    print(
        f"{args.config}: float32 VLMDiff weights {weights / GIB:.2f} GiB (sd15: {weights_sd15 / GIB:.2f} GiB); "
        f"baseline (imports only) {baseline / 1024:.2f} GiB; trained last.ckpt "
        f"{measured['resume']['file_bytes'] / GIB:.2f} GiB"
    )
    print(table(["stage", "peak RSS GiB", "above baseline GiB", "x weights", "sd15 projected GiB"], rows))
    summary = {
        "config": args.config,
        "weights_bytes": weights,
        "weights_bytes_sd15": weights_sd15,
        "baseline_rss_mib": baseline,
        "stages": results,
    }
    path = write_results("memory", summary, args.output)
    print(f"results: {path}")
    return summary


if __name__ == "__main__":
    main()
