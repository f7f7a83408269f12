"""Progress on stderr for the phases that can take more than a second (tqdm).

Silent by default: a library call prints nothing. A caller (the CLI) switches progress on
for a block of work with ``enabled(True)``; ``wanted()`` is the CLI's default (stderr is a
terminal; ``DYNEDIT_PROGRESS=1`` forces it on, ``=0`` off, e.g. for tests and CI logs).
Nothing is ever written to stdout.

Two ways to mark a phase, both free when progress is off:

    with progress.phase("key statistics", total=len(layers), unit="layer") as bar:
        for layer in layers:
            ...
            bar.update()

    progress.step("localisation")   # one line, closed by the next step/phase or by end()

``step`` is for code whose phases follow each other inside a loop (the rectify loop):
each call closes the previous step's line (with the time it took) and opens the next.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys

ENV_VAR = "DYNEDIT_PROGRESS"

_on: contextvars.ContextVar[bool] = contextvars.ContextVar("dynedit_progress_on", default=False)
_open_step: contextvars.ContextVar[object | None] = contextvars.ContextVar("dynedit_progress_step", default=None)


def wanted(stream=None) -> bool:
    """The default for a command line tool: ``DYNEDIT_PROGRESS`` (1/0) when set, else
    whether ``stream`` (stderr) is a terminal."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env in ("0", "1"):
        return env == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - closed or odd streams
        return False


def is_enabled() -> bool:
    return _on.get()


@contextlib.contextmanager
def enabled(on: bool = True):
    """Show progress (on stderr) for the work done inside the block; log records are
    routed around the bars so that they do not tear them."""
    token = _on.set(bool(on))
    try:
        if on:
            from tqdm.contrib.logging import logging_redirect_tqdm

            with logging_redirect_tqdm():
                yield
                end()
        else:
            yield
    finally:
        end()
        _on.reset(token)


class _Bar:
    """What ``phase`` yields: a tqdm bar, or nothing when progress is off."""

    def __init__(self, bar=None):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def note(self, text: str) -> None:
        """A short status after the bar (e.g. the current loss)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _make(desc: str, total: int | None, unit: str) -> _Bar:
    if not _on.get():
        return _Bar()
    from tqdm import tqdm

    if total is None:  # no count: "desc: elapsed", the final line keeps the time taken
        bar = tqdm(total=None, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True,
                   bar_format="{desc}: {elapsed}{postfix}")
    else:
        bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=True, dynamic_ncols=True)
    return _Bar(bar)


@contextlib.contextmanager
def phase(desc: str, total: int | None = None, *, unit: str = "it"):
    """A phase of work: a bar when ``total`` is given (call ``update``), else one line
    with the time taken. Closes any open ``step`` first."""
    end()
    bar = _make(desc, total, unit)
    try:
        yield bar
    finally:
        bar.close()


def step(desc: str) -> None:
    """Close the open step (if any) and open a new one-line step named ``desc``."""
    end()
    if _on.get():
        _open_step.set(_make(desc, None, "it"))


def end() -> None:
    """Close the open step, if any."""
    bar = _open_step.get()
    if bar is not None:
        bar.close()
        _open_step.set(None)


def callback(desc: str, *, unit: str = "batch"):
    """A ``(done, total)`` callback (the form ``verify`` takes) drawing one bar; call its
    ``close()`` when done."""

    class _Callback:
        def __init__(self):
            self.bar = None

        def __call__(self, done: int, total: int) -> None:
            if not _on.get():
                return
            if self.bar is None:
                end()
                self.bar = _make(desc, total, unit)
            self.bar.update(done - self.bar._bar.n)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return _Callback()


__all__ = ["ENV_VAR", "wanted", "is_enabled", "enabled", "phase", "step", "end", "callback"]
