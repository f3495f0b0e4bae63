"""``Predictor``: a bundle (or run folder) → hierarchy-consistent polli-typus results for images + raw metadata.

Preprocessing is the validation path itself, imported rather than re-implemented: ``load_image(train=False)``
(decode, EXIF orientation, resize + centre crop to DATA.IMG_SIZE with DATA.VAL_CROP_PCT) in uint8, then
``eval_transform`` (x / 255, AUG.MEAN/STD) on the device, in fp32, exactly as ``Trainer.validate`` feeds the model.
Metadata goes through ``linnaeus.inference.metadata`` → ``linnaeus.data.encoders``, the encoders labels.h5 uses.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from typus import CalibrationMethod, CalibrationProvenance, ScoreSemantics

from linnaeus.aug import eval_transform
from linnaeus.data.images import load_image
from linnaeus.data.taxonomy import rank_of_key
from linnaeus.errors import ConfigError, DataError
from linnaeus.inference.bundle import WEIGHTS, Bundle
from linnaeus.inference.calibration import scale_all
from linnaeus.inference.decoding import Decoded, Hierarchy, decode
from linnaeus.inference.metadata import encode_records
from linnaeus.inference.policies import PolicySpec, check_policy
from linnaeus.inference.typus_output import ResultBuilder, model_evidence, taxonomy_context

ImageInput = str | os.PathLike | bytes | Image.Image


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def image_id(image: ImageInput, i: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"<{'bytes' if isinstance(image, (bytes, bytearray, memoryview)) else 'image'}:{i}>"


def _pil_to_bytes(image: Image.Image) -> bytes:
    """A decoded PIL image as lossless PNG bytes for the shared loader (orientation applied first, since PNG
    drops EXIF). Pixels equal the PIL image's; a JPEG *file* decodes through the loader's own path instead."""
    buf = io.BytesIO()
    ImageOps.exif_transpose(image).save(buf, format="PNG")
    return buf.getvalue()


class Predictor:
    """Loads the model once; :meth:`predict` returns one ``typus.ClassificationResult`` per image."""

    def __init__(self, bundle: Bundle, device: str | torch.device | None = None, *, calibrate: bool = True) -> None:
        """``calibrate``: divide each head's logits by the bundle's fitted temperature (when it has one)."""
        from linnaeus.inference.calibration import check_doc

        self.bundle = bundle
        self.cfg = bundle.cfg
        self.device = resolve_device(device)
        self.model = bundle.build_model().to(self.device)
        # bf16 autocast where the device has it (CUDA with bf16 support): the forward pass at half the memory traffic;
        # log-softmax, calibration and decoding stay in fp32. CPUs run fp32, so results there are exact.
        self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.task_keys = bundle.task_keys
        self.components = bundle.components
        heads = self.cfg.MODEL.CLASSIFICATION.HEADS
        self.hierarchy = Hierarchy.build(bundle.class_maps, bundle.tree, {k: h.TYPE for k, h in heads.items()})
        routing = next((h for h in heads.values() if h.TYPE == "ConditionalClassifier"), None)
        info = bundle.info
        cal = bundle.calibration if calibrate else None
        self.temperatures: dict[str, float] = check_doc(cal, self.task_keys, "calibration") if cal else {}
        calibration = None
        if cal:
            calibration = CalibrationProvenance(
                method=CalibrationMethod.TEMPERATURE_SCALING,
                calibration_set_id=cal.get("calibration_set_id"),
                parameters={"temperature_by_rank": {str(rank_of_key(k)): t for k, t in self.temperatures.items()}},
            )
        self.results = ResultBuilder(
            class_maps=bundle.class_maps,
            tree=bundle.tree,
            context=taxonomy_context(
                bundle.class_maps,
                bundle.tree,
                source=self.cfg.DATA.DATASET.NAME or "linnaeus",
                version=self.cfg.DATA.DATASET.VERSION or None,
            ),
            provenance={
                "producer": "linnaeus",
                "model_name": self.cfg.MODEL.NAME,
                "model_version": f"{info.get('which')}@step{info.get('step')}",
                "checkpoint_uri": str(bundle.path / WEIGHTS) if bundle.path else info.get("source"),
                "checkpoint_sha": info.get("weights_sha256") or info.get("source_sha256"),
                "handler_version": f"linnaeus {info.get('linnaeus_version', '')}".strip(),
                "calibration": calibration,
            },
            model_evidence=model_evidence(
                {k: h.TYPE for k, h in heads.items()},
                routing.ROUTING if routing else "soft",
                routing.TEMPERATURE if routing else 1.0,
            ),
            score_semantics=ScoreSemantics.TEMPERATURE_SCALED_RANK_PROBABILITY
            if cal
            else ScoreSemantics.RANK_SOFTMAX_PROBABILITY,
        )

    @classmethod
    def from_bundle(
        cls, path: str | os.PathLike, device: str | torch.device | None = None, *, calibrate: bool = True
    ) -> Predictor:
        return cls(Bundle.load(path), device, calibrate=calibrate)

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike,
        which: str = "best",
        device: str | torch.device | None = None,
        *,
        calibrate: bool = True,
    ) -> Predictor:
        return cls(Bundle.from_run(run_dir, which), device, calibrate=calibrate)

    # ---------------------------------------------------------------------------------------------- inputs
    def load_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """uint8 (B, 3, S, S), decoded and cropped exactly as the validation dataset does."""
        arrays = []
        for image in images:
            source = _pil_to_bytes(image) if isinstance(image, Image.Image) else image
            if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
                raise DataError(f"image input of type {type(image).__name__}: expected a path, bytes or a PIL image")
            arrays.append(
                load_image(
                    Path(source) if isinstance(source, os.PathLike) else source,
                    img_size=self.cfg.DATA.IMG_SIZE,
                    train=False,
                    rng=None,
                    val_crop_pct=self.cfg.DATA.VAL_CROP_PCT,
                )
            )
        return (
            torch.from_numpy(np.stack(arrays))
            if arrays
            else torch.zeros((0, 3, self.cfg.DATA.IMG_SIZE, self.cfg.DATA.IMG_SIZE), dtype=torch.uint8)
        )

    def encode_metadata(
        self, metadata: Sequence[Mapping[str, Any] | None] | None, n: int, names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(meta float32 (n, ΣDIM), meta_valid bool (n, C)); None or a missing field → that slice zeroed."""
        if metadata is not None and len(metadata) != n:
            raise DataError(f"metadata: {len(metadata)} entries for {n} images; expected one dict (or None) per image")
        names = list(names) if names is not None else [f"image {i}" for i in range(n)]
        records = list(metadata) if metadata is not None else [None] * n
        meta, valid = encode_records(self.components, records, names)
        return torch.from_numpy(meta), torch.from_numpy(valid)

    @torch.inference_mode()
    def log_probs(self, images_uint8: torch.Tensor, meta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per task key, (B, K) log-softmax of the model's (refined) logits divided by the rank's temperature (over
        every class, when calibrated); the model sees what validation feeds it."""
        return scale_all(self.raw_log_probs(images_uint8, meta), self.temperatures)

    @torch.inference_mode()
    def raw_log_probs(self, images_uint8: torch.Tensor, meta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per task key, (B, K) log-softmax of the model's (refined) logits, uncalibrated."""
        x = eval_transform(images_uint8.to(self.device), self.cfg.AUG.MEAN, self.cfg.AUG.STD)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x, self._meta_in(meta))
        return {k: torch.log_softmax(v.float(), dim=1).cpu() for k, v in logits.items()}

    def _meta_in(self, meta: torch.Tensor | None) -> torch.Tensor | None:
        return None if meta is None or meta.shape[1] == 0 else meta.to(self.device, torch.float32)

    @torch.inference_mode()
    def features(self, images_uint8: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        """(B, D) features of each photo on its own (what a multi-view model pools), on the device."""
        x = eval_transform(images_uint8.to(self.device), self.cfg.AUG.MEAN, self.cfg.AUG.STD)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model.forward_features(x, self._meta_in(meta))

    @torch.inference_mode()
    def raw_log_probs_of_features(
        self, features: torch.Tensor, view_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Uncalibrated log-probabilities from :meth:`features`: (B, D) → one answer per photo; (N, K, D) with the
        (N, K) mask of present views (``pack_views``) → one per observation, the views pooled before the heads (a
        multi-view model only)."""
        f = features.to(self.device)
        if view_mask is not None:
            if self.model.pooling is None:
                raise ConfigError("pooling views needs a model trained with DATA.OBSERVATIONS (it has no view pooling)")
            f = self.model.pooling(f, view_mask.to(self.device))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model.head(f)
        return {k: torch.log_softmax(v.float(), dim=1).cpu() for k, v in logits.items()}

    # ---------------------------------------------------------------------------------------------- predict
    def decode(
        self,
        images: Sequence[ImageInput],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        top_k: int = 5,
        consistent: bool = True,
        ids: Sequence[str] | None = None,
    ) -> list[Decoded]:
        """One batch → decoded chains and per-rank candidates (class indices), before typus formatting."""
        if top_k < 1:
            raise ConfigError(f"top_k: expected >= 1, got {top_k}")
        names = list(ids) if ids is not None else [image_id(im, i) for i, im in enumerate(images)]
        meta, _ = self.encode_metadata(metadata, len(images), names)
        return decode(self.log_probs(self.load_images(images), meta), self.hierarchy, top_k, consistent)

    def predict(
        self,
        images: Sequence[ImageInput],
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        top_k: int = 5,
        consistent: bool = True,
        *,
        batch_size: int = 32,
        ids: Sequence[str] | None = None,
        policy: PolicySpec | None = None,
    ) -> list[Any]:
        """One ``typus.ClassificationResult`` per image (validated by its schema), processed ``batch_size`` at a time.

        ``metadata``: per image a dict with any of lat, lon (degrees), date (ISO 8601), elevation (metres), or None
        (one dict applies to every image).
        ``consistent=False`` gives raw per-rank top-k (``--raw``). ``ids`` name the images in the results
        (default: the path, or ``<bytes:i>`` / ``<image:i>``). ``policy``: the decision policy (default: the
        bundle's, else ``repair``; see :mod:`linnaeus.inference.policies`); ``consistent=False`` ignores it.
        """
        if policy is None:
            policy = self.default_policy
        if batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {batch_size}")
        if isinstance(metadata, Mapping):  # one dict: the same observation metadata for every image
            metadata = [metadata] * len(images)
        if metadata is not None and len(metadata) != len(images):
            raise DataError(f"metadata: {len(metadata)} entries for {len(images)} images; expected one per image")
        names = list(ids) if ids is not None else [image_id(im, i) for i, im in enumerate(images)]
        out = []
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            if not consistent or policy.kind == "repair":
                decoded = self.decode(
                    images[start:end],
                    None if metadata is None else metadata[start:end],
                    top_k,
                    consistent,
                    names[start:end],
                )
                out += [self.results.build(d, names[start + i], top_k) for i, d in enumerate(decoded)]
                continue
            meta, _ = self.encode_metadata(
                None if metadata is None else metadata[start:end], len(images[start:end]), names[start:end]
            )
            lp = self.log_probs(self.load_images(images[start:end]), meta)
            out += self.results_with_policy(lp, policy, names[start:end], top_k)
        return out

    @property
    def default_policy(self) -> PolicySpec:
        """The bundle's stored default (``calibration.json`` ``default_policy``), else ``repair``."""
        cal = self.bundle.calibration or {}
        name = cal.get("default_policy") if self.temperatures or cal.get("default_policy") == "cost" else None
        if not name:
            return PolicySpec("repair")
        return check_policy(name, cal.get("policies"), cal.get("cost_profile"))

    def policy(self, name: str | None, cost_profile: str | None = None) -> PolicySpec:
        """``--policy NAME`` resolved against the bundle's fitted parameters (None: the bundle's default)."""
        if name is None:
            return self.default_policy
        return check_policy(name, (self.bundle.calibration or {}).get("policies"), cost_profile)

    def results_with_policy(
        self, log_probs: Mapping[str, torch.Tensor], policy: PolicySpec, names: Sequence[str], top_k: int
    ) -> list[Any]:
        """typus results of one batch of (calibrated) log-probs under a threshold / climb / cost policy."""
        from linnaeus.inference import policy_output as po
        from linnaeus.inference.policies import climb

        h = self.hierarchy
        decoded = decode(log_probs, h, top_k, consistent=False)
        decisions = None
        if policy.kind == "climb":
            decisions = climb([log_probs[k].exp() for k in h.keys], h, float(policy.parameters["theta"]))
            for i, d in enumerate(decoded):  # a committed taxon is always listed among its rank's candidates
                for r, rd in enumerate(d.ranks):
                    c = int(decisions.chosen[i, r])
                    if c >= 0 and c not in {x for x, _ in rd.candidates}:
                        rd.candidates.append((c, float(log_probs[rd.key][i, c].exp())))
        out = []
        for i, d in enumerate(decoded):
            raw = self.results.build(d, names[i], top_k)
            if policy.kind == "threshold":
                out.append(po.threshold_result(raw, policy))
            elif policy.kind == "cost":
                out.append(po.cost_result(raw, policy))
            else:
                assert decisions is not None
                levels = h.levels
                chosen = {
                    levels[r]: (
                        self.results.taxon_id(k, int(decisions.chosen[i, r])) if decisions.chosen[i, r] >= 0 else None
                    )
                    for r, k in enumerate(h.keys)
                }
                out.append(
                    po.climb_result(
                        raw,
                        policy,
                        chosen,
                        {levels[r]: int(decisions.reason[i, r]) for r in range(len(levels))},
                        {levels[r]: float(decisions.score[i, r]) for r in range(len(levels))},
                    )
                )
        return out
