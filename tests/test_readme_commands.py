"""Every command the READMEs (README.md, bench/README.md) and the launch scripts show parses with the scripts' parsers.

The README's pipeline commands are also run in tiny form by the other tests and by `make demo`; this
test keeps their flags from drifting away from the code.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "captioner.py",
    "finetune_autoencoder.py",
    "build_model.py",
    "train.py",
    "test.py",
    "utils/prepare_coco_ad.py",
    "scripts/reproduce.py",
    "bench/bench_inference.py",
    "bench/bench_training.py",
    "bench/bench_eval.py",
    "bench/bench_memory.py",
    "bench/bench_checkpoint_size.py",
    "bench/bench_report.py",
}
RUN_FILE_FLAGS = ("--run_file", "--config_file")  # a stage's run file (the second is the older spelling)
MODULES = {
    "-m vlmdiff.evaluation.report": "vlmdiff.evaluation.report",
    "-m vlmdiff.evaluation.metrics": "vlmdiff.evaluation.metrics",
    "-m vlmdiff.export": "vlmdiff.export",
}


def _logical_lines(text: str) -> list[str]:
    """Code lines of the ```bash blocks (README) or of a shell script, continuations joined."""
    lines, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        lines.append((buf + line).strip())
        buf = ""
    return lines


def _bash_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", markdown, flags=re.S))


def commands() -> list[tuple[str, str, list[str]]]:
    """(source, target, argv) for each python invocation found."""
    sources = {name: _bash_blocks((ROOT / name).read_text()) for name in ("README.md", "bench/README.md")}
    for p in sorted((ROOT / "scripts").glob("*.s*")):
        sources[f"scripts/{p.name}"] = p.read_text()
    found = []
    for source, text in sources.items():
        for line in _logical_lines(text):
            line = (
                line.split("#", 1)[0]
                .strip()
                .replace("$p", "0")
                .replace('"$DATA"', "data/x")
                .replace('"$CKPT"', "c.ckpt")
            )
            line = line.replace('"$START"', "s.ckpt").replace('"$NGPU"', "2")
            m = re.search(r"(?:python|torchrun[^\n]*?\d+)\s+(-m \S+|\S+\.py)\s*(.*)$", line)
            if not m or "pytest" in line or '"$@"' in line:  # "$@": the caller's arguments
                continue
            target, rest = m.group(1), m.group(2)
            rest = rest.split(";")[0].split("&&")[0]
            found.append((source, target, shlex.split(rest)))
    return found


def test_every_benchmark_script_is_shown_in_bench_readme():
    shown = {t for s, t, _ in commands() if s == "bench/README.md"}
    benchmarks = {f"bench/{p.name}" for p in (ROOT / "bench").glob("bench_*.py")}
    unparsed = {"bench/bench_unet_attention.py"}  # reads sys.argv inside main(); `make bench-core` runs it
    assert benchmarks - unparsed <= shown, benchmarks - unparsed - shown


def test_the_readme_shows_every_stage_for_every_dataset():
    cmds = [(t, a) for s, t, a in commands() if s == "README.md"]
    for script in ("captioner.py", "finetune_autoencoder.py", "build_model.py", "train.py", "test.py"):
        for dataset in ("mvtec", "visa", "realiad", "coco"):
            shown = [
                a for t, a in cmds if t == script and ("--data_set" not in a or a[a.index("--data_set") + 1] == dataset)
            ]
            named = [a for a in shown if dataset in " ".join(a)]
            assert named, f"README shows no {script} command for {dataset}"
    assert any(t == "utils/prepare_coco_ad.py" for t, _ in cmds)


def readme_files() -> dict[str, str]:
    """The example files the README shows as ```yaml blocks whose first line is ``# NAME``."""
    blocks = re.findall(r"```yaml\n# (\S+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return {name: body for name, body in blocks}


@pytest.mark.parametrize(
    "source,target,argv", commands(), ids=[f"{s}: {t} {' '.join(a[:4])}" for s, t, a in commands()]
)
def test_command_parses(source, target, argv, monkeypatch, tmp_path):
    flag = next((f for f in RUN_FILE_FLAGS if f in argv), None)
    if flag:  # the README's run file, written where the command expects it
        name = argv[argv.index(flag) + 1]
        assert name in readme_files(), f"{source}: the README does not show {name}"
        (tmp_path / name).write_text(readme_files()[name])
        monkeypatch.chdir(tmp_path)
    if target in MODULES:
        module = importlib.import_module(MODULES[target])
    else:
        assert target in SCRIPTS, f"{source}: unknown script {target}"
        module = importlib.import_module(target[:-3].replace("/", "."))
    try:
        module.parse_args(argv)
    except SystemExit as e:  # argparse rejected a flag or value
        pytest.fail(f"{source}: `{target} {' '.join(argv)}` does not parse (exit {e.code})")


# Upstream's README command lines, only the paths substituted (D = the folder that holds the datasets).
UPSTREAM_TRAIN = {
    "realiad": "--resume_path ./models/vlmdiff.ckpt --coco_part -1 --data_set realiad --data_path D/real_iad "
    "--exp_name realiad_internvl --use_captions --caption_folder realiad_captions_internvl_pd",
    "mvtec": "--resume_path ./models/vlmdiff.ckpt --coco_part -1 --data_set mvtec --data_path D/mvtec "
    "--exp_name mvtec_internvl --use_captions --caption_folder mvtec_captions_internvl_pd",
    "visa": "--resume_path ./models/vlmdiff.ckpt --coco_part -1 --data_set visa --data_path D/visa "
    "--exp_name visa_internvl --use_captions --caption_folder visa_captions_internvl_pd",
}
UPSTREAM_TEST = (
    "--resume_path ./ckpt_{d}_internvl/model_epoch=099.ckpt --coco_part -1 --data_set {d} --data_path D/{root} "
    "--exp_name {d}_internvl --use_dino --dino_version v1s8 --start_ind 0 --end_ind 120000"
)
# Only what keeps the run tiny: one epoch (so model_epoch=000.ckpt stands for model_epoch=099.ckpt), CPU, 2 DDIM steps.
SMALL_TRAIN = [
    "--max_epochs",
    "1",
    "--save_every_n_epochs",
    "1",
    "--accelerator",
    "cpu",
    "--devices",
    "1",
    "--num_workers",
    "0",
    "--batch_size",
    "2",
    "--accumulate_grad_batches",
    "1",
    "--no_progress_bar",
]
SMALL_TEST = ["--ddim_steps", "2", "--num_workers", "0", "--device", "cpu", "--no_progress_bar"]


def _upstream_tree(dataset: str, d: Path) -> Path:
    """A tiny dataset at D/{mvtec,visa,real_iad} and upstream-format train captions beside it."""
    from tests import datagen
    from vlmdiff.data import index_dataset

    if dataset == "mvtec":
        root = datagen.make_mvtec(d / "mvtec", classes=("bottle",), n_train=2, n_test_good=1, defects=("crack",))
    elif dataset == "visa":
        root = datagen.make_visa(d / "visa", classes=("candle",), n_train=2, n_test_good=1, n_test_anomaly=1)
    else:
        root = datagen.make_realiad(d, classes=("toy",), views=2)
        root = root.rename(d / "real_iad")  # its JSON files stay in D/real_iad_jsons/, where upstream reads them
    records = index_dataset(dataset, root, "train")
    # upstream's label files: paths relative to the root (MVTec-AD, VisA), absolute paths (Real-IAD)
    ids = [str((root / r.id).resolve()) if dataset == "realiad" else r.id for r in records]
    datagen.write_upstream_captions(
        d / f"{dataset}_captions_internvl_pd",
        "train",
        dataset,
        "internvl",
        ids,
        [f"a photo of a normal {r.class_name}" for r in records],
    )
    return root


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["realiad", "mvtec", "visa"])
def test_upstream_readme_command_lines_run(dataset, tmp_path, monkeypatch):
    import test as test_script
    import train
    from ldm.checkpoint import load_checkpoint
    from tests.tinyckpt import build_tiny_vlmdiff
    from vlmdiff.features import build_feature_extractor, default_weights_path

    monkeypatch.chdir(tmp_path)
    root = _upstream_tree(dataset, tmp_path / "D")
    (tmp_path / "models").mkdir()
    build_tiny_vlmdiff(tmp_path / "models")  # ./models/vlmdiff.ckpt
    dino = default_weights_path("dino_v1s8")  # where test.py looks for DINO ViT-S/8 weights (random here)
    dino.parent.mkdir(parents=True)
    torch.save(build_feature_extractor("dino_v1s8", random_init=True).backbone.state_dict(), dino)

    argv = UPSTREAM_TRAIN[dataset].replace("D/", f"{tmp_path / 'D'}/").split()
    ckpt_dir = train.main(argv + SMALL_TRAIN)
    assert ckpt_dir == Path(f"ckpt_{dataset}_internvl")
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["last.ckpt", "model_epoch=000.ckpt"]
    assert load_checkpoint(ckpt_dir / "model_epoch=000.ckpt")["provenance"]["use_captions"] is True

    argv = UPSTREAM_TEST.format(d=dataset, root=root.name).replace("D/", f"{tmp_path / 'D'}/")
    argv = argv.replace("model_epoch=099.ckpt", "model_epoch=000.ckpt").split()
    result = test_script.main(argv + SMALL_TEST)
    assert set(result["official"]["mean"]) >= {"auroc_image", "auroc_pixel", "aupro"}
    out = Path("results") / f"{dataset}_internvl"
    assert (out / "metrics.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["feature_extractor"]["name"] == "dino_v1s8"
