"""Every list of metrics, header, paper row and table column comes from the one metric table."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from utils.io import write_json
from vlmdiff.evaluation import metric_table as T
from vlmdiff.evaluation import metrics as M
from vlmdiff.evaluation import report, run_results
from vlmdiff.evaluation.evaluate import metrics_csv


@pytest.fixture(scope="module")
def result() -> dict:
    rng = np.random.default_rng(0)
    maps = rng.random((6, 64, 64)).astype(np.float32)
    masks = np.zeros((6, 64, 64), np.uint8)
    masks[3:, 10:20, 10:20] = 255
    maps[3:, 10:20, 10:20] += 0.3
    return M.evaluate(maps, masks, ["a", "a", "b", "a", "b", "b"], protocol="both")


def test_the_table_names_each_metric_once():
    assert len(set(T.METRICS)) == len(T.TABLE) and len(set(T.HEADERS)) == len(T.TABLE)
    assert T.METRICS == tuple(m.key for m in T.TABLE) and T.HEADERS == tuple(m.header for m in T.TABLE)
    assert all(m.level in ("image", "pixel") and m.legacy in ("same", "flip", "own") for m in T.TABLE)


def test_every_consumer_has_the_tables_columns(result, tmp_path):
    for protocol, res in result.items():
        for row in [*res["per_class"].values(), res["mean"]]:
            assert tuple(row) == T.METRICS, protocol
        assert tuple(res["mean_over"]) == T.METRICS
    header = next(csv.reader(io.StringIO(metrics_csv(result))))
    assert header == ["protocol", "class", *T.METRICS]
    md = M.format_table(result["official"]).splitlines()
    assert md[0] == "| class | " + " | ".join(T.HEADERS) + " |"
    assert all(line.count("|") == len(T.TABLE) + 2 for line in md)
    cmp = M.paper_comparison(M.paper_means(result, "both"), "mvtec").splitlines()
    assert cmp[0] == "| | " + " | ".join(T.HEADERS) + " |"
    assert all(line.count("|") == len(T.TABLE) + 2 for line in cmp)
    run = tmp_path / "run"
    write_json(run / "metrics.json", {"metrics": M._nan_to_none(result)})
    assert tuple(run_results.read_metrics(run)["official"]["mean"]) == T.METRICS
    side = report.comparison_table([run], "official").splitlines()
    assert side[0] == "| run | protocol | " + " | ".join(T.HEADERS) + " |"
    assert all(line.count("|") == len(T.TABLE) + 3 for line in side)


def test_the_legacy_row_follows_the_table(result):
    for cls, off in result["official"]["per_class"].items():
        leg = result["legacy"]["per_class"][cls]
        for m in T.TABLE:
            if m.legacy == "same":
                assert leg[m.key] == off[m.key]
            elif m.legacy == "flip":
                assert leg[m.key] == (off[m.key] if off[m.key] >= 0.5 else 1.0 - off[m.key])
    official = {m.key: 0.25 for m in T.TABLE}
    legacy = T.legacy_row(official, {f"legacy_{m.field}": 0.125 for m in T.TABLE})
    assert legacy == {m.key: {"same": 0.25, "flip": 0.75, "own": 0.125}[m.legacy] for m in T.TABLE}


def test_paper_rows_have_one_value_per_paper_column():
    for row in T.PAPER_RESULTS.values():
        assert tuple(row) == T.PAPER_COLUMNS
    assert T.PAPER_COLUMNS == tuple(m.key for m in T.TABLE if m.paper_column)
    with pytest.raises(ValueError, match=f"needs {len(T.PAPER_COLUMNS)} values"):
        T.paper_row([50.0] * (len(T.PAPER_COLUMNS) + 1))  # a metric added to the table but not to a row
    with pytest.raises(ValueError, match="needs"):
        T.paper_row([50.0] * (len(T.PAPER_COLUMNS) - 1))


def test_a_metric_the_paper_lacks_reads_n_a_beside_it(monkeypatch):
    extra = T.Metric("extra", "EXTRA", "pixel", "extra", higher_is_better=False, paper_column=False)
    monkeypatch.setattr(T, "TABLE", (*T.TABLE, extra))
    monkeypatch.setattr(T, "METRICS", (*T.METRICS, "extra"))
    monkeypatch.setattr(T, "HEADERS", (*T.HEADERS, "EXTRA"))
    row = {**dict.fromkeys(T.METRICS, 0.5), "extra": 0.25}
    lines = T.paper_comparison({"official": row}, "mvtec").splitlines()
    assert lines[0].endswith("| EXTRA |")
    assert lines[-2].endswith("| n/a |") and lines[-1].endswith("| n/a |")  # paper row and difference
    assert lines[2].endswith("| 25.0 |") and not math.isnan(T.PAPER_RESULTS["mvtec"]["aupro"])


def test_differences_are_positive_where_ours_is_better(monkeypatch):
    paper = T.PAPER_RESULTS["mvtec"]
    ours = {k: paper[k] + 0.01 for k in T.METRICS}
    diff = T.paper_comparison({None: ours}, "mvtec").splitlines()[-1]
    assert diff.count("+1.0") == len(T.TABLE)
    lower = [T.Metric(m.key, m.header, m.level, m.field, False, m.paper_column, m.legacy) for m in T.TABLE]
    monkeypatch.setattr(T, "TABLE", tuple(lower))  # the same columns, lower values better
    diff = T.paper_comparison({None: ours}, "mvtec").splitlines()[-1]
    assert diff.count("-1.0") == len(T.TABLE)
