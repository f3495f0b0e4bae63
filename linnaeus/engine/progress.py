"""Training progress that reads well in a terminal and in a file.

On a terminal: a tqdm bar, with log records printed above it (``BarSafeHandler``), never glued onto it. Anywhere
else (a file, a SLURM ``.out``, a pipe): one plain line every N steps or S seconds, never a carriage return. The
periodic line always goes to the log files too (``train.log``), bar or not.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

log = logging.getLogger("linnaeus")

# A record carrying this attribute is a periodic progress line: a console showing a live bar already displays it.
PROGRESS_ATTR = "linnaeus_progress"


def is_terminal(stream: IO[str] | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest capture, redirected files)
        return False


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"


class BarSafeHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write``: a live bar is cleared, the record printed on its own
    line, the bar redrawn. Progress records are skipped while a bar shows the same numbers."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self.bar_active = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar_active and getattr(record, PROGRESS_ATTR, False):
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def console_handler(level: int, formatter: logging.Formatter, stream: IO[str] | None = None) -> BarSafeHandler:
    """The console handler the run's logger should use instead of a plain ``StreamHandler``."""
    handler = BarSafeHandler(stream)
    handler.setLevel(level)
    handler.setFormatter(formatter)
    return handler


class Progress:
    """``Progress(total, initial, is_main)``; call ``update(step, loss=, img_s=, lr=)`` after each optimizer step and
    ``close()`` at the end. Only the main process shows anything; on other ranks every call is a no-op.

    ``every_steps`` / ``every_seconds``: a progress line is logged when either has passed since the last one (and at
    the last step); lines go through ``logger`` so they reach ``train.log`` and, without a bar, the console."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        is_main: bool = True,
        every_steps: int = 50,
        every_seconds: float = 60.0,
        stream: IO[str] | None = None,
        logger: logging.Logger = log,
        desc: str = "train",
    ) -> None:
        self.total = int(total)
        self.initial = int(initial)
        self.enabled = is_main
        self.every_steps = max(1, int(every_steps))
        self.every_seconds = float(every_seconds)
        self.logger = logger
        self.start = time.monotonic()
        self.last_line_step = self.initial
        self.last_line_time = self.start
        self.step = self.initial
        self.bar = None
        self._bar_handlers: list[BarSafeHandler] = []
        stream = stream if stream is not None else sys.stderr
        if self.enabled and is_terminal(stream):
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total, initial=self.initial, desc=desc, unit="step", dynamic_ncols=True, file=stream
            )
            self._bar_handlers = [h for h in logger.handlers if isinstance(h, BarSafeHandler)]
            for h in self._bar_handlers:
                h.bar_active = True

    def eta_seconds(self, now: float | None = None) -> float | None:
        done = self.step - self.initial
        if done <= 0:
            return None
        elapsed = (now if now is not None else time.monotonic()) - self.start
        return elapsed / done * max(self.total - self.step, 0)

    def line(self, loss: float | None = None, img_s: float | None = None, lr: float | None = None) -> str:
        width = len(str(self.total))
        parts = [f"step {self.step:>{width}}/{self.total} ({100 * self.step / max(self.total, 1):3.0f}%)"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if img_s is not None:
            parts.append(f"{img_s:.1f} img/s")
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        parts.append(f"elapsed {format_duration(time.monotonic() - self.start)}")
        eta = self.eta_seconds()
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else "ETA -")
        return "  ".join(parts)

    def update(self, step: int, loss: float | None = None, img_s: float | None = None, lr: float | None = None) -> None:
        """Report that ``step`` optimizer steps are done. Values may be None when not measured at this step."""
        if not self.enabled:
            return
        advanced = step - self.step
        self.step = step
        if self.bar is not None:
            if advanced > 0:
                self.bar.update(advanced)
            post = {k: v for k, v in (("loss", loss), ("img_s", img_s), ("lr", lr)) if v is not None}
            if post:
                self.bar.set_postfix(
                    {
                        k: (f"{v:.2e}" if k == "lr" else f"{v:.3f}" if k == "loss" else f"{v:.0f}")
                        for k, v in post.items()
                    },
                    refresh=False,
                )
        now = time.monotonic()
        due = (
            step - self.last_line_step >= self.every_steps
            or now - self.last_line_time >= self.every_seconds
            or step >= self.total
        )
        if due and step > self.last_line_step:
            self.last_line_step, self.last_line_time = step, now
            self.logger.info("%s", self.line(loss, img_s, lr), extra={PROGRESS_ATTR: True})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for h in self._bar_handlers:
            h.bar_active = False
        self._bar_handlers = []

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def announce(what: str, estimate: str) -> None:
    """One line before a long one-time step, so a silent minute is never mistaken for a hang."""
    log.info("%s (%s)...", what, estimate)
