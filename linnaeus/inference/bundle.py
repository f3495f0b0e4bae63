"""Inference bundles: everything needed to serve a trained model, with no pickle and no training code paths.

A bundle folder (written by ``linnaeus export``) holds:

- ``weights.safetensors``: consolidated fp32 weights (whatever wrote the checkpoint: DDP or ZeRO-1/2/3);
- ``config.yaml``: the run's resolved config (the model is rebuilt from it with ``build_model``);
- ``class_maps.json``: per rank, class index → taxon id, name, rank level (the run's own file);
- ``taxonomy.json``: the tree the run used (hierarchy matrices and decoding are derived from it);
- ``preprocessing.json``: the validation image transform and the metadata encoding, component by component;
- ``bundle.json``: format version, which weights (best / final / step_N), their step and sha256, the sha256 of
  every other file (``files_sha256``: config, class maps, taxonomy, preprocessing), model summary;
- ``calibration.json`` (optional; ``linnaeus calibrate``): per-rank temperatures, the calibration split's id, NLL/ECE
  before and after, fitted decision-policy parameters; its sha256 is recorded in bundle.json and checked on load.

The same :class:`Bundle` object is also built straight from a run folder (``Bundle.from_run``), so ``predict --run``
and ``predict --bundle`` share every line after loading.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linnaeus.config import Config, dump_config, load_config
from linnaeus.data.taxonomy import ClassMap, TaxonomyTree, keys_coarse_to_fine, rank_of_key
from linnaeus.engine.checkpoint import strip_prefixes as _strip_prefixes
from linnaeus.engine.ema import EMA_FILE
from linnaeus.errors import ConfigError, DataError, clip
from linnaeus.inference.metadata import COLUMNS_ASSUMED, MetaComponent, resolve_components
from linnaeus.utils.io import atomic_write_json, make_readable

log = logging.getLogger("linnaeus")

FORMAT = "linnaeus-bundle"
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.yaml"
CLASS_MAPS = "class_maps.json"
TAXONOMY = "taxonomy.json"
PREPROCESSING = "preprocessing.json"
INFO = "bundle.json"
CALIBRATION = "calibration.json"  # optional: not in BUNDLE_FILES
BUNDLE_FILES = (WEIGHTS, CONFIG, CLASS_MAPS, TAXONOMY, PREPROCESSING, INFO)
HASHED_FILES = (CONFIG, CLASS_MAPS, TAXONOMY, PREPROCESSING)  # besides the weights (``weights_sha256``)
_STEP = re.compile(r"^step_(\d+)$")


# ------------------------------------------------------------------------------------------------------ helpers
def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def _fp32(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in _strip_prefixes(sd).items()}


def refuse_nonfinite(sd: dict[str, torch.Tensor], where: Path | str) -> None:
    """Weights with NaN/inf would predict nothing (every score NaN) while exiting 0: refused with one line."""
    for name, tensor in sd.items():
        if tensor.is_floating_point():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise DataError(
                    f"{where}: weight {name} holds {bad} non-finite values (NaN/inf); these weights cannot predict "
                    "(did the run diverge? export another checkpoint, e.g. --which step_N)"
                )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the file's string metadata). safetensors only: no pickle is ever unpickled here."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path}: cannot read safetensors weights ({err})") from None


def class_maps_from_json(doc: Any, task_keys: list[str], where: str) -> dict[str, ClassMap]:
    """class_maps.json (``PreparedData.class_maps_json``) → ClassMap per task key, checked against the config."""
    if not isinstance(doc, dict):
        raise DataError(f"{where}: expected an object keyed by task key")
    missing = [k for k in task_keys if k not in doc]
    if missing:
        raise DataError(f"{where}: no class map for {missing} (config DATA.TASK_KEYS_H5 is {task_keys})")
    out = {}
    for key in task_keys:
        entry = doc[key]
        classes = entry.get("classes") if isinstance(entry, dict) else None
        if not isinstance(classes, list) or not classes:
            raise DataError(f"{where}: {key}.classes must be a non-empty list")
        ids, names = [], []
        for i, c in enumerate(classes):
            if not isinstance(c, dict) or c.get("index") != i or "taxon_id" not in c:
                raise DataError(f"{where}: {key}.classes[{i}] must be {{'index': {i}, 'taxon_id': ..., 'name': ...}}")
            try:
                ids.append(int(c["taxon_id"]))
            except (TypeError, ValueError):
                raise DataError(
                    f"{where}: {key}.classes[{i}].taxon_id must be an integer, got {c['taxon_id']!r}"
                ) from None
            names.append(c.get("name"))
        out[key] = ClassMap(key, rank_of_key(key), np.asarray(ids, np.int64), names)
    return out


def hierarchy_matrices(
    task_keys: list[str], class_maps: dict[str, ClassMap], tree: TaxonomyTree
) -> dict[tuple[str, str], torch.Tensor]:
    """The same (parent_key, child_key) matrices ``PreparedData.hierarchy_matrices`` gives the trainer."""
    order = keys_coarse_to_fine(task_keys)
    return {
        (p, c): torch.as_tensor(tree.hierarchy_matrix(class_maps[p], class_maps[c]), dtype=torch.float32)
        for p, c in itertools.pairwise(order)
    }


def preprocessing_doc(cfg: Config, components: list[MetaComponent]) -> dict[str, Any]:
    return {
        "image": {
            "img_size": cfg.DATA.IMG_SIZE,
            "val_crop_pct": cfg.DATA.VAL_CROP_PCT,
            "resize": "shorter side to img_size / val_crop_pct, then centre crop img_size x img_size "
            "(one filtered resize of the source box; linnaeus.data.images.load_image with train=False)",
            "interpolation": "bilinear",
            "exif_orientation": True,
            "color": "RGB uint8, then x / 255",
            "mean": list(cfg.AUG.MEAN),
            "std": list(cfg.AUG.STD),
        },
        "metadata": {
            "active": bool(cfg.DATA.META.ACTIVE),
            "dim": sum(c.dim for c in components),
            "missing": "all-zero slice (and validity flag False), as in labels.h5",
            "components": [c.to_json() for c in components],
        },
    }


# ------------------------------------------------------------------------------------------------------ bundle
def view_pooling(cfg: Config) -> dict[str, Any] | None:
    """How a multi-view model (``DATA.OBSERVATIONS.ENABLED``) pools its views before the heads; None for an image
    model. Recorded in bundle.json (``model.view_pooling``) so a reader knows what the bundle expects."""
    if not cfg.DATA.OBSERVATIONS.ENABLED:
        return None
    return {
        "mode": cfg.MODEL.VIEW_POOLING,
        "temperature": float(cfg.MODEL.VIEW_POOLING_TEMPERATURE),
        "views": int(cfg.DATA.OBSERVATIONS.VIEWS),
    }


@dataclass
class Bundle:
    cfg: Config
    state_dict: dict[str, torch.Tensor]
    class_maps: dict[str, ClassMap]
    class_maps_doc: dict[str, Any]
    tree: TaxonomyTree
    taxonomy_doc: dict[str, Any]
    components: list[MetaComponent]
    preprocessing: dict[str, Any]
    info: dict[str, Any]
    path: Path | None = None  # the bundle folder, or None when built from a run folder
    calibration: dict[str, Any] | None = None  # calibration.json (temperatures, fitted policies), when fitted

    @property
    def task_keys(self) -> list[str]:
        return list(self.cfg.DATA.TASK_KEYS_H5)

    @property
    def num_classes(self) -> dict[str, int]:
        return {k: len(m) for k, m in self.class_maps.items()}

    @property
    def meta_dims(self) -> list[int]:
        return [c.dim for c in self.components]

    def build_model(self) -> torch.nn.Module:
        """The model exactly as the trainer built it, with these weights loaded (strict), in eval mode."""
        from linnaeus.config.resolve_model import model_spec
        from linnaeus.models import build_model

        hierarchy = hierarchy_matrices(self.task_keys, self.class_maps, self.tree)
        model = build_model(
            model_spec(self.cfg), self.task_keys, self.num_classes, self.meta_dims, hierarchy, load_pretrained=False
        )
        where = self.path or self.info.get("source", "the run")
        expected = model.state_dict()
        for name, tensor in self.state_dict.items():
            if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
                raise DataError(
                    f"{where}: weight {name} has shape {list(tensor.shape)} but the model built from its config, "
                    f"class maps and metadata needs {list(expected[name].shape)}"
                )
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{where}: weights do not match the model built from its config.yaml "
                f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
            )
        return model.eval()

    # -------------------------------------------------------------------------------------------- from a run
    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, which: str = "best") -> Bundle:
        run = Path(run_dir)
        if not (run / CONFIG).is_file():
            raise ConfigError(f"--run {run}: not a run folder (no {CONFIG})")
        cfg = load_config(run / CONFIG)
        sd, weights_info = resolve_weights(run, which)
        refuse_nonfinite(sd, f"{run} ({weights_info.get('source', which)})")
        class_maps_doc = _read_json(run / CLASS_MAPS)
        class_maps = class_maps_from_json(class_maps_doc, list(cfg.DATA.TASK_KEYS_H5), str(run / CLASS_MAPS))
        tree = TaxonomyTree.from_json(run / TAXONOMY)
        components = resolve_components(cfg)
        from linnaeus import __version__

        info = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "linnaeus_version": __version__,
            "run": str(run.resolve()),
            **weights_info,
            "model": {
                "type": cfg.MODEL.TYPE,
                "name": cfg.MODEL.NAME,
                "img_size": cfg.MODEL.IMG_SIZE,
                "view_pooling": view_pooling(cfg),
            },
            "task_keys": list(cfg.DATA.TASK_KEYS_H5),
            "task_keys_coarse_to_fine": keys_coarse_to_fine(cfg.DATA.TASK_KEYS_H5),
            "num_classes": {k: len(m) for k, m in class_maps.items()},
            "meta_dims": [c.dim for c in components],
            "dataset": {
                "name": cfg.DATA.DATASET.NAME,
                "version": cfg.DATA.DATASET.VERSION,
                "clade": cfg.DATA.DATASET.CLADE,
            },
        }
        return cls(
            cfg=cfg,
            state_dict=sd,
            class_maps=class_maps,
            class_maps_doc=class_maps_doc,
            tree=tree,
            taxonomy_doc=tree.to_json(),
            components=components,
            preprocessing=preprocessing_doc(cfg, components),
            info=info,
            calibration=_run_calibration(run, weights_info, list(cfg.DATA.TASK_KEYS_H5)),
        )

    # -------------------------------------------------------------------------------------------- from a folder
    @classmethod
    def load(cls, path: str | os.PathLike) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"--bundle {root}: not a folder")
        absent = [f for f in BUNDLE_FILES if not (root / f).is_file()]
        if absent:
            raise DataError(f"bundle {root}: missing {absent}; expected a folder written by `linnaeus export`")
        info = _read_json(root / INFO)
        if not isinstance(info, dict):
            raise DataError(f"{root / INFO}: expected a JSON object written by `linnaeus export`")
        version = info.get("format_version")
        if not isinstance(version, int) or info.get("format") != FORMAT or version > FORMAT_VERSION:
            raise DataError(
                f"{root / INFO}: format {info.get('format')!r} version {version!r}; "
                f"this linnaeus reads {FORMAT} up to version {FORMAT_VERSION}"
            )
        _verify_weights_file(root, info)
        cfg = load_config(root / CONFIG)
        sd, _ = read_safetensors(root / WEIGHTS)
        class_maps_doc = _read_json(root / CLASS_MAPS)
        class_maps = class_maps_from_json(class_maps_doc, list(cfg.DATA.TASK_KEYS_H5), str(root / CLASS_MAPS))
        tree = TaxonomyTree.from_json(root / TAXONOMY)
        preprocessing = _read_json(root / PREPROCESSING)
        try:
            raw_components = preprocessing["metadata"]["components"]
        except (KeyError, TypeError):
            raise DataError(f"{root / PREPROCESSING}: no metadata.components list") from None
        components = [MetaComponent.from_json(c, str(root / PREPROCESSING)) for c in raw_components]
        components.sort(key=lambda c: c.idx)
        _verify_against_info(root, info, {k: len(m) for k, m in class_maps.items()}, [c.dim for c in components])
        _verify_files(root, info)
        refuse_nonfinite(sd, root / WEIGHTS)
        calibration = _read_calibration(root, info, list(cfg.DATA.TASK_KEYS_H5))
        return cls(
            cfg,
            _fp32(sd),
            class_maps,
            class_maps_doc,
            tree,
            tree.to_json(),
            components,
            preprocessing,
            info,
            root,
            calibration,
        )

    def set_calibration(self, doc: dict[str, Any]) -> Path:
        """Store a calibration document with these weights: in the bundle folder (calibration.json, its sha256
        in bundle.json), or for a run in ``export/calibration.json`` tagged with the weights it was fitted on."""
        from linnaeus.inference.calibration import check_doc

        check_doc(doc, self.task_keys, "calibration")
        self.calibration = doc
        if self.path is not None:
            atomic_write_json(self.path / CALIBRATION, doc)
            self.info = dict(self.info, calibration_sha256=sha256_file(self.path / CALIBRATION))
            atomic_write_json(self.path / INFO, self.info)
            return self.path / CALIBRATION
        run = Path(self.info["run"])
        (run / "export").mkdir(parents=True, exist_ok=True)
        weights = {k: self.info.get(k) for k in ("which", "step", "source")}
        atomic_write_json(run / "export" / CALIBRATION, {**doc, "weights": weights})
        return run / "export" / CALIBRATION

    # -------------------------------------------------------------------------------------------- writing
    def save(self, out: str | os.PathLike) -> Path:
        """Write the bundle to a temporary sibling folder, then rename it into place (replacing an older bundle)."""
        from safetensors.torch import save_file

        out = Path(out)
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / INFO).is_file())):
            raise ConfigError(f"--out {out}: exists and is not a bundle folder; choose a new path or remove it")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            meta = {"format": FORMAT, "which": str(self.info.get("which")), "step": str(self.info.get("step"))}
            save_file({k: v.contiguous() for k, v in self.state_dict.items()}, str(tmp / WEIGHTS), metadata=meta)
            make_readable(tmp / WEIGHTS)  # safetensors writes 0600; a bundle is meant to be shared
            (tmp / CONFIG).write_text(dump_config(self.cfg))
            atomic_write_json(tmp / CLASS_MAPS, self.class_maps_doc)
            atomic_write_json(tmp / TAXONOMY, self.taxonomy_doc)
            atomic_write_json(tmp / PREPROCESSING, self.preprocessing)
            info = dict(
                self.info,
                weights_file=WEIGHTS,
                weights_sha256=sha256_file(tmp / WEIGHTS),
                files_sha256={name: sha256_file(tmp / name) for name in HASHED_FILES},
            )
            info.pop("calibration_sha256", None)
            if self.calibration is not None:
                atomic_write_json(tmp / CALIBRATION, {k: v for k, v in self.calibration.items() if k != "weights"})
                info["calibration_sha256"] = sha256_file(tmp / CALIBRATION)
            atomic_write_json(tmp / INFO, info)
            old = None
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
            tmp.rename(out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.info, self.path = info, out
        return out


def _check_sha256(path: Path, recorded: Any, field: str, what_happened: str) -> None:
    """``path``'s sha256 is the one bundle.json records in ``field``, or one DataError line saying so."""
    actual = sha256_file(path)
    if actual != recorded:
        raise DataError(
            f"{path}: sha256 {actual[:16]}... does not match bundle.json's {field} {str(recorded)[:16]}...; "
            f"{what_happened}"
        )


