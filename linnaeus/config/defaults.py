"""Every configuration key Linnaeus accepts, with its default and meaning.

This is the reference the user guide points to. Sections mirror the YAML: ``EXPERIMENT``, ``MODEL``, ``DATA``,
``AUG``, ``TRAIN``, ``OPTIMIZER``, ``LR_SCHEDULER``, ``LOSS``, ``SCHEDULE``, ``MISC``. Every node forbids unknown
keys, so a typo fails with the nearest valid key (see ``linnaeus.config.loader``). ``MODEL.CLASSIFICATION.HEADS``
and ``DATA.META.COMPONENTS`` are open maps: their keys are task keys and component names chosen by the user.

Keys of configs written for the prior Polli Linnaeus trainer are not fields here: ``linnaeus.config.compat`` maps
them onto these keys, or accepts them with one warning line each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from linnaeus.registry import HEADS, LOSSES, MODELS

# Names of registered parts; checked against ``linnaeus.registry`` so a new model/head/loss needs no schema edit.
ModelName = Annotated[str, AfterValidator(MODELS.validator())]
HeadName = Annotated[str, AfterValidator(HEADS.validator())]
LossName = Annotated[str, AfterValidator(LOSSES.validator())]


def _on_off_auto(value: Any) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("expected true, false or auto")


# A speed setting that defaults to "auto": on where it pays (CUDA), off elsewhere.
OnOffAuto = Annotated[bool | Literal["auto"], BeforeValidator(_on_off_auto)]


class Node(BaseModel):
    """A config section: strict keys, assignment validated, attribute access (``cfg.DATA.BATCH_SIZE``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True, allow_inf_nan=False)


class Interval(Node):
    """When something fires. Set at most one; all unset means "never" unless the owner sets a default."""

    STEPS: int | None = Field(None, ge=1, description="every N optimizer steps")
    EPOCHS: float | None = Field(None, gt=0, description="every N epochs (fractions allowed, e.g. 0.5)")
    FRACTION: float | None = Field(None, gt=0, le=1, description="every fraction of the whole run")

    @model_validator(mode="after")
    def _at_most_one(self) -> Interval:
        if sum(v is not None for v in (self.STEPS, self.EPOCHS, self.FRACTION)) > 1:
            raise ValueError("set only one of STEPS, EPOCHS, FRACTION")
        return self


class Ramp(Node):
    """A probability that moves linearly from START_PROB to END_PROB, then stays at END_PROB."""

    ENABLED: bool = Field(True, description="turn this ramp (and what it drives) on or off")
    START_PROB: float = Field(1.0, ge=0, le=1, description="probability at the start of training")
    END_PROB: float = Field(0.0, ge=0, le=1, description="probability reached at the ramp's end and kept after it")
    END_STEPS: int | None = Field(None, ge=0, description="ramp length in optimizer steps")
    END_FRACTION: float | None = Field(None, ge=0, le=1, description="ramp length as a fraction of training")

    @model_validator(mode="after")
    def _one_end(self) -> Ramp:
        if self.END_STEPS is not None and self.END_FRACTION is not None:
            raise ValueError("set only one of END_STEPS, END_FRACTION")
        return self


# --------------------------------------------------------------------------------------------------- EXPERIMENT
class WandbConfig(Node):
    ENABLED: bool = Field(False, description="log to Weights & Biases (adds wandb to EXPERIMENT.TRACKERS)")
    PROJECT: str | None = Field(None, description="W&B project; defaults to EXPERIMENT.PROJECT")
    ENTITY: str | None = Field(None, description="W&B team or user; None: your default entity")
    MODE: Literal["online", "offline", "disabled"] | None = Field(
        None, description="overrides WANDB_MODE; None keeps the environment's choice"
    )
    RUN_ID: str | None = Field(None, description="attach to this run id; resumed runs reuse the saved id")
    TAGS: list[str] = Field(default_factory=list, description="W&B tags, added to EXPERIMENT.TAGS")


