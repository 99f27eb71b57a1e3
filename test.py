"""Test VLMDiff: reconstruct every test image, compare features, write anomaly maps and the metrics.

Per image: encode, noise to t = 999, 10 DDIM steps (901 ... 1) with guidance scale 9 (one pass when the
caption is empty), decode; anomaly map = smoothed sum over feature levels of 1 - cosine(input,
reconstruction); image score = max after 8 x avgpool(8). Metrics: the seven paper columns per class
and their mean, under the official protocol (default) or upstream's legacy one.

--use_captions (or --test_captions) guides every test image by its own test caption, as upstream does (two
guidance passes); a test image without a caption is an error. The paper's recipe for MVTec-AD, VisA and
Real-IAD is to leave it out: the empty caption, one pass.
--resume_path takes a Lightning checkpoint (ckpt_{exp_name}/model_epoch=NNN.ckpt, last.ckpt), an upstream
one, or a weights-only export (python -m vlmdiff.export CKPT OUT.safetensors).

  python test.py --data_set mvtec --data_path data/mvtec --resume_path ckpt_vlmdiff_mvtec/last.ckpt \\
      --use_dino --dino_version v1s8 --save_visuals
  python test.py ... --start_ind 0 --end_ind 1000      # a shard; then the rest; then:
  python test.py ... --run_eval_only                   # merge the shards' maps and compute the metrics
  torchrun --nproc_per_node 4 test.py ...              # the same over 4 GPUs
  python test.py --data_set folder --data_path my_images --resume_path ...   # no ground truth: scores only
  python test.py --data_set folder ... --threshold_from results/vlmdiff_mvtec  # ... labelled normal/anomalous

Each evaluation ends with report.html in the output folder (curves, galleries, the paper's row);
python -m vlmdiff.evaluation.report RUN rebuilds it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.cli import (
    HelpFormatter,
    add_run_file_args,
    data_workers,
    parse_with_run_file,
    print_config,
    run_main,
    setup_logging,
)
from utils.errors import UserError
from utils.io import read_json
from utils.lock import claim_folder
from utils.progress import add_progress_args
from vlmdiff import distributed
from vlmdiff.cli import (
    BATCH_SIZE,
    add_caption_args,
    add_config_args,
    add_data_args,
    check_numbers,
    coco_part,
    load_split_captions,
    model_config_to_print,
    short_precision,
)
from vlmdiff.data.common import MASK_ORDERS
from vlmdiff.data.registry import canonical_name

if TYPE_CHECKING:  # torch and the model stack are imported after parsing: --help needs neither
    import torch

log = logging.getLogger("test")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(p, folder=True)
    add_caption_args(p, split="test")
    r = p.add_argument_group("model and reconstruction")
    r.add_argument(
        "--resume_path",
        default=None,
        help="the trained VLMDiff checkpoint to test: a .ckpt, or a weights-only .safetensors from "
        "python -m vlmdiff.export (default: none; needed unless --run_eval_only)",
    )
    r.add_argument("--unsafe_legacy_pickle", action="store_true", help="allow arbitrary pickles (trusted files only)")
    r.add_argument("--ddim_steps", type=int, default=10, help="DDIM steps (10: timesteps 901, 801, ..., 1)")
    r.add_argument(
        "--noise_t", type=int, default=999, help="noise level of the input latent (DDIM steps <= it are run)"
    )
    r.add_argument(
        "--guidance_scale",
        type=float,
        default=9.0,
        help="classifier-free guidance scale (one pass when the caption is empty)",
    )
    r.add_argument("--seed", type=int, default=1, help="seeds each image's noise together with its id")
    r.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="images per forward pass")
    r.add_argument(
        "--num_workers", type=int, default=None, help="DataLoader workers (default: 4, at most the CPUs available)"
    )
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    r.add_argument(
        "--dist_timeout",
        type=float,
        default=distributed.DEFAULT_TIMEOUT_S,
        help="under torchrun/srun: seconds a process waits for the others (joining, and at the end of "
        "scoring) before it stops with an error",
    )
    r.add_argument(
        "--precision",
        default="32",
        type=short_precision,
        choices=("32", "bf16", "16"),
        help="32 is faithful; bf16 autocast roughly doubles GPU throughput (maps within ~1e-2); "
        "bf16-mixed, 16-mixed and 32-true are accepted for bf16, 16 and 32",
    )
    f = p.add_argument_group("anomaly maps")
    f.add_argument(
        "--feature_extractor",
        default=None,
        help="resnet50, dino_v1s8, ..., efficientnet_lite0 (default: resnet50, or DINO with --use_dino)",
    )
    f.add_argument("--use_dino", action="store_true", help="upstream's spelling: DINO features (with --dino_version)")
    f.add_argument(
        "--dino_version",
        default=None,
        choices=("v1s8", "v1s16", "v1b8", "v1b16", "v2s14", "v1r50"),
        help="DINO backbone for --use_dino (default: v1s8)",
    )
    f.add_argument(
        "--feature_weights", default=None, help="weights of the feature extractor (default: models/features/...)"
    )
    f.add_argument(
        "--feature_input_size",
        type=int,
        default=None,
        help="resize images to this square size before the feature extractor (default: the extractor's "
        "own, 224 for DINOv2, else the model's image size); the maps keep the image size",
    )
    f.add_argument("--sigma", type=float, default=5.0, help="Gaussian smoothing of the maps")
    f.add_argument(
        "--image_pooling",
        default="paper",
        choices=("paper", "ader", "max"),
        help="image score: paper = max after 8 x avgpool 8; ader = max after avgpool 16; max = the map's maximum",
    )
    f.add_argument("--map_dtype", default="float32", choices=("float32", "float16"), help="storage of the maps")
    e = p.add_argument_group("evaluation and output")
    e.add_argument(
        "--metrics_protocol",
        "--protocol",
        default="official",
        choices=("official", "legacy", "both"),
        help="official (scikit-learn, MVTec AU-PRO), legacy (upstream's metric code, the paper's table) or both",
    )
    e.add_argument(
        "--mask_threshold",
        type=float,
        default=0.0,
        help="ground truth = stored mask > this fraction of full scale (stored masks are 0/255 with "
        "--mask_order resize_first, soft 0..255 edges with binarize_first)",
    )
    e.add_argument(
        "--mask_order",
        default=MASK_ORDERS[0],
        choices=MASK_ORDERS,
        help="how masks reach the image size: resize_first (upstream's order) resizes the raw mask values "
        "(VisA: defect indexes 1..k) bilinearly, then takes > 0, which drops thin or tiny defects "
        "that round to 0; binarize_first takes > 0, then resizes (larger regions, keeps those defects). "
        "Recorded in manifest.json",
    )
    e.add_argument("--exp_name", default=None, help="run name (default: vlmdiff_{data_set})")
    e.add_argument("--output_dir", default=None, help="default: results/{exp_name}")
    e.add_argument(
        "--save_visuals",
        action="store_true",
        help="a titled strip per image in {output_dir}/visuals/: input | autoencoder | reconstruction | "
        "anomaly map | overlay | ground truth, 256 px per panel, one colour scale per class; and "
        "upstream's {name}-input/-reconstruction/-samples/-features.jpg and -heatmap.png in "
        "{output_dir}/log_image_{exp_name}/",
    )
    e.add_argument(
        "--threshold_from",
        default=None,
        metavar="RUN",
        help="with --data_set folder: label each image normal/anomalous with the F1-max thresholds "
        "recorded by the labelled test run RUN (its thresholds.json); also writes a mask PNG per image "
        "(default: none, scores only)",
    )
    e.add_argument("--no_report", action="store_true", help="do not build report.html at the end")
    e.add_argument(
        "--gallery_size",
        type=int,
        default=8,
        help="images per gallery of the report (false alarms, misses, best detections)",
    )
    e.add_argument("--start_ind", type=int, default=0, help="first test image (sorted by id) of this shard")
    e.add_argument(
        "--end_ind",
        type=int,
        default=-1,
        help="end (exclusive) of this shard; -1 or any end past the last image: the end",
    )
    e.add_argument("--run_eval_only", action="store_true", help="only merge stored maps and compute the metrics")
    add_progress_args(e)
    add_config_args(p, default=None)
    add_run_file_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags as given; :func:`resolve_defaults` fills in those worked out from the others."""
    return parse_with_run_file(build_parser(), argv)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the run name, the output folder and (unless --run_eval_only) the feature extractor, in place."""
    args.exp_name = args.exp_name or f"vlmdiff_{canonical_name(args.data_set)}"
    args.output_dir = str(Path(args.output_dir or Path("results") / args.exp_name))
    if not args.run_eval_only:
        from vlmdiff.features import resolve_extractor_name

        args.feature_extractor = resolve_extractor_name(args.feature_extractor, args.use_dino, args.dino_version)
    return args


def _device(name: str, local_rank: int) -> torch.device:
    import torch

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = resolve_defaults(parse_args(argv))
    if args.print_config:
        print_config(args, model=model_config_to_print(args, args.resume_path))
        return None
    setup_logging(args.verbose)
    _check_args(args)
    span = (0, None) if args.run_eval_only else (args.start_ind, None if args.end_ind < 0 else args.end_ind)
    job = "test.py evaluation" if args.run_eval_only else "test.py scoring"
    with claim_folder(_output_dir(args), job, "--output_dir", span, holder=distributed.detect_ranks().is_main):
        return run(args)


def _check_args(args: argparse.Namespace) -> None:
    """Flags that can be checked before any work."""
    if canonical_name(args.data_set) == "coco" and args.coco_part < 0:
        raise UserError("--data_set coco needs --coco_part 0..3")
    check_numbers(
        args,
        {
            "batch_size": ">= 1",
            "num_workers": ">= 0",
            "ddim_steps": ">= 1",
            "sigma": ">= 0",
            "mask_threshold": "[0, 1)",
            "feature_input_size": ">= 1",
            "gallery_size": ">= 1",
        },
    )
    dataset_name = canonical_name(args.data_set)
    if args.threshold_from and dataset_name != "folder":
        raise UserError(
            f"--threshold_from is for unlabelled images (--data_set folder); {dataset_name} has ground "
            "truth, so its run records thresholds itself"
        )
    if args.threshold_from:
        from vlmdiff.evaluation.run_folder import RunFolder

        given = Path(args.threshold_from)
        if not (RunFolder(given).thresholds if given.is_dir() else given).is_file():
            raise UserError(
                f"--threshold_from {given}: no {RunFolder.THRESHOLDS} there; evaluate a labelled test run first "
                "(test.py on mvtec/visa/... writes it)"
            )
    if not args.run_eval_only:
        _device(args.device, 0)


def _output_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir or Path("results") / (args.exp_name or f"vlmdiff_{canonical_name(args.data_set)}"))


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Score (unless --run_eval_only) and evaluate, in the output folder main() holds."""
    from utils.provenance import provenance
    from vlmdiff.evaluation.evaluate import evaluate_run, label_run
    from vlmdiff.evaluation.map_store import MapStore
    from vlmdiff.evaluation.report_page import build_report
    from vlmdiff.evaluation.run_folder import RunFolder
    from vlmdiff.evaluation.run_inputs import check_coverage, check_data, check_stored_settings, maps_settings
    from vlmdiff.evaluation.thresholds import load_thresholds

    dataset_name = canonical_name(args.data_set)
    exp_name = args.exp_name or f"vlmdiff_{dataset_name}"
    output_dir = _output_dir(args)
    folder = RunFolder(output_dir)
    has_truth = dataset_name != "folder"
    ranks = distributed.detect_ranks()
    records = _index(args, dataset_name)
    # upstream's README passes --start_ind 0 --end_ind 120000 for a whole test set: that is no shard
    sharded = args.start_ind != 0 or 0 <= args.end_ind < len(records)
    if not args.run_eval_only:
        _score(args, dataset_name, exp_name, output_dir, ranks, records)
        if ranks.world > 1:
            distributed.barrier()
        if not ranks.is_main:
            distributed.finish()
            return None
        if sharded:
            log.info(
                "shard [%d, %s) done; when every shard is done run with --run_eval_only",
                args.start_ind,
                "end" if args.end_ind < 0 else args.end_ind,
            )
            return None
    elif not folder.manifest.is_file():
        raise UserError(
            f"--run_eval_only: {output_dir} holds no test run (no {RunFolder.MANIFEST}); check --output_dir"
        )
    else:
        parser, made_by = build_parser(), read_json(folder.manifest)
        given = {k: v for k, v in vars(args).items() if v != parser.get_default(k)}  # what this command sets
        if {"feature_extractor", "use_dino", "dino_version"} & given.keys():
            from vlmdiff.features import resolve_extractor_name

            given["feature_extractor"] = resolve_extractor_name(
                args.feature_extractor, args.use_dino, args.dino_version
            )
        check_stored_settings(output_dir, made_by, given, args.resume_path)
        check_data(output_dir, records)
    check_coverage(MapStore(folder.maps), [r.id for r in records], output_dir)
    visuals = folder.panels.is_dir()
    image_paths = {r.id: str(r.image_path) for r in records}
    made_by = read_json(folder.manifest)  # the scoring run's settings (also for --run_eval_only)
    if not has_truth:
        thresholds = load_thresholds(args.threshold_from, args.image_pooling, made_by) if args.threshold_from else None
        path = label_run(output_dir, args.image_pooling, image_paths, visuals, thresholds)
        report = None if args.no_report else build_report(output_dir, gallery_size=args.gallery_size)
        print(
            f"image scores: {path}\nmaps: {folder.maps}"
            + (f"\nvisuals: {folder.visuals}" if visuals else "")
            + (f"\nreport: {report}" if report else "")
        )
        distributed.finish()
        return None
    seed = made_by.get("reconstruction", {}).get("seed", args.seed)
    if args.mask_threshold > 0 and made_by.get("data", {}).get("mask_order") == "resize_first":
        log.warning(
            "--mask_threshold %g changes nothing: the stored masks are 0/255 (--mask_order resize_first)",
            args.mask_threshold,
        )
    extra = {
        "provenance": provenance(
            seed=seed,
            config=made_by.get("config"),
            checkpoint=made_by.get("checkpoint"),
            data_set=dataset_name,
            data_path=str(args.data_path),
        ),
        "maps": maps_settings(made_by),  # what the evaluated maps were made with (not this command's flags)
    }
    result = evaluate_run(
        output_dir,
        args.metrics_protocol,
        args.image_pooling,
        args.mask_threshold,
        visuals,
        dataset_name,
        extra,
        image_paths,
    )
    report = (
        None
        if args.no_report
        else build_report(
            output_dir, "both" if args.metrics_protocol == "both" else None, gallery_size=args.gallery_size
        )
    )
    print(folder.metrics_md.read_text())
    print(
        f"metrics: {folder.metrics_json} (also metrics.csv, metrics.md)\nmaps: {folder.maps}"
        + (f"\nvisuals: {folder.visuals}" if visuals else "")
        + (f"\nreport: {report}" if report else "")
    )
    distributed.finish()
    return result


