"""Plain progress lines (utils.progress), worker counts and the quieted dependency notices (utils.cli)."""

from __future__ import annotations

import logging
import warnings

import pytest
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tqdm import tqdm

import utils.cli
import utils.progress
from utils.progress import ProgressLines, format_duration, format_rate, progress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(utils.progress.time, "monotonic", c)
    return c


def test_lines_at_the_interval_with_count_rate_and_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="utils.progress")
    lines = ProgressLines("test", 20, "img", interval_s=10)
    clock.now += 4
    lines.update(2)  # 4 s after the start: no line yet
    assert caplog.messages == []
    clock.now += 6
    assert lines.due()
    lines.update(3)  # 5 images in 10 s: one line
    assert caplog.messages == ["test: img 5/20 (25%) | 2.0 s/img | elapsed 0:10 | ETA 0:30"]
    clock.now += 1
    lines.update(15)
    lines.close()  # the end always gets a line
    assert caplog.messages[-1] == "test: img 20/20 (100%) | 1.82 img/s | elapsed 0:11 | ETA 0:00"
    lines.close()
    assert len(caplog.messages) == 2


def test_resumed_work_counts_only_this_process_and_shows_fields(clock, caplog):
    caplog.set_level(logging.INFO, logger="utils.progress")
    lines = ProgressLines("train", 200, "step", interval_s=0, start=100)
    clock.now += 5
    assert lines.set(110, "train epoch 2/3", loss=0.08123)
    assert caplog.messages == [
        "train epoch 2/3: step 110/200 (55%) | loss 0.08123 | 2.00 step/s | elapsed 0:05 | ETA 0:45"
    ]
    unknown = ProgressLines("captioning", None, "img", interval_s=0)
    clock.now += 3725
    unknown.update(1)
    assert caplog.messages[-1] == "captioning: img 1 | 3725.0 s/img | elapsed 1:02:05"


def test_formats():
    assert format_duration(59.6) == "1:00" and format_duration(3725) == "1:02:05"
    assert format_duration(float("inf")) == "?"
    assert format_rate(0, 10, "img") == "? img/s" and format_rate(30, 10, "img") == "3.00 img/s"


def test_bar_on_a_terminal_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(utils.progress, "is_terminal", lambda: True)
    with progress(3, "test", "img") as meter:
        assert isinstance(meter, tqdm) and not meter.disable
    assert isinstance(progress(3, "test", "img", bar=False), ProgressLines)  # --no_progress_bar
    assert progress(3, "test", "img", enabled=False).disable  # other ranks: nothing
    monkeypatch.setattr(utils.progress, "is_terminal", lambda: False)
    assert isinstance(progress(3, "test", "img"), ProgressLines)


def test_data_workers_default_to_the_available_cpus(monkeypatch):
    monkeypatch.setattr(utils.cli.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert utils.cli.available_cpus() == 1
    assert utils.cli.data_workers(None, 4) == 1
    assert utils.cli.data_workers(3, 4) == 3  # an explicit --num_workers is kept
    monkeypatch.setattr(utils.cli.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert utils.cli.data_workers(None, 4) == 4


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_lightning_tips_and_dependency_deprecations_are_quiet():
    from lightning_utilities.core import rank_zero as shared  # the logger rank_zero_info uses now

    rank_zero = shared.log
    kept_filters, seen_logs = list(rank_zero.filters), Records()
    rank_zero.addHandler(seen_logs)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            utils.cli.setup_logging()
            rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger](https://pypi.org/)")
            rank_zero_info("GPU available: False, used: False")
            for module in ("lightning.pytorch.utilities._pytree", "transformers.utils", "vlmdiff.features"):
                warnings.warn_explicit("old API", DeprecationWarning, f"{module}.py", 1, module=module)
            warnings.warn_explicit(
                "Found 183 module(s) in eval mode at the start of training.",
                UserWarning,
                "fit_loop.py",
                1,
                module="lightning.pytorch.loops.fit_loop",
            )
            warnings.warn_explicit(
                "The dataloader does not have many workers",
                UserWarning,
                "trainer.py",
                1,
                module="lightning.pytorch.trainer",
            )
        assert seen_logs.messages == ["GPU available: False, used: False"]
        # our own deprecations and Lightning's useful warnings stay visible
        assert [(w.category, w.filename) for w in seen] == [
            (DeprecationWarning, "vlmdiff.features.py"),
            (UserWarning, "trainer.py"),
        ]
    finally:
        rank_zero.removeHandler(seen_logs)
        rank_zero.filters[:] = kept_filters
