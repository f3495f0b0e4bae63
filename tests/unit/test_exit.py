"""exit_process: the exit status, output, threads and atexit handlers of a normal exit, without the teardown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from linnaeus.utils.exit import exit_process

out = Path(sys.argv[1])
atexit.register(lambda: out.with_suffix(".atexit").write_text("ran"))

def late():
    time.sleep(0.3)
    out.with_suffix(".thread").write_text("finished")

threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
sys.stdout.write("buffered, no newline")  # a pipe: block-buffered, flushed only at exit
sys.stderr.write("err")
exit_process(75)
raise AssertionError("exit_process returned")
"""


def test_exit_keeps_status_output_threads_and_atexit(tmp_path: Path) -> None:
    base = tmp_path / "mark"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(base)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 75, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert proc.stderr == "err"
    assert base.with_suffix(".thread").read_text() == "finished"
    assert base.with_suffix(".atexit").read_text() == "ran"