def _index(args: argparse.Namespace, dataset_name: str):
    from vlmdiff.data import index_dataset

    records = sorted(
        index_dataset(dataset_name, args.data_path, "test", classes=args.classes, coco_part=coco_part(args)),
        key=lambda r: r.id,
    )
    if not records:
        raise UserError(f"no test images found in {args.data_path} for --data_set {args.data_set}")
    return records


def _score(
    args: argparse.Namespace,
    dataset_name: str,
    exp_name: str,
    output_dir: Path,
    ranks: distributed.Ranks,
    records: list,
) -> None:
    import torch

    from ldm.checkpoint import DIGEST_KEY
    from ldm.config import to_dict
    from vlmdiff.checkpoint import load_vlmdiff
    from vlmdiff.data import AnomalyDataset, match_captions
    from vlmdiff.evaluation.map_store import MapStore
    from vlmdiff.evaluation.run_folder import RunFolder
    from vlmdiff.evaluation.run_inputs import (
        captions_record,
        check_manifest,
        data_fingerprint,
        manifest_for,
        source_files,
    )
    from vlmdiff.features import build_feature_extractor, resolve_extractor_name
    from vlmdiff.inference import ScoringOptions, score_images, shard_indices
    from vlmdiff.reconstruction import ReconstructionSettings

    if not args.resume_path:
        raise UserError("--resume_path (the trained checkpoint) is required unless --run_eval_only")
    device = _device(args.device, ranks.local_rank)
    distributed.init(ranks, device, args.dist_timeout)
    settings = ReconstructionSettings(args.ddim_steps, args.noise_t, args.guidance_scale, 0.0, args.seed)
    extractor_name = resolve_extractor_name(args.feature_extractor, args.use_dino, args.dino_version)
    # Captions, the test files and the (small) feature extractor are checked before the large checkpoint is read.
    captions = load_split_captions(args, "test")  # None without --use_captions: every caption is ""
    matched = {} if captions is None else match_captions(records, captions, root=Path(args.data_path), require=True)
    sources = source_files(records)  # each map's chunk records them; a resumed run checks them
    extractor = build_feature_extractor(extractor_name, args.feature_weights, input_size=args.feature_input_size)
    model, info = load_vlmdiff(args.resume_path, args.config, args.overrides, args.unsafe_legacy_pickle)
    settings.check(model.num_timesteps)
    model.eval().to(device)
    extractor.eval().to(device)
    dataset = AnomalyDataset(records, image_size=model.cfg.image_size, captions=matched, mask_order=args.mask_order)
    data = {
        "data_set": dataset_name,
        "data_path": str(Path(args.data_path).resolve()),
        "coco_part": args.coco_part,
        "classes": args.classes,
        "test_captions": captions is not None,
        "captions": captions_record(None if captions is None else matched, captions),
        "image_size": model.cfg.image_size,
        "n_images": len(records),
        "mask_order": args.mask_order,
        "fingerprint": data_fingerprint(records),
    }
    manifest = manifest_for(
        checkpoint=args.resume_path,
        checkpoint_digest=info[DIGEST_KEY],
        config=to_dict(model.cfg),
        reconstruction=asdict(settings),
        extractor=extractor_name,
        extractor_weights=args.feature_weights,
        extractor_input_size=args.feature_input_size,
        data=data,
        map_dtype=args.map_dtype,
        sigma=args.sigma,
        precision=args.precision,
    )
    if args.threshold_from:  # refuse thresholds of another model or settings before scoring, not after
        from vlmdiff.evaluation.thresholds import load_thresholds

        load_thresholds(args.threshold_from, args.image_pooling, manifest)
    if ranks.is_main:
        check_manifest(output_dir, manifest)
    distributed.barrier()
    if not ranks.is_main:
        check_manifest(output_dir, manifest)
    indices = shard_indices(
        len(records), args.start_ind, None if args.end_ind < 0 else args.end_ind, ranks.rank, ranks.world
    )
    autocast = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]
    folder = RunFolder(output_dir)
    store = MapStore(folder.maps, dtype=args.map_dtype)
    visuals = folder.panels if args.save_visuals else None
    upstream_visuals = folder.log_images(exp_name) if args.save_visuals else None
    options = ScoringOptions(
        batch_size=args.batch_size,
        num_workers=data_workers(args.num_workers, 4),
        device=device,
        sigma=args.sigma,
        pooling=args.image_pooling,
        autocast_dtype=autocast,
        visuals=visuals,
        upstream_visuals=upstream_visuals,
        progress=ranks.is_main,
        bar=not args.no_progress_bar,
        log_interval=args.log_interval,
    )
    n = score_images(model, extractor, dataset, indices, store, settings, options, sources=sources)
    log.info("rank %d scored %d images with %s features", ranks.rank, n, extractor_name)


if __name__ == "__main__":
    sys.exit(run_main(main))
