"""The VLMDiff pipeline end to end on a small generated dataset, on a CPU, with nothing downloaded.

Runs the five stages through the real scripts (each script's ``main`` is called in this process;
the equivalent command line is printed first so that it can be copied), in seven numbered steps:

  1. a demo dataset in MVTec-AD layout: crops of real photographs shipped with scikit-image and
     scikit-learn, with synthetic defects (scratch, stain, hole, patch) and exact masks;
  2. captioner.py with the offline ``template`` backend (stands in for the VLM);
  3. finetune_autoencoder.py: the demo's KL autoencoder, trained from a random start;
  4. a tiny "base" latent diffusion model, pretrained here for a few minutes on the demo's normal
     training images (it stands in for Stable Diffusion 1.5, which was pretrained on images);
  5. build_model.py assembles it with the autoencoder into the starting VLMDiff checkpoint;
  6. train.py with the captions (encoded by a real sentence encoder shipped as a pip package);
  7. test.py with the ImageNet EfficientNet-Lite0 backbone for the anomaly maps and --save_visuals,

then prints the seven metrics (official protocol) and where the heatmaps are.

The models are tiny and trained from scratch on synthetic defects in real photographs, so the
numbers are not the paper's: they show that the pipeline works, nothing more. configs/demo.yaml is
the model; the training and test settings are the ``FULL`` constants in this file.

  python scripts/demo.py                   # the whole demo into demo_out/ (~9 min on 2 CPU cores)
  python scripts/demo.py --quick           # a smoke run: 1 class, a few images, 2 steps per stage
  python scripts/demo.py --keep            # reuse the stages an earlier run already finished
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("demo")

BANNER = """\
VLMDiff demo. Everything here is small: the models are tiny, trained from scratch in minutes on a CPU,
on synthetic defects pasted into real photographs (not MVTec-AD, VisA, Real-IAD or COCO-AD), with a
template captioner instead of a VLM and a tiny pretrained-here diffusion model instead of Stable
Diffusion 1.5. Its numbers are therefore NOT the paper's; they only show that the five stages work
together. The real pipeline is the same scripts with the commands of the README."""


@dataclass(frozen=True)
class DemoSettings:
    """Every choice of the demo; the model's sizes are in ``config`` (configs/demo.yaml).

    The paper's values, for comparison: 256 px images; the released kl-f8 autoencoder finetuned with
    LPIPS; SD-1.5 pretrained on billions of images; lr 1e-5, batch 12 x accumulation 4, 300 epochs
    (MVTec-AD); DDIM 10 steps from t = 999; Gaussian sigma 5 at 256 px; DINO ViT-S/8 features; image
    score = max after 8 x avgpool 8.
    """

    config: str = "demo"  # configs/demo.yaml
    # data (vlmdiff.data.demo): object classes, whose crops are aligned like MVTec-AD's objects
    classes: tuple[str, ...] = ("coffee", "chelsea")
    n_train: int = 32
    n_test_good: int = 24
    n_test_defect: int = 48  # 12 of each defect type
    data_image_size: int = 64  # the model's size: masks stay exact
    data_seed: int = 0
    # stage 2: autoencoder from a random start, L1 + KL (no LPIPS, no GAN: disc_start is never reached)
    ae_steps: int = 250
    ae_batch_size: int = 8
    ae_base_lr: float = 2.5e-4  # lr = base_lr x batch size (upstream's rule) = 2e-3
    # stage 3: base model pretraining, the stand-in for SD-1.5 (the whole UNet is trained)
    base_steps: int = 100
    base_batch_size: int = 8
    base_lr: float = 1e-3
    # stage 4: VLMDiff training (SG network + UNet decoder), with captions
    train_steps: int = 400
    train_batch_size: int = 8
    train_lr: float = 1e-3
    # stage 5: test: noise to t = 401 (not 999), i.e. DDIM steps 401, 301, 201, 101, 1 of the 10-step grid;
    # over seeds 1-3 x 1-2 threads t = 401 gave the steadiest image AU-ROC (t = 201: 78-87 %)
    ddim_steps: int = 10
    noise_t: int = 401
    sigma: float = 2.0  # pixels at 64 px (the paper's 5 at 256 px is 1.25 here)
    feature_input_size: int = 256  # the backbone sees the 64 px images upsampled to the paper's 256 px
    image_pooling: str = "max"  # the paper's 8 x avgpool 8 spans nearly a whole 64 px map
    test_batch_size: int = 8
    seed: int = 1


FULL = DemoSettings()
QUICK = DemoSettings(
    classes=("coffee",),
    n_train=2,
    n_test_good=1,
    n_test_defect=2,
    ae_steps=2,
    ae_batch_size=2,
    base_steps=2,
    base_batch_size=2,
    train_steps=2,
    train_batch_size=2,
    ddim_steps=2,
    noise_t=999,
    test_batch_size=4,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_out", help="folder for everything the demo makes (default demo_out)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 class, a few images, 2 steps per stage")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep what an earlier run with the same settings finished in --output and redo only the "
        "rest (default: start afresh)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the demo's models are so small that a second thread gains "
        "nothing, and threads stall when other processes share the cores; 0 = torch's default)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=FULL.seed,
        help="seed of every stage's training and of the test noise (the dataset itself stays the same)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 0")
    return args


# ---------------------------------------------------------------------------------------------
# Stages

# The demo's steps in the order they run; their printed numbers ("3/7") come from this tuple.
STEPS: tuple[str, ...] = ("data", "captions", "autoencoder", "base", "build", "train", "test")


class Runner:
    """Runs named stages in order, prints their number and command line, times them and remembers finished ones."""

    def __init__(self, output: Path, keep: bool, settings: DemoSettings):
        self.output = output
        self.marks = output / "stages"
        self.times: dict[str, float] = {}
        fingerprint = repr(settings)
        stamp = self.marks / "settings.txt"
        if not keep or not stamp.is_file() or stamp.read_text() != fingerprint:
            if output.exists():
                _clear(output)
        self.marks.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fingerprint)

    def stage(self, name: str, title: str, command: list[str] | None, fn: Callable[[], Any]) -> None:
        mark = self.marks / f"{name}.done"
        print(f"\n=== {STEPS.index(name) + 1}/{len(STEPS)} {title} ===", flush=True)
        if command is not None:
            print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
        if mark.is_file():
            print("(already done by an earlier run: --keep)", flush=True)
            return
        start = time.perf_counter()
        fn()
        self.times[name] = time.perf_counter() - start
        mark.write_text(f"{self.times[name]:.1f}\n")
        print(f"--- {title}: {self.times[name]:.0f} s", flush=True)


def _clear(output: Path) -> None:
    """Remove a previous demo's folders (only the names the demo makes, never anything else)."""
    for name in ("data", "captions", "autoencoder", "models", "train", "results", "stages"):
        shutil.rmtree(output / name, ignore_errors=True)


