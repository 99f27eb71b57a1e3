"""scripts/demo.py --quick: the five stages run through the real scripts and the metric table is printed.

A smoke test at the smallest size (1 class, a few images, 2 steps per stage); it checks that the
pipeline runs and reports, not the demo's quality targets (those need the full run, `make demo`).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(demo, tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("demo") / "out"
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(str(x) for x in a)))
    try:
        result = demo.main(["--quick", "--output", str(out)])
    finally:
        capture.undo()
        torch.set_num_threads(threads)
    return out, result, "\n".join(lines)


def test_quick_demo_runs_every_stage_and_prints_the_table(quick_run, demo):
    out, result, printed = quick_run
    assert "NOT the paper's" in printed
    for command in (
        "-m vlmdiff.data.demo",
        "captioner.py",
        "finetune_autoencoder.py",
        "build_model.py",
        "train.py",
        "test.py",
    ):
        assert re.search(rf"^\$ python {re.escape(command)} ", printed, re.M), command
    assert "--vlm_model template" in printed and "--feature_extractor efficientnet_lite0" in printed
    assert "--save_visuals" in printed and "--use_captions" in printed
    header = "| class | AU-ROC_I | AP_I | F1max_I | AU-ROC_P | AP_P | F1max_P | AU-PRO |"
    assert printed.count(header) >= 1 and re.search(r"^\| mean \|", printed, re.M)
    assert set(result["per_class"]) == set(demo.QUICK.classes)
    assert set(result["mean"]) == {
        "auroc_image",
        "ap_image",
        "f1max_image",
        "auroc_pixel",
        "ap_pixel",
        "f1max_pixel",
        "aupro",
    }
    assert json.loads((out / "results" / "metrics.json").read_text())["metrics"]["official"]
    assert len(list((out / "results" / "visuals").rglob("*.png"))) >= demo.QUICK.n_test_good + demo.QUICK.n_test_defect
    assert str(out / "results" / "visuals") in printed
    assert (out / "models" / "vlmdiff_init.ckpt").is_file() and (out / "train" / "ckpt_demo" / "last.ckpt").is_file()


def test_each_step_is_numbered_once_in_order(quick_run, demo):
    _, _, printed = quick_run
    headers = re.findall(r"^=== (\d+)/(\d+) (.+) ===$", printed, re.M)
    assert [int(n) for n, _, _ in headers] == list(range(1, len(demo.STEPS) + 1))
    assert {int(total) for _, total, _ in headers} == {len(demo.STEPS)}
    assert len({title for _, _, title in headers}) == len(headers)


def test_keep_reuses_finished_stages(quick_run, demo):
    out, result, _ = quick_run
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(str(x) for x in a)))
        again = demo.main(["--quick", "--keep", "--output", str(out)])
    assert "\n".join(lines).count("already done by an earlier run") == len(demo.STEPS)
    assert again["mean"] == pytest.approx(result["mean"], nan_ok=True)