class ExperimentConfig(Node):
    PROJECT: str = Field(
        "linnaeus", description="project name: second level of the run folder, and the tracker project"
    )
    GROUP: str = Field(
        "default", description="group name: third level of the run folder (e.g. the hardware or a sweep)"
    )
    NAME: str = Field("run", description="run name: last level of the run folder; rerunning the same name resumes it")
    TAGS: list[str] = Field(default_factory=list, description="free-form tags passed to the trackers")
    NOTES: str = Field("", description="free-form notes passed to the trackers")
    OUTPUT_DIR: str = Field("outputs", description="runs go to OUTPUT_DIR/PROJECT/GROUP/NAME")
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="console and logs/train.log verbosity"
    )
    WANDB: WandbConfig = Field(default_factory=WandbConfig)
    TRACKERS: list[str] = Field(
        default_factory=list,
        description="accelerate trackers: wandb, tensorboard, csv, ... (WANDB.ENABLED True adds wandb)",
    )

    def run_folder(self) -> Path:
        """OUTPUT_DIR/PROJECT/GROUP/NAME: where the run writes (also what '{output_dir}' in paths stands for)."""
        return Path(self.OUTPUT_DIR) / self.PROJECT / self.GROUP / self.NAME


# -------------------------------------------------------------------------------------------------------- MODEL
class HeadLossConfig(Node):
    TYPE: LossName = Field("CrossEntropyLoss", description="a registered loss: linnaeus.losses.list_criteria()")
    PARAMS: dict[str, Any] = Field(
        default_factory=dict,
        description="checked by the loss; built in: CrossEntropyLoss {label_smoothing}, "
        "TaxonomyAwareLabelSmoothing {alpha, beta}",
    )
    WEIGHT: float = Field(1.0, ge=0, description="static weight of this rank's loss in the total")


class HeadConfig(Node):
    TYPE: HeadName = Field("LinearHead", description="a registered head: linnaeus.models.list_heads()")
    NUM_CLASSES: int | None = Field(None, ge=1, description="checked against labels.h5; inferred when omitted")
    USE_BIAS: bool = Field(True, description="the head's linear layer has a bias")
    PARAMS: dict[str, Any] = Field(default_factory=dict, description="settings of a head registered outside Linnaeus")
    ROUTING: Literal["soft", "gumbel", "hard"] = Field("soft", description="ConditionalClassifier only")
    TEMPERATURE: float = Field(1.0, gt=0, description="ConditionalClassifier routing temperature")
    LOSS: HeadLossConfig = Field(default_factory=HeadLossConfig)


class ClassificationConfig(Node):
    HEADS: dict[str, HeadConfig] = Field(default_factory=dict, description="one head per task key")


class ConvNeXtStages(Node):
    DEPTHS: list[int] = Field(default_factory=lambda: [3, 3, 9, 3], description="only the first two are built")
    DIMS: list[int] = Field(
        default_factory=lambda: [96, 192, 384, 768],
        description="channels of the four ConvNeXt stages (only the first two are built)",
    )
    LAYER_SCALE_INIT_VALUE: float = Field(1e-6, description="initial LayerScale of the ConvNeXt blocks")


class RopeStages(Node):
    DEPTHS: list[int] = Field(default_factory=lambda: [5, 2], description="blocks per RoPE-ViT attention stage")
    DIMS: list[int] = Field(default_factory=lambda: [384, 768], description="embedding width per attention stage")
    NUM_HEADS: list[int] = Field(default_factory=lambda: [6, 12], description="attention heads per attention stage")
    MLP_RATIO: list[float] = Field(
        default_factory=lambda: [4.0, 4.0], description="MLP hidden width / embedding width, per attention stage"
    )
    ROPE_THETA: float = Field(10000.0, description="base frequency of the rotary position embedding")
    ROPE_MIXED: bool = Field(True, description="learnable mixed 2-D frequencies (False: fixed axial)")
    LAYER_SCALE_INIT_VALUE: float | None = Field(
        None,
        gt=0,
        description="LayerScale on attention/MLP branches (DeiT-LS); None: none. Set it to receive "
        "a RoPE-ViT-LS checkpoint's gamma_1/gamma_2 (stitched pretrained source)",
    )


class ConvStages(Node):
    """mFormerV0 stem + MBConv stages."""

    STEM_DIMS: list[int] = Field(default_factory=lambda: [48, 64], description="channels of the two stem convolutions")
    OUT_CHANNELS: list[int] = Field(default_factory=lambda: [96, 192], description="channels of the MBConv stages")
    DEPTHS: list[int] = Field(default_factory=lambda: [2, 3], description="blocks per MBConv stage")
    EXPAND_RATIO: float = Field(4.0, description="MBConv inverted-bottleneck expansion")
    SE_RATIO: float = Field(0.25, description="squeeze-and-excitation reduction ratio")