def _verify_weights_file(root: Path, info: dict[str, Any]) -> None:
    """The weights are the ones `linnaeus export` wrote: their sha256 matches bundle.json (checked before reading)."""
    recorded = info.get("weights_sha256")
    if not isinstance(recorded, str) or not recorded:
        raise DataError(f"{root / INFO}: no weights_sha256; cannot verify {WEIGHTS}")
    _check_sha256(root / WEIGHTS, recorded, "weights_sha256", "the weights were changed after export")


def _read_calibration(root: Path, info: dict[str, Any], task_keys: list[str]) -> dict[str, Any] | None:
    """calibration.json when present, verified against bundle.json's calibration_sha256."""
    from linnaeus.inference.calibration import check_doc

    path = root / CALIBRATION
    recorded = info.get("calibration_sha256")
    if not path.is_file():
        if recorded:
            raise DataError(f"{path}: missing, but bundle.json records a calibration (calibration_sha256)")
        return None
    _check_sha256(path, recorded, "calibration_sha256", "the calibration was changed outside `linnaeus calibrate`")
    doc = _read_json(path)
    check_doc(doc, task_keys, str(path))
    return doc


def _run_calibration(run: Path, weights_info: dict[str, Any], task_keys: list[str]) -> dict[str, Any] | None:
    """A run's export/calibration.json, used only when it was fitted on exactly these weights."""
    from linnaeus.inference.calibration import check_doc

    path = run / "export" / CALIBRATION
    if not path.is_file():
        return None
    doc = _read_json(path)
    fitted_on = doc.get("weights") if isinstance(doc, dict) else None
    if not isinstance(fitted_on, dict) or any(fitted_on.get(k) != weights_info.get(k) for k in ("which", "step")):
        log.info("%s: fitted on other weights (%s); not applied", path, fitted_on)
        return None
    check_doc(doc, task_keys, str(path))
    return doc


