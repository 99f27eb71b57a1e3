"""reproduce.py --launcher slurm under a real SLURM (a one-node cluster on localhost, tests/slurm_cluster.py).

- the tiny recipe submitted as SLURM jobs runs every stage as its own job, chained by afterok, with the
  test as a two-task job array and a merge job, and ends in the paper table with the metrics of the same
  recipe run here with --launcher local;
- a stage that fails (a training image that cannot be read) leaves its dependents unrun (cancelled by the
  scheduler: DependencyNeverSatisfied with --kill-on-invalid-dep), and ``reproduce.py --status RUN`` names
  the failed stage, its job id and its log in one line.

Both SLURM runs are submitted first; the local run is made while they wait in the queue or run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.scripts.test_reproduce import reproduce

STAGES = ["demo", "captions", "autoencoder", "build", "train", "test", "merge"]


def _jobs(run: Path) -> list[dict]:
    return json.loads((run / "jobs.json").read_text())["jobs"]


def _means(run: Path) -> dict[str, dict[str, float]]:
    metrics = json.loads((run / "results" / "tiny" / "metrics.json").read_text())["metrics"]
    return {p: metrics[p]["mean"] for p in ("legacy", "official")}


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    """(local run, SLURM run, failed SLURM run): all three finished."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(slurm_cluster.conf))
    base = tmp_path_factory.mktemp("reproduce_slurm")
    local, ok, failed = base / "local", base / "slurm", base / "failed"
    try:
        assert reproduce.main(["--recipe", "tiny", "--run_dir", str(ok), "--launcher", "slurm"]) == 0
        assert reproduce.main(["--recipe", "tiny", "--run_dir", str(local)]) == 0
        # the failing run starts from the local run's finished captions, autoencoder and model; one training
        # image no longer decodes, so the training job fails and its dependents must not run
        top = {"train", "results", "status", "paper_table.md", "paper_table.csv", "paper_table.html"}
        shutil.copytree(local, failed, ignore=lambda d, names: [n for n in names if Path(d) == local and n in top])
        (failed / "data" / "coffee" / "train" / "good" / "001.png").write_bytes(b"not a png")
        assert reproduce.main(["--recipe", "tiny", "--run_dir", str(failed), "--launcher", "slurm"]) == 0
        for run in (ok, failed):
            slurm_cluster.wait(_jobs(run)[-1]["job_id"], timeout_s=600)
    finally:
        mp.undo()
    return local, ok, failed


def test_every_stage_runs_as_a_slurm_job_and_ends_in_the_local_runs_paper_table(runs, slurm_cluster, capsys):
    local, ok, _ = runs
    jobs = _jobs(ok)
    assert [j["stage"] for j in jobs] == STAGES
    ids = {j["stage"]: j["job_id"] for j in jobs}
    for job in jobs:
        info = slurm_cluster.job(job["job_id"])
        assert info["JobState"] == "COMPLETED", slurm_cluster.output_tail(info)
        assert (ok / "jobs" / f"{job['key']}.sbatch").is_file()
    # the chain the scheduler was given: afterok on the previous stages
    assert jobs[STAGES.index("train")]["after"] == [ids["build"], ids["captions"]]
    assert jobs[STAGES.index("merge")]["after"] == [ids["test"]]
    # the test ran as a job array of two shards, each its own log and status
    test = jobs[STAGES.index("test")]
    assert test["array"] == 2
    for i in range(2):
        log = Path(test["log"].replace("%a", str(i)))
        assert log.read_text().startswith("job "), log
        assert (ok / "status" / f"{test['key']}_{i}.ok").is_file()
    assert (ok / "paper_table.md").is_file() and (ok / "paper_table.html").is_file()
    theirs, ours = _means(ok), _means(local)
    for protocol in ours:
        for k, v in ours[protocol].items():
            assert theirs[protocol][k] == pytest.approx(v, abs=1e-6), (protocol, k)
    assert "| ours, legacy protocol (the paper's) |" in (ok / "paper_table.md").read_text()
    capsys.readouterr()
    assert reproduce.main(["--status", str(ok)]) == 0
    assert capsys.readouterr().out.strip() == f"{ok}: all 7 jobs finished; paper table: {ok / 'paper_table.md'}"


def test_a_failed_stage_leaves_its_dependents_unrun_and_status_names_it(runs, slurm_cluster, capsys):
    _, _, failed = runs
    jobs = _jobs(failed)
    assert [j["stage"] for j in jobs] == ["train", "test", "merge"]  # the finished stages were not resubmitted
    train, test, merge = (slurm_cluster.job(j["job_id"]) for j in jobs)
    assert train["JobState"] == "FAILED"
    for info in (test, merge):
        assert info["JobState"] == "CANCELLED" and info["Reason"] == "DependencyNeverSatisfied", info
    assert not (failed / "results").exists() and not (failed / "paper_table.md").exists()
    capsys.readouterr()
    assert reproduce.main(["--status", str(failed)]) == 0
    line = capsys.readouterr().out.strip()
    log = failed / "logs" / f"{jobs[0]['key']}_{jobs[0]['job_id']}.log"
    expected = (
        f"FAILED: stage train, job {jobs[0]['job_id']}, exit code 2, log {log} -- error: image {failed}/data/coffee/"
    )
    assert line.startswith(expected + "train/good/001.png is corrupt or truncated") and "\n" not in line