class AttentionStages(Node):
    """mFormerV0 relative-position attention stages."""

    DIMS: list[int] = Field(default_factory=lambda: [384, 768], description="embedding width per attention stage")
    DEPTHS: list[int] = Field(default_factory=lambda: [5, 2], description="blocks per attention stage")
    NUM_HEADS: list[int] = Field(default_factory=lambda: [8, 8], description="attention heads per attention stage")
    MLP_RATIO: list[float] = Field(
        default_factory=lambda: [4.0, 4.0], description="MLP hidden width / embedding width, per attention stage"
    )


class TimmModelConfig(Node):
    """``MODEL.TYPE: timm``: any timm image model as the backbone (built with random weights; see PRETRAINED)."""

    NAME: str | None = Field(None, description="a timm model name, e.g. vit_base_patch16_dinov3")
    KWARGS: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for timm.create_model")
    GLOBAL_POOL: str | None = Field(None, description="timm global_pool ('token', 'avg', ...); None: the model's")
    META_FUSION: Literal["add", "concat"] = Field(
        "add", description="how the metadata embedding joins the pooled image feature (docs/design.md)"
    )


class ModelConfig(Node):
    TYPE: ModelName = Field("mFormerV1", description="a registered model: linnaeus.models.list_models()")
    NAME: str = Field(
        "mFormerV1_sm",
        description="the architecture variant's name (e.g. mFormerV1_sm); recorded with the run and the bundle",
    )
    IMG_SIZE: int = Field(384, ge=32, description="must equal DATA.IMG_SIZE; mFormerV0/V1 need a multiple of 32")
    IN_CHANS: int = Field(3, description="input image channels")
    DROP_PATH_RATE: float = Field(
        0.2, ge=0, lt=1, description="stochastic depth: the largest drop-path rate, reached at the last block"
    )
    DROP_RATE: float = Field(0.0, ge=0, lt=1, description="dropout rate inside the blocks (MLP and projection outputs)")
    ATTN_DROP_RATE: float = Field(0.0, ge=0, lt=1, description="dropout on the attention weights")
    ONLY_LAST_CLS: bool = Field(
        False,
        description="heads read only the last attention stage's class token (False: both stages' class tokens aggregated)",
    )
    GRADIENT_CHECKPOINTING: bool = Field(
        False, description="recompute block activations in backward: less memory, slower steps"
    )
    COMPILE: OnOffAuto = Field(
        "auto", description="torch.compile the model's forward; auto: on CUDA (a failed compile warns, runs eager)"
    )
    CHANNELS_LAST: OnOffAuto = Field(
        "auto", description="convolution weights and images in channels_last layout; auto: on CUDA"
    )
    PARAMS: dict[str, Any] = Field(
        default_factory=dict, description="settings of a model registered outside Linnaeus, read by its from_config"
    )
    # Start from pretrained weights (local files only; `linnaeus check` prints what each file gives).
    PRETRAINED: str | None = Field(
        None, description="weights file (.safetensors/.pth/.bin) or Linnaeus bundle folder to start from"
    )
    PRETRAINED_SOURCE: Literal["linnaeus", "timm", "metaformer", "stitched_convnext_ropevit"] | None = Field(
        None, description="layout of PRETRAINED; None: 'timm' for MODEL.TYPE timm, else 'linnaeus'"
    )
    PRETRAINED_CONVNEXT: str | None = Field(None, description="stitched_convnext_ropevit: ConvNeXt weights file")
    PRETRAINED_ROPEVIT: str | None = Field(None, description="stitched_convnext_ropevit: RoPE-Mixed ViT weights file")
    FREEZE_BACKBONE: bool = Field(False, description="backbone gets no gradients and no optimizer state")
    VIEW_POOLING: Literal["mean", "lse", "attention"] = Field(
        "mean",
        description="with DATA.OBSERVATIONS.ENABLED: how per-view features are pooled before the heads (lse:"
        " count-normalised log-sum-exp; attention: gated attention, Ilse et al. 2018)",
    )
    VIEW_POOLING_TEMPERATURE: float = Field(1.0, gt=0, description="lse pooling: 0+ -> mean, large -> max")
    UNFREEZE_BACKBONE_AFTER: Interval = Field(
        default_factory=Interval, description="with FREEZE_BACKBONE: unfreeze once, after this many steps/epochs"
    )
    TIMM: TimmModelConfig = Field(default_factory=TimmModelConfig)
    CONVNEXT_STAGES: ConvNeXtStages = Field(default_factory=ConvNeXtStages)
    ROPE_STAGES: RopeStages = Field(default_factory=RopeStages)
    CONV_STAGES: ConvStages = Field(default_factory=ConvStages)
    ATTENTION_STAGES: AttentionStages = Field(default_factory=AttentionStages)
    CLASSIFICATION: ClassificationConfig = Field(default_factory=ClassificationConfig)


