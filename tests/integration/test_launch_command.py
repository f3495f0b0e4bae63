"""`linnaeus launch`'s exit status under torch elastic: a rank's own exit status (a LinnaeusError's 2 or a
non-finite stop's 3) is the launcher's, not torch elastic's 1. The ranks are tiny scripts under the real launcher."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from launch_utils import PY, ROOT, env

pytestmark = pytest.mark.slow

RANK = """
import os, sys, time
rank = int(os.environ["RANK"])
if rank == 0 or os.environ.get("BOTH") == "1":
    print(f"error: rank {rank} stops", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(120)  # the other rank is still working when rank 0 fails: torch elastic ends it
"""


@pytest.mark.parametrize("both", [True, False])
def test_launch_reports_the_failed_ranks_own_exit_status(tmp_path: Path, both: bool) -> None:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    cmd = [PY, "-m", "linnaeus.launch", "--config_file", str(ROOT / "accelerate_configs/cpu_ddp.yaml"), str(script)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(env(), BOTH="1" if both else "0"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "linnaeus launch: rank 0 exited 3" in proc.stderr, proc.stderr[-3000:]
