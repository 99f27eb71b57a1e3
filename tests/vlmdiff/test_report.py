"""vlmdiff.report: averaging runs (COCO-AD parts) and the paper comparison."""

from __future__ import annotations

import json

import pytest

from utils.errors import UserError
from vlmdiff import report
from vlmdiff.metrics import METRICS


def _run(folder, value):
    folder.mkdir()
    mean = {k: value for k in METRICS}
    (folder / "metrics.json").write_text(json.dumps({"metrics": {"official": {"per_class": {"coco": mean}, "mean": mean}}}))
    return folder


def test_average_of_four_parts(tmp_path, capsys):
    runs = [str(_run(tmp_path / f"p{i}", v)) for i, v in enumerate((0.5, 0.6, 0.7, 0.8))]
    mean = report.main([*runs, "--dataset", "coco", "--output", str(tmp_path / "mean.json")])
    assert mean["auroc_image"] == pytest.approx(0.65)
    out = capsys.readouterr().out
    assert "paper (coco)" in out and "65.0" in out and "59.1" in out
    assert json.loads((tmp_path / "mean.json").read_text())["mean"]["aupro"] == pytest.approx(0.65)


def test_missing_protocol_is_clear(tmp_path):
    run = _run(tmp_path / "r", 0.5)
    with pytest.raises(UserError, match="legacy"):
        report.main([str(run), "--protocol", "legacy"])
