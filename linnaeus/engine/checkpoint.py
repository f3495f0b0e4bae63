"""Resumable checkpoints: ``checkpoints/step_<N>/`` written under a temporary name on all ranks, renamed when complete,
then an atomically replaced ``latest`` pointer; retention of the last K and the best M; consolidated fp32 export.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from linnaeus.errors import ConfigError, DataError
from linnaeus.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("linnaeus")

STATE_FILE = "trainer_state.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int, keep_best: int, best_metric: str, best_mode: str) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode

    # ------------------------------------------------------------------------------------------------ discovery
    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        target = self.root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
        # A kill between replacing a re-saved step folder and renaming its new copy leaves the pointer dangling;
        # the newest complete checkpoint is then the right place to continue.
        done = self.completed()
        if not done:
            raise ConfigError(f"{pointer}: points to '{target.name}', which is not a complete checkpoint, and none is")
        log.warning(
            "%s points to missing '%s'; using the newest complete checkpoint %s", pointer, target.name, done[-1][1]
        )
        return done[-1][1]

    def completed(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.root.glob("step_*"):
            m = STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                out.append((int(m.group(1)), p))
        return sorted(out)

    def clean_partial(self) -> None:
        """Remove temporary folders and files left by a kill during writing (main process, before anyone saves)."""
        for p in self.root.glob(".tmp_step_*"):
            log.warning("removing incomplete checkpoint %s (interrupted while writing)", p)
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(f".{LATEST}.*.tmp"):  # atomic_write_text's temporary name for the pointer
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ writing
    def save(
        self, accelerator, step: int, trainer_state: dict[str, Any], write_files: Callable[[Path], None] | None = None
    ) -> Path:
        """Collective: every rank must call this (DeepSpeed's save has barriers). ``write_files(folder)``: extra files
        (identical on every rank, e.g. the EMA weights), written by the main process before the folder is complete.

        Disk space is checked first, by every rank, and agreed (one all-reduce), so a checkpoint that cannot fit
        stops all ranks together with one line instead of one rank's traceback and a hang on the others. A disk
        that fills anyway (the size is an estimate) stops this rank with the same line; either way the temporary
        folder is removed and ``latest`` still names the previous complete checkpoint."""
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp_{step_dir_name(step)}"
        needed = self._bytes_needed(accelerator)
        free = shutil.disk_usage(self.root).free
        short = torch.tensor([1.0 if free < needed else 0.0], device=accelerator.device)
        if accelerator.reduce(short, "max").item() > 0:
            raise self._no_space(step, needed, free)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp), safe_serialization=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if write_files is not None:
                    write_files(tmp)
                atomic_write_json(tmp / STATE_FILE, trainer_state)
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                atomic_write_text(self.root / LATEST, final.name + "\n")
                self._retain(trainer_state)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise self._no_space(step, needed, shutil.disk_usage(self.root).free) from None
        accelerator.wait_for_everyone()
        return final

    def _bytes_needed(self, accelerator) -> int:
        """The newest checkpoint's size, else ~16 bytes per parameter (fp32 weights, master copy, two Adam moments);
        plus a tenth for margin."""
        done = self.completed()
        if done:
            size = sum(f.stat().st_size for f in done[-1][1].rglob("*") if f.is_file())
        else:
            params = sum(
                int(getattr(p, "ds_numel", 0) or p.numel())
                for m in getattr(accelerator, "_models", [])
                for p in m.parameters()
            )
            size = 16 * params
        return int(size * 1.1) + (1 << 20)

    def _no_space(self, step: int, needed: int, free: int) -> DataError:
        latest = (self.root / LATEST).read_text().strip() if (self.root / LATEST).is_file() else "none yet"
        return DataError(
            f"{self.root}: not enough disk space for checkpoint {step_dir_name(step)} (about {needed} bytes needed, "
            f"{free} free); latest complete checkpoint: {latest}. Free space or lower "
            "SCHEDULE.CHECKPOINT.KEEP_LAST_N / KEEP_BEST_N, then rerun to resume"
        )

    def _retain(self, trainer_state: dict[str, Any]) -> None:
        """Keep the last K and the best M (by the configured metric); never the one `latest` points to."""
        done = self.completed()
        keep = {p.name for _, p in done[-self.keep_last :]}
        bests = trainer_state.get("best_checkpoints", [])
        keep |= {b["dir"] for b in bests[: self.keep_best]}
        latest = (self.root / LATEST).read_text().strip()
        keep.add(latest)
        for _, p in done:
            if p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def update_bests(self, bests: list[dict[str, Any]], step: int, metrics: dict[str, float]) -> list[dict[str, Any]]:
        """Record this step's value of the best metric (e.g. 'val/taxa_L10/top1'); sorted best first."""
        if self.best_metric not in metrics:
            return bests
        value = float(metrics[self.best_metric])
        entry = {"dir": step_dir_name(step), "step": step, "value": value}
        bests = [b for b in bests if b["step"] != step] + [entry]
        bests.sort(key=lambda b: -b["value"] if self.best_mode == "max" else b["value"])
        # Only the top M are kept on disk (and a later entry can only enter above them), so the list stays bounded.
        return bests[: self.keep_best]


def read_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint about to be resumed. DeepSpeed and accelerate unpickle the folder's files
    with ``weights_only=False`` on resume, so every pickle in it is first scanned (not loaded) for names outside the
    few these libraries write; a tampered folder is refused with one line before anything loads it."""
    from linnaeus.engine.safe_files import verify_checkpoint_files

    verify_checkpoint_files(ckpt)
    return json.loads((ckpt / STATE_FILE).read_text())


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict keys as the bare model names them (no DDP ``module.`` or torch.compile ``_orig_mod.``)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a checkpoint folder, whatever wrote it (DDP or ZeRO-1/2/3, any world size).
    Reads files only, never unpickling code (``weights_only=True``): no process group, no DeepSpeed."""
    ds_dir = ckpt / "pytorch_model"
    if ds_dir.is_dir():
        from linnaeus.engine.zero_consolidate import zero_state_dict

        sd = zero_state_dict(ds_dir)
    elif (ckpt / "model.safetensors").is_file():
        from safetensors.torch import load_file

        sd = load_file(str(ckpt / "model.safetensors"))
    elif (ckpt / "pytorch_model.bin").is_file():
        sd = torch.load(ckpt / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{ckpt}: no model weights found (expected pytorch_model/ or model.safetensors)")
    return {k: v.float() if v.is_floating_point() else v for k, v in strip_prefixes(sd).items()}


def export_weights(ckpt: Path, out_file: Path, metadata: dict[str, str] | None = None) -> Path:
    """One consolidated fp32 safetensors file, loadable into the model without DeepSpeed."""
    from linnaeus.utils.io import atomic_save_safetensors

    return atomic_save_safetensors(consolidated_state_dict(ckpt), out_file, metadata)
