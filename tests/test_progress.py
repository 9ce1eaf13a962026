"""Specification of tf_mamlpp.run.progress: a bar on a terminal, log lines elsewhere."""

import io
import types

import pytest

from tf_mamlpp.run import progress as progress_module
from tf_mamlpp.run.progress import Progress, format_duration


class TtyStringIO(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    """A settable clock in place of time.monotonic inside the progress module."""
    state = types.SimpleNamespace(now=1000.0)
    monkeypatch.setattr(progress_module, "time",
                        types.SimpleNamespace(monotonic=lambda: state.now))
    return state


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(59.9) == "0:00:59"
    assert format_duration(61) == "0:01:01"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(36000 + 59) == "10:00:59"
    assert format_duration(-3) == "0:00:00"


def test_off_a_terminal_writes_a_plain_line_at_most_every_log_every_seconds(clock):
    stream = io.StringIO()
    progress = Progress(25, "epoch 1/3", stream=stream, log_every=10.0)
    for _ in range(25):
        clock.now += 1.0
        progress.update(loss=0.5)
    # Updates at 1 s .. 25 s after the start: lines at 10 s and 20 s only.
    assert stream.getvalue().count("\n") == 2
    elapsed = progress.close()
    assert elapsed == pytest.approx(25.0)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("epoch 1/3 ") for line in lines)
    assert "10/25" in lines[0] and "20/25" in lines[1] and "25/25" in lines[2]
    assert "loss=0.5" in lines[2]
    assert "elapsed 0:00:25" in lines[2]
    assert "[" not in text  # no bar in a log


def test_off_a_terminal_a_fast_run_writes_only_the_final_line(clock):
    stream = io.StringIO()
    progress = Progress(100, "val tasks", stream=stream, log_every=30.0)
    for _ in range(100):
        clock.now += 0.1
        progress.update()
    assert stream.getvalue() == ""
    progress.close()
    assert stream.getvalue().count("\n") == 1
    assert "100/100" in stream.getvalue()


def test_on_a_terminal_every_update_redraws_in_place(clock):
    stream = TtyStringIO()
    progress = Progress(10, "epoch 2/3", stream=stream, log_every=1000.0, width=10)
    for _ in range(5):
        clock.now += 1.0
        progress.update(acc=0.25)
    text = stream.getvalue()
    assert text.count("\r") == 5
    assert "\n" not in text
    last = text.split("\r")[-1]
    # Half done at one unit a second: a half-full bar and 5 s left.
    assert "[#####.....] 5/10" in last
    assert "acc=0.25" in last
    assert "left 0:00:05" in last
    progress.close()
    text = stream.getvalue()
    assert text.count("\r") == 6
    assert text.endswith("\n") and text.count("\n") == 1


def test_a_resumed_bar_counts_from_where_it_stopped_and_times_only_what_it_ran(clock):
    stream = io.StringIO()
    progress = Progress(500, "epoch 3/10", stream=stream, log_every=1000.0, done=59)
    for _ in range(41):
        clock.now += 0.5
        progress.update()
    progress.close()
    line = stream.getvalue().splitlines()[-1]
    assert "100/500" in line
    assert "0.5 s/it" in line
    assert "left 0:03:20" in line  # 400 iterations at 0.5 s


def test_the_whole_runs_time_left_follows_the_units_after_the_bar(clock):
    stream = io.StringIO()
    progress = Progress(10, "epoch 1/3", stream=stream, units_after=20, unit="it")
    for _ in range(5):
        clock.now += 2.0
        progress.update()
    progress.close()
    line = stream.getvalue().splitlines()[-1]
    assert "left 0:00:10 (run 0:00:50)" in line  # 5 + 20 iterations at 2 s
