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


def test_the_console_script_ends_through_exit_process(tmp_path: Path) -> None:
    """`linnaeus` (pyproject's script) and `python -m linnaeus` run cli.run: main's status, its one-line errors."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["linnaeus"] == "linnaeus.cli:run"
    code = "import sys; from linnaeus.cli import run; sys.argv = ['linnaeus', *sys.argv[1:]]; run()"
    missing = str(tmp_path / "none.yaml")
    proc = subprocess.run(
        [sys.executable, "-c", code, "config", "validate", "--cfg", missing],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error:"), proc.stderr
    ok = subprocess.run([sys.executable, "-m", "linnaeus", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "usage: linnaeus" in ok.stdout