# --------------------------------------------------------------------------------------------------------- DATA
class MetaComponentConfig(Node):
    ENABLED: bool = Field(True, description="feed this component to the model (False: left out)")
    SOURCE: str = Field(..., description="dataset name in labels.h5, e.g. 'temporal'")
    COLUMNS: list[str] = Field(default_factory=list, description="column_names to select; [] = all columns")
    DIM: int = Field(..., ge=1, description="number of (selected) columns")
    IDX: int = Field(..., ge=0, description="packing order of the metadata vector and of the metadata tokens")
    ALLOW_MISSING: bool = Field(True, description="False drops rows where this component is missing (counted)")
    OOR_MASK: bool = Field(False, description="mask this component for rows with in_region == 0")


def default_components() -> dict[str, MetaComponentConfig]:
    return {
        "TEMPORAL": MetaComponentConfig(SOURCE="temporal", DIM=2, IDX=0),
        "SPATIAL": MetaComponentConfig(SOURCE="spatial", DIM=3, IDX=1),
        "ELEVATION": MetaComponentConfig(SOURCE="elevation_broadrange_2", DIM=10, IDX=2, ENABLED=False),
    }


class MetaConfig(Node):
    ACTIVE: bool = Field(True, description="use metadata (time, place, elevation) as model inputs")
    COMPONENTS: dict[str, MetaComponentConfig] = Field(
        default_factory=default_components,
        description="metadata components by name (TEMPORAL, SPATIAL, ELEVATION, ...): SOURCE, DIM, IDX, ...",
    )


class VerifyImagesConfig(Node):
    ENABLED: bool = Field(False, description="check every image file before training (missing, optionally corrupt)")
    DECODE: bool = Field(False, description="also decode every image (slower; finds corrupt files)")
    MAX_MISSING_RATIO: float = Field(
        0.0,
        ge=0,
        le=1,
        description="tolerate up to max(COUNT, RATIO x N) bad images: replaced and counted with ALLOW_MISSING_IMAGES, "
        "else their rows are left out",
    )
    MAX_MISSING_COUNT: int = Field(0, ge=0, description="see MAX_MISSING_RATIO; 0 and 0 tolerate none")
    NUM_WORKERS: int = Field(8, ge=1, description="threads checking images")
    REPORT_PATH: str | None = Field(
        None, description="JSON report; default: the run folder. '{output_dir}' is replaced by the run folder"
    )


class HybridConfig(Node):
    USE_HYBRID: bool = Field(True, description="images are files under IMAGES_DIR; False (images in HDF5) is refused")
    IMAGES_DIR: str = Field(
        "", description="folder holding the image files named by labels.h5's img_identifiers (required)"
    )
    ALLOW_SYMLINKS_OUTSIDE: bool = Field(False, description="follow symbolic links that lead out of IMAGES_DIR")
    FILE_EXTENSION: str = Field(".jpg", description="appended to img_identifiers that have no extension")
    ALLOW_MISSING_IMAGES: bool = Field(False, description="replace unreadable images and count them (else fail)")
    VERIFY_IMAGES: VerifyImagesConfig = Field(default_factory=VerifyImagesConfig)


class H5Config(Node):
    LABELS_PATH: str | None = Field(
        None, description="labels.h5 with every row; split into train/val by TRAIN_VAL_SPLIT_RATIO"
    )
    TRAIN_LABELS_PATH: str | None = Field(None, description="pre-split alternative to LABELS_PATH")
    VAL_LABELS_PATH: str | None = Field(None, description="pre-split validation labels (with TRAIN_LABELS_PATH)")
    TRAIN_VAL_SPLIT_RATIO: float = Field(0.9, gt=0, le=1, description="share of LABELS_PATH rows used for training")
    TRAIN_VAL_SPLIT_SEED: int = Field(42, description="seed of the train/val split (saved in split.npz)")
    SPLIT_BY: Literal["observation", "row"] = Field(
        "observation",
        description="observation: every observation's photos (labels.h5 observation_ids) fall on one side, no leak;"
        " row: each row drawn alone. Without observation_ids the split is by row",
    )
    SPLIT_STRATIFY: bool = Field(
        False, description="draw per class of the finest rank so every class with >= 2 observations (rows) trains"
    )


