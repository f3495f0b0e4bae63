"""What the data layer reads: labels, images, crops, splits, filters, metadata components, loaders, shards.

Plain, frozen values (tuples, strings, numbers): ``linnaeus.config.resolve_data.data_spec`` fills them from the
config, and nothing under ``linnaeus.data`` reads the config itself. Paths are kept as the user wrote them; the
data layer resolves them (``~``, relative to the current directory) when it uses them, and raises its one-line
errors then, as before. Each field's docstring names the config key it comes from.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ComponentSpec:
    """One enabled metadata component (``DATA.META.COMPONENTS.<name>``)."""

    name: str
    source: str  # SOURCE: the labels.h5 dataset
    columns: tuple[str, ...]  # COLUMNS ([] = all)
    dim: int  # DIM
    idx: int  # IDX: packing order
    allow_missing: bool = True  # ALLOW_MISSING
    oor_mask: bool = False  # OOR_MASK

    @property
    def key(self) -> str:
        return f"DATA.META.COMPONENTS.{self.name}"


@dataclass(frozen=True)
class LabelsSpec:
    """Which labels.h5 file(s), which ranks, which taxonomy, and where the config states class counts."""

    labels_path: str | None = None  # DATA.H5.LABELS_PATH
    train_labels_path: str | None = None  # DATA.H5.TRAIN_LABELS_PATH
    val_labels_path: str | None = None  # DATA.H5.VAL_LABELS_PATH
    task_keys: tuple[str, ...] = ("taxa_L10", "taxa_L20")  # DATA.TASK_KEYS_H5, config order
    taxonomy_path: str | None = None  # DATA.TAXONOMY_PATH
    # (task key, config key, value) for every MODEL.CLASSIFICATION.HEADS.<key>.NUM_CLASSES and
    # DATA.NUM_CLASSES_PER_LEVEL.<key> that is set (checked against the data, never used as the count).
    configured_num_classes: tuple[tuple[str, str, int], ...] = ()

    def configured(self, key: str) -> list[tuple[str, int]]:
        """(config key, value) for every place the configuration states the class count of ``key``."""
        return [(name, value) for k, name, value in self.configured_num_classes if k == key]


@dataclass(frozen=True)
class SplitSpec:
    ratio: float = 0.9  # DATA.H5.TRAIN_VAL_SPLIT_RATIO (one file split by seed)
    seed: int = 42  # DATA.H5.TRAIN_VAL_SPLIT_SEED
    by: str = "observation"  # DATA.H5.SPLIT_BY (observation | row; row when labels.h5 has no observation_ids)
    stratify: bool = False  # DATA.H5.SPLIT_STRATIFY (by the finest configured rank)


@dataclass(frozen=True)
class FilterSpec:
    in_region_only: bool = False  # DATA.IN_REGION_ONLY
    require_all_ranks: bool = False  # DATA.REQUIRE_ALL_RANKS


@dataclass(frozen=True)
class MetaSpec:
    """Enabled components in IDX order (empty when ``DATA.META.ACTIVE`` is False)."""

    active: bool = True  # DATA.META.ACTIVE
    components: tuple[ComponentSpec, ...] = ()

    @property
    def dims(self) -> list[int]:
        return [c.dim for c in self.components]

    def in_region_key(self, in_region_only: bool) -> str | None:
        """The config key that needs labels.h5's ``in_region`` (for the error message), or None."""
        if in_region_only:
            return "DATA.IN_REGION_ONLY"
        for c in self.components:
            if c.oor_mask:
                return f"{c.key}.OOR_MASK"
        return None


@dataclass(frozen=True)
class VerifyImagesSpec:
    """``DATA.HYBRID.VERIFY_IMAGES``."""

    enabled: bool = False  # ENABLED
    decode: bool = False  # DECODE
    max_missing_ratio: float = 0.0  # MAX_MISSING_RATIO
    max_missing_count: int = 0  # MAX_MISSING_COUNT
    num_workers: int = 8  # NUM_WORKERS
    report_path: str | None = None  # REPORT_PATH with '{output_dir}' already replaced by the run folder


@dataclass(frozen=True)
class ImageSpec:
    """Where the image files are and how strict reading them is (``DATA.HYBRID``)."""

    use_hybrid: bool = True  # USE_HYBRID (False is refused)
    images_dir: str = ""  # IMAGES_DIR
    file_extension: str = ".jpg"  # FILE_EXTENSION
    allow_symlinks_outside: bool = False  # ALLOW_SYMLINKS_OUTSIDE
    allow_missing: bool = False  # ALLOW_MISSING_IMAGES
    verify: VerifyImagesSpec = field(default_factory=VerifyImagesSpec)


@dataclass(frozen=True)
class CropSpec:
    """How an image becomes a square training/validation input."""

    img_size: int = 384  # DATA.IMG_SIZE
    rrc_scale: tuple[float, ...] = (0.35, 1.0)  # AUG.RRC_SCALE
    rrc_ratio: tuple[float, ...] = (0.75, 1.3333)  # AUG.RRC_RATIO
    val_crop_pct: float = 0.875  # DATA.VAL_CROP_PCT


@dataclass(frozen=True)
class LoaderSpec:
    batch_size: int = 64  # DATA.BATCH_SIZE (per process)
    batch_size_val: int = 128  # DATA.BATCH_SIZE_VAL
    num_workers: int = 4  # DATA.NUM_WORKERS
    prefetch_factor: int = 2  # DATA.PREFETCH_FACTOR
    pin_memory: bool = True  # DATA.PIN_MEMORY
    decode: str = "auto"  # DATA.DECODE


@dataclass(frozen=True)
class ShardSpec:
    enabled: bool = False  # DATA.SHARDS.ENABLED
    dir: str | None = None  # DATA.SHARDS.DIR
    shuffle_buffer: int = 1000  # DATA.SHARDS.SHUFFLE_BUFFER
    verify: str = "full"  # DATA.SHARDS.VERIFY


@dataclass(frozen=True)
class ObservationsSpec:
    """``DATA.OBSERVATIONS``: multi-view samples (one observation, up to ``views`` photos)."""

    enabled: bool = False  # ENABLED
    views: int = 4  # VIEWS
    select: str = "random"  # SELECT


@dataclass(frozen=True)
class DataSpec:
    """Everything ``linnaeus.data`` needs from the config (filled by ``linnaeus.config.resolve_data``)."""

    labels: LabelsSpec = field(default_factory=LabelsSpec)
    split: SplitSpec = field(default_factory=SplitSpec)
    filters: FilterSpec = field(default_factory=FilterSpec)
    meta: MetaSpec = field(default_factory=MetaSpec)
    images: ImageSpec = field(default_factory=ImageSpec)
    crop: CropSpec = field(default_factory=CropSpec)
    loader: LoaderSpec = field(default_factory=LoaderSpec)
    shards: ShardSpec = field(default_factory=ShardSpec)
    observations: ObservationsSpec = field(default_factory=ObservationsSpec)
    seed: int = 0  # MISC.SEED: sample order and augmentation draws

    @property
    def task_keys(self) -> list[str]:
        return list(self.labels.task_keys)

    @property
    def in_region_key(self) -> str | None:
        return self.meta.in_region_key(self.filters.in_region_only)
