"""The plan of a recipe: its jobs in order, each with the stage scripts' real command lines.

Stages: (tiny recipe only: the demo data), captions, autoencoder finetuning (one per COCO-AD part),
build, train, test (on SLURM: a job array of shards, then a merge job), and the paper-table report.
Each job knows its outputs and checks whether they are already complete (``Job.done``), so a rerun
continues where an earlier one stopped.

Run folder layout (``RUN``)::

    RUN/recipe.yaml                       the resolved recipe
    RUN/autoencoder[_partP]/autoencoder.ckpt
    RUN/models/vlmdiff[_partP].ckpt       the assembled starting checkpoint
    RUN/train/ckpt_{exp}/model_epoch=NNN.ckpt, last.ckpt
    RUN/results/{exp}/metrics.json ...    test.py's run folder (maps, metrics, report.html)
    RUN/paper_table.{md,csv,html}
    RUN/jobs/NN_stage.sbatch, RUN/jobs.json, RUN/logs/, RUN/status/   (SLURM)
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vlmdiff.pipeline.recipe import Recipe, Resources, accumulation

log = logging.getLogger(__name__)

STAGES = ("demo", "captions", "captions_merge", "autoencoder", "build", "train", "test", "merge", "report")


@dataclass
class Job:
    """One job: commands run in order (argv lists; the first item is a script or ``-m module``)."""

    key: str  # unique, file-name safe: "05_train_part0"
    stage: str
    part: int | None
    commands: list[list[str]]
    resources: Resources
    after: list[str] = field(default_factory=list)  # keys of the jobs it waits for
    shards: list[tuple[int, int]] = field(default_factory=list)  # array job: (start, end) per task; {start} {end}
    resume_if: tuple[str, str] | None = None  # (file, flag): add flag to the first command when file exists
    check: Callable[[], str | None] | None = None  # None when complete, else why not (see done())
    gpu_hours: float = 0.0

    def done(self) -> bool:
        return self.check is not None and self.check() is None

    def why_not_done(self) -> str:
        return "no check" if self.check is None else (self.check() or "complete")


def command_line(argv: list[str], python: str = "python") -> str:
    """The shell command of an argv list as the plan prints it."""
    return " ".join(shlex.quote(a) if not a.startswith("{") else a for a in [python, *argv])


# ------------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class RunPaths:
    run: Path
    name: str

    def exp(self, part: int | None) -> str:
        return self.name if part is None else f"{self.name}_part{part}"

    def ae_dir(self, part: int | None) -> Path:
        return self.run / ("autoencoder" if part is None else f"autoencoder_part{part}")

    def assembled(self, part: int | None) -> Path:
        return self.run / "models" / ("vlmdiff.ckpt" if part is None else f"vlmdiff_part{part}.ckpt")

    def ckpt_dir(self, part: int | None) -> Path:
        return self.run / "train" / f"ckpt_{self.exp(part)}"

    def results(self, part: int | None) -> Path:
        return self.run / "results" / self.exp(part)


def fill(value: str, run: Path, part: int | None = None) -> str:
    """``{run}`` and ``{part}`` in a recipe path."""
    return value.replace("{run}", str(run)).replace("{part}", "" if part is None else str(part))


def final_checkpoint(paths: RunPaths, recipe: Recipe, part: int | None) -> Path:
    """The trained checkpoint the test uses: the last epoch's ``model_epoch=NNN.ckpt`` (0-based NNN)."""
    return paths.ckpt_dir(part) / f"model_epoch={recipe.train.epochs - 1:03d}.ckpt"


