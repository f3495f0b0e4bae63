"""``python -m benchmarks.observations [--json OUT]``: what observations change, measured by real training runs.

- ``leak``: demo data with near-duplicate views (burst-like photos of one observation), image training with
  metadata off, validation species top-1 after a row split vs an observation split of the same file. A row split
  puts near-copies of validation photos into training, so its accuracy is inflated: the leak ``SPLIT_BY
  observation`` closes.

- ``detail``: demo data where the species' look shows in one randomly chosen photo of each observation (the others
  show the genus shape in grey): a multi-view model (views pooled before the heads) scored per observation against
  the same backbone trained on single images and scored per photo.

Each run is a real ``python -m linnaeus.train`` at 32 px on the CPU (1-4 minutes each on 2 cores).
Throughput (multi-view vs image training, images/s) is ``benchmarks/multiview.py`` (the suite's ``multiview``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = ROOT / "configs" / "experiments" / "demo.yaml"


def train(data: Path, out: Path, name: str, opts: dict[str, str]) -> dict[str, Any]:
    """One training run on ``data``; returns its last validation row."""
    base = {
        "DATA.H5.LABELS_PATH": str(data / "labels.h5"),
        "DATA.HYBRID.IMAGES_DIR": str(data / "images"),
        "DATA.TAXONOMY_PATH": str(data / "taxonomy.json"),
        "DATA.IMG_SIZE": "32",
        "MODEL.IMG_SIZE": "32",
        "DATA.NUM_WORKERS": "0",
        "DATA.META.ACTIVE": "False",
        "SCHEDULE.META_MASKING.ENABLED": "False",
        "DATA.H5.TRAIN_VAL_SPLIT_RATIO": "0.7",
        "TRAIN.EPOCHS": "12",
        "EXPERIMENT.OUTPUT_DIR": str(out),
        "EXPERIMENT.NAME": name,
        "SCHEDULE.VALIDATION.INTERVAL": "{EPOCHS: 4}",
        "SCHEDULE.VALIDATION.MASK_META_INTERVAL": "{EPOCHS: 1000}",
        "SCHEDULE.CHECKPOINT.INTERVAL": "{EPOCHS: 1000}",
        **opts,
    }
    flat = [x for kv in base.items() for x in kv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "linnaeus.train", "--cfg", str(DEMO_CFG), "--opts", *flat]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name}: training failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = (out / "linnaeus_demo" / "cpu" / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, rows) if r["phase"] == "val"][-1]


def leak(work: Path) -> dict[str, Any]:
    from linnaeus.data.demo import write_demo_dataset

    data = work / "near_duplicate"
    write_demo_dataset(data, seed=1, per_species=40, observations=True, views="near-duplicate")
    top1 = {
        by: train(data, work / "out", f"split_{by}", {"DATA.H5.SPLIT_BY": by})["taxa_L10/top1"]
        for by in ("row", "observation")
    }
    return {"val_species_top1": top1, "inflation": top1["row"] - top1["observation"]}


def detail(work: Path, per_species: int = 80, epochs: int = 48) -> dict[str, Any]:
    from linnaeus.data.demo import write_demo_dataset

    data = work / "detail_in_one"
    write_demo_dataset(data, seed=2, per_species=per_species, observations=True, views="detail-in-one")
    common = {"TRAIN.EPOCHS": str(epochs), "SCHEDULE.VALIDATION.INTERVAL": f"{{EPOCHS: {epochs}}}"}
    per_photo = train(data, work / "out", "photos", common)["taxa_L10/top1"]
    multi = train(
        data,
        work / "out",
        "observations",
        {**common, "DATA.OBSERVATIONS.ENABLED": "True", "DATA.OBSERVATIONS.VIEWS": "4"},
    )["taxa_L10/top1"]
    return {"per_photo_species_top1": per_photo, "per_observation_species_top1": multi, "gain": multi - per_photo}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="linnaeus_obs_") as tmp:
        report = {"leak": leak(Path(tmp)), "detail": detail(Path(tmp))}
    t = report["leak"]["val_species_top1"]
    print(f"leak: validation species top-1 {t['row']:.3f} (row split) vs {t['observation']:.3f} (observation split)")
    d = report["detail"]
    print(
        f"detail in one photo: species top-1 {d['per_observation_species_top1']:.3f} per observation (views pooled)"
        f" vs {d['per_photo_species_top1']:.3f} per photo (same backbone, image training)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
