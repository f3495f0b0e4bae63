"""The launch script of the extension recipe in docs/design.md, run as written with a DataLoader worker: it trains.
The same script without its ``if __name__ == "__main__":`` guard fails in one line instead of training again inside
each worker (workers import the main script, see ``linnaeus.data.loader.worker_context``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from launch_utils import DEMO_CFG, PY, ROOT, env, final_weights, run_dir, tiny_opts

pytestmark = pytest.mark.slow

DESIGN = ROOT / "docs" / "design.md"


def _recipe() -> tuple[list[str], str, str]:
    """(the part modules, the launch script, the experiment fragment) of the recipe."""
    section = DESIGN.read_text().split("\n## Extending Linnaeus", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scripts = [b for b in blocks if "linnaeus.train" in b]
    assert len(scripts) == 1, scripts
    (yaml_block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    return [b for b in blocks if b not in scripts], scripts[0], yaml_block


def _run(tmp_path: Path, demo: Path, script: str, name: str) -> subprocess.CompletedProcess:
    parts, _, yaml_block = _recipe()
    (tmp_path / "my_parts.py").write_text("\n\n".join(parts))
    (tmp_path / f"{name}.py").write_text(script)
    exp = tmp_path / "my_experiment.yaml"
    exp.write_text(f"BASE: [{DEMO_CFG}]\n" + yaml_block)
    overrides = {
        "DATA__NUM_WORKERS": 1,
        "TRAIN__MAX_STEPS": 2,
        # the demo's smoothing parameter merges into the recipe's loss, which takes only eps
        "MODEL__CLASSIFICATION__HEADS__taxa_L10__LOSS__PARAMS": "{eps: 0.2}",
    }
    opts = tiny_opts(demo, tmp_path / "out", name=name, **overrides)
    return subprocess.run(
        [PY, f"{name}.py", "--cfg", str(exp), "--opts", *opts],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_recipe_script_trains_with_loader_workers(demo: Path, tmp_path: Path) -> None:
    _, script, _ = _recipe()
    proc = _run(tmp_path, demo, script, "train_mine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert final_weights(run_dir(tmp_path / "out", "train_mine"))


def test_an_unguarded_script_fails_in_one_line_instead_of_training_in_each_worker(demo: Path, tmp_path: Path) -> None:
    unguarded = "import my_parts\nfrom linnaeus.train import main\n\nraise SystemExit(main())\n"
    proc = _run(tmp_path, demo, unguarded, "unguarded")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert any("unguarded.py calls linnaeus.train.main() at import" in line for line in lines), proc.stderr[-3000:]
    assert 'if __name__ == "__main__":' in lines[0]
