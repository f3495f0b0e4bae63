"""``decide_on_main`` across two real processes (accelerate launch, gloo): only the main process decides, every
process gets its answer, and a refusal raised there is raised on every process with its type and line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch_utils import ACCELERATE, ROOT, env

pytestmark = pytest.mark.slow

SCRIPT = """
import json, os, sys
from pathlib import Path

from linnaeus.config import load_config
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.engine.distributed import build_accelerator, decide_on_main
from linnaeus.errors import DataError

out = Path(sys.argv[1])
acc, _ = build_accelerator(engine_spec(load_config(None, ["DATA.BATCH_SIZE", "4"])).loop)
rank = acc.process_index


def decide():
    (out / f"decided_by_{rank}").write_text("")
    return {"from": rank, "pid": os.getpid()}


def refuse():
    raise DataError(f"refused by rank {rank}")


got = decide_on_main(acc, decide)
try:
    decide_on_main(acc, refuse)
    err = None
except DataError as e:
    err = f"{type(e).__name__}: {e}"
(out / f"rank_{rank}.json").write_text(json.dumps({"got": got, "err": err, "world": acc.num_processes}))
"""


def test_decide_on_main_with_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "decide.py"
    script.write_text(SCRIPT)
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), str(script)]
    proc = subprocess.run([*cmd, str(tmp_path)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    main_pid = results[0]["got"]["pid"]
    for r in results:
        assert r["world"] == 2
        assert r["got"] == {"from": 0, "pid": main_pid}  # the main process's answer, on rank 1 too
        assert r["err"] == "DataError: refused by rank 0"  # the main process's refusal, same type and line
    assert sorted(p.name for p in tmp_path.glob("decided_by_*")) == ["decided_by_0"]  # decided once, on main