def _verify_files(root: Path, info: dict[str, Any]) -> None:
    """Config, class names, taxonomy and preprocessing are the ones `linnaeus export` wrote (sha256 against
    bundle.json's ``files_sha256``; bundles written before it was recorded are not checked)."""
    recorded = info.get("files_sha256")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise DataError(f"{root / INFO}: files_sha256 is not a mapping of file name to sha256")
    for name in HASHED_FILES:
        expected = recorded.get(name)
        if not isinstance(expected, str):
            raise DataError(f"{root / INFO}: files_sha256 has no entry for {name}; cannot verify it")
        _check_sha256(root / name, expected, "files_sha256", "the file was changed after export")


def _verify_against_info(root: Path, info: dict[str, Any], num_classes: dict[str, int], meta_dims: list[int]) -> None:
    """Class maps and metadata encoders agree with the sizes bundle.json recorded at export."""
    recorded = info.get("num_classes")
    if isinstance(recorded, dict):
        for key, n in num_classes.items():
            if key in recorded and recorded[key] != n:
                raise DataError(
                    f"{root / CLASS_MAPS}: {key} has {n} classes but bundle.json records {recorded[key]} "
                    "(the weights' output size)"
                )
    recorded_dims = info.get("meta_dims")
    if isinstance(recorded_dims, list) and list(recorded_dims) != list(meta_dims):
        raise DataError(
            f"{root / PREPROCESSING}: metadata widths {meta_dims} differ from bundle.json's {recorded_dims} "
            "(the weights' metadata input size)"
        )


