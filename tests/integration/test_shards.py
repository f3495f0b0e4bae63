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
from linnaeus.config.resolve_data import data_spec
from linnaeus.data.dataset import sample_rng
from linnaeus.data.device_decode import DeviceDecoder
from linnaeus.data.images import load_image
from linnaeus.data.loader import build_loader
from linnaeus.data.prepare import prepare_data
from linnaeus.data.shards import ShardOptions, build_shard_batches, shard_report, write_shards
from linnaeus.data.shards.reader import ShardTrainDataset, iter_shard
from linnaeus.data.shards.tario import TarFormatError, iter_tar_members
from linnaeus.errors import DataError

from launch_utils import ensure_demo, final_weights, latest_checkpoint, launch, metrics, run_dir, spawn, tiny_opts

REPO = Path(__file__).resolve().parents[2]
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
    return ds, out, cfg, prepare_data(data_spec(cfg)), json.loads((out / "manifest.json").read_text())


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
        data_spec(load_config(ds.config_path)), out, ShardOptions(samples_per_shard=SPS, workers=2, progress=False)
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for split in ("train", "val"):
        assert [s["sha256"] for s in manifest["splits"][split]["shards"]] == [
            s["sha256"] for s in m["splits"][split]["shards"]
        ]
    for name in names:
        assert sha256(out / name) == sha256(ref / name)
    # A rerun on a complete folder keeps everything (checksums verified) and rewrites nothing.
    again = write_shards(
        data_spec(load_config(ds.config_path)), out, ShardOptions(samples_per_shard=SPS, progress=False)
    )
    assert again["_counts"]["kept"] == manifest["num_shards"]


