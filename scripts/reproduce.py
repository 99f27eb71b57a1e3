"""Reproduce a paper table with one command: captions, autoencoder, build, train, test, paper table.

A recipe (configs/recipes/NAME.yaml: mvtec, visa, realiad, coco, tiny) holds every stage's settings as
the paper uses them and each stage's cluster resources; an OmegaConf dotlist at the end of the command
line overrides any key (train.epochs=10, test.shards=8, train.resources.gpus=4).

  python scripts/reproduce.py --recipe mvtec --dry_run                  # the plan, GPU-hour estimates
  python scripts/reproduce.py --recipe mvtec                            # run it here, stage after stage
  python scripts/reproduce.py --recipe mvtec --launcher slurm           # submit it as SLURM jobs
  python scripts/reproduce.py --status runs/reproduce_mvtec             # the failed stage, its job and log

Stages whose outputs are already complete (checked: caption files cover every image, checkpoints are
readable, the test metrics come from the current checkpoint) are skipped, so rerunning the same command
continues where a failed run stopped. With --launcher slurm each stage is one sbatch job (scripts kept
in RUN/jobs/, logs in RUN/logs/, ids in RUN/jobs.json) chained by afterok dependencies; the test is a job
array of shards followed by one job that merges them and writes RUN/paper_table.{md,csv,html}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="mvtec, visa, realiad, coco, tiny, or a recipe .yaml file")
    p.add_argument("--run_dir", help="run folder (default: runs/reproduce_{recipe})")
    p.add_argument(
        "--launcher",
        choices=("local", "slurm"),
        default="local",
        help="local: run the stages here in order (default); slurm: submit them as sbatch jobs",
    )
    p.add_argument("--dry_run", action="store_true", help="print the plan and GPU-hour estimates; write nothing")
    p.add_argument(
        "--status",
        nargs="?",
        const="",
        metavar="RUN",
        help="say in one line how the run in RUN (or --run_dir, or the recipe's default) stands: "
        "the failed stage, its job id and log",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.epochs=10")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from utils.cli import setup_logging
    from vlmdiff.pipeline.reproduce import run

    setup_logging(args.verbose)
    return run(args)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from utils.cli import run_main

    sys.exit(run_main(main))
