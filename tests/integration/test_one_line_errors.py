"""Inputs that used to give tracebacks (or a misleading line) now give one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import TEMPORAL_COLUMNS, write_labels_h5

from linnaeus.cli import main


def _check(capsys, ds) -> tuple[int, list[str]]:
    rc = main(["check", "--cfg", str(ds.config_path), "--no-images"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, [line for line in err.splitlines() if line.strip()]


def _rewrite(ds, rows: slice | None = None, group: str | None = None) -> None:
    with h5py.File(ds.labels_path) as f:
        data = {
            k: (f[k].asstr()[()] if k == "img_identifiers" else f[k][()]) for k in f if isinstance(f[k], h5py.Dataset)
        }
    if rows is not None:
        data = {k: v[rows] for k, v in data.items()}
    if group is not None:
        data.pop(group)
    write_labels_h5(ds.labels_path, data, attrs={"temporal": {"column_names": TEMPORAL_COLUMNS}})
    if group is not None:
        with h5py.File(ds.labels_path, "a") as f:
            f.create_group(group).create_dataset("ids", data=np.ones(24, np.uint32))


def test_zero_row_labels_file_is_one_line_in_check(capsys, tiny_dataset) -> None:
    _rewrite(tiny_dataset, rows=slice(0, 0))
    rc, lines = _check(capsys, tiny_dataset)
    assert rc == 2
    assert len(lines) == 1 and "dataset 'img_identifiers' has 0 rows" in lines[0], lines


def test_taxa_group_instead_of_dataset_says_so(capsys, tiny_dataset) -> None:
    _rewrite(tiny_dataset, group="taxa_L20")
    rc, lines = _check(capsys, tiny_dataset)
    assert rc == 2
    assert len(lines) == 1 and "'taxa_L20' is an HDF5 group, expected a dataset" in lines[0], lines
    assert "present" not in lines[0]


def test_deeply_nested_taxonomy_json_is_one_line(capsys, tiny_dataset) -> None:
    tiny_dataset.taxonomy_path.write_text("[" * 200_000 + "]" * 200_000)
    rc, lines = _check(capsys, tiny_dataset)
    assert rc == 2
    assert len(lines) == 1 and "nested too deeply" in lines[0] and "taxonomy" in lines[0], lines


@pytest.mark.parametrize(("ratio", "which"), [("1.0", "validation"), ("0.01", "training")])
def test_empty_split_is_one_line_before_training(tiny_dataset, tmp_path, ratio: str, which: str) -> None:
    opts = ["DATA.H5.TRAIN_VAL_SPLIT_RATIO", ratio, "EXPERIMENT.OUTPUT_DIR", str(tmp_path), "DATA.BATCH_SIZE", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "linnaeus.train", "--cfg", str(tiny_dataset.config_path), "--opts", *opts],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"the {which} split is empty" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("checkpoints/step_*"))