# ------------------------------------------------------------------------------------------------------ weights
def _checkpoint_step(ckpt: Path) -> int | None:
    state = ckpt / "trainer_state.json"
    if state.is_file():
        return int(json.loads(state.read_text()).get("step", 0))
    m = _STEP.match(ckpt.name)
    return int(m.group(1)) if m else None


def _from_checkpoint(ckpt: Path, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from linnaeus.engine.checkpoint import consolidated_state_dict

    sd = consolidated_state_dict(ckpt)
    return _fp32(sd), {"which": which, "source": str(ckpt), "step": _checkpoint_step(ckpt)}


def _from_export(path: Path, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd, meta = read_safetensors(path)
    step = meta.get("step")
    return _fp32(sd), {
        "which": which,
        "source": str(path),
        "step": int(step) if step and step.isdigit() else None,
        "source_sha256": sha256_file(path),
    }


def _from_ema_file(path: Path, which: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's EMA weights (its step from the folder)."""
    sd, info = _from_export(path, which)
    return sd, {**info, "step": _checkpoint_step(path.parent)}


def _latest_checkpoint(run: Path) -> Path | None:
    from linnaeus.engine.checkpoint import CheckpointManager

    root = run / "checkpoints"
    if not root.is_dir():
        return None
    return CheckpointManager(root, 1, 0, "", "max").latest()


def resolve_weights(run: Path, which: str = "best") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 weights of ``which`` (best | final | ema | step_N) from a run folder, and where they came from.

    best: export/best.safetensors, else the best checkpoint named by trainer_state.json (its EMA weights when the run
    ranked by a ``val_ema/`` metric), else final. ema: the EMA weights (``TRAIN.EMA``), as final.
    final: export/final.safetensors unless the latest checkpoint is newer (a resumed run that did not finish),
    else the latest checkpoint. step_N: that checkpoint folder, consolidated from its shards.
    """
    export = run / "export"
    ckpts = run / "checkpoints"
    if which == "best":
        if (export / "best.safetensors").is_file():
            return _from_export(export / "best.safetensors", "best")
        latest = _latest_checkpoint(run)
        if latest is not None:
            state = json.loads((latest / "trainer_state.json").read_text())
            bests = state.get("best_checkpoints", [])
            if bests and not _STEP.match(str(bests[0].get("dir", ""))):  # a folder name, never a path elsewhere
                raise DataError(
                    f"{latest / 'trainer_state.json'}: best checkpoint {clip(bests[0].get('dir'))!r} is not a step_<N> folder"
                )
            if bests and (ckpts / bests[0]["dir"]).is_dir():
                if str(state.get("best_metric", "")).startswith("val_ema/"):
                    return _from_ema_file(ckpts / bests[0]["dir"] / EMA_FILE, "best")
                return _from_checkpoint(ckpts / bests[0]["dir"], "best")
        log.info("%s: no best weights recorded; using the final weights", run)
        return resolve_weights(run, "final")
    if which == "final":
        latest = _latest_checkpoint(run)
        final = export / "final.safetensors"
        if final.is_file():
            sd, info = _from_export(final, "final")
            latest_step = _checkpoint_step(latest) if latest is not None else None
            if latest is None or info["step"] is None or latest_step is None or latest_step <= info["step"]:
                return sd, info
            log.warning(
                "%s: checkpoint %s is newer than export/final.safetensors; using the checkpoint", run, latest.name
            )
        if latest is not None:
            return _from_checkpoint(latest, "final")
        raise ConfigError(f"--run {run}: no weights (no export/final.safetensors and no checkpoints/latest)")
    if which == "ema":
        latest = _latest_checkpoint(run)
        exported = export / EMA_FILE
        if exported.is_file():
            sd, info = _from_export(exported, "ema")
            latest_step = _checkpoint_step(latest) if latest is not None else None
            if latest is None or info["step"] is None or latest_step is None or latest_step <= info["step"]:
                return sd, info
        if latest is not None and (latest / EMA_FILE).is_file():
            return _from_ema_file(latest / EMA_FILE, "ema")
        raise ConfigError(f"--which ema: {run} has no EMA weights (it was trained without TRAIN.EMA.ENABLED)")
    m = _STEP.match(which)
    if not m:
        raise ConfigError(f"--which {which!r}: expected best, final, ema or step_N (e.g. step_1200)")
    ckpt = ckpts / which
    if not (ckpt / "trainer_state.json").is_file():
        have = sorted(
            (p.name for p in ckpts.glob("step_*") if (p / "trainer_state.json").is_file()), key=lambda s: int(s[5:])
        )
        raise ConfigError(f"--which {which}: no complete checkpoint {ckpt} (available: {have or 'none'})")
    return _from_checkpoint(ckpt, which)


def assumed_encodings(components: list[MetaComponent]) -> list[MetaComponent]:
    """Encodable components whose columns are the encoders' defaults rather than the config's or the labels file's."""
    return [c for c in components if c.encoder is not None and c.columns_from == COLUMNS_ASSUMED]


def export_bundle(
    run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best", *, assume_encodings: bool = False
) -> Path:
    """``linnaeus export``: build the bundle from a run folder, check the weights load into the model, write it.

    A metadata component whose encoding could not be read (no ``COLUMNS`` in the config, no readable
    ``column_names`` in the labels file) would be served with the built-in encoding, which may not be the one
    training used: refused, unless ``assume_encodings``, which warns and records the assumption in bundle.json.
    """
    bundle = Bundle.from_run(run_dir, which)
    assumed = assumed_encodings(bundle.components)
    if assumed:
        keys = ", ".join(f"DATA.META.COMPONENTS.{c.name}.COLUMNS" for c in assumed)
        if not assume_encodings:
            raise ConfigError(
                f"{keys}: not set, and the labels file has no readable 'column_names' for "
                f"{', '.join(repr(c.source) for c in assumed)}, so the metadata encoding serving would use is a guess; "
                "set COLUMNS to the columns training used, or pass --assume-encodings to export with the built-in "
                "encoding"
            )
        for c in assumed:
            log.warning(
                "export: ASSUMING the built-in encoding for metadata component %s (labels.h5 '%s': %s); "
                "predictions are wrong if training encoded it differently. Recorded in %s.",
                c.name,
                c.source,
                ", ".join(c.columns),
                INFO,
            )
        bundle.info["assumed_metadata_encodings"] = {
            c.name: {"source": c.source, "columns": list(c.columns)} for c in assumed
        }
    bundle.build_model()  # fail here, not at serving time, if weights and config disagree
    return bundle.save(out)
