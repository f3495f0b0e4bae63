"""Progress display: plain periodic lines (no carriage returns) in files, a bar with log lines above it on a TTY."""

from __future__ import annotations

import fcntl
import io
import logging
import os
import pty
import select
import struct
import termios

from linnaeus.engine.progress import Progress, console_handler


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _logger(stream, name: str) -> tuple[logging.Logger, io.StringIO]:
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(console_handler(logging.INFO, logging.Formatter("%(levelname)s %(message)s"), stream))
    file_like = io.StringIO()  # stands in for train.log
    fh = logging.StreamHandler(file_like)
    fh.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(fh)
    return logger, file_like


def test_file_output_gets_a_line_every_n_steps_or_s_seconds(monkeypatch) -> None:
    clock = _Clock()
    monkeypatch.setattr("linnaeus.engine.progress.time.monotonic", clock)
    out = io.StringIO()
    logger, train_log = _logger(out, "test.progress.file")
    p = Progress(total=100, initial=0, every_steps=10, every_seconds=30, stream=out, logger=logger)
    for step in range(1, 26):
        clock.now += 1.0
        p.update(step, loss=2.5, img_s=64.0, lr=1e-3)
    clock.now += 60.0  # a slow stretch: the time rule fires before the step rule
    p.update(26, loss=2.0, img_s=8.0, lr=1e-3)
    p.update(100, loss=1.0)  # the last step always gets a line
    p.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[2] for line in lines] == ["10/100", "20/100", "26/100", "100/100"]
    assert "loss 2.5000  64.0 img/s  lr 0.001  elapsed 0m10s  ETA 1m30s" in lines[0]
    assert train_log.getvalue().splitlines() == [line.removeprefix("INFO ") for line in lines]


def test_other_ranks_show_nothing() -> None:
    out = io.StringIO()
    logger, train_log = _logger(out, "test.progress.rank1")
    p = Progress(total=10, is_main=False, every_steps=1, stream=out, logger=logger)
    p.update(10, loss=1.0)
    p.close()
    assert out.getvalue() == "" and train_log.getvalue() == ""


def test_terminal_gets_a_bar_and_log_lines_on_their_own_lines() -> None:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a real terminal has a size
    tty = os.fdopen(slave, "w", buffering=1)
    logger, train_log = _logger(tty, "test.progress.tty")
    p = Progress(total=50, every_steps=5, stream=tty, logger=logger)
    for step in range(1, 11):
        p.update(step, loss=1.0, img_s=10.0, lr=1e-3)
        if step == 7:
            logger.info("validation @ step 7")
    p.close()
    tty.flush()
    data = b""
    while select.select([master], [], [], 0.2)[0]:
        data += os.read(master, 65536)
    data = data.decode()
    tty.close()
    os.close(master)
    assert "10/50" in data and "\r" in data  # a tqdm bar was drawn and updated in place
    # The bar is erased (carriage return, blanks, carriage return) before the record, so on screen the record
    # starts its own line instead of being glued after the bar's text.
    line = next(chunk for chunk in data.split("\n") if "validation @ step 7" in chunk)
    pieces = [piece for piece in line.split("\r") if piece]
    assert pieces[-1] == "INFO validation @ step 7" and not pieces[-2].strip(), repr(line)
    # Periodic lines reach train.log but not the terminal (the bar shows them there).
    assert [line.split()[1] for line in train_log.getvalue().splitlines() if line.startswith("step")] == [
        "5/50",
        "10/50",
    ]
    assert "step  5/50" not in data
