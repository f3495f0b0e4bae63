"""Config → ``DataSpec``: the one place the data layer's keys are read."""

from __future__ import annotations

from linnaeus.config.defaults import Config
from linnaeus.specs.data import (
    ComponentSpec,
    CropSpec,
    DataSpec,
    FilterSpec,
    ImageSpec,
    LabelsSpec,
    LoaderSpec,
    MetaSpec,
    ObservationsSpec,
    ShardSpec,
    SplitSpec,
    VerifyImagesSpec,
)


def _configured_num_classes(cfg: Config) -> tuple[tuple[str, str, int], ...]:
    heads = cfg.MODEL.CLASSIFICATION.HEADS
    per_level = cfg.DATA.NUM_CLASSES_PER_LEVEL or {}
    out = []
    for key in cfg.DATA.TASK_KEYS_H5:
        if key in heads and heads[key].NUM_CLASSES is not None:
            out.append((key, f"MODEL.CLASSIFICATION.HEADS.{key}.NUM_CLASSES", int(heads[key].NUM_CLASSES)))
        if key in per_level:
            out.append((key, f"DATA.NUM_CLASSES_PER_LEVEL.{key}", int(per_level[key])))
    return tuple(out)


def labels_spec(cfg: Config) -> LabelsSpec:
    h5 = cfg.DATA.H5
    return LabelsSpec(
        labels_path=h5.LABELS_PATH,
        train_labels_path=h5.TRAIN_LABELS_PATH,
        val_labels_path=h5.VAL_LABELS_PATH,
        task_keys=tuple(cfg.DATA.TASK_KEYS_H5),
        taxonomy_path=cfg.DATA.TAXONOMY_PATH,
        configured_num_classes=_configured_num_classes(cfg),
    )


def meta_spec(cfg: Config) -> MetaSpec:
    """Enabled components in IDX order (the packing order); none when ``DATA.META.ACTIVE`` is False."""
    meta = cfg.DATA.META
    if not meta.ACTIVE:
        return MetaSpec(active=False)
    comps = [
        ComponentSpec(name, c.SOURCE, tuple(c.COLUMNS), c.DIM, c.IDX, c.ALLOW_MISSING, c.OOR_MASK)
        for name, c in meta.COMPONENTS.items()
        if c.ENABLED
    ]
    return MetaSpec(active=True, components=tuple(sorted(comps, key=lambda s: s.idx)))


def image_spec(cfg: Config) -> ImageSpec:
    hybrid = cfg.DATA.HYBRID
    v = hybrid.VERIFY_IMAGES
    report = v.REPORT_PATH.replace("{output_dir}", str(cfg.EXPERIMENT.run_folder())) if v.REPORT_PATH else None
    return ImageSpec(
        use_hybrid=hybrid.USE_HYBRID,
        images_dir=hybrid.IMAGES_DIR,
        file_extension=hybrid.FILE_EXTENSION,
        allow_symlinks_outside=hybrid.ALLOW_SYMLINKS_OUTSIDE,
        allow_missing=hybrid.ALLOW_MISSING_IMAGES,
        verify=VerifyImagesSpec(
            enabled=v.ENABLED,
            decode=v.DECODE,
            max_missing_ratio=v.MAX_MISSING_RATIO,
            max_missing_count=v.MAX_MISSING_COUNT,
            num_workers=v.NUM_WORKERS,
            report_path=report,
        ),
    )


def crop_spec(cfg: Config) -> CropSpec:
    return CropSpec(
        img_size=cfg.DATA.IMG_SIZE,
        rrc_scale=tuple(cfg.AUG.RRC_SCALE),
        rrc_ratio=tuple(cfg.AUG.RRC_RATIO),
        val_crop_pct=cfg.DATA.VAL_CROP_PCT,
    )


def data_spec(cfg: Config) -> DataSpec:
    d = cfg.DATA
    return DataSpec(
        labels=labels_spec(cfg),
        split=SplitSpec(
            ratio=d.H5.TRAIN_VAL_SPLIT_RATIO,
            seed=d.H5.TRAIN_VAL_SPLIT_SEED,
            by=d.H5.SPLIT_BY,
            stratify=d.H5.SPLIT_STRATIFY,
        ),
        filters=FilterSpec(in_region_only=d.IN_REGION_ONLY, require_all_ranks=d.REQUIRE_ALL_RANKS),
        meta=meta_spec(cfg),
        images=image_spec(cfg),
        crop=crop_spec(cfg),
        loader=LoaderSpec(
            batch_size=d.BATCH_SIZE,
            batch_size_val=d.BATCH_SIZE_VAL,
            num_workers=d.NUM_WORKERS,
            prefetch_factor=d.PREFETCH_FACTOR,
            pin_memory=d.PIN_MEMORY,
            decode=d.DECODE,
        ),
        shards=ShardSpec(
            enabled=d.SHARDS.ENABLED,
            dir=d.SHARDS.DIR,
            shuffle_buffer=d.SHARDS.SHUFFLE_BUFFER,
            verify=d.SHARDS.VERIFY,
        ),
        observations=ObservationsSpec(
            enabled=d.OBSERVATIONS.ENABLED, views=d.OBSERVATIONS.VIEWS, select=d.OBSERVATIONS.SELECT
        ),
        seed=cfg.MISC.SEED,
    )
