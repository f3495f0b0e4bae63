"""Helpers for tests that run the real job: demo data, experiment overrides, real launches, reading run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from linnaeus.config import repo_root

ROOT = repo_root()
DEMO_CFG = ROOT / "configs/experiments/demo.yaml"
PY = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def ensure_demo(base: Path, per_species: int) -> Path:
    """A demo dataset written once per test session and shared by the tests that need one."""
    out = base / f"demo_{per_species}"
    if not (out / "labels.h5").is_file():
        from linnaeus.data.demo import write_demo_dataset

        write_demo_dataset(out, seed=0, per_species=per_species)
    return out


def tiny_opts(demo: Path, out_dir: Path, name: str = "run", **overrides: object) -> list[str]:
    """The demo experiment shrunk for tests: 32 px, few steps, frequent logging, no randomness that would make
    equivalence checks depend on batch layout unless a test asks for it."""
    opts: dict[str, object] = {
        "DATA.H5.LABELS_PATH": str(demo / "labels.h5"),
        "DATA.HYBRID.IMAGES_DIR": str(demo / "images"),
        "DATA.TAXONOMY_PATH": str(demo / "taxonomy.json"),
        "DATA.IMG_SIZE": 32,
        "MODEL.IMG_SIZE": 32,
        "DATA.BATCH_SIZE": 16,
        "DATA.BATCH_SIZE_VAL": 64,
        "DATA.NUM_WORKERS": 0,
        "MODEL.DROP_PATH_RATE": 0.0,
        "EXPERIMENT.OUTPUT_DIR": str(out_dir),
        "EXPERIMENT.NAME": name,
        "TRAIN.MAX_STEPS": 6,
        "SCHEDULE.METRICS.LOG_INTERVAL_STEPS": 1,
        "SCHEDULE.VALIDATION.INTERVAL": "{STEPS: 1000}",
        "SCHEDULE.VALIDATION.MASK_META_INTERVAL": "{STEPS: 1000}",
        "SCHEDULE.CHECKPOINT.INTERVAL": "{STEPS: 1000}",
        "TRAIN.CALIBRATE": False,  # its own test (test_evaluate.py); a validation pass more per run otherwise
    }
    opts.update({k.replace("__", "."): v for k, v in overrides.items()})
    flat: list[str] = []
    for k, v in opts.items():
        flat += [k, v if isinstance(v, str) else json.dumps(v)]
    return flat


def run_dir(out_dir: Path, name: str = "run") -> Path:
    return out_dir / "linnaeus_demo" / "cpu" / name


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["WANDB_MODE"] = e.get("WANDB_MODE", "disabled")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def train_cmd(opts: list[str], accelerate_config: str | None = None, extra: list[str] | None = None) -> list[str]:
    if accelerate_config is None:
        return [PY, "-m", "linnaeus.train", "--cfg", str(DEMO_CFG), "--opts", *opts]
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "accelerate_configs" / f"{accelerate_config}.yaml"),
        *(extra or []),
        "-m",
        "linnaeus.train",
        "--cfg",
        str(DEMO_CFG),
        "--opts",
        *opts,
    ]


def launch(
    opts: list[str],
    accelerate_config: str | None = None,
    timeout: int = 600,
    check: bool = True,
    extra: list[str] | None = None,
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        train_cmd(opts, accelerate_config, extra), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(run: Path, phase: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if phase is None or r["phase"] == phase]


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "final.safetensors"))


def spawn(opts: list[str], accelerate_config: str | None = None) -> subprocess.Popen:
    """A training run in the background, in its own session, for tests that signal or kill it."""
    return spawn_cmd(train_cmd(opts, accelerate_config))


def spawn_cmd(cmd: list[str]) -> subprocess.Popen:
    """Any command in the background from the repository root, in its own session, output captured."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


# ------------------------------------------------------------------ watching and stopping background runs
def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"run ended before the condition held ({proc.returncode}):\n{err[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in their own sessions, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def free_port() -> int:
    """A TCP port nobody listens on now: a launch's rendezvous port, so that launches running side by side on one
    machine (other test sessions) do not meet at accelerate's default 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (orphans are reaped by whoever is pid 1, maybe never)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def latest_checkpoint(run: Path) -> str | None:
    p = run / "checkpoints" / "latest"
    return p.read_text().strip() if p.is_file() else None
