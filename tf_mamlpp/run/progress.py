"""A progress bar with figures and time left, or periodic log lines off a terminal.

On a terminal the bar redraws in place; in a CI log or a file it becomes one
plain line every `log_every` seconds, so the log stays readable. Hand-written
because keras.utils.Progbar has no label, no count that starts past zero
(a resumed epoch) and no time left beyond its own bar (the whole run).
"""

import sys
import time


def format_duration(seconds):
    """Seconds as H:MM:SS."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts work done out of `total` and shows rate, figures and time left.

    Args:
      total: units of work (iterations, tasks).
      description: a short label, e.g. "epoch 3/100".
      stream: where to write; standard error by default.
      log_every: seconds between lines when the stream is not a terminal.
      width: characters of the bar on a terminal.
      done: units already done before this bar started (a resumed epoch).
      units_after: units of the same kind still to come after this bar's
        (the rest of the run): the line then shows the run's time left too.
      unit: the unit's name in the rate, e.g. "it" for "0.21 s/it".
    """

    def __init__(self, total, description, stream=None, log_every=30.0, width=24, done=0,
                 units_after=None, unit="it"):
        self.total = total
        self.description = description
        self.stream = stream or sys.stderr
        self.log_every = log_every
        self.width = width
        self.started_at = done
        self.done = done
        self.units_after = units_after
        self.unit = unit
        self.figures = {}
        self.start = time.monotonic()
        self.last_line = self.start
        self.interactive = self.stream.isatty()

    def update(self, count=1, **figures):
        """Records `count` more units done and the latest figures (name=value)."""
        self.done += count
        self.figures.update(figures)
        now = time.monotonic()
        if self.interactive:
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif now - self.last_line >= self.log_every:
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
            self.last_line = now

    def close(self):
        """Writes the final line; returns the seconds elapsed."""
        now = time.monotonic()
        self.stream.write(("\r" if self.interactive else "") + self.line(now) + "\n")
        self.stream.flush()
        return now - self.start

    def line(self, now):
        elapsed = now - self.start
        counted = self.done - self.started_at
        seconds_per_unit = elapsed / counted if counted > 0 else 0.0
        left = (self.total - self.done) * seconds_per_unit
        figures = " ".join(f"{name}={value:.4g}" for name, value in self.figures.items())
        bar = ""
        if self.interactive:
            filled = int(self.width * self.done / max(self.total, 1))
            bar = "[" + "#" * filled + "." * (self.width - filled) + "] "
        line = (f"{self.description} {bar}{self.done}/{self.total} {figures} "
                f"{seconds_per_unit:.3g} s/{self.unit} elapsed {format_duration(elapsed)} "
                f"left {format_duration(left)}")
        if self.units_after is not None:
            run_left = left + self.units_after * seconds_per_unit
            line += f" (run {format_duration(run_left)})"
        return line