# ------------------------------------------------------------------------------------------- the plan
def build_plan(recipe: Recipe, run: Path, launcher: str) -> list[Job]:
    """The jobs of ``recipe`` in order; ``launcher`` "slurm" shards the test into an array plus a merge job."""
    from vlmdiff.pipeline import checks

    run = Path(run)
    paths = RunPaths(run, recipe.name)
    data = recipe.data
    ds = data.data_set
    data_path = fill(data.data_path, run)
    parts: list[int | None] = list(data.coco_parts) or [None]
    jobs: list[Job] = []
    counter = iter(range(1, 1000))

    def add(stage: str, part: int | None, commands: list[list[str]], res: Resources, after: list[Job], **kw) -> Job:
        suffix = "" if part is None else f"_part{part}"
        job = Job(f"{next(counter):02d}_{stage}{suffix}", stage, part, commands, res, [j.key for j in after], **kw)
        jobs.append(job)
        return job

    first: list[Job] = []
    if recipe.demo.enabled:
        d = recipe.demo
        argv = ["-m", "vlmdiff.pipeline.demo_assets", "--output", str(run), "--data", data_path]
        argv += ["--classes", *d.classes, "--n_train", str(d.n_train), "--n_test_good", str(d.n_test_good)]
        argv += ["--n_test_defect", str(d.n_test_defect), "--image_size", str(d.image_size)]
        argv += ["--seed", str(d.seed), "--config", d.config, "--sd_path", fill(recipe.build.sd_path, run)]
        first = [
            add(
                "demo",
                None,
                [argv],
                d.resources,
                [],
                check=lambda: checks.demo_done(Path(data_path), Path(fill(recipe.build.sd_path, run))),
            )
        ]

    # ---- captions (train and test images; COCO-AD: every part's images, one file per COCO split)
    c = recipe.captions
    cap_folder = fill(c.folder, run) if c.folder else None
    argv = ["captioner.py", "--data_set", ds, "--data_path", data_path, "--vlm_model", c.vlm_model]
    argv += ["--prompt_type", c.prompt_type, "--split", "both", "--batch_size", str(c.batch_size)]
    argv += ["--device", c.device, "--no_progress_bar"]
    if cap_folder and ds != "coco":
        argv += ["--output", cap_folder]
    argv += list(c.extra_args)
    cap_done = lambda: checks.captions_done(  # noqa: E731
        ds, Path(data_path), c.vlm_model, c.prompt_type, cap_folder, c.caption_model
    )
    if launcher == "slurm" and c.shards > 1:
        n_images = c.images or sum(data.train_images) + sum(data.test_images)
        shard_job = add(
            "captions",
            None,
            [argv + ["--start_ind", "{start}", "--end_ind", "{end}"]],
            c.resources,
            first,
            shards=_shards(n_images, c.shards),
            check=cap_done,
        )
        captions = add("captions_merge", None, [argv + ["--merge"]], c.merge_resources, [shard_job], check=cap_done)
    else:
        captions = add("captions", None, [argv], c.resources, first, check=cap_done)

    caption_args = ["--vlm_model", c.vlm_model, "--prompt_type", c.prompt_type]
    caption_args += ["--caption_model", c.caption_model] if ds == "coco" else []
    caption_args += ["--caption_folder", cap_folder] if cap_folder and ds != "coco" else []
    tests: list[Job] = []
    accum = accumulation(recipe.train)
    for part in parts:
        part_args = ["--coco_part", str(part)] if part is not None else []
        # ---- autoencoder (one per data set and per COCO-AD part)
        a = recipe.autoencoder
        if a.checkpoint:
            ae_ckpt = Path(fill(a.checkpoint, run, part))
            ae_after = first
        else:
            ae_dir = paths.ae_dir(part)
            ae_ckpt = ae_dir / "autoencoder.ckpt"
            argv = ["finetune_autoencoder.py", "--data_set", ds, "--data_path", data_path, *part_args]
            argv += ["--config", a.config, "--resume_path", fill(a.resume_path, run)]
            if a.perceptual_weight > 0:
                argv += ["--vgg_weights", fill(a.vgg_weights, run)]
            argv += ["--perceptual_weight", str(a.perceptual_weight), "--max_steps", str(a.max_steps)]
            argv += ["--batch_size", str(a.batch_size), "--accumulate_grad_batches", str(a.accumulate_grad_batches)]
            argv += ["--base_lr", str(a.base_lr), "--precision", a.precision, "--seed", str(a.seed)]
            argv += ["--devices", "1", "--output_dir", str(ae_dir), "--no_progress_bar", *a.extra_args]
            ae_job = add(
                "autoencoder",
                part,
                [argv],
                a.resources,
                first,
                resume_if=(str(ae_dir / "checkpoints" / "last.ckpt"), "--resume"),
                check=lambda p=ae_ckpt: checks.checkpoint_done(p),
            )
            ae_after = [ae_job]
        # ---- build
        b = recipe.build
        out = paths.assembled(part)
        argv = ["build_model.py", "--sd_path", fill(b.sd_path, run), "--ae_path", str(ae_ckpt)]
        argv += ["--data_set", ds, "--output", str(out), "--config", b.config, "--seed", str(b.seed), *b.extra_args]
        build = add("build", part, [argv], b.resources, ae_after, check=lambda p=out: checks.checkpoint_done(p))
        # ---- train (--resume with --resume_path: a fresh start, or the continuation after a requeue/failure)
        t = recipe.train
        argv = ["train.py", "--data_set", ds, "--data_path", data_path, *part_args]
        argv += ["--resume_path", str(out), "--resume", "--output_root", str(run / "train"), "--exp_name"]
        argv += [paths.exp(part)]
        argv += ["--use_captions", *caption_args] if t.use_captions else []
        argv += ["--max_epochs", str(t.epochs), "--save_every_n_epochs", str(t.save_every_n_epochs)]
        argv += ["--batch_size", str(t.batch_size), "--accumulate_grad_batches", str(accum), "--lr", str(t.lr)]
        argv += ["--precision", t.precision, "--seed", str(t.seed), "--num_workers", str(t.num_workers)]
        argv += ["--devices", str(max(1, t.resources.gpus))]
        argv += ["--accelerator", "gpu" if t.resources.gpus else "cpu", "--no_progress_bar", *t.extra_args]
        final = final_checkpoint(paths, recipe, part)
        train = add(
            "train", part, [argv], t.resources, [build, captions], check=lambda p=final: checks.checkpoint_done(p)
        )
        # ---- test (local: one job; slurm: an array of shards and a merge job)
        s = recipe.test
        res_dir = paths.results(part)
        argv = ["test.py", "--data_set", ds, "--data_path", data_path, *part_args, "--resume_path", str(final)]
        argv += ["--exp_name", paths.exp(part), "--output_dir", str(res_dir)]
        argv += ["--use_captions", *caption_args] if s.use_captions else []
        argv += ["--feature_extractor", s.feature_extractor, "--ddim_steps", str(s.ddim_steps)]
        argv += ["--noise_t", str(s.noise_t), "--sigma", str(s.sigma), "--image_pooling", s.image_pooling]
        argv += ["--feature_input_size", str(s.feature_input_size)] if s.feature_input_size else []
        argv += ["--precision", s.precision, "--batch_size", str(s.batch_size), "--seed", str(s.seed)]
        argv += ["--metrics_protocol", "both", "--no_progress_bar"]
        argv += ["--save_visuals"] if s.save_visuals else []
        argv += list(s.extra_args)
        done = lambda d=res_dir, p=final: checks.test_done(d, p)  # noqa: E731
        n_test = data.test_images[parts.index(part)]
        if launcher == "slurm" and s.shards > 1:
            shards = _shards(n_test, s.shards)
            shard_job = add(
                "test",
                part,
                [argv + ["--start_ind", "{start}", "--end_ind", "{end}", "--no_report"]],
                s.resources,
                [train],
                shards=shards,
                check=done,
            )
            merge = add("merge", part, [argv + ["--run_eval_only"]], s.merge_resources, [shard_job], check=done)
            tests.append(merge)
        else:
            tests.append(add("test", part, [argv], s.resources, [train], check=done))

    # ---- the paper table (COCO-AD: the mean of the four parts)
    argv = ["-m", "vlmdiff.evaluation.paper_table", "--dataset", ds, "--output", str(run)]
    argv += ["--runs", *[str(paths.results(p)) for p in parts]]
    report = [argv]
    check = lambda: checks.report_done(run, [paths.results(p) for p in parts])  # noqa: E731
    if launcher == "slurm" and len(tests) == 1 and tests[0].stage == "merge":
        tests[0].commands += report  # one final job merges the shards and writes the report
        tests[0].stage = "merge"
        inner = tests[0].check
        tests[0].check = lambda: inner() or check()
    else:
        add("report", None, report, recipe.report_resources, tests, check=check)
    return jobs


def _shards(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` (start, end) ranges over ``n`` items; the last one runs to the end (-1), whatever the real count."""
    size = math.ceil(n / count)
    return [(i * size, (i + 1) * size if i < count - 1 else -1) for i in range(count)]


def pending(jobs: list[Job]) -> list[Job]:
    """The jobs to run: those not complete, plus everything that depends on one of them."""
    todo: set[str] = set()
    for job in jobs:
        if any(k in todo for k in job.after) or not job.done():
            todo.add(job.key)
    return [j for j in jobs if j.key in todo]