class ShardsConfig(Node):
    ENABLED: bool = Field(False, description="train from WebDataset shards in DIR instead of image files")
    DIR: str | None = Field(None, description="folder written by `linnaeus shard`")
    SHUFFLE_BUFFER: int = Field(1000, ge=0, description="sample shuffle buffer per worker")
    VERIFY: Literal["none", "open", "full"] = Field(
        "full", description="shard checks: open = size at each open; full = also sha256, once per shard per run"
    )


class ObservationsConfig(Node):
    ENABLED: bool = Field(
        False, description="a sample is one observation (labels.h5 observation_ids) with up to VIEWS photos"
    )
    VIEWS: int = Field(4, ge=1, description="photos read per observation (K); fewer are masked out")
    SELECT: Literal["random", "first"] = Field(
        "random", description="which photos when an observation has more than VIEWS (validation: first)"
    )


class DatasetInfo(Node):
    NAME: str = Field("", description="descriptive dataset name; recorded in bundle.json")
    VERSION: str = Field("", description="descriptive dataset version; recorded in bundle.json")
    CLADE: str = Field("", description="descriptive; recorded in bundle.json with NAME and VERSION")


class DataConfig(Node):
    BATCH_SIZE: int = Field(64, ge=1, description="per process; TRAIN.BATCH_SIZE is an alias")
    BATCH_SIZE_VAL: int = Field(128, ge=1, description="validation batch size per process")
    IMG_SIZE: int = Field(
        384, ge=32, description="training and validation image side in pixels (square); must equal MODEL.IMG_SIZE"
    )
    VAL_CROP_PCT: float = Field(0.875, gt=0, le=1, description="validation: resize to IMG_SIZE/CROP_PCT, centre crop")
    NUM_WORKERS: int = Field(
        4, ge=0, description="DataLoader worker processes per training process (clamped to the usable CPU cores)"
    )
    PIN_MEMORY: bool = Field(True, description="page-locked batches for faster host-to-GPU copies (CUDA only)")
    PREFETCH_FACTOR: int = Field(2, ge=1, description="batches each loader worker prepares ahead")
    DECODE: Literal["auto", "cpu", "device"] = Field(
        "auto",
        description="JPEG decode in loader workers (cpu) or batched on the training device; auto: device on CUDA",
    )
    TASK_KEYS_H5: list[str] = Field(
        default_factory=lambda: ["taxa_L10", "taxa_L20"],
        min_length=1,
        description="the rank datasets of labels.h5 to train on (taxa_L10 species, taxa_L20 genus, ...)",
    )
    NUM_CLASSES_PER_LEVEL: dict[str, int] | None = Field(None, description="checked against labels.h5 when set")
    TAXONOMY_PATH: str | None = Field(None, description="taxonomy.json; inferred from labels.h5 when unset")
    REQUIRE_ALL_RANKS: bool = Field(False, description="drop rows with a null at any configured rank (counted)")
    IN_REGION_ONLY: bool = Field(False, description="drop rows whose in_region is 0 (counted)")
    HYBRID: HybridConfig = Field(default_factory=HybridConfig)
    H5: H5Config = Field(default_factory=H5Config)
    META: MetaConfig = Field(default_factory=MetaConfig)
    SHARDS: ShardsConfig = Field(default_factory=ShardsConfig)
    OBSERVATIONS: ObservationsConfig = Field(default_factory=ObservationsConfig)
    DATASET: DatasetInfo = Field(default_factory=DatasetInfo)


# ---------------------------------------------------------------------------------------------------------- AUG
class RandomEraseConfig(Node):
    PROB: float = Field(0.25, ge=0, le=1, description="probability of erasing one random rectangle")
    AREA_RANGE: list[float] = Field(
        default_factory=lambda: [0.02, 0.33], description="erased area as a share of the image, range"
    )
    ASPECT_RATIO: list[float] = Field(
        default_factory=lambda: [0.3, 3.3], description="erased rectangle aspect-ratio range"
    )