def _script(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


def _flags(*switches: str, **values: Any) -> list[str]:
    """A command line's flags: ``--key value`` per keyword (a list gives several values), ``--switch`` per switch."""
    out = []
    for key, value in values.items():
        out += [f"--{key}", *(str(v) for v in (value if isinstance(value, (list, tuple)) else [value]))]
    return out + [f"--{switch}" for switch in switches]


def run(settings: DemoSettings, output: Path, keep: bool = False) -> dict[str, Any]:
    """Run the whole demo into ``output``; returns test.py's metrics (official protocol)."""
    from vlmdiff.data.demo import generate_demo_dataset
    from vlmdiff.pipeline.demo_assets import pretrain_base

    output = Path(output)
    runner = Runner(output, keep, settings)
    py = "python"
    data, captions = output / "data", output / "captions"
    ae_dir, models, results = output / "autoencoder", output / "models", output / "results"
    ae_ckpt, base_ckpt, init_ckpt = ae_dir / "autoencoder.ckpt", models / "base_sd.ckpt", models / "vlmdiff_init.ckpt"
    ckpt_dir = output / "train" / "ckpt_demo"
    s = settings

    gen_args = _flags(
        output=data,
        classes=s.classes,
        n_train=s.n_train,
        n_test_good=s.n_test_good,
        n_test_defect=s.n_test_defect,
        image_size=s.data_image_size,
        seed=s.data_seed,
    )
    runner.stage(
        "data",
        "demo dataset (MVTec-AD layout)",
        [py, "-m", "vlmdiff.data.demo", *gen_args],
        lambda: generate_demo_dataset(
            data, s.classes, s.n_train, s.n_test_good, s.n_test_defect, s.data_image_size, s.data_seed
        ),
    )

    cap_args = _flags(data_set="mvtec", data_path=data, vlm_model="template", prompt_type="pd", output=captions)
    runner.stage(
        "captions",
        "captions (template backend standing in for a VLM)",
        [py, "captioner.py", *cap_args],
        lambda: _script("captioner").main(cap_args),
    )

    ae_args = _flags(
        "no_progress_bar",
        data_set="mvtec",
        data_path=data,
        config=s.config,
        resume_path="none",
        perceptual_weight=0,
        batch_size=s.ae_batch_size,
        accumulate_grad_batches=1,
        base_lr=s.ae_base_lr,
        max_steps=s.ae_steps,
        output_dir=ae_dir,
        accelerator="cpu",
        log_images_every_n_steps=max(1, s.ae_steps),
        save_every_n_steps=0,
        log_every_n_steps=10,
        seed=s.seed,
        num_workers=0,
    )
    runner.stage(
        "autoencoder",
        "autoencoder (random start; no LPIPS: no VGG weights offline)",
        [py, "finetune_autoencoder.py", *ae_args],
        lambda: _script("finetune_autoencoder").main(ae_args),
    )

    runner.stage(
        "base",
        "a tiny base model standing in for Stable Diffusion 1.5 (pretrained here)",
        None,
        lambda: pretrain_base(
            base_ckpt, s.config, s.seed, ae_ckpt, data, captions, models, s.base_steps, s.base_lr, s.base_batch_size
        ),
    )
    build_args = _flags(sd_path=base_ckpt, ae_path=ae_ckpt, output=init_ckpt, config=s.config, seed=s.seed)
    runner.stage(
        "build",
        "assemble the starting VLMDiff checkpoint",
        [py, "build_model.py", *build_args],
        lambda: _script("build_model").main(build_args),
    )

    train_args = _flags(
        "use_captions",
        "no_progress_bar",
        data_set="mvtec",
        data_path=data,
        resume_path=init_ckpt,
        caption_folder=captions,
        vlm_model="template",
        output_root=output / "train",
        exp_name="demo",
        max_steps=s.train_steps,
        max_epochs=-1,
        batch_size=s.train_batch_size,
        accumulate_grad_batches=1,
        lr=s.train_lr,
        save_every_n_steps=max(1, s.train_steps),
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
        seed=s.seed,
        num_workers=0,
    )
    runner.stage(
        "train",
        "train VLMDiff (SG network + UNet decoder) with the captions",
        [py, "train.py", *train_args],
        lambda: _script("train").main(train_args),
    )

    # tested with the empty caption, the paper's recipe for MVTec-AD (--use_captions would guide by test captions)
    test_args = _flags(
        "save_visuals",
        "no_progress_bar",
        data_set="mvtec",
        data_path=data,
        resume_path=ckpt_dir / "last.ckpt",
        feature_extractor="efficientnet_lite0",
        ddim_steps=s.ddim_steps,
        noise_t=s.noise_t,
        sigma=s.sigma,
        feature_input_size=s.feature_input_size,
        image_pooling=s.image_pooling,
        batch_size=s.test_batch_size,
        device="cpu",
        seed=s.seed,
        output_dir=results,
        num_workers=0,
    )
    runner.stage(
        "test",
        "test: reconstructions, anomaly maps, metrics",
        [py, "test.py", *test_args],
        lambda: _script("test").main(test_args),
    )
    return _report(results, runner.times)


def _report(results: Path, times: dict[str, float]) -> dict[str, Any]:
    import json

    from vlmdiff.evaluation.metrics import format_table

    metrics = json.loads((results / "metrics.json").read_text())["metrics"]["official"]
    metrics = {"per_class": metrics["per_class"], "mean": metrics["mean"]}
    nan = float("nan")
    for row in [*metrics["per_class"].values(), metrics["mean"]]:
        for k, v in row.items():
            row[k] = nan if v is None else v
    print("\n" + format_table(metrics, "demo results, official protocol (%; NOT comparable to the paper)"))
    if times:
        print(
            "\nstage times: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            + f"; total {sum(times.values()):.0f} s"
        )
    print(
        "\nheatmaps (input | autoencoder | reconstruction | anomaly map | overlay | ground truth): "
        f"{results / 'visuals'}"
    )
    print(f"report: {results / 'report.html'}")
    print(f"metrics: {results / 'metrics.json'} and {results / 'metrics.md'}")
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from utils.cli import setup_logging

    setup_logging(args.verbose)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(BANNER, flush=True)
    start = time.perf_counter()
    settings = dataclasses.replace(QUICK if args.quick else FULL, seed=args.seed)
    result = run(settings, Path(args.output), keep=args.keep)
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return result


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from utils.cli import run_main

    sys.exit(run_main(main))
