"""Stage 1: caption the train and test images of a dataset with a vision-language model.

Writes upstream's caption files into the output folder, by default
``{dataset}_captions_{vlm}_{prompt_type}`` beside the dataset root:
``{split}_captions_{dataset}_{vlm}.json`` + ``{split}_labels_{dataset}_{vlm}.json`` (ids: path
relative to the root; absolute paths for Real-IAD, as upstream). COCO-AD captions go to
``{data_path}/annotations/captions_{train|val}2017_{vlm}.json`` (COCO caption format).

Captioners (--vlm_model; a short name, its hub id, or a local folder named like the hub id picks the
backend that reproduces the paper's captions):
  internvl    OpenGVLab/InternVL2-8B, its remote code (trust_remote_code), bf16, dynamic 448 px tiling
              (up to 12 tiles + a thumbnail), chat, greedy, up to 1024 new tokens
  blip        Salesforce/blip2-flan-t5-xxl decoded as LAVIS blip2_t5 generate: 5 beams, at most 30
              new tokens, min length 1
  deepseekvl  deepseek-ai/deepseek-vl-1.3b-chat through LMDeploy (pip install lmdeploy), prompt
              "{prompt} <IMAGE_TOKEN>", greedy, up to 512 new tokens
  llava       llava-hf/llama3-llava-next-8b-hf (LLaVA-NeXT Llama-3-8B), greedy, 256 new tokens
  template    deterministic descriptions from the class name and image statistics, offline and fast
Any other folder or hub id of an image-text-to-text model runs in the ``hf`` backend (chat template,
greedy); --backend forces a backend (e.g. internvl for another InternVL2 size). File names carry the
model actually used: the short names above, else the sanitised model name (or --vlm_name). A model
must be a local folder or in the Hugging Face cache when the hub is offline (HF_HUB_OFFLINE=1) or
unreachable; otherwise the run stops at once saying where to put it.

Progress is appended to ``{output}/progress/*.jsonl`` one fsynced line per image, so a killed run
loses at most the image in flight: rerun the same command to resume. Split the work with
``--start_ind/--end_ind`` (indexes into the sorted image list, train images then test images, end
exclusive); once every image of a split has a caption its upstream files are written (or run
``--merge`` after the shards finish). Under ``torchrun`` or SLURM each process takes every
world-size-th image of the shard and writes its own progress file; the last one to finish merges.

Example: python captioner.py --data_set mvtec --data_path data/mvtec --vlm_model models/InternVL2-8B
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.cli import HelpFormatter, add_run_file_args, parse_with_run_file, print_config, run_main, setup_logging
from utils.errors import UserError
from utils.progress import add_progress_args
from vlmdiff.cli import add_data_args
from vlmdiff.distributed import detect_ranks
from vlmdiff.vlm_backends import BACKENDS

logger = logging.getLogger("captioner")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_data_args(
        p,
        required=True,
        coco_part_help="COCO-AD part whose images to caption (-1: every meta_20_*.json present)",
        classes=False,
    )
    p.add_argument(
        "--vlm_model",
        default="internvl",
        help="internvl, blip, deepseekvl, llava, template, or a local model folder / hub id",
    )
    p.add_argument("--prompt_type", default="pd", choices=["pd", "pa"], help="pd: describe; pa: defect inspector")
    p.add_argument("--start_ind", type=int, default=0, help="first image of this shard (sorted list)")
    p.add_argument(
        "--end_ind",
        type=int,
        default=None,
        help="end of this shard, exclusive; -1 also means the end (default: the end)",
    )
    p.add_argument(
        "--caption_folder",
        default=None,
        help="output folder (upstream's name for it; same as --output; default: as --output)",
    )
    p.add_argument(
        "--output",
        default=None,
        help="output folder (default: {dataset}_captions_{vlm}_{prompt_type} beside the dataset root)",
    )
    p.add_argument(
        "--backend",
        default=None,
        choices=tuple(BACKENDS),
        help="caption backend (default: the paper's backend for internvl/blip/deepseekvl, template for "
        "--vlm_model template, else hf)",
    )
    p.add_argument("--vlm_name", default=None, help="short model token in file names (default: from --vlm_model)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="dtype of the VLM (auto: float32 on CPU, bfloat16 on GPUs that have it, else float16)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch_size", type=int, default=1, help="images per VLM call")
    p.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="longest caption in tokens (default: internvl 1024, blip 30, deepseekvl 512, llava 256, "
        "other models 1024)",
    )
    p.add_argument("--split", default="both", choices=["train", "test", "both"], help="which images to caption")
    p.add_argument("--merge", action="store_true", help="only merge the progress files into the upstream files")
    p.add_argument("--delay_per_image", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: slow down
    add_progress_args(p)
    add_run_file_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = parse_with_run_file(p, argv)
    if args.end_ind is not None and args.end_ind == -1:
        args.end_ind = None
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        p.error("--batch_size and --max_new_tokens must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    from vlmdiff import captioning as cap
    from vlmdiff.data.captions import caption_folder_name
    from vlmdiff.data.registry import canonical_name
    from vlmdiff.vlm_backends import build_backend, default_backend

    args = parse_args(argv)
    if args.print_config:
        print_config(args)
        return
    setup_logging(args.verbose)
    dataset = canonical_name(args.data_set)
    root = Path(args.data_path)
    backend_name = args.backend or default_backend(args.vlm_model)
    vlm = cap.check_vlm_name(args.vlm_name or cap.derive_vlm_name(args.vlm_model, backend_name))
    if args.output and args.caption_folder and Path(args.output) != Path(args.caption_folder):
        raise UserError(f"--output {args.output} and --caption_folder {args.caption_folder} differ; give one")
    output = Path(
        args.output
        or args.caption_folder
        or Path(root).absolute().parent / caption_folder_name(dataset, vlm, args.prompt_type)
    )
    splits = ["train", "test"] if args.split == "both" else [args.split]
    jobs = cap.plan_jobs(dataset, root, splits, args.coco_part)
    mine = cap.shard(jobs, args.start_ind, args.end_ind)
    ranks = detect_ranks()  # under torchrun/SLURM each process takes every world-th image of the shard
    mine = mine[ranks.rank :: ranks.world]
    done = cap.read_progress(output, dataset, vlm, args.prompt_type)
    if args.merge:
        for split in splits:
            cap.merge_split(output, root, dataset, vlm, split, jobs, done, strict=True)
        return
    todo = [j for j in mine if (j.split, j.record.id) not in done]
    logger.info(
        "%d images in %s, %d in this shard, %d already captioned, %d to do; output %s",
        len(jobs),
        root,
        len(mine),
        len(mine) - len(todo),
        len(todo),
        output,
    )
    n = 0
    if todo:
        prompt = cap.prompt_for(dataset, args.prompt_type)
        device = f"cuda:{ranks.local_rank}" if args.device == "auto" and ranks.world > 1 else args.device
        backend = build_backend(
            backend_name, args.vlm_model, prompt, args.dtype, device, args.max_new_tokens, args.prompt_type
        )
        writer = cap.ProgressWriter(
            cap.progress_file(
                output, dataset, vlm, args.prompt_type, args.start_ind, args.end_ind, ranks.rank, ranks.world
            )
        )
        meta = {"dataset": dataset, "vlm": vlm, "prompt_type": args.prompt_type}
        try:
            n = cap.caption_jobs(
                todo,
                backend,
                writer,
                meta,
                args.batch_size,
                args.delay_per_image,
                bar=not args.no_progress_bar,
                log_interval=args.log_interval,
            )
        finally:
            writer.close()
        done = cap.read_progress(output, dataset, vlm, args.prompt_type)
    merged = [split for split in splits if cap.merge_split(output, root, dataset, vlm, split, jobs, done, strict=False)]
    logger.info(
        "done: %d images captioned by this process (progress files in %s); caption files of %s written",
        n,
        cap.progress_dir(output),
        " and ".join(merged) if merged else "no split yet",
    )


if __name__ == "__main__":
    sys.exit(run_main(main))