class AugConfig(Node):
    RRC_SCALE: list[float] = Field(default_factory=lambda: [0.35, 1.0], description="random-resized-crop area range")
    RRC_RATIO: list[float] = Field(
        default_factory=lambda: [0.75, 1.3333], description="random-resized-crop aspect-ratio range"
    )
    HFLIP_PROB: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")
    COLOR_JITTER: float = Field(0.3, ge=0, description="brightness/contrast/saturation strength; 0 disables")
    RANDOM_ERASE: RandomEraseConfig = Field(default_factory=RandomEraseConfig)
    MEAN: list[float] = Field(
        default_factory=lambda: [0.485, 0.456, 0.406], description="per-channel normalisation mean (RGB, 0-1 scale)"
    )
    STD: list[float] = Field(
        default_factory=lambda: [0.229, 0.224, 0.225],
        description="per-channel normalisation standard deviation (RGB, 0-1 scale)",
    )


# -------------------------------------------------------------------------------------------------------- TRAIN
class EmaConfig(Node):
    """Exponential moving average of the weights (timm ModelEmaV3), validated as its own phase ``val_ema``."""

    ENABLED: bool = Field(
        False, description="keep an exponential moving average of the weights (validated as val_ema, exported)"
    )
    DECAY: float = Field(0.9998, gt=0, lt=1, description="EMA decay per optimizer step")
    WARMUP: bool = Field(True, description="decay ramps up as 1 - (1 + step/gamma)^-power early in training")


class TrainConfig(Node):
    EPOCHS: float = Field(
        50, gt=0, description="length of training in epochs (fractions allowed); TRAIN.MAX_STEPS overrides"
    )
    MAX_STEPS: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides EPOCHS)")
    BATCH_SIZE: int | None = Field(
        None, ge=1, description="alias of DATA.BATCH_SIZE (as the prior system's user guide calls it)"
    )
    AMP_OPT_LEVEL: Literal["O0", "O1", "O2", "O3"] | None = Field(
        None,
        description="O0 fp32; O1/O2/O3 the best half precision available (bf16 preferred); None: accelerate config",
    )
    ACCUMULATION_STEPS: int = Field(1, ge=0, description="0 is read as 1")
    CLIP_GRAD: float = Field(5.0, description="max global grad norm; <= 0 disables")
    AUTO_RESUME: bool = Field(True, description="continue from the run folder's latest checkpoint when there is one")
    RESUME_FROM: str | None = Field(None, description="a checkpoints/step_N folder to resume from")
    RESUME_CONFIG_CHANGE: Literal["refuse", "allow"] = Field(
        "refuse",
        description="resuming with a config that changes what the weights mean (model, data, losses, optimizer, "
        "LR, augmentation): refuse (default) or allow; epochs, intervals, workers and loggers may always change",
    )
    NONFINITE: Literal["stop", "skip"] = Field(
        "stop",
        description="a non-finite loss or gradient: stop the run there (exit 3; checked a step late, no GPU wait), or "
        "skip that optimizer step (costs one GPU-to-host read, a full sync, per optimizer step)",
    )
    NONFINITE_MAX_SKIPS: int = Field(10, ge=0, description="with NONFINITE skip: stop once more steps than this fail")
    CALIBRATE: bool = Field(
        True,
        description="when training ends: fit one temperature per rank (and the threshold/climb decision policies for "
        "95 % accuracy) on the validation split for the best weights, into export/calibration.json, which `linnaeus "
        "export` puts in the bundle (`linnaeus calibrate` does it again later, with other settings)",
    )
    EMA: EmaConfig = Field(default_factory=lambda: EmaConfig())


# ---------------------------------------------------------------------------------------------------- OPTIMIZER
class OptimizerConfig(Node):
    NAME: Literal["adamw"] = Field("adamw", description="the optimizer")
    FUSED: OnOffAuto = Field("auto", description="fused AdamW kernel; auto: where torch has one (CUDA, CPU)")
    WEIGHT_DECAY: float = Field(
        0.05, ge=0, description="AdamW decoupled weight decay (not applied to norms, biases, tokens)"
    )
    BETAS: list[float] = Field(default_factory=lambda: [0.9, 0.999], description="AdamW beta1, beta2")
    EPS: float = Field(1e-8, description="AdamW epsilon")
    HEAD_LR_MULTIPLIER: float = Field(1.0, gt=0, description="LR multiplier for classification heads")
    LAYER_DECAY: float | None = Field(
        None, gt=0, le=1, description="layer-wise LR decay: layer i of L gets LAYER_DECAY^(L+1-i) (timm layer ids)"
    )


