"""``scripts/reproduce.py``: one command from images to a paper table (see that script's help)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ldm.config import to_dict
from utils.errors import UserError
from utils.io import write_text
from vlmdiff.pipeline.plan import Job, build_plan, command_line, pending
from vlmdiff.pipeline.recipe import Recipe, Resources, load_recipe

log = logging.getLogger(__name__)


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"reproduce_{recipe.name}"


def resources_text(r: Resources) -> str:
    gpus = f"--gres=gpu:{r.gpus} " if r.gpus else ""
    part = f" --partition={r.partition}" if r.partition else ""
    requeue = " --requeue" if r.requeue else ""
    return f"{gpus}--cpus-per-task={r.cpus} --mem={r.mem_gb}G --time={r.time}{part}{requeue}"


def plan_text(recipe: Recipe, jobs: list[Job], run: Path, launcher: str) -> str:
    """The plan as --dry_run prints it: jobs, command lines, resources, dependencies, GPU-hours."""
    from vlmdiff.pipeline.compute import estimate, format_estimates

    estimates = estimate(recipe)
    hours = {(e.stage, e.part): e.hours for e in estimates}
    todo = {j.key for j in pending(jobs)}
    lines = [
        f"recipe {recipe.name}: {recipe.description}",
        f"run folder {run}; launcher {launcher}; {len(jobs)} jobs, {len(todo)} to run "
        f"({len(jobs) - len(todo)} complete and skipped)",
        "",
    ]
    for job in jobs:
        state = "to run" if job.key in todo else "complete: skipped"
        after = ", ".join(job.after) if job.after else "none"
        lines.append(
            f"[{job.key}] {job.stage} ({state}); after: {after}"
            if launcher == "slurm"
            else f"[{job.key}] {job.stage} ({state})"
        )
        if launcher == "slurm":
            lines.append(
                f"  sbatch {resources_text(job.resources)}"
                + (f" --array=0-{len(job.shards) - 1}" if job.shards else "")
            )
        if job.shards:
            lines.append("  shards (start, end): " + ", ".join(f"{s}:{e}" for s, e in job.shards))
        h = hours.get((job.stage, job.part))
        if h:
            lines.append("  estimated GPU-hours: " + ", ".join(f"{v:,.2f} {k}" for k, v in h.items()))
        for i, argv in enumerate(job.commands):
            extra = f" [{job.resume_if[1]} when {job.resume_if[0]} exists]" if i == 0 and job.resume_if else ""
            lines.append("  $ " + command_line(argv) + extra)
    lines += ["", format_estimates(recipe, estimates)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Do what the command line asks: --status, --dry_run, or run/submit the unfinished jobs."""
    from vlmdiff.pipeline import launchers

    if args.status is not None and (args.status or args.run_dir) and not args.recipe:
        run_dir = Path(args.status or args.run_dir)
        if not run_dir.is_dir():
            raise UserError(f"--status {run_dir}: no such run folder")
        print(launchers.status_line(run_dir))
        return 0
    if not args.recipe:
        raise UserError("give --recipe NAME (mvtec, visa, realiad, coco, tiny or a .yaml file), or --status RUN")
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(recipe)
    if args.status is not None:
        print(launchers.status_line(Path(args.status or run_dir)))
        return 0
    jobs = build_plan(recipe, run_dir, args.launcher)
    if args.dry_run:
        print(plan_text(recipe, jobs, run_dir, args.launcher))
        return 0
    if run_dir.is_dir():
        previous = launchers.status_line(run_dir)
        if previous.startswith("FAILED"):
            log.warning("the previous attempt: %s", previous)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "recipe.yaml", OmegaConf.to_yaml(to_dict(recipe)))
    todo = pending(jobs)
    skipped = [j.key for j in jobs if j not in todo]
    if skipped:
        log.info("complete, skipped: %s", ", ".join(skipped))
    if not todo:
        log.info("nothing to do: every stage is complete; paper table %s", run_dir / "paper_table.md")
        return 0
    if args.launcher == "local":
        launchers.run_local(todo, run_dir, recipe.threads)
        print((run_dir / "paper_table.md").read_text())
    else:
        done = {j.key for j in jobs if j not in todo}
        record = launchers.submit_slurm(todo, run_dir, recipe.name, done, recipe.threads)
        print(f"submitted {len(record['jobs'])} jobs (ids in {run_dir / launchers.JOBS_FILE}); ")
        print(f"follow with: python scripts/reproduce.py --status {run_dir}")
    return 0
