"""`linnaeus check` end to end (in-process through the CLI, plus one real subprocess), image verification, and the
data rules that check lists and training (and `linnaeus shard`) raise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TEMPORAL_COLUMNS, write_jpeg, write_labels_h5

from linnaeus.cli import main
from linnaeus.config.resolve_data import data_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.data.verify_images import scan_images
from linnaeus.errors import ConfigError, DataError

import launch_utils

REPO = Path(__file__).resolve().parents[2]


def check(capsys, ds, *extra: str, opts: tuple[str, ...] = ()) -> tuple[int, str, list[str]]:
    argv = ["check", "--cfg", str(ds.config_path), *extra]
    if opts:
        argv += ["--opts", *opts]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), lines
    return rc, out, lines


def rewrite(ds, drop: tuple[str, ...] = (), **replace) -> None:
    """Rewrite the tiny labels.h5 without ``drop`` and with ``replace`` datasets."""
    with h5py.File(ds.labels_path) as f:
        data = {
            k: (f[k].asstr()[()] if k == "img_identifiers" else f[k][()]) for k in f if isinstance(f[k], h5py.Dataset)
        }
    for k in drop:
        data.pop(k)
    data.update(replace)
    write_labels_h5(ds.labels_path, data, attrs={"temporal": {"column_names": TEMPORAL_COLUMNS}})


def test_clean_dataset_passes(capsys, tiny_dataset):
    rc, out, errors = check(capsys, tiny_dataset)
    assert rc == 0 and errors == []
    assert "result: OK" in out and "24 existence checked; 0 missing, 0 corrupt" in out
    assert "taxa_L10  species  7" in out
    assert "TEMPORAL   temporal                h5    2    0    91.7%     2" in out


def test_json_report(capsys, tiny_dataset):
    rc, out, _ = check(capsys, tiny_dataset, "--json", "--decode-images")
    report = json.loads(out)
    assert rc == 0 and report["ok"] and report["errors"] == []
    assert report["ranks"]["taxa_L20"]["num_classes"] == 3 and report["ranks"]["taxa_L20"]["nulls"] == {
        "train": 2,
        "val": 2,
    }
    assert report["images"]["decoded"] and report["images"]["checked"] == 24
    assert report["labels"][0]["rows_total"] == 24 and report["split"] == {
        "train": 18,
        "val": 6,
        "seed": 7,
        "ratio": 0.75,
        "presplit": False,
        "by": "row",  # the tiny dataset has no observation_ids
        "stratify": "",
        "how": "by row, seed 7, ratio 0.75",
    }
    assert report["metadata"]["SPATIAL"][0]["missing"] == 1
    assert report["taxonomy"]["conflicts"] == [] and report["taxonomy"]["nodes"] == 12
    model = report["model"]  # measured, not documented: mFormerV1_sm with 3 metadata components
    assert model["name"] == "mFormerV1_sm" and abs(model["backbone_params"] / 30.7e6 - 1) < 0.05
    assert set(model["gmacs"]) >= {"224", "384"} and abs(model["gmacs"]["224"] / 4.3 - 1) < 0.05


CASES = {
    "missing identifiers": ({"drop": ("img_identifiers",)}, "dataset 'img_identifiers' is missing"),
    "missing taxa": ({"drop": ("taxa_L20",)}, "dataset 'taxa_L20' (listed in DATA.TASK_KEYS_H5) is missing"),
    "length mismatch": (
        {"taxa_L30": np.ones(23, np.uint32)},
        "dataset 'taxa_L30' has 23 rows but 'img_identifiers' has 24",
    ),
    "float taxa": (
        {"taxa_L10": np.arange(24, dtype=np.float64)},
        "dataset 'taxa_L10' has dtype float64, expected integer taxon ids",
    ),
    "meta dim": (
        {"spatial": np.ones((24, 2), np.float32)},
        "DATA.META.COMPONENTS.SPATIAL.DIM is 3 but the dataset has 2 columns (dataset 'spatial'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_violation(capsys, tiny_dataset, case):
    change, expected = CASES[case]
    rewrite(tiny_dataset, **change)
    rc, out, errors = check(capsys, tiny_dataset)
    assert rc == 2
    assert len(errors) == 1 and expected in errors[0], errors
    assert "result: 1 error" in out


def test_several_violations_each_get_a_line(capsys, tiny_dataset):
    rewrite(tiny_dataset, drop=("taxa_L30",), taxa_L10=np.arange(24, dtype=np.float32), spatial=np.ones((24, 5)))
    rc, _, errors = check(capsys, tiny_dataset)
    assert rc == 2 and len(errors) == 3
    assert "dataset 'taxa_L10' has dtype float32" in errors[0]
    assert "dataset 'taxa_L30' (listed in DATA.TASK_KEYS_H5) is missing" in errors[1]
    assert "DATA.META.COMPONENTS.SPATIAL.DIM is 3 but the dataset has 5 columns" in errors[2]


def test_nan_metadata_is_missing_not_an_error(capsys, tiny_dataset):
    spatial = np.full((24, 3), np.nan, np.float32)
    spatial[:12] = 0.5
    rewrite(tiny_dataset, spatial=spatial)
    rc, out, errors = check(capsys, tiny_dataset, "--json", "--no-images")
    report = json.loads(out)
    assert rc == 0 and errors == []
    assert report["metadata"]["SPATIAL"][0]["coverage"] == 0.5 and report["images"] is None


def test_not_hdf5(capsys, tiny_dataset):
    tiny_dataset.labels_path.write_bytes(b"\x89PNG\r\n\x1a\n not really labels")
    rc, _, errors = check(capsys, tiny_dataset)
    assert rc == 2
    assert errors == [
        f"error: labels file {tiny_dataset.labels_path} is not an HDF5 file (expected labels.h5 written with h5py/HDF5)"
    ]


def test_species_under_two_genera(capsys, tiny_dataset):
    taxa_l20 = tiny_dataset.taxa["taxa_L20"].astype(np.uint32)
    taxa_l20[[3]] = 102  # one Apis cerana (12) row under Eristalis
    taxa_l20[[15, 16]] = 101  # two Eristalis arbustorum (16) rows under Bombus
    rewrite(tiny_dataset, taxa_L20=taxa_l20)
    rc, out, errors = check(capsys, tiny_dataset, "--no-images", opts=("DATA.TAXONOMY_PATH", "null"))
    # The moved rows also put genus 102 under Apidae and genus 101 under Syrphidae: four conflicts in all.
    assert rc == 2 and len(errors) == 4
    assert errors[0].endswith(
        "taxa_L10 id 12 has 2 different parents: taxa_L20 id 100 (2 rows), taxa_L20 id 102 (1 rows)"
    )
    assert errors[1].endswith(
        "taxa_L10 id 16 has 2 different parents: taxa_L20 id 101 (2 rows), taxa_L20 id 102 (1 rows)"
    )
    assert "taxa_L20 id 102 has 2 different parents: taxa_L30 id 1001 (4 rows), taxa_L30 id 1000 (1 rows)" in errors[3]
    assert "4 conflicts" in out


def test_labels_inconsistent_with_taxonomy(capsys, tiny_dataset):
    taxa_l30 = tiny_dataset.taxa["taxa_L30"].astype(np.uint32)
    taxa_l30[[12, 13]] = 1000  # Eristalis tenax (15) rows in Apidae
    rewrite(tiny_dataset, taxa_L30=taxa_l30)
    rc, out, errors = check(capsys, tiny_dataset, "--no-images")
    assert rc == 2
    assert (
        f"error: {tiny_dataset.labels_path} row 12: taxa_L30 id 1000 is not an ancestor of taxa_L20 id 102" in errors[0]
    )
    assert "(2 rows like this)" in errors[0]
    assert "4 inconsistent rows" in out  # counted against the genus and the species


def test_num_classes_mismatch(capsys, tiny_dataset):
    rc, _, errors = check(capsys, tiny_dataset, "--no-images", opts=("DATA.NUM_CLASSES_PER_LEVEL", "{taxa_L10: 150}"))
    assert rc == 2 and len(errors) == 1
    assert "DATA.NUM_CLASSES_PER_LEVEL.taxa_L10 is 150 but" in errors[0] and "has 7 distinct" in errors[0]


def test_config_error_is_one_line(capsys, tiny_dataset):
    rc = main(["check", "--cfg", str(tiny_dataset.config_path), "--opts", "DATA.BATCH_SIZ", "3"])
    _, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "did you mean DATA.BATCH_SIZE?" in err


def test_missing_and_corrupt_images(capsys, tiny_dataset):
    tiny_dataset.image_file(3).unlink()
    tiny_dataset.image_file(8).write_bytes(tiny_dataset.image_file(8).read_bytes()[:200])  # truncated JPEG
    tiny_dataset.image_file(9).write_bytes(b"")
    rc, out, errors = check(capsys, tiny_dataset)
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: image {tiny_dataset.image_file(3)} (labels.h5 row 3) does not exist;")
    assert "2 of 24 images are missing or unreadable" in errors[0]  # the truncated one needs decoding to be found
    rc, out, errors = check(capsys, tiny_dataset, "--json", "--decode-images")
    report = json.loads(out)
    assert (report["images"]["missing"], report["images"]["corrupt"]) == (1, 2)
    problems = {i["row"]: i["problem"] for i in report["images"]["items"]}
    assert problems[3] == "does not exist" and problems[9] == "is empty (0 bytes)"
    assert problems[8].startswith("cannot be decoded")
    assert "3 of 24 images" in errors[0]


def test_allowed_missing_images_within_limit(capsys, tiny_dataset):
    tiny_dataset.image_file(3).unlink()
    allow = ("DATA.HYBRID.ALLOW_MISSING_IMAGES", "true")
    rc, _, errors = check(capsys, tiny_dataset, opts=allow)
    assert rc == 2 and "more than DATA.HYBRID.VERIFY_IMAGES allows" in errors[0] and "= 0" in errors[0]
    rc, out, errors = check(capsys, tiny_dataset, opts=(*allow, "DATA.HYBRID.VERIFY_IMAGES.MAX_MISSING_RATIO", "0.05"))
    assert rc == 0 and errors == []
    assert "warning: 1 missing and 0 corrupt images will be replaced and counted" in out


def test_verify_images_in_prepare(tiny_dataset, tmp_path):
    tiny_dataset.image_file(5).unlink()
    report_path = tmp_path / "verify.json"
    opts = ("DATA.HYBRID.VERIFY_IMAGES.ENABLED", "true", "DATA.HYBRID.VERIFY_IMAGES.REPORT_PATH", str(report_path))
    with pytest.raises(DataError) as err:
        prepare_data(data_spec(tiny_dataset.config(*opts)))
    assert f"image {tiny_dataset.image_file(5)} (labels.h5 row 5) does not exist" in str(err.value)
    assert f"(full list: {report_path})" in str(err.value)
    report = json.loads(report_path.read_text())
    assert report["items"] == [
        {"row": 5, "identifier": "img_0005", "path": str(tiny_dataset.image_file(5)), "problem": "does not exist"}
    ]
    data = prepare_data(
        data_spec(
            tiny_dataset.config(
                *opts, "DATA.HYBRID.ALLOW_MISSING_IMAGES", "true", "DATA.HYBRID.VERIFY_IMAGES.MAX_MISSING_COUNT", "1"
            )
        )
    )
    assert data.image_report["missing"] == 1 and data.stats["images"]["checked"] == 24


def test_scan_images_parallel_matches_serial(tmp_path):
    paths = [str(tmp_path / f"{i}.jpg") for i in range(50)]
    for p in paths[::3]:
        Path(p).write_bytes(b"x")
    serial = scan_images(paths, workers=1)
    assert scan_images(paths, workers=4) == serial and len(serial) == 33


def test_real_subprocess(tiny_dataset):
    exe = Path(sys.executable).parent / "linnaeus"
    cmd = [str(exe if exe.exists() else REPO / ".venv/bin/linnaeus"), "check", "--cfg", str(tiny_dataset.config_path)]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "result: OK" in ok.stdout
    rewrite(tiny_dataset, drop=("taxa_L10",))
    bad = subprocess.run([*cmd, "--no-images"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: {tiny_dataset.labels_path}: dataset 'taxa_L10' (listed in DATA.TASK_KEYS_H5) is missing;"
        " taxa datasets present: ['taxa_L20', 'taxa_L30']"
    ]


# --------------------------------------------------------------- identifiers stay inside DATA.HYBRID.IMAGES_DIR
ESCAPES = {1: "../../../../etc/passwd", 4: "/etc/hostname", 10: "../outside.jpg"}


def with_identifiers(ds, replace: dict[int, str]) -> None:
    ids = list(ds.identifiers)
    for row, ident in replace.items():
        ids[row] = ident
    rewrite(ds, img_identifiers=ids)


def escape_lines(ds) -> list[str]:
    """What every command says about ESCAPES, in row order."""
    return [
        f"{ds.labels_path} row 1: img_identifiers entry '../../../../etc/passwd' leads outside"
        " DATA.HYBRID.IMAGES_DIR through '..'",
        f"{ds.labels_path} row 4: img_identifiers entry '/etc/hostname' is an absolute path; identifiers must be"
        " relative to DATA.HYBRID.IMAGES_DIR",
        f"{ds.labels_path} row 10: img_identifiers entry '../outside.jpg' leads outside DATA.HYBRID.IMAGES_DIR"
        " through '..'",
    ]


def test_check_refuses_identifiers_outside_the_image_folder(capsys, tiny_dataset):
    write_jpeg(tiny_dataset.root / "outside.jpg")  # readable, so only the rule keeps it out
    with_identifiers(tiny_dataset, ESCAPES)
    rc, out, errors = check(capsys, tiny_dataset, "--json")
    report = json.loads(out)
    assert rc == 2 and errors == [f"error: {line}" for line in escape_lines(tiny_dataset)]
    assert report["images"]["checked"] == 21 and report["images"]["missing"] == 0  # the refused ones are not opened
    rc, _, no_images = check(capsys, tiny_dataset, "--no-images")  # the rule holds without the image check too
    assert rc == 2 and no_images == errors


def test_prepare_refuses_identifiers_outside_the_image_folder(tiny_dataset):
    with_identifiers(tiny_dataset, ESCAPES)
    with pytest.raises(DataError) as err:
        prepare_data(data_spec(tiny_dataset.config()))
    split_rows = prepare_data(data_spec(tiny_dataset.config("DATA.HYBRID.IMAGES_DIR", '""'))).train.rows
    first = min(r for r in ESCAPES if r in split_rows)  # train rows are checked first
    line = next(x for x in escape_lines(tiny_dataset) if f" row {first}:" in x)
    assert str(err.value).startswith(line) and "more problems; `linnaeus check` lists them all" in str(err.value)


def test_train_and_shard_refuse_identifiers_outside_the_image_folder(capsys, tiny_dataset, tmp_path):
    with_identifiers(tiny_dataset, {10: "../outside.jpg"})
    write_jpeg(tiny_dataset.root / "outside.jpg")
    line = escape_lines(tiny_dataset)[2]
    out = tmp_path / "shards"
    assert main(["shard", "--cfg", str(tiny_dataset.config_path), "--out", str(out), "--samples-per-shard", "4"]) == 2
    assert capsys.readouterr().err == f"error: {line}\n" and not list(out.glob("**/*.tar"))
    train = [sys.executable, "-m", "linnaeus.train", "--cfg", str(tiny_dataset.config_path)]
    proc = subprocess.run(train, capture_output=True, text=True, timeout=300, cwd=REPO, env=launch_utils.env())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert not list((tiny_dataset.root / "outputs").glob("**/checkpoints/*"))


def test_symbolic_links_out_of_the_image_folder(capsys, tiny_dataset):
    root, images = tiny_dataset.root, tiny_dataset.images_dir
    write_jpeg(root / "outside.jpg")
    write_jpeg(root / "elsewhere" / "x.jpg")
    (images / "link.jpg").symlink_to(root / "outside.jpg")  # a file link leading out
    (images / "sub").symlink_to(root / "elsewhere", target_is_directory=True)  # a folder link leading out
    (images / "inner.jpg").symlink_to(tiny_dataset.image_file(0))  # a link that stays inside: fine
    with_identifiers(tiny_dataset, {2: "link.jpg", 3: "sub/x.jpg", 5: "inner.jpg", 6: "sub/../outside.jpg"})
    rc, _, errors = check(capsys, tiny_dataset)
    assert rc == 2 and len(errors) == 3, errors
    refused = {e.split(": img_identifiers entry ")[1].split(" ")[0]: e for e in errors}
    # '..' after a folder link: inside by its text, outside in fact.
    assert set(refused) == {"'link.jpg'", "'sub/x.jpg'", "'sub/../outside.jpg'"}
    line = refused["'link.jpg'"]
    assert f"row 2: img_identifiers entry 'link.jpg' leads through a symbolic link to {root / 'outside.jpg'}" in line
    assert "outside DATA.HYBRID.IMAGES_DIR" in line and "DATA.HYBRID.ALLOW_SYMLINKS_OUTSIDE True" in line
    rc, _, errors = check(capsys, tiny_dataset, opts=("DATA.HYBRID.ALLOW_SYMLINKS_OUTSIDE", "true"))
    assert rc == 0 and errors == []
    with pytest.raises(DataError, match=r"row \d+: img_identifiers entry '(link|sub/x)\.jpg' leads through a symbolic"):
        prepare_data(data_spec(tiny_dataset.config()))


# ------------------------------------------------------------------------------- other rules: check and train
def test_encoded_metadata_out_of_range(capsys, tiny_dataset):
    spatial = tiny_dataset_spatial(tiny_dataset)
    spatial[4] = [1e30, 0.0, 0.0]
    spatial[9, 2] = -3.0
    rewrite(tiny_dataset, spatial=spatial)
    rc, _, errors = check(capsys, tiny_dataset, "--no-images")
    expected = (
        f"{tiny_dataset.labels_path}: dataset 'spatial' row 4 holds 1e+30, outside [-1, 1], the range of its encoding"
        " (2 rows like this; DATA.META.COMPONENTS.SPATIAL)"
    )
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(f"error: {expected}")
    with pytest.raises(DataError, match=r"dataset 'spatial' row 4 holds 1e\+30"):
        prepare_data(data_spec(tiny_dataset.config()))
    # A row with NaN is missing (zeroed and flagged), not out of range.
    spatial[4], spatial[9] = np.nan, 0.5
    rewrite(tiny_dataset, spatial=spatial)
    assert check(capsys, tiny_dataset, "--no-images")[0] == 0


def tiny_dataset_spatial(ds) -> np.ndarray:
    with h5py.File(ds.labels_path) as f:
        return f["spatial"][()]


def test_images_inside_hdf5_are_refused(capsys, tiny_dataset):
    rc, _, errors = check(capsys, tiny_dataset, opts=("DATA.HYBRID.USE_HYBRID", "false"))
    assert rc == 2 and errors == [
        "error: DATA.HYBRID.USE_HYBRID: False means images stored inside the HDF5 file, which Linnaeus does not read;"
        " keep it True and set DATA.HYBRID.IMAGES_DIR to the folder of image files"
    ]
    with pytest.raises(ConfigError, match=r"DATA\.HYBRID\.USE_HYBRID: False means images stored inside the HDF5"):
        prepare_data(data_spec(tiny_dataset.config("DATA.HYBRID.USE_HYBRID", "false")))


def test_empty_splits(capsys, tiny_dataset):
    ratio = ("DATA.H5.TRAIN_VAL_SPLIT_RATIO", "1.0")
    rc, _, errors = check(capsys, tiny_dataset, "--no-images", opts=ratio)
    expected = "the validation split is empty (DATA.H5.TRAIN_VAL_SPLIT_RATIO 1.0 leaves no rows for it)"
    assert rc == 2 and len(errors) == 1 and expected in errors[0]
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare_data(data_spec(tiny_dataset.config(*ratio)))
    rewrite(tiny_dataset, in_region=np.zeros(24, np.uint8))
    with pytest.raises(DataError, match=r"the training split is empty: no labels\.h5 rows are left"):
        prepare_data(data_spec(tiny_dataset.config("DATA.IN_REGION_ONLY", "true")))


def test_a_huge_identifier_gives_a_short_error_line(capsys, tiny_dataset):
    """Issue 26: a 10 MB identifier gave a 10 MB error line; identifiers are clipped with an ellipsis."""
    with h5py.File(tiny_dataset.labels_path) as f:
        ids = list(f["img_identifiers"].asstr()[()])
    ids[0] = "a" * 10_000_000
    rewrite(tiny_dataset, img_identifiers=ids)
    rc, out, errors = check(capsys, tiny_dataset)
    assert rc == 2 and len(errors) == 1
    assert len(errors[0]) < 1000 and "…" in errors[0] and "characters)" in errors[0], errors[0][:2000]
    assert len(out) < 10_000


def test_error_lines_clip_any_huge_word():
    from linnaeus.errors import DataError

    line = str(DataError(f"labels.h5 row 3: '{'x' * 50_000}' is not an identifier"))
    assert len(line) < 500 and line.startswith("labels.h5 row 3: 'xx") and line.endswith("is not an identifier")


def test_an_all_missing_metadata_column_is_reported(capsys, tiny_dataset):
    """Issue 26: an all-NaN metadata column passed `check` with OK and no word about it."""
    with h5py.File(tiny_dataset.labels_path) as f:
        temporal = f["temporal"][()].astype(np.float32)
    temporal[:] = np.nan
    rewrite(tiny_dataset, temporal=temporal)
    rc, out, errors = check(capsys, tiny_dataset)
    assert rc == 0 and errors == []
    warned = [line for line in out.splitlines() if line.startswith("warning:") and "TEMPORAL" in line]
    assert len(warned) == 1 and "missing (NaN or zeros) on all" in warned[0], out
    assert "DATA.META.COMPONENTS.TEMPORAL.ENABLED false" in warned[0]
    rc, out, errors = check(capsys, tiny_dataset, opts=("DATA.META.COMPONENTS.TEMPORAL.ENABLED", "false"))
    assert rc == 0 and errors == []
    assert not any("TEMPORAL" in line for line in out.splitlines() if line.startswith("warning:"))


def _report_block(lines: list[str]) -> list[str]:
    """The pretrained load report: its 'pretrained (' line and the indented lines under it."""
    start = next(i for i, line in enumerate(lines) if line.startswith("pretrained ("))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


@pytest.mark.slow
def test_check_reports_pretrained_heads_as_a_training_start_loads_them(capsys, tmp_path):
    """`check` knows the class maps: its per-group load report is the one the training start logs, heads included."""
    demo = launch_utils.ensure_demo(tmp_path, per_species=4)
    first = launch_utils.tiny_opts(demo, tmp_path / "first", TRAIN__MAX_STEPS=1)
    launch_utils.launch(first)
    export = launch_utils.run_dir(tmp_path / "first") / "export" / "final.safetensors"
    second = launch_utils.tiny_opts(demo, tmp_path / "second", TRAIN__MAX_STEPS=1, MODEL__PRETRAINED=str(export))

    code = main(["check", "--cfg", str(launch_utils.DEMO_CFG), "--no-images", "--opts", *second])
    out = capsys.readouterr().out
    assert code == 0, out
    checked = _report_block(out.splitlines())

    launch_utils.launch(second)
    log = (launch_utils.run_dir(tmp_path / "second") / "logs" / "train.log").read_text().splitlines()
    logged = [re.split(r"\] (?:INFO|WARNING) ", line, maxsplit=1)[-1] for line in log]
    trained = _report_block(logged)
    assert checked == trained
    heads = re.search(r"heads (\d+)/(\d+)", checked[0])
    assert heads is not None and heads[1] == heads[2] != "0", checked[0]


@pytest.mark.parametrize("rows", [1, 2])
def test_a_labels_file_of_one_or_two_rows_is_one_line_not_a_crash(capsys, tiny_dataset, rows):
    """Issue 26: `check` crashed on a one-row labels file (IndexError from argmax). Now every problem is one line,
    --json says the same, and a training split smaller than one batch is reported as training would refuse it."""
    with h5py.File(tiny_dataset.labels_path) as f:
        data = {
            k: (f[k].asstr()[()] if k == "img_identifiers" else f[k][()]) for k in f if isinstance(f[k], h5py.Dataset)
        }
    rewrite(tiny_dataset, **{k: v[:rows] for k, v in data.items()})
    rc, out, errors = check(capsys, tiny_dataset)  # check() asserts no traceback and only `error:` lines
    assert rc == 2 and len(errors) >= 1 and all("\n" not in e for e in errors), errors
    rc, out, _ = check(capsys, tiny_dataset, "--json")
    assert rc == 2 and json.loads(out)["errors"]