class LRSchedulerConfig(Node):
    NAME: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="LR schedule: cosine decay, wsd (warmup-stable-decay) or constant, all after warmup"
    )
    BASE_LR: float = Field(1e-4, gt=0, description="peak learning rate (after warmup)")
    WARMUP_LR: float = Field(5e-7, ge=0, description="learning rate at the first step of warmup")
    MIN_LR: float = Field(1e-5, ge=0, description="learning rate at the end of the decay")
    WARMUP_STEPS: int | None = Field(
        None, ge=0, description="warmup length in optimizer steps (set one of WARMUP_STEPS/EPOCHS/FRACTION)"
    )
    WARMUP_EPOCHS: float | None = Field(
        None, ge=0, description="warmup length in epochs (set one of WARMUP_STEPS/EPOCHS/FRACTION)"
    )
    WARMUP_FRACTION: float | None = Field(None, ge=0, le=1, description="default when none is set: 0.05")
    STABLE_FRACTION: float = Field(0.8, ge=0, le=1, description="wsd: share of post-warmup steps at BASE_LR")
    DECAY_TYPE: Literal["cosine", "linear"] = Field("cosine", description="wsd: shape of the final decay")
    SCALE_WITH_BATCH: bool = Field(False, description="LR = BASE_LR * effective_batch / REFERENCE_BS")
    REFERENCE_BS: int = Field(512, ge=1, description="with SCALE_WITH_BATCH: the effective batch BASE_LR is meant for")

    @model_validator(mode="after")
    def _one_warmup(self) -> LRSchedulerConfig:
        set_ = [k for k in ("WARMUP_STEPS", "WARMUP_EPOCHS", "WARMUP_FRACTION") if getattr(self, k) is not None]
        if len(set_) > 1:
            raise ValueError("set only one of WARMUP_STEPS, WARMUP_EPOCHS, WARMUP_FRACTION")
        return self


# --------------------------------------------------------------------------------------------------------- LOSS
class GradNormConfig(Node):
    ENABLED: bool = Field(False, description="balance the ranks' loss weights with GradNorm")
    ALPHA: float = Field(1.5, ge=0, description="GradNorm asymmetry: higher pulls slow-learning ranks harder")
    UPDATE_INTERVAL: int = Field(100, ge=1, description="update the weights every N optimizer steps")
    WARMUP_STEPS: int = Field(0, ge=0, description="steps before the first update")
    LR: float = Field(0.025, gt=0, description="step size of the weight update")


class ClassWeightingConfig(Node):
    TYPE: Literal["none", "smoothing", "capping", "logarithmic"] = Field(
        "none", description="per-class loss weights from train counts: none, smoothing, capping or logarithmic"
    )
    CAP: float = Field(20.0, gt=0, description="capping: weights min(N / n_c, CAP)")
    SMOOTHING: float = Field(0.1, ge=0, description="smoothing: weights N / (n_c + SMOOTHING)")


class LossConfig(Node):
    GRADNORM: GradNormConfig = Field(default_factory=GradNormConfig)
    CLASS_WEIGHTING: ClassWeightingConfig = Field(default_factory=ClassWeightingConfig)


# ----------------------------------------------------------------------------------------------------- SCHEDULE
class PartialMetaMaskingConfig(Node):
    ENABLED: bool = Field(False, description="also hide some metadata components (not all) of unmasked samples")
    PROB: float = Field(0.3, ge=0, le=1, description="probability of a partial mask")
    WHITELIST: list[list[str]] = Field(default_factory=list, description="component-name subsets to mask together")


class MetaMaskingConfig(Ramp):
    START_PROB: float = Field(
        1.0, ge=0, le=1, description="probability a sample's metadata is hidden at the start of training"
    )
    END_PROB: float = Field(0.05, ge=0, le=1, description="probability a sample's metadata is hidden after the ramp")
    END_FRACTION: float | None = Field(None, ge=0, le=1, description="default when neither END_* is set: 0.5")
    PARTIAL: PartialMetaMaskingConfig = Field(default_factory=PartialMetaMaskingConfig)


class NullMaskingConfig(Ramp):
    ENABLED: bool = Field(False, description="ramp in the loss of samples whose label is null at a rank")
    START_PROB: float = Field(0.0, ge=0, le=1, description="probability a null-labelled sample is kept in the loss")
    END_PROB: float = Field(
        1.0, ge=0, le=1, description="probability a null-labelled sample is kept in the loss after the ramp"
    )


