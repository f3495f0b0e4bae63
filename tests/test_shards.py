"""``linnaeus shard`` and training from shards: format, completeness, resumption, fingerprints, loader epochs."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import write_tiny_dataset
from PIL import Image

from linnaeus.cli import main
from linnaeus.config import load_config
from linnaeus.data.dataset import sample_rng
from linnaeus.data.images import load_image
from linnaeus.data.loader import build_loader
from linnaeus.data.prepare import prepare_data
from linnaeus.data.shards import ShardOptions, build_shard_batches, shard_report, write_shards
from linnaeus.data.shards.reader import ShardTrainDataset, iter_shard
from linnaeus.data.shards.tario import TarFormatError, iter_tar_members
from linnaeus.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SPS = 4  # samples per shard: many small shards from a small dataset


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_cfg(ds, out: Path, *opts: str):
    return ds.config(
        "DATA.SHARDS.ENABLED", "true", "DATA.SHARDS.DIR", str(out), "DATA.SHARDS.SHUFFLE_BUFFER", "8", *opts
    )


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """One dataset sharded once through the CLI with 2 writer processes."""
    root = tmp_path_factory.mktemp("shards")
    ds = write_tiny_dataset(root / "data", per_species=8)
    out = root / "out"
    argv = ["shard", "--cfg", str(ds.config_path), "--out", str(out), "--samples-per-shard", str(SPS), "--workers", "2"]
    assert main(argv) == 0
    cfg = shard_cfg(ds, out)
    return ds, out, cfg, prepare_data(cfg), json.loads((out / "manifest.json").read_text())


def test_manifest_records_source_counts_and_checksums(sharded):
    _ds, out, _, prepared, m = sharded
    assert m["format_version"] == 1 and m["tool"]["version"]
    assert m["source"]["labels"]["train"]["fingerprint"] == prepared.train.store.fingerprint
    assert m["source"]["seed"] == 7 and m["source"]["ratio"] == 0.75
    for split in ("train", "val"):
        e = m["splits"][split]
        assert e["num_samples"] == len(prepared.view(split).rows) and e["num_skipped"] == 0
        assert e["num_shards"] == len(e["shards"]) == -(-e["num_samples"] // SPS)
        for s in e["shards"]:
            assert sha256(out / s["name"]) == s["sha256"] and (out / s["name"]).stat().st_size == s["bytes"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [s["name"] for e in m["splits"].values() for s in e["shards"]]
    )


def test_every_split_row_once_readable_by_webdataset_and_tar(sharded):
    ds, out, _, prepared, m = sharded
    with h5py.File(ds.labels_path, "r") as f:
        identifiers = [x.decode() if isinstance(x, bytes) else x for x in f["img_identifiers"][:]]
    for split in ("train", "val"):
        seen = []
        for s in m["splits"][split]["shards"]:
            path = out / s["name"]
            listing = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True).stdout
            names = listing.split()
            assert len(names) == 2 * s["samples"] and all(n.endswith((".jpg", ".json")) for n in names)
            samples = list(wds.WebDataset(str(path), shardshuffle=False, empty_check=False))
            assert len(samples) == s["samples"]
            for sample in samples:
                info = json.loads(sample["json"])
                assert sample["__key__"] == f"{info['row']:010d}"
                assert info["identifier"] == identifiers[info["row"]]
                assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
                # Original bytes, not a re-encode.
                assert sample["jpg"] == ds.image_file(info["row"]).read_bytes()
                seen.append(info["row"])
        assert sorted(seen) == prepared.view(split).rows.tolist()  # each row exactly once


def test_interrupted_shard_run_resumes_to_identical_shards(sharded, tmp_path):
    ds, ref, _, _, m = sharded
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "linnaeus", "shard", "--cfg", str(ds.config_path), "--out", str(out)]
    cmd += ["--samples-per-shard", str(SPS), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not (out / "train-000000.tar").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Whatever the kill left, also leave the damage a kill can do: a partial temp file, a torn progress line,
    # a truncated shard, and no manifest.
    out.mkdir(exist_ok=True)
    names = [s["name"] for s in m["splits"]["train"]["shards"]]
    shutil.copy(ref / names[1], out / names[1])
    with open(out / names[1], "r+b") as fh:
        fh.truncate(700)
    (out / f".{names[2]}.999.tmp").write_bytes(b"partial")
    with open(out / ".progress.jsonl", "a") as fh:
        fh.write('{"name": "train-0000')
    (out / "manifest.json").unlink(missing_ok=True)
    (out / "train-999999.tar").write_bytes(b"stale")  # e.g. from a run with a smaller shard size

    manifest = write_shards(
        load_config(ds.config_path), out, ShardOptions(samples_per_shard=SPS, workers=2, progress=False)
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for split in ("train", "val"):
        assert [s["sha256"] for s in manifest["splits"][split]["shards"]] == [
            s["sha256"] for s in m["splits"][split]["shards"]
        ]
    for name in names:
        assert sha256(out / name) == sha256(ref / name)
    # A rerun on a complete folder keeps everything (checksums verified) and rewrites nothing.
    again = write_shards(load_config(ds.config_path), out, ShardOptions(samples_per_shard=SPS, progress=False))
    assert again["_kept"] == manifest["num_shards"]


def test_missing_image_strict_fails_and_allowed_is_skipped(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    row = int(prepare_data(ds.config()).train.rows[3])
    ds.image_file(row).unlink()
    with pytest.raises(DataError) as err:
        write_shards(ds.config(), tmp_path / "strict", ShardOptions(samples_per_shard=SPS, progress=False))
    msg = str(err.value)
    assert ds.image_file(row).name in msg and f"row {row}" in msg and "ALLOW_MISSING_IMAGES" in msg
    assert not list((tmp_path / "strict").glob(".*.tmp"))

    cfg = ds.config("DATA.HYBRID.ALLOW_MISSING_IMAGES", "true")
    m = write_shards(cfg, tmp_path / "lenient", ShardOptions(samples_per_shard=SPS, splits=("train",), progress=False))
    e = m["splits"]["train"]
    assert e["num_skipped"] == 1 and e["skipped_examples"][0]["row"] == row
    assert e["num_samples"] == len(prepare_data(cfg).train.rows) - 1 and "val" not in m["splits"]


def test_max_side_reencodes_large_images(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2, image_size=40)
    out = tmp_path / "out"
    m = write_shards(
        ds.config(), out, ShardOptions(samples_per_shard=SPS, max_side=24, splits=("val",), progress=False)
    )
    for s in m["splits"]["val"]["shards"]:
        for sample in wds.WebDataset(str(out / s["name"]), shardshuffle=False, empty_check=False):
            assert max(Image.open(io.BytesIO(sample["jpg"])).size) == 24


def test_changed_labels_fail_with_reshard_message(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    out = tmp_path / "out"
    assert main(["shard", "--cfg", str(ds.config_path), "--out", str(out), "--samples-per-shard", "4"]) == 0
    cfg = shard_cfg(ds, out)
    assert shard_report(cfg)["ok"] and shard_report(cfg, prepare_data(cfg))["split_match"] is True
    with h5py.File(ds.labels_path, "a") as f:
        f["metadata"].attrs["note"] = "relabelled"  # any byte change is a new fingerprint
    prepared = prepare_data(cfg)
    with pytest.raises(DataError) as err:
        build_shard_batches(cfg, prepared, world_size=1, rank=0, batch_size=2, seed=0, num_workers=0)
    msg = str(err.value)
    assert str(ds.labels_path) in msg and "changed" in msg and "\n" not in msg
    assert f"linnaeus shard --cfg {ds.config_path} --out {out}" in msg
    report = shard_report(cfg)
    assert not report["ok"] and report["fingerprint_match"] is False and "changed" in report["errors"][0]


def _epoch(cfg, prepared, *, world, rank, bs, workers, epoch=0):
    stream = build_shard_batches(cfg, prepared, world_size=world, rank=rank, batch_size=bs, seed=5, num_workers=workers)
    n = stream.batches_per_epoch
    stream.set_epoch(epoch)
    batches = list(stream)
    assert len(batches) == n == len(stream)
    return batches, n


def _check_against_file_rows(batches, prepared):
    a = prepared.samples("train", with_paths=False)
    where = {int(r): i for i, r in enumerate(a.rows)}
    for b in batches:
        for j, row in enumerate(b["row"].tolist()):
            i = where[row]  # KeyError: not a training row
            for k, t in b["targets"].items():
                assert int(t[j]) == int(a.targets[k][i])
            assert torch.equal(b["meta"][j], torch.from_numpy(a.meta[i]))
            assert torch.equal(b["meta_valid"][j], torch.from_numpy(a.meta_valid[i]))
    return [r for b in batches for r in b["row"].tolist()]


def test_loader_epoch_matches_file_training_rows(sharded):
    ds, _out, cfg, prepared, _ = sharded
    n_train, bs = len(prepared.train.rows), 4
    file_loader, _ = build_loader(
        prepared.dataset("train", train=True), batch_size=bs, num_workers=0, shuffle=True, seed=5
    )
    ref = next(iter(file_loader))

    batches, n = _epoch(cfg, prepared, world=1, rank=0, bs=bs, workers=0)
    assert n == n_train // bs
    b = batches[0]
    assert b.keys() == ref.keys() and b["targets"].keys() == ref["targets"].keys()
    for k in ("image", "meta", "meta_valid", "row", "is_pad", "image_ok"):
        assert b[k].dtype == ref[k].dtype and b[k].shape == ref[k].shape, k
    assert not b["is_pad"].any() and b["image_ok"].all()
    # Same decoder as files: train crop from (seed, epoch, row).
    row = int(b["row"][0])
    expected = load_image(ds.image_file(row), img_size=64, train=True, rng=sample_rng(5, 0, row))
    assert np.array_equal(b["image"][0].numpy(), expected)
    rows1 = _check_against_file_rows(batches, prepared)
    assert len(set(rows1)) >= 0.7 * n_train

    # The same epoch again is identical; the next epoch is another order.
    again, _ = _epoch(cfg, prepared, world=1, rank=0, bs=bs, workers=0)
    assert [r for x in again for r in x["row"].tolist()] == rows1
    other, _ = _epoch(cfg, prepared, world=1, rank=0, bs=bs, workers=0, epoch=1)
    assert [r for x in other for r in x["row"].tolist()] != rows1

    # Two processes (one with 2 workers): equal batch counts, together the same kind of coverage.
    r0, n0 = _epoch(cfg, prepared, world=2, rank=0, bs=bs, workers=2)
    r1, n1 = _epoch(cfg, prepared, world=2, rank=1, bs=bs, workers=0)
    assert n0 == n1 == n_train // (2 * bs)
    rows2 = _check_against_file_rows(r0, prepared) + _check_against_file_rows(r1, prepared)
    assert len(set(rows2)) >= 0.7 * n0 * 2 * bs


def test_resume_offset_and_few_shards_still_give_exact_counts(sharded):
    _, _out, cfg, prepared, _ = sharded
    stream = build_shard_batches(cfg, prepared, world_size=4, rank=3, batch_size=2, seed=0, num_workers=2)
    n = stream.batches_per_epoch
    stream.set_epoch(2, start_batch=2)
    assert len(stream) == n - 2 and len(list(stream)) == n - 2


def test_corrupt_members_are_skipped_and_counted(sharded, tmp_path):
    _, out, _cfg, prepared, m = sharded
    a = prepared.samples("train", with_paths=False)
    good = [str(out / s["name"]) for s in m["splits"]["train"]["shards"]]
    bad = tmp_path / "bad.tar"
    val_row = int(prepared.val.rows[0])
    with tarfile.open(bad, "w") as tar:
        for name, data in [
            ("0000000001.jpg", b"not a jpeg"),
            ("0000000001.json", json.dumps({"row": int(a.rows[1])}).encode()),
            (f"{val_row:010d}.jpg", Path(good[0]).read_bytes()[:10]),
            (f"{val_row:010d}.json", json.dumps({"row": val_row}).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(good[0]).read_bytes()[:1500])
    # Three good shards hold fewer samples than an epoch needs, so every epoch reads all five shards.
    shards = [str(bad), str(truncated), *good[:3]]
    ds = ShardTrainDataset(
        shards,
        [2, 4] + [s["samples"] for s in m["splits"]["train"]["shards"][:3]],
        a,
        batch_size=4,
        batches_per_epoch=6,
        img_size=64,
        shuffle_buffer=0,
    )
    for epoch in range(2):
        ds.set_epoch(epoch)
        rows = [r for b in ds for r in b["row"].tolist()]
        assert len(rows) == 24 and set(rows) <= set(a.rows.tolist())
    assert ds.skipped_count >= 6  # per epoch: two bad samples + the truncated tar


def test_cli_rejects_unknown_split(sharded, capsys):
    ds, out, *_ = sharded
    assert main(["shard", "--cfg", str(ds.config_path), "--out", str(out), "--splits", "train,test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --splits") and "\n" not in err


def test_cli_does_not_import_torch():
    code = "import sys, linnaeus.data.shards.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False", "the writer should start fast and fork-safe without torch"


@pytest.mark.skipif(os.name != "posix", reason="uses tar")
def test_shard_size_target_plans_by_mean_file_size(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    size = ds.image_file(0).stat().st_size
    m = write_shards(ds.config(), tmp_path / "out", ShardOptions(shard_size_mb=5 * (size + 1536) / 1e6, progress=False))
    assert m["options"]["samples_per_shard"]["train"] in (4, 5, 6)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_reads_other_writers_and_rejects_truncation(fmt):
    members = [("a" * 120 + ".jpg", b"x" * 700), ("dir/0001.json", b"{}"), ("empty.txt", b"")]
    if fmt == tarfile.USTAR_FORMAT:
        members[0] = ("p" * 90 + "/" + "a" * 60 + ".jpg", b"x" * 700)  # long names via the ustar prefix field
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_dir_info())  # skipped by the reader
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    assert list(iter_tar_members(io.BytesIO(raw))) == members
    for cut in (700, 1100, 2048):
        with pytest.raises(TarFormatError):
            list(iter_tar_members(io.BytesIO(raw[:cut])))
    garbled = bytearray(raw)
    garbled[600] ^= 0xFF  # inside the second header block
    with pytest.raises(TarFormatError):
        list(iter_tar_members(io.BytesIO(bytes(garbled))))


def _dir_info() -> tarfile.TarInfo:
    info = tarfile.TarInfo("somedir")
    info.type = tarfile.DIRTYPE
    return info


def test_rerun_with_other_shard_size_replaces_the_old_set(sharded, tmp_path):
    ds, ref, _, prepared, _ = sharded
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    opts = ShardOptions(samples_per_shard=7, splits=("train",), workers=1, progress=False)
    m = write_shards(load_config(ds.config_path), out, opts)
    assert m["splits"]["train"]["num_shards"] == -(-len(prepared.train.rows) // 7)
    assert "val" in m["splits"]  # the val entry of the earlier run is still valid and kept
    on_disk = sorted(p.name for p in out.glob("train-*.tar"))
    assert on_disk == [s["name"] for s in m["splits"]["train"]["shards"]]
    rows = [
        json.loads(parts["json"])["row"] for name in on_disk for _, parts in iter_shard(str(out / name), pytest.fail)
    ]
    assert sorted(rows) == prepared.train.rows.tolist()


RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from linnaeus.config import load_config
from linnaeus.data.prepare import prepare_data
from linnaeus.data.shards import build_shard_batches

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = load_config(sys.argv[1], ["DATA.SHARDS.ENABLED", "true", "DATA.SHARDS.DIR", sys.argv[2]])
stream = build_shard_batches(cfg, prepare_data(cfg), world_size=world, rank=rank, batch_size=4, seed=0, num_workers=1)
n = stream.batches_per_epoch
rows = []
for epoch in range(2):
    stream.set_epoch(epoch)
    for batch in stream:
        step = torch.ones(1)
        dist.all_reduce(step)  # one collective per batch: a rank with fewer batches would hang here
        rows += batch["row"].tolist()
    dist.barrier()
json.dump({"n": n, "rows": rows}, open(f"{sys.argv[3]}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_two_process_launch_steps_together(sharded, tmp_path):
    ds, out, _, prepared, _ = sharded
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file"]
    cmd += [
        str(REPO / "accelerate_configs" / "cpu_ddp.yaml"),
        str(script),
        str(ds.config_path),
        str(out),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = len(prepared.train.rows) // 8
    assert results[0]["n"] == results[1]["n"] == n
    assert all(len(r["rows"]) == 2 * n * 4 for r in results)
    assert set(results[0]["rows"]) | set(results[1]["rows"]) <= set(prepared.train.rows.tolist())
