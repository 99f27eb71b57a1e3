"""The benchmark scripts run end to end in their smallest settings.

The benchmarks themselves are never run by make test.
"""

from __future__ import annotations

import json

import torch

from bench import bench_checkpoint_size, bench_eval, bench_inference, bench_report, bench_training


def test_inference_benchmark_tiny(tmp_path):
    out = bench_inference.main(
        [
            "--config",
            "tiny",
            "--images",
            "2",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--ddim_steps",
            "2",
            "--ablation",
            "--output",
            str(tmp_path / "inference.json"),
        ]
    )
    names = list(out["variants"])
    assert names[0] == "upstream way" and names[-1] == "ours" and len(names) >= 4
    assert all(v["within_tolerance"] for v in out["variants"].values())
    assert out["variants"]["upstream way"]["two_passes"] and out["variants"]["upstream way"]["attention"] == "math"
    assert json.loads((tmp_path / "inference.json").read_text())["config"] == "tiny"


def test_training_benchmark_tiny(tmp_path):
    out = bench_training.main(
        [
            "--measure",
            "tiny",
            "--analyse",
            "tiny",
            "--settings",
            "0,4",
            "--steps",
            "1",
            "--output",
            str(tmp_path / "training.json"),
        ]
    )
    fp32, bf16_ckpt = out["analysis"]["tiny"].values()
    assert fp32["params"]["all"]["trainable"] < fp32["params"]["all"]["total"]
    assert fp32["adamw_state_bytes"] == 2 * fp32["grads_bytes"] > 0
    assert 0 < bf16_ckpt["activation_bytes"] < fp32["activation_bytes"]
    (measured,) = out["measured"].values()  # bf16 is not measured on a CPU by default
    assert measured["step_s"] > 0 and measured["extra_peak_mib"] > 0


def test_eval_benchmark_tiny(tmp_path):
    out = bench_eval.main(
        [
            "--n_images",
            "4",
            "--sizes",
            "20",
            "--class_size",
            "20",
            "--big_class",
            "30",
            "--protocol",
            "both",
            "--output",
            str(tmp_path / "eval.json"),
            "--tmp",
            str(tmp_path),
        ]
    )
    a = out["aupro_timing"]
    assert abs(a["aupro_legacy_upstream_loop"] - a["aupro_legacy"]) < 1e-9  # the two legacy loops agree
    assert [r["maps"] for r in out["memory_curve"]] == [20, 40]
    big = out["big_class"]  # streamed and the previous in-memory evaluation of one class, in one run
    assert big["maps"] == 30 and big["streamed"]["peak_rss_mib"] > 0
    assert big["in_memory"]["max_metric_difference"] < 1e-9


def test_report_benchmark_tiny(tmp_path):
    out = bench_report.main(
        [
            "--n_images",
            "4",
            "--class_size",
            "2",
            "--gallery_size",
            "1",
            "--output",
            str(tmp_path / "report.json"),
            "--tmp",
            str(tmp_path),
        ]
    )
    assert out["report_s"] > 0 and out["evaluate_peak_rss_mib"] > 0 and out["report_peak_rss_mib"] > 0
    assert out["pictures"] == 3 + 2 * 2  # mean + 2 class figures; per class 1 false alarm + 1 miss/detection
    assert json.loads((tmp_path / "report.json").read_text())["n_images"] == 4


def test_memory_meter_sees_an_allocation():
    from bench.common import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert meter.peak_mib() > 48
    del x


def test_checkpoint_size_benchmark_tiny(tmp_path):
    out = bench_checkpoint_size.main(["--configs", "tiny", "--output", str(tmp_path / "size.json")])
    tiny, measured = out["computed"]["tiny"], out["measured_tiny"]
    assert tiny["export_bytes"] < tiny["lightning_bytes"] and tiny["trainable"] < tiny["parameters"]
    # the files hold the computed bytes plus headers and Lightning's loop/callback state (a few %)
    assert 1.0 < measured["export_bytes"] / tiny["export_bytes"] < 1.05
    assert 1.0 < measured["lightning_bytes"] / tiny["lightning_bytes"] < 1.1
