"""One progress bar per stage: tqdm on a terminal, plain periodic lines otherwise.

When stderr is not a terminal (a log file, CI, `| tee`), tqdm's carriage
returns turn into pages of partial lines. There `tqdm(...)` from this module
returns a `LineProgress` instead: the same small interface (`n`, `update`,
`set_postfix`, `set_postfix_str`, `refresh`, `close`), printing one line when
at least `every_seconds` passed or another 10% is done, and one at the end.

    from stages.progress import tqdm
    bar = tqdm(total=100, desc="teacher", unit="shard")
"""

from __future__ import annotations

import sys
import time

EVERY_SECONDS = 10.0
EVERY_FRACTION = 0.1


def is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def tqdm(*, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
         disable: bool = False, file=None, **tqdm_kwargs):
    """tqdm on a terminal, LineProgress elsewhere; a do-nothing bar when `disable`."""
    stream = file if file is not None else sys.stderr
    if disable:
        return LineProgress(total=total, initial=initial, desc=desc, unit=unit, file=stream, silent=True)
    if is_terminal(stream):
        from tqdm.auto import tqdm as real_tqdm

        return real_tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, **tqdm_kwargs)
    return LineProgress(total=total, initial=initial, desc=desc, unit=unit, file=stream)


def restart_clock(bar) -> None:
    """Measure the rate and ETA from now on (e.g. once an engine has started: its start-up is not
    the work's pace). For a tqdm bar and a LineProgress alike."""
    if isinstance(bar, LineProgress):
        bar.restart_clock()
    elif bar is not None and hasattr(bar, "start_t"):  # tqdm: elapsed and rate count from start_t and initial
        bar.start_t = bar.last_print_t = bar._time()
        bar.initial = bar.last_print_n = bar.n


class LineProgress:
    """A progress report in whole lines: `[desc] 40/100 shard (40%), 12.3 shard/s, ETA 5s | postfix`."""

    def __init__(self, *, total: int | None, initial: int = 0, desc: str = "", unit: str = "it", file=None,
                 silent: bool = False, every_seconds: float = EVERY_SECONDS, clock=time.monotonic):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self._file, self._silent, self._every, self._clock = file, silent, every_seconds, clock
        self._start_n, self._postfix = initial, ""
        self._t0 = self._last_t = clock()
        self._last_n = initial
        self._closed = False

    # ---- the tqdm interface used in this project
    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def refresh(self) -> None:
        if self._due():
            self._emit()

    def close(self) -> None:
        if not self._closed and self.n != self._last_n:
            self._emit()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def restart_clock(self) -> None:
        """Rate and ETA from now on (restart_clock)."""
        self._t0 = self._clock()
        self._start_n = self.n

    # ---- when and what to print
    def _due(self) -> bool:
        if self._silent or self._closed or self.n == self._last_n:
            return False
        if self._clock() - self._last_t >= self._every:
            return True
        if self.total:
            step = max(1.0, self.total * EVERY_FRACTION)
            return int(self.n // step) != int(self._last_n // step) or self.n >= self.total
        return False

    def line(self) -> str:
        elapsed = max(self._clock() - self._t0, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        parts = [f"[{self.desc}] {self.n}/{self.total} {self.unit}" if self.total
                 else f"[{self.desc}] {self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.3g} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        text = ", ".join(parts)
        return f"{text} | {self._postfix}" if self._postfix else text

    def _emit(self) -> None:
        if self._silent:
            return
        print(self.line(), file=self._file if self._file is not None else sys.stderr, flush=True)
        self._last_t, self._last_n = self._clock(), self.n


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
