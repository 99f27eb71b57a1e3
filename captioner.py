"""Stage 1: caption the train and test images of a dataset with a vision-language model.

Writes upstream's caption files (DESIGN.md section 7) into the output folder, by default
``{dataset}_captions_{vlm}_{prompt_type}`` beside the dataset root:
``{split}_captions_{dataset}_{vlm}.json`` + ``{split}_labels_{dataset}_{vlm}.json`` (ids: path
relative to the root; absolute paths for Real-IAD, as upstream). COCO-AD captions go to
``{data_path}/annotations/captions_{train|val}2017_{vlm}.json`` (COCO caption format).

Backends: ``--backend hf`` loads any image-text-to-text model of ``transformers`` (a local folder or
a hub id; short names internvl/blip/deepseekvl map to native checkpoints) and decodes greedily;
``--backend template`` (or ``--vlm_model template``) writes deterministic descriptions from the class
name and image statistics, offline and fast.

Progress is appended to ``{output}/progress/*.jsonl`` one fsynced line per image, so a killed run
loses at most the image in flight: rerun the same command to resume. Split the work with
``--start_ind/--end_ind`` (indexes into the sorted image list, train images then test images, end
exclusive); once every image of a split has a caption its upstream files are written (or run
``--merge`` after the shards finish). Under ``torchrun`` or SLURM each process takes every
world-size-th image of the shard and writes its own progress file; the last one to finish merges.

Example: python captioner.py --data_set mvtec --data_path data/mvtec --vlm_model models/InternVL3-8B-hf
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from utils.cli import run_main, setup_logging
from utils.errors import UserError
from utils.progress import add_progress_args
from vlmdiff.distributed import detect_ranks

logger = logging.getLogger("captioner")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_set", required=True, choices=["mvtec", "visa", "realiad", "real_iad", "coco"])
    p.add_argument("--data_path", required=True, help="dataset root")
    p.add_argument("--coco_part", type=int, default=-1, choices=[-1, 0, 1, 2, 3],
                   help="COCO-AD part whose images to caption (-1: every meta_20_*.json present)")
    p.add_argument("--vlm_model", default="internvl",
                   help="local model folder or hub id; internvl/blip/deepseekvl; 'template' = template backend")
    p.add_argument("--prompt_type", default="pd", choices=["pd", "pa"], help="pd: describe; pa: defect inspector")
    p.add_argument("--start_ind", type=int, default=0, help="first image of this shard (sorted list)")
    p.add_argument("--end_ind", type=int, default=None, help="end of this shard, exclusive (default/-1: to the end)")
    p.add_argument("--caption_folder", default=None, help="output folder (upstream's name for it; same as --output)")
    p.add_argument("--output", default=None, help="output folder (default: {dataset}_captions_{vlm}_{prompt_type} "
                                                  "beside the dataset root)")
    p.add_argument("--backend", default=None, choices=["hf", "template"], help="default: hf, template for "
                                                                                "--vlm_model template")
    p.add_argument("--vlm_name", default=None, help="short model token in file names (default: from --vlm_model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=1024, help="upstream InternVL used 1024")
    p.add_argument("--split", default="both", choices=["train", "test", "both"])
    p.add_argument("--merge", action="store_true", help="only merge the progress files into the upstream files")
    p.add_argument("--delay_per_image", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow down
    p.add_argument("--no_progress_bar", action="store_true", help="plain progress lines instead of the bar")
    add_progress_args(p)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.end_ind is not None and args.end_ind == -1:
        args.end_ind = None
    if args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--batch_size and --max_new_tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from vlmdiff import captioning as cap
    from vlmdiff.data.captions import caption_folder_name
    from vlmdiff.data.registry import canonical_name

    args = parse_args(argv)
    setup_logging(args.verbose)
    dataset = canonical_name(args.data_set)
    root = Path(args.data_path)
    backend_name = args.backend or ("template" if args.vlm_model == "template" else "hf")
    vlm = cap.check_vlm_name(args.vlm_name or cap.derive_vlm_name(args.vlm_model, backend_name))
    if args.output and args.caption_folder and Path(args.output) != Path(args.caption_folder):
        raise UserError(f"--output {args.output} and --caption_folder {args.caption_folder} differ; give one")
    output = Path(args.output or args.caption_folder or
                  Path(root).absolute().parent / caption_folder_name(dataset, vlm, args.prompt_type))
    splits = ["train", "test"] if args.split == "both" else [args.split]
    jobs = cap.plan_jobs(dataset, root, splits, args.coco_part)
    mine = cap.shard(jobs, args.start_ind, args.end_ind)
    ranks = detect_ranks()  # under torchrun/SLURM each process takes every world-th image of the shard
    mine = mine[ranks.rank::ranks.world]
    done = cap.read_progress(output, dataset, vlm, args.prompt_type)
    if args.merge:
        for split in splits:
            cap.merge_split(output, root, dataset, vlm, split, jobs, done, strict=True)
        return
    todo = [j for j in mine if (j.split, j.record.id) not in done]
    logger.info("%d images in %s, %d in this shard, %d already captioned, %d to do; output %s",
                len(jobs), root, len(mine), len(mine) - len(todo), len(todo), output)
    n = 0
    if todo:
        prompt = cap.prompt_for(dataset, args.prompt_type)
        if backend_name == "template":
            backend = cap.TemplateBackend(args.prompt_type)
        else:
            device = f"cuda:{ranks.local_rank}" if args.device == "auto" and ranks.world > 1 else args.device
            backend = cap.HFBackend(args.vlm_model, prompt, args.dtype, device, args.max_new_tokens)
        writer = cap.ProgressWriter(cap.progress_file(output, dataset, vlm, args.prompt_type, args.start_ind,
                                                      args.end_ind, ranks.rank, ranks.world))
        meta = {"dataset": dataset, "vlm": vlm, "prompt_type": args.prompt_type}
        try:
            n = cap.caption_jobs(todo, backend, writer, meta, args.batch_size, args.delay_per_image,
                                 bar=not args.no_progress_bar, log_interval=args.log_interval)
        finally:
            writer.close()
        done = cap.read_progress(output, dataset, vlm, args.prompt_type)
    merged = [split for split in splits if cap.merge_split(output, root, dataset, vlm, split, jobs, done, strict=False)]
    logger.info("done: %d images captioned by this process (progress files in %s); caption files of %s written",
                n, cap.progress_dir(output), " and ".join(merged) if merged else "no split yet")


if __name__ == "__main__":
    sys.exit(run_main(main))