class MixAlgo(Node):
    ENABLED: bool = Field(False, description="use this mixing method")
    ALPHA: float = Field(1.0, gt=0, description="Beta(alpha, alpha) distribution of the mixing share")


class MixProbConfig(Ramp):
    """Probability that a batch is mixed at all (then SWITCH_PROB picks Mixup or CutMix)."""

    ENABLED: bool = Field(False, description="mix samples within a batch (Mixup/CutMix)")
    START_PROB: float = Field(1.0, ge=0, le=1, description="probability a batch is mixed at the start of training")
    END_PROB: float = Field(0.2, ge=0, le=1, description="probability a batch is mixed after the ramp")
    END_FRACTION: float | None = Field(None, ge=0, le=1, description="default when neither END_* is set: 1.0")


class MixConfig(Node):
    GROUP_LEVEL: str | None = Field(None, description="pairs share the taxon at this task key; default: coarsest")
    PROB: MixProbConfig = Field(default_factory=MixProbConfig)
    MIXUP: MixAlgo = Field(default_factory=MixAlgo)
    CUTMIX: MixAlgo = Field(default_factory=MixAlgo)
    SWITCH_PROB: float = Field(0.5, ge=0, le=1, description="CutMix instead of Mixup when both are enabled")


class ValidationSchedule(Node):
    INTERVAL: Interval = Field(default_factory=lambda: Interval(EPOCHS=1))
    MASK_META_INTERVAL: Interval = Field(default_factory=lambda: Interval(EPOCHS=1))


class CheckpointSchedule(Node):
    INTERVAL: Interval = Field(default_factory=lambda: Interval(EPOCHS=1))
    KEEP_LAST_N: int = Field(2, ge=1, description="newest checkpoints kept")
    KEEP_BEST_N: int = Field(1, ge=0, description="best checkpoints kept by BEST_METRIC (0: none)")
    BEST_METRIC: str = Field("val/chain_accuracy", description="a metrics.jsonl key, phase-prefixed")
    BEST_MODE: Literal["max", "min"] = Field("max", description="whether BEST_METRIC is better high (max) or low (min)")


class MetricsSchedule(Node):
    LOG_INTERVAL_STEPS: int = Field(10, ge=1, description="train metrics to metrics.jsonl / W&B every N steps")


class ScheduleConfig(Node):
    META_MASKING: MetaMaskingConfig = Field(default_factory=MetaMaskingConfig)
    NULL_MASKING: NullMaskingConfig = Field(default_factory=NullMaskingConfig)
    MIX: MixConfig = Field(default_factory=MixConfig)
    VALIDATION: ValidationSchedule = Field(default_factory=ValidationSchedule)
    CHECKPOINT: CheckpointSchedule = Field(default_factory=CheckpointSchedule)
    METRICS: MetricsSchedule = Field(default_factory=MetricsSchedule)


class MiscConfig(Node):
    SEED: int = Field(42, ge=0, le=2**32 - 1, description="seeds Python, NumPy and torch (NumPy needs < 2**32)")
    DETERMINISTIC: bool = Field(False, description="torch deterministic algorithms (slower)")


class Config(Node):
    """The whole resolved configuration. Build one with ``linnaeus.config.load_config``."""

    BASE: list[str] = Field(default_factory=list, description="YAML files this one inherits from")
    BASE_RESOLVED: list[str] = Field(
        default_factory=list,
        description="written by the loader: the file each BASE entry resolved to, in merge order (not followed)",
    )
    EXPERIMENT: ExperimentConfig = Field(default_factory=ExperimentConfig)
    MODEL: ModelConfig = Field(default_factory=ModelConfig)
    DATA: DataConfig = Field(default_factory=DataConfig)
    AUG: AugConfig = Field(default_factory=AugConfig)
    TRAIN: TrainConfig = Field(default_factory=TrainConfig)
    OPTIMIZER: OptimizerConfig = Field(default_factory=OptimizerConfig)
    LR_SCHEDULER: LRSchedulerConfig = Field(default_factory=LRSchedulerConfig)
    LOSS: LossConfig = Field(default_factory=LossConfig)
    SCHEDULE: ScheduleConfig = Field(default_factory=ScheduleConfig)
    MISC: MiscConfig = Field(default_factory=MiscConfig)


def default_config() -> Config:
    return Config()
