"""Device batch augmentation: normalisation, photometric ops, random erasing and selective Mixup/CutMix."""

from __future__ import annotations

import pytest
import torch

from linnaeus.aug import BatchAugment, eval_transform, pair_within_groups, resolve_group_level, to_float_normalized
from linnaeus.aug.photometric import color_jitter, random_erase, random_hflip
from linnaeus.config.defaults import AugConfig, Config, MixAlgo, MixConfig, RandomEraseConfig, ScheduleConfig
from linnaeus.config.resolve_model import aug_spec
from linnaeus.errors import ConfigError

KEYS = ["taxa_L10", "taxa_L20", "taxa_L30"]  # species, genus, family (user order, finest first)
B, H, W = 32, 16, 16
NUM_CLASSES = {"taxa_L10": B, "taxa_L20": B // 4, "taxa_L30": B // 8}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def no_aug() -> AugConfig:
    return AugConfig(HFLIP_PROB=0.0, COLOR_JITTER=0.0, RANDOM_ERASE=RandomEraseConfig(PROB=0.0))


def augment(aug: AugConfig, mix: MixConfig, *args, **kw) -> BatchAugment:
    """``BatchAugment`` for these ``AUG`` and ``SCHEDULE.MIX`` sections, through the spec the trainer builds."""
    return BatchAugment(aug_spec(Config(AUG=aug, SCHEDULE=ScheduleConfig(MIX=mix))), *args, **kw)


def mix_cfg(mixup: bool = True, cutmix: bool = False, **kw) -> MixConfig:
    return MixConfig(MIXUP=MixAlgo(ENABLED=mixup), CUTMIX=MixAlgo(ENABLED=cutmix), **kw)


def make_batch(seed: int = 0, nulls: bool = True):
    """Species unique per sample, 4 species per genus, 2 genera per family; a few nulls at each rank.

    Because species are unique, a mixed species row names the partner exactly, so a wrong pairing is visible.
    """
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, H, W), dtype=torch.uint8, generator=g)
    idx = torch.arange(B)
    targets = {"taxa_L10": idx.clone(), "taxa_L20": idx // 4, "taxa_L30": idx // 8}
    if nulls:
        targets["taxa_L10"][[1, 9]] = -1
        targets["taxa_L20"][[2]] = -1
        targets["taxa_L30"][[5, 30]] = -1  # 30 is left with a null group: it must stay unmixed
    meta = idx.float().unsqueeze(1).repeat(1, 4)  # meta row i = i identifies the source sample
    meta_valid = (idx % 3 != 0).unsqueeze(1).repeat(1, 2)
    return images, targets, meta, meta_valid


def run(aug: BatchAugment, batch, seed: int = 0, mix_prob: float = 1.0):
    images, targets, meta, meta_valid = batch
    return aug(images, targets, meta, meta_valid, mix_prob=mix_prob, generator=gen(seed))


def checked_partner(out) -> torch.Tensor:
    """out.partner, cross-checked against the species rows (unique species name the partner independently)."""
    soft, lam, partner = out.targets["taxa_L10"], out.lam, out.partner
    for i in range(B):
        if out.valid["taxa_L10"][i]:
            others = [j for j in torch.nonzero(soft[i] > 0).flatten().tolist() if j != i]
            assert others == ([int(partner[i])] if lam[i] < 1 else [])
    return partner


# ------------------------------------------------------------------------------------------------ normalisation
def test_normalisation_formula_and_eval_transform() -> None:
    images = make_batch()[0]
    ref = (images.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = to_float_normalized(images, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(eval_transform(images, MEAN, STD), out)
    half = to_float_normalized(images, MEAN, STD, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref, rtol=1e-2, atol=2e-2)
    with pytest.raises(TypeError):
        to_float_normalized(images.float(), MEAN, STD)


def test_all_off_equals_normalisation() -> None:
    batch = make_batch()
    aug = augment(no_aug(), mix_cfg(), KEYS, NUM_CLASSES)
    out = run(aug, batch, mix_prob=0.0)
    assert torch.equal(out.images, to_float_normalized(batch[0], MEAN, STD))
    for k in KEYS:
        assert out.targets[k] is batch[1][k]
        assert torch.equal(out.valid[k], batch[1][k] >= 0)
    assert out.meta is batch[2] and out.meta_valid is batch[3] and out.mix_mode is None and out.lam is None


# ----------------------------------------------------------------------------------------------- photometric ops
def test_hflip_and_jitter() -> None:
    images = make_batch()[0]
    assert torch.equal(random_hflip(images, 1.0, gen()), images.flip(-1))
    assert random_hflip(images, 0.0, gen()) is images
    x = images.float() / 255
    assert color_jitter(x, 0.0, gen()) is x
    jit = color_jitter(x, 0.4, gen())
    assert jit.shape == x.shape and jit.min() >= 0 and jit.max() <= 1 and not torch.equal(jit, x)


@pytest.mark.parametrize("area_range,aspect", [((0.02, 0.33), (0.3, 3.3)), ((0.2, 0.25), (1.0, 1.0))])
def test_random_erase_box_area_in_range(area_range, aspect) -> None:
    side, n = 64, 64
    x = torch.zeros(n, 3, side, side)
    out = random_erase(x, 1.0, area_range, aspect, gen(3))
    erased = 0
    for i in range(n):
        mask = (out[i] != 0).any(0)
        if not mask.any():
            continue  # no attempt fitted (allowed, timm-style)
        erased += 1
        rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(mask.sum()) == h * w  # one solid rectangle (noise is never exactly 0)
        # h, w are rounded from sqrt(area·r), sqrt(area/r): allow that rounding and nothing more.
        slack = 0.5 * (h + w) + 0.25
        assert area_range[0] * side * side - slack <= h * w <= area_range[1] * side * side + slack
        assert (out[i][:, ~mask] == 0).all() and out[i][:, mask].std() > 0.5
    assert erased >= n * 0.9
    assert random_erase(x, 0.0, area_range, aspect, gen()) is x


# -------------------------------------------------------------------------------------------------- reproducible
def test_shape_dtype_device_and_seed_reproducibility() -> None:
    batch = make_batch()
    aug = augment(AugConfig(), mix_cfg(mixup=True, cutmix=True), KEYS, NUM_CLASSES)
    a, b, c = run(aug, batch, seed=7), run(aug, batch, seed=7), run(aug, batch, seed=8)
    assert a.images.shape == batch[0].shape and a.images.dtype == torch.float32
    assert a.images.device == batch[0].device
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    for k in KEYS:
        assert a.targets[k].shape == (B, NUM_CLASSES[k]) and a.targets[k].dtype == torch.float32
        assert torch.equal(a.targets[k], b.targets[k]) and torch.equal(a.valid[k], b.valid[k])
    assert torch.equal(a.meta, b.meta) and torch.equal(a.meta_valid, b.meta_valid)
    assert a.meta.shape == batch[2].shape and a.meta_valid.dtype == torch.bool
    low = augment(AugConfig(), mix_cfg(), KEYS, NUM_CLASSES, dtype=torch.bfloat16)
    assert run(low, batch).images.dtype == torch.bfloat16


def test_mix_prob_zero_equals_unmixed_path() -> None:
    batch = make_batch()
    mixing = augment(AugConfig(), mix_cfg(mixup=True, cutmix=True), KEYS, NUM_CLASSES)
    plain = augment(AugConfig(), mix_cfg(mixup=False), KEYS, NUM_CLASSES)
    a, b = run(mixing, batch, seed=4, mix_prob=0.0), run(plain, batch, seed=4, mix_prob=1.0)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.images, mixing.photometric(batch[0], gen(4)))
    for k in KEYS:
        assert a.targets[k] is batch[1][k] and a.targets[k].dtype == torch.int64
    assert a.mix_mode is None and b.mix_mode is None


# ------------------------------------------------------------------------------------------------------- mixing
def test_pair_within_groups() -> None:
    group = torch.tensor([3, 3, 3, -1, 5, 5, 7, -1, 3, 9, 9, 9, 9, 2])
    for seed in range(5):
        partner, has = pair_within_groups(group, gen(seed))
        assert sorted(partner.tolist()) == list(range(len(group)))  # each sample is a partner exactly once
        assert torch.equal(group[partner], group)
        assert torch.equal(has, partner != torch.arange(len(group)))
        assert has.tolist() == [True, True, True, False, True, True, False, False, True, True, True, True, True, False]


def test_group_level_resolution() -> None:
    assert resolve_group_level(None, KEYS) == "taxa_L30"
    assert resolve_group_level("taxa_L20", KEYS) == "taxa_L20"
    with pytest.raises(ConfigError):
        resolve_group_level("taxa_L40", KEYS)
    with pytest.raises(ConfigError):
        augment(AugConfig(RANDOM_ERASE=RandomEraseConfig(AREA_RANGE=[0.5, 0.1])), mix_cfg(), KEYS, NUM_CLASSES)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mixup_pairs_and_soft_targets(seed: int) -> None:
    batch = make_batch(seed)
    _, targets, meta, meta_valid = batch
    aug = augment(no_aug(), mix_cfg(mixup=True), KEYS, NUM_CLASSES)
    out = run(aug, batch, seed=seed)
    assert out.mix_mode == "mixup"
    lam, family = out.lam, targets["taxa_L30"]
    partner = checked_partner(out)
    assert (lam < 1).any()
    paired = lam < 1
    # Pairs only within the same non-null family; samples with a null family stay unmixed.
    assert torch.equal(family[partner][paired], family[paired]) and (family[paired] >= 0).all()
    assert (lam[family < 0] == 1).all()
    x = to_float_normalized(batch[0], MEAN, STD)
    w = lam.view(-1, 1, 1, 1)
    torch.testing.assert_close(out.images, x * w + x[partner] * (1 - w))
    assert torch.equal(out.images[~paired], x[~paired])
    for k in KEYS:
        t, soft, valid = targets[k], out.targets[k], out.valid[k]
        expected_valid = torch.where(paired, (t >= 0) & (t[partner] >= 0), t >= 0)
        assert torch.equal(valid, expected_valid)
        torch.testing.assert_close(soft[valid].sum(1), torch.ones(int(valid.sum())))
        assert (soft[~valid] == 0).all()
    # At and above the group rank (family is the coarsest) targets stay one-hot.
    fam = out.targets["taxa_L30"][out.valid["taxa_L30"]]
    assert torch.equal(fam.max(1).values, torch.ones(fam.shape[0]))
    # Metadata from the dominant sample.
    src = torch.where(lam < 0.5, partner, torch.arange(B))
    assert torch.equal(out.meta, meta[src]) and torch.equal(out.meta_valid, meta_valid[src])


def test_species_group_level_keeps_every_rank_one_hot() -> None:
    batch = make_batch(nulls=False)
    batch[1]["taxa_L10"] = torch.arange(B) // 2  # pairs of samples share a species
    aug = augment(no_aug(), mix_cfg(GROUP_LEVEL="taxa_L10"), KEYS, {**NUM_CLASSES, "taxa_L10": B // 2})
    out = run(aug, batch, seed=1)
    assert (out.lam < 1).all()
    for k in KEYS:
        assert torch.equal(out.targets[k].max(1).values, torch.ones(B))
        assert torch.equal(out.targets[k].argmax(1), batch[1][k])


def test_cutmix_box_and_area_corrected_lambda() -> None:
    batch = make_batch(nulls=False)
    # Each sample is one flat colour, so pasted pixels name their source sample.
    images = (torch.arange(B, dtype=torch.uint8) * 7).view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()
    batch = (images, *batch[1:])
    aug = augment(no_aug(), mix_cfg(mixup=False, cutmix=True), KEYS, NUM_CLASSES)
    seen = 0
    for seed in range(6):
        out = run(aug, batch, seed=seed)
        assert out.mix_mode == "cutmix"
        x = to_float_normalized(images, MEAN, STD)
        partner = checked_partner(out)
        for i in range(B):
            foreign = (out.images[i] != x[i]).any(0)
            if out.lam[i] == 1:
                assert not foreign.any()
                continue
            seen += 1
            assert batch[1]["taxa_L30"][partner[i]] == batch[1]["taxa_L30"][i]
            assert torch.equal(out.images[i][:, foreign], x[partner[i]][:, foreign])
            torch.testing.assert_close(float(foreign.float().mean()), 1 - float(out.lam[i]))
    assert seen > 0


def test_switch_prob_picks_both_algorithms() -> None:
    batch = make_batch()
    aug = augment(no_aug(), mix_cfg(mixup=True, cutmix=True, SWITCH_PROB=0.5), KEYS, NUM_CLASSES)
    modes = {run(aug, batch, seed=s).mix_mode for s in range(12)}
    assert modes == {"mixup", "cutmix"}
    only_cut = augment(no_aug(), mix_cfg(mixup=True, cutmix=True, SWITCH_PROB=1.0), KEYS, NUM_CLASSES)
    assert {run(only_cut, batch, seed=s).mix_mode for s in range(4)} == {"cutmix"}


def test_empty_metadata_and_no_partner_batch() -> None:
    images, targets, _, _ = make_batch(nulls=False)
    targets["taxa_L30"] = torch.arange(B)  # every family unique: nobody has a partner
    classes = {**NUM_CLASSES, "taxa_L30": B}
    aug = augment(no_aug(), mix_cfg(), KEYS, classes)
    out = aug(images, targets, torch.zeros(B, 0), torch.zeros(B, 0, dtype=torch.bool), mix_prob=1.0, generator=gen())
    # Whether anyone has a partner is not asked of the device: the batch mixes with itself, which changes nothing.
    assert out.meta.shape == (B, 0) and torch.equal(out.partner, torch.arange(B)) and bool((out.lam == 1).all())
    plain = aug(images, targets, torch.zeros(B, 0), torch.zeros(B, 0, dtype=torch.bool), mix_prob=0.0, generator=gen())
    assert torch.equal(out.images, plain.images)
    for k in KEYS:
        assert torch.equal(out.targets[k], torch.nn.functional.one_hot(targets[k], classes[k]).float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract() -> None:
    images, targets, meta, meta_valid = make_batch()
    dev = torch.device("cuda")
    aug = augment(AugConfig(), mix_cfg(mixup=True, cutmix=True), KEYS, NUM_CLASSES)
    outs = [
        aug(
            images.to(dev),
            {k: t.to(dev) for k, t in targets.items()},
            meta.to(dev),
            meta_valid.to(dev),
            mix_prob=1.0,
            generator=torch.Generator(device=dev).manual_seed(seed),
            host_generator=torch.Generator().manual_seed(seed),
        )
        for seed in (5, 5)
    ]
    a, b = outs
    assert a.images.device.type == "cuda" and a.images.shape == images.shape and a.mix_mode is not None
    assert torch.equal(a.images, b.images)
    for k in KEYS:
        assert torch.equal(a.targets[k], b.targets[k]) and a.targets[k].device.type == "cuda"
    fam = targets["taxa_L30"].to(dev)
    assert torch.equal(fam[a.partner], fam)
