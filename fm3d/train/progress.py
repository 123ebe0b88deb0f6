"""Progress that shows up wherever a command's output goes: a live bar on a terminal, lines in a log.

A long command under SLURM, CI or `| tee` writes to a file, where a live bar renders nothing
useful (Rich prints nothing until the end, tqdm a wall of carriage returns). When stdout is
not a terminal, these helpers print one plain line every `every_s` seconds instead (and at
the start and the end), e.g.

    fit: step 120/1000 epoch 3 loss 1.234 2.1 it/s ETA 0:07:01
    fm3d prepare: 40/128 study 1.3 study/s ETA 0:01:07 prepared=40 failed=0

- `progress(iterable, desc, total)`: for a plain loop (tqdm on a terminal); used by prepare,
  `ehr labels` and the demo generator. It imports no Lightning, so data tools stay light.
- `fm3d.train.progress_bar`: the same for a Lightning run (`fm3d pretrain`, `finetune`, `evaluate`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import timedelta
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_EVERY_S = 30.0


def format_duration(seconds: float) -> str:
    """`0:07:01`; `?` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(timedelta(seconds=round(seconds)))


def rate_and_eta(done: float, total: float | None, elapsed: float, unit: str) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{rate:.2f} {unit}/s"
    if total is not None and math.isfinite(total) and rate > 0:
        text += f" ETA {format_duration((total - done) / rate)}"
    return text


def count_of(done: int, total: float | None) -> str:
    return f"{done}/{int(total)}" if total is not None and math.isfinite(total) else str(done)


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (a live bar renders there)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class LineProgress:
    """tqdm's loop interface (iterate, `update`, `set_postfix`, `close`) printing periodic plain lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None,
        desc: str,
        total: int | None,
        unit: str,
        initial: int,
        every_s: float,
        stream: TextIO | None,
    ) -> None:
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else _length(iterable)
        self.n = initial
        self._initial = initial
        self.every_s, self.stream = every_s, stream
        self._postfix = ""
        self._started = self._last_line = time.monotonic()
        self._closed = False
        self._print(f"{desc}: start, {count_of(self.n, self.total)} {unit}")

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def _line(self) -> str:
        elapsed = time.monotonic() - self._started
        done = self.n - self._initial
        total = None if self.total is None else self.total - self._initial
        rate = rate_and_eta(done, total, elapsed, self.unit)
        return f"{self.desc}: {count_of(self.n, self.total)} {self.unit} {rate} {self._postfix}".rstrip()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._print(self._line())

    def set_postfix(
        self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any
    ) -> None:
        values = {**(ordered_dict or {}), **kwargs}
        self._postfix = " ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            elapsed = format_duration(time.monotonic() - self._started)
            self._print(f"{self._line()} done in {elapsed}")

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(
    iterable: Iterable[Any] | None = None,
    desc: str = "",
    total: int | None = None,
    *,
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    every_s: float = DEFAULT_EVERY_S,
    stream: TextIO | None = None,
) -> tqdm | LineProgress:
    """A progress reporter for a loop: tqdm's bar on a terminal, periodic plain lines otherwise.

    Use it as tqdm: `for x in progress(items, "labels", unit="shard")`, or
    `bar = progress(total=n, desc=...); bar.update(); bar.set_postfix(...); bar.close()`.
    """
    if disable or is_terminal(stream or sys.stdout):
        return tqdm(
            iterable, desc=desc, total=total, unit=unit, initial=initial, disable=disable, file=stream
        )
    return LineProgress(iterable, desc, total, unit, initial, every_s, stream)