def test_missing_image_strict_fails_and_allowed_is_skipped(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    row = int(prepare_data(data_spec(ds.config())).train.rows[3])
    ds.image_file(row).unlink()
    with pytest.raises(DataError) as err:
        write_shards(data_spec(ds.config()), tmp_path / "strict", ShardOptions(samples_per_shard=SPS, progress=False))
    msg = str(err.value)
    assert ds.image_file(row).name in msg and f"row {row}" in msg and "ALLOW_MISSING_IMAGES" in msg
    assert not list((tmp_path / "strict").glob(".*.tmp"))

    cfg = ds.config("DATA.HYBRID.ALLOW_MISSING_IMAGES", "true")
    m = write_shards(
        data_spec(cfg), tmp_path / "lenient", ShardOptions(samples_per_shard=SPS, splits=("train",), progress=False)
    )
    e = m["splits"]["train"]
    assert e["num_skipped"] == 1 and e["skipped_examples"][0]["row"] == row
    assert e["num_samples"] == len(prepare_data(data_spec(cfg)).train.rows) - 1 and "val" not in m["splits"]


def test_max_side_reencodes_large_images(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2, image_size=40)
    out = tmp_path / "out"
    m = write_shards(
        data_spec(ds.config()), out, ShardOptions(samples_per_shard=SPS, max_side=24, splits=("val",), progress=False)
    )
    for s in m["splits"]["val"]["shards"]:
        for sample in wds.WebDataset(str(out / s["name"]), shardshuffle=False, empty_check=False):
            assert max(Image.open(io.BytesIO(sample["jpg"])).size) == 24


def test_changed_labels_fail_with_reshard_message(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    out = tmp_path / "out"
    argv = ["shard", "--cfg", str(ds.config_path), "--out", str(out), "--samples-per-shard", "4"]
    assert main([*argv, "--workers", "1", "--opts", "DATA.NUM_WORKERS", "0"]) == 0
    cfg = shard_cfg(ds, out)
    assert (
        shard_report(data_spec(cfg))["ok"]
        and shard_report(data_spec(cfg), prepare_data(data_spec(cfg)))["split_match"] is True
    )
    with h5py.File(ds.labels_path, "a") as f:
        f["metadata"].attrs["note"] = "relabelled"  # any byte change is a new fingerprint
    prepared = prepare_data(data_spec(cfg))
    with pytest.raises(DataError) as err:
        build_shard_batches(data_spec(cfg), prepared, world_size=1, rank=0, batch_size=2, seed=0, num_workers=0)
    msg = str(err.value)
    assert str(ds.labels_path) in msg and "changed" in msg and "\n" not in msg
    # The hint repeats the original command, --opts included (but not --workers, which does not change shards).
    assert f"`linnaeus {' '.join(argv[:-2])} --samples-per-shard 4 --opts DATA.NUM_WORKERS 0`" in msg
    report = shard_report(data_spec(cfg))
    assert not report["ok"] and report["fingerprint_match"] is False and "changed" in report["errors"][0]


def _epoch(cfg, prepared, *, world, rank, bs, workers, epoch=0):
    stream = build_shard_batches(
        data_spec(cfg), prepared, world_size=world, rank=rank, batch_size=bs, seed=5, num_workers=workers
    )
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
    stream = build_shard_batches(data_spec(cfg), prepared, world_size=4, rank=3, batch_size=2, seed=0, num_workers=2)
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
    code = "import sys, linnaeus.commands.shard; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False", "the writer should start fast and fork-safe without torch"


@pytest.mark.skipif(os.name != "posix", reason="uses tar")
def test_shard_size_target_plans_by_mean_file_size(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    size = ds.image_file(0).stat().st_size
    m = write_shards(
        data_spec(ds.config()), tmp_path / "out", ShardOptions(shard_size_mb=5 * (size + 1536) / 1e6, progress=False)
    )
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
    m = write_shards(data_spec(load_config(ds.config_path)), out, opts)
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
from linnaeus.config.resolve_data import data_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.data.shards import build_shard_batches


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(sys.argv[1], ["DATA.SHARDS.ENABLED", "true", "DATA.SHARDS.DIR", sys.argv[2]])
    stream = build_shard_batches(
        data_spec(cfg), prepare_data(data_spec(cfg)), world_size=world, rank=rank, batch_size=4, seed=0, num_workers=1
    )
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


if __name__ == "__main__":  # loader workers import the main script (forkserver)
    main()
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


def _shard_cmd(ds, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "linnaeus", "shard", "--cfg", str(ds.config_path), "--out", str(out), *extra]


def test_parallel_parts_and_merge_equal_one_run(sharded, tmp_path):
    ds, ref, _, _, m = sharded
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            _shard_cmd(ds, out, "--samples-per-shard", str(SPS), "--workers", "1", "--part", f"{i}/2"),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert "--merge" in outs[0][0] and not (out / "manifest.json").exists()
    progress = sorted(p.name for p in out.glob(".progress*"))
    assert progress == [".progress.part-0-of-2.jsonl", ".progress.part-1-of-2.jsonl"]
    argv = ["shard", "--cfg", str(ds.config_path), "--out", str(out), "--samples-per-shard", str(SPS)]
    # A merge before all parts are done names what is missing and writes nothing.
    part1 = out / progress[1]
    saved = part1.read_text()
    part1.write_text("")
    assert main([*argv, "--merge"]) == 2
    assert not (out / "manifest.json").exists()
    part1.write_text(saved)
    assert main([*argv, "--merge"]) == 0

    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # progress logs gone
    for name in (p.name for p in ref.glob("*.tar")):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["command"] == f"linnaeus {' '.join(argv)}"
    assert {k: v for k, v in merged.items() if k != "command"} == {k: v for k, v in m.items() if k != "command"}


def test_part_argument_is_checked(sharded, capsys):
    ds, out, *_ = sharded
    assert main(["shard", "--cfg", str(ds.config_path), "--out", str(out), "--part", "2/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --part") and "0 <= I < N" in err


def test_changed_source_image_is_reported_and_rewritten(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    out = tmp_path / "out"
    assert main(["shard", "--cfg", str(ds.config_path), "--out", str(out), "--samples-per-shard", str(SPS)]) == 0
    cfg = shard_cfg(ds, out)
    before = shard_report(data_spec(cfg))
    assert before["ok"] and before["stale_shards"] == 0, before["errors"]
    prepared = prepare_data(data_spec(cfg))
    row = int(prepared.train.rows[0])
    image = ds.image_file(row)
    Image.new("RGB", (32, 32), (250, 10, 10)).save(image, format="JPEG")
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))

    report = shard_report(data_spec(cfg))
    assert not report["ok"] and report["stale_shards"] == 1
    assert "source images changed" in report["errors"][0] and "linnaeus shard --cfg" in report["errors"][0]
    stale = report["errors"][0].split()[1].rstrip(":")
    m = write_shards(data_spec(load_config(ds.config_path)), out, ShardOptions(samples_per_shard=SPS, progress=False))
    assert m["_counts"]["stale"] == m["_counts"]["written"] == 1
    members = {json.loads(p["json"])["row"]: p["jpg"] for _, p in iter_shard(stale, pytest.fail)}
    assert members[row] == image.read_bytes()
    assert shard_report(data_spec(cfg))["ok"] and shard_report(data_spec(cfg))["stale_shards"] == 0


def test_flipped_byte_in_a_shard_is_caught_with_verify_full(sharded, tmp_path):
    ds, ref, _, prepared, m = sharded
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    bad = m["splits"]["train"]["shards"][0]
    with open(out / bad["name"], "r+b") as fh:
        fh.seek(512 + 200)  # inside the first image's bytes: tar headers stay valid
        byte = fh.read(1)
        fh.seek(512 + 200)
        fh.write(bytes([byte[0] ^ 0x01]))
    bad_rows = {json.loads(p["json"])["row"] for _, p in iter_shard(str(ref / bad["name"]), pytest.fail)}

    def epoch(verify: str) -> tuple[set[int], int]:
        cfg = shard_cfg(ds, out, "DATA.SHARDS.VERIFY", verify)
        stream = build_shard_batches(
            data_spec(cfg), prepared, world_size=1, rank=0, batch_size=4, seed=5, num_workers=0
        )
        rows = set()
        for e in range(2):
            stream.set_epoch(e)
            rows |= {r for b in stream for r in b["row"].tolist()}
        return rows, stream.skipped_samples

    rows, skipped = epoch("full")
    assert skipped >= bad["samples"] and not rows & bad_rows
    assert shard_report(data_spec(shard_cfg(ds, out)), verify_checksums=True)["splits"]["train"]["bad_files"] == [
        bad["name"]
    ]
    rows, skipped = epoch("open")  # same size: only the sha256 sees it
    assert skipped <= 1 and rows & bad_rows


@pytest.mark.parametrize("world,rank,workers", [(1, 0, 0), (1, 0, 2), (2, 1, 2)])
def test_resume_mid_epoch_continues_with_the_next_samples(sharded, world, rank, workers):
    _ds, _out, cfg, prepared, _ = sharded
    stream = build_shard_batches(
        data_spec(cfg), prepared, world_size=world, rank=rank, batch_size=4, seed=3, num_workers=workers
    )
    stream.set_epoch(1)
    full = list(stream)
    assert len(full) == stream.batches_per_epoch >= 5
    for k in (1, 4):
        stream.set_epoch(1, start_batch=k)
        rest = list(stream)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:], strict=True):
            assert a["row"].tolist() == b["row"].tolist()
            assert torch.equal(a["image"], b["image"])


def test_shard_sh_outside_slurm_prints_usage_and_exits_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for args in ([], ["cfg.yaml", str(tmp_path / "out")]):
        proc = subprocess.run(["bash", str(REPO / "shard.sh"), *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 2 and "usage: sbatch --array=0-(N-1) shard.sh CONFIG.yaml OUT" in proc.stderr
    assert "not inside a SLURM job" in proc.stderr and not (tmp_path / "out").exists()
    # Inside an array task it runs this task's part (a stand-in `linnaeus` shows the command line).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "linnaeus").write_text('#!/bin/sh\necho "linnaeus $*"\n')
    (fake / "linnaeus").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "5"}
    slurm |= {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4", "PATH": f"{fake}:{env['PATH']}"}
    slurm["LINNAEUS_VENV"] = str(tmp_path / "no-venv")  # the checkout's .venv would put the real linnaeus first
    args = ["c.yaml", "out", "--samples-per-shard", "8", "--opts", "DATA.IMG_SIZE", "64"]
    proc = subprocess.run(["bash", str(REPO / "shard.sh"), *args], capture_output=True, text=True, env={**env, **slurm})
    assert proc.returncode == 0, proc.stderr
    assert (
        "linnaeus shard --cfg c.yaml --out out --part 3/5 --samples-per-shard 8 --opts DATA.IMG_SIZE 64" in proc.stdout
    )


@pytest.mark.slow
def test_kill_9_of_a_shard_fed_run_then_rerun_matches_an_uninterrupted_run(tmp_path_factory, tmp_path):
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=30)
    shards = tmp_path / "shards"
    common = dict(
        TRAIN__MAX_STEPS=12,
        SCHEDULE__CHECKPOINT__INTERVAL="{STEPS: 3}",
        SCHEDULE__CHECKPOINT__KEEP_LAST_N=10,
        DATA__SHARDS__ENABLED=True,
        DATA__SHARDS__DIR=str(shards),
        DATA__SHARDS__SHUFFLE_BUFFER=16,
    )
    opts = tiny_opts(demo, tmp_path / "a", name="straight", **common)
    cmd = [sys.executable, "-m", "linnaeus", "shard", "--cfg", str(REPO / "configs/experiments/demo.yaml")]
    cmd += ["--out", str(shards), "--samples-per-shard", "24", "--workers", "1", "--opts", *opts]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=300)
    launch(opts)
    straight = final_weights(run_dir(tmp_path / "a", "straight"))

    opts = tiny_opts(demo, tmp_path / "b", name="killed", **common)
    run = run_dir(tmp_path / "b", "killed")
    proc = spawn(opts)
    deadline = time.monotonic() + 300
    while latest_checkpoint(run) != "step_3" and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert 12 not in {r["step"] for r in metrics(run, "train")}, "finished before the kill; the test proves nothing"
    launch(opts)
    log = (run / "logs" / "train.log").read_text()
    resumed_at = [s for s in range(3, 12, 3) if f"resumed from step {s}" in log]
    assert resumed_at, log[-2000:]
    batches = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["num_samples"] // 16
    assert resumed_at[0] % batches != 0, "the resume must land mid-epoch to test the shard stream position"
    resumed = final_weights(run)
    worst = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    assert worst < 1e-5, worst


# ------------------------------------------------------------------------------------------- device decode
def _stream_epoch(cfg, prepared, *, decode, workers, epoch=1, start_batch=0):
    stream = build_shard_batches(
        data_spec(cfg), prepared, world_size=1, rank=0, batch_size=4, seed=7, num_workers=workers, decode=decode
    )
    stream.set_epoch(epoch, start_batch=start_batch)
    return list(stream)


def test_device_decode_shard_batches_match_cpu_decode_crops(sharded):
    """Same rows in the same order as CPU decode, crops within the bound tests/unit/test_device_decode.py states
    (max 32 levels, mean 1.5: the CPU path's reduced-size JPEG decode against full-resolution resampling)."""
    _ds, _out, cfg, prepared, _ = sharded
    cpu = _stream_epoch(cfg, prepared, decode="cpu", workers=2)
    planned = _stream_epoch(cfg, prepared, decode="device", workers=2)
    # exactly the keys of a device-decode file batch
    file_loader, _ = build_loader(
        prepared.dataset("train", train=True, decode="device"), batch_size=4, num_workers=0, shuffle=True, seed=5
    )
    file_batch = next(iter(file_loader))
    assert planned[0].keys() == file_batch.keys() and "image" not in planned[0]
    for k in file_batch:
        if k != "targets":
            assert planned[0][k].dtype == file_batch[k].dtype, k
    decoder = DeviceDecoder()
    decoded = [decoder.decode(b, "cpu") for b in planned]
    assert decoder.decoded == 4 * len(cpu) and decoder.fallbacks == 0
    for d, c in zip(decoded, cpu, strict=True):
        assert d.keys() == c.keys()
        assert d["row"].tolist() == c["row"].tolist()
        diff = (d["image"].int() - c["image"].int()).abs()
        assert int(diff.max()) <= 32 and float(diff.float().mean()) < 1.5
    # Decoded in the workers (a CPU training device): bit-identical to the main process's decode, counts carried.
    shipped = _stream_epoch(cfg, prepared, decode="worker", workers=2)
    receiver = DeviceDecoder()
    for s, d in zip(shipped, decoded, strict=True):
        assert s["decode_counts"].tolist() == [4, 0, 0]
        got = receiver.decode(s, "cpu")
        assert got.keys() == d.keys() and torch.equal(got["image"], d["image"])
    assert receiver.counts() == decoder.counts()


@pytest.mark.parametrize("decode", ["device", "worker"])
def test_device_decode_shard_resume_is_sample_exact(sharded, decode, monkeypatch):
    _ds, _out, cfg, prepared, _ = sharded
    from linnaeus.data.shards import reader

    reads = []
    real_read = reader.read_image
    monkeypatch.setattr(reader, "read_image", lambda data, **kw: reads.append(1) or real_read(data, **kw))
    resumed = _stream_epoch(cfg, prepared, decode=decode, workers=0, start_batch=3)
    assert len(reads) == 4 * len(resumed)  # the fast-forward never reads an image
    full = _stream_epoch(cfg, prepared, decode=decode, workers=2)
    assert len(full) >= 5
    for k in (1, 4):
        rest = _stream_epoch(cfg, prepared, decode=decode, workers=2, start_batch=k)
        assert len(rest) == len(full) - k
        for a, b in zip(rest, full[k:], strict=True):
            assert a.keys() == b.keys() and a["row"].tolist() == b["row"].tolist()
            for key in ("image_bytes", "image_offsets", "crop_box", "image") if decode == "device" else ("image",):
                if key in a:
                    assert torch.equal(a[key], b[key]), key


def test_png_member_falls_back_and_unreadable_header_is_skipped_with_device_decode(sharded, tmp_path):
    _, out, _cfg, prepared, m = sharded
    a = prepared.samples("train", with_paths=False)
    good = m["splits"]["train"]["shards"]
    png = io.BytesIO()
    Image.fromarray(np.full((50, 70, 3), 90, np.uint8)).save(png, format="PNG")
    mixed = tmp_path / "mixed.tar"
    with tarfile.open(mixed, "w") as tar:
        for name, data in [
            ("0000000001.png", png.getvalue()),
            ("0000000001.json", json.dumps({"row": int(a.rows[0])}).encode()),
            ("0000000002.jpg", b"\xff\xd8 not a jpeg header"),
            ("0000000002.json", json.dumps({"row": int(a.rows[1])}).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    common = dict(img_size=64, shuffle_buffer=0, batch_size=3, batches_per_epoch=2)
    shards = [str(mixed), str(out / good[0]["name"])]
    counts = [2, good[0]["samples"]]
    ds = ShardTrainDataset(shards, counts, a, decode="device", **common)
    decoder = DeviceDecoder()
    batches = [decoder.decode(b, "cpu") for b in ds]
    rows = [r for b in batches for r in b["row"].tolist()]
    assert len(rows) == 6 and int(a.rows[1]) not in rows[:3]
    assert ds.skipped_count >= 1  # the unreadable header: skipped and counted as with CPU decode
    assert decoder.fallbacks == rows.count(int(a.rows[0])) >= 1  # the PNG: decoded in the worker, counted
    cpu = ShardTrainDataset(shards, counts, a, decode="cpu", **common)
    cpu_batches = list(cpu)
    assert [r for b in cpu_batches for r in b["row"].tolist()] == rows
    # the PNG fell back to the CPU path itself with the same planned box: bit-identical to CPU decode
    i = rows.index(int(a.rows[0]))
    assert torch.equal(batches[i // 3]["image"][i % 3], cpu_batches[i // 3]["image"][i % 3])


def _shard_cli(ds, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "linnaeus", "shard", "--cfg", str(ds.config_path), "--out", str(out), *extra]


def test_fifo_named_like_an_image_is_one_line_not_a_hang(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    row = int(prepare_data(data_spec(ds.config())).train.rows[3])
    ds.image_file(row).unlink()
    os.mkfifo(ds.image_file(row))  # nobody ever writes to it: reading it would wait forever
    cmd = _shard_cli(ds, tmp_path / "out", "--samples-per-shard", str(SPS), "--workers", "1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ds.image_file(row).name in errors[0] and "not a regular file" in errors[0], errors


def test_second_shard_run_into_a_busy_out_is_one_line(tmp_path):
    ds = write_tiny_dataset(tmp_path / "data", per_species=2)
    out = tmp_path / "out"
    first = subprocess.Popen(
        _shard_cli(ds, out, "--samples-per-shard", str(SPS), "--workers", "1"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        progress = out / ".progress.jsonl"  # its first shard written: the run holds the folder
        while not (progress.is_file() and progress.read_text().strip()):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # holds the folder, mid-run
        for extra in ([], ["--part", "0/2"], ["--merge"]):
            second = subprocess.run(
                _shard_cli(ds, out, "--samples-per-shard", str(SPS), *extra),
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
            assert second.returncode == 2 and len(errors) == 1, second.stderr[-3000:]
            assert "Traceback" not in second.stderr and "another `linnaeus shard` run" in errors[0], errors
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert (out / "manifest.json").is_file()


def test_parts_share_the_out_folder_but_one_part_runs_once(tmp_path):
    from linnaeus.data.shards.folder_lock import ShardFolderLock
    from linnaeus.data.shards.manifest import Part

    out = tmp_path / "out"
    out.mkdir()
    with ShardFolderLock(out, Part(0, 2)), ShardFolderLock(out, Part(1, 2)):
        with pytest.raises(DataError, match="part 0/2"):
            ShardFolderLock(out, Part(0, 2)).__enter__()
        with pytest.raises(DataError, match="another `linnaeus shard`"):
            ShardFolderLock(out, None).__enter__()
    with ShardFolderLock(out, None):
        pass
