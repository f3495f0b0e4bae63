"""MODEL.TYPE timm (a real small timm ViT), frozen backbones, layer-wise LR decay, timm weights, bundles; EMA."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import write_tiny_dataset
from safetensors.torch import load_file, save_file

from linnaeus.config import load_config, save_config
from linnaeus.config.resolve_data import data_spec
from linnaeus.config.resolve_engine import engine_spec
from linnaeus.config.resolve_model import model_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.engine.ema import EmaComponent
from linnaeus.engine.finetune import optimizer_groups, unfreeze_step
from linnaeus.engine.schedule import StepPlan
from linnaeus.errors import ConfigError
from linnaeus.inference.bundle import export_bundle
from linnaeus.inference.predictor import Predictor
from linnaeus.models import build_model, param_groups

TIMM_TINY = [
    "MODEL.TYPE", "timm", "MODEL.NAME", "test_vit", "MODEL.TIMM.NAME", "test_vit",
    "MODEL.IMG_SIZE", "32", "DATA.IMG_SIZE", "32", "MODEL.DROP_PATH_RATE", "0.0",
]  # fmt: skip
ALL_HEAD_TYPES = [
    "MODEL.CLASSIFICATION.HEADS",
    "{taxa_L10: {TYPE: ConditionalClassifier}, taxa_L20: {TYPE: HierarchicalSoftmaxHead}, taxa_L30: {TYPE: LinearHead}}",
]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("timm") / "data", per_species=2)


def build(cfg, data, **kw):
    hierarchy = {k: torch.as_tensor(v) for k, v in data.hierarchy_matrices().items()}
    return build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy, **kw)


def batch(data, n: int = 3):
    torch.manual_seed(0)
    return torch.randn(n, 3, 32, 32), torch.randn(n, sum(data.meta_dims))


def test_timm_backbone_with_metadata_and_all_head_types(ds):
    cfg = ds.config(*TIMM_TINY, *ALL_HEAD_TYPES)
    data = prepare_data(data_spec(cfg))
    assert data.meta_dims, "the tiny dataset has metadata components"
    model = build(cfg, data).eval()
    assert type(model.backbone.model).__name__ == "VisionTransformer"
    image, meta = batch(data)
    out = model(image, meta)
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (3, n) for k, n in data.num_classes.items()}
    # Metadata reaches the feature: other metadata, other logits; no metadata = all-missing (zeros).
    assert not torch.allclose(out["taxa_L10"], model(image, meta + 1.0)["taxa_L10"])
    torch.testing.assert_close(model(image, None)["taxa_L10"], model(image, torch.zeros_like(meta))["taxa_L10"])
    with pytest.raises(ConfigError, match="model input 'meta'"):
        model(image, meta[:, :1])
    concat = build(ds.config(*TIMM_TINY, "MODEL.TIMM.META_FUSION", "concat"), data)
    assert concat.backbone.num_features == 2 * model.backbone.num_features
    assert len(model.gradnorm_shared_parameters()) == 2  # the fusion LayerNorm


def test_unknown_timm_name_is_one_line_error(ds):
    cfg = ds.config(*TIMM_TINY, "MODEL.TIMM.NAME", "not_a_model_xyz")
    with pytest.raises(ConfigError, match=r"MODEL\.TIMM\.NAME: 'not_a_model_xyz' is not a timm model"):
        build(cfg, prepare_data(data_spec(cfg)))


def test_frozen_backbone_gets_no_gradients_and_no_optimizer_state(ds):
    cfg = ds.config(*TIMM_TINY, "MODEL.FREEZE_BACKBONE", "true")
    data = prepare_data(data_spec(cfg))
    model = build(cfg, data).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("backbone.model.")}
    assert any(n.startswith("backbone.aggregate.meta_tokens.") for n, p in model.named_parameters() if p.requires_grad)
    groups = optimizer_groups(model, engine_spec(cfg).optimizer)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for n, p in model.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    image, meta = batch(data)
    sum(v.logsumexp(1).mean() for v in model(image, meta).values()).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, before[n]) and p not in opt.state, n
    assert not torch.equal(model.state_dict()["head.heads.taxa_L10.fc.weight"], before["head.heads.taxa_L10.fc.weight"])


def test_unfreeze_after_resolves_to_a_step(ds):
    plan = StepPlan(steps_per_epoch=10, total_steps=100)
    cfg = ds.config(*TIMM_TINY, "MODEL.FREEZE_BACKBONE", "true", "MODEL.UNFREEZE_BACKBONE_AFTER", "{EPOCHS: 2.5}")
    assert unfreeze_step(engine_spec(cfg).freeze, plan) == 25
    assert unfreeze_step(engine_spec(ds.config(*TIMM_TINY, "MODEL.FREEZE_BACKBONE", "true")).freeze, plan) is None
    with pytest.raises(ConfigError, match=r"MODEL\.UNFREEZE_BACKBONE_AFTER \(from --opts\): set only together"):
        ds.config(*TIMM_TINY, "MODEL.UNFREEZE_BACKBONE_AFTER", "{STEPS: 5}")  # refused as the config loads


def test_layer_decay_groups_follow_depth(ds):
    cfg = ds.config(*TIMM_TINY, "OPTIMIZER.LAYER_DECAY", "0.5", "OPTIMIZER.HEAD_LR_MULTIPLIER", "3.0")
    data = prepare_data(data_spec(cfg))
    model = build(cfg, data)
    scale = {id(p): g["lr_scale"] for g in optimizer_groups(model, engine_spec(cfg).optimizer) for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(model.backbone.model.blocks)
    # timm ids: 0 = patch embedding and tokens, 1..depth = blocks (the final norm joins the last); fusion after.
    assert scale[id(named["backbone.model.patch_embed.proj.weight"])] == 0.5 ** (depth + 1)
    assert scale[id(named["backbone.model.cls_token"])] == 0.5 ** (depth + 1)
    assert scale[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == 0.5**depth
    assert scale[id(named[f"backbone.model.blocks.{depth - 1}.mlp.fc1.weight"])] == 0.5
    assert scale[id(named["backbone.model.norm.weight"])] == 0.5
    assert scale[id(named["backbone.aggregate.norm.weight"])] == 1.0
    assert scale[id(named["head.heads.taxa_L10.fc.weight"])] == 3.0
    # Without LAYER_DECAY the groups are the plain four (backbone/head × decay/no decay).
    assert len(param_groups(model, 0.05, 3.0)) == 4


def test_layer_decay_for_mformer_v1():
    from test_pretrained import V1_SM

    tiny = [
        "MODEL.CONVNEXT_STAGES.DEPTHS", "[2, 1, 1, 1]", "MODEL.CONVNEXT_STAGES.DIMS", "[8, 16, 32, 64]",
        "MODEL.ROPE_STAGES.DEPTHS", "[2, 1]", "MODEL.ROPE_STAGES.DIMS", "[32, 64]",
        "MODEL.ROPE_STAGES.NUM_HEADS", "[2, 2]",
    ]  # fmt: skip
    cfg = load_config(V1_SM, tiny)
    model = build_model(model_spec(cfg), ["taxa_L10"], {"taxa_L10": 3}, [2])
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for n in _names(model, g)}
    # Layers: stem 0, conv 1-2, conv 3, attn 4-5, attn 6, aggregation 7 (L = 8).
    assert scale["backbone.stem.0.weight"] == 0.5**7
    assert scale["backbone.conv_stages.0.1.dwconv.weight"] == 0.5**5
    assert scale["backbone.downsamples.0.conv.weight"] == 0.5**4  # joins the first block after it
    assert scale["backbone.attn_stages.0.cls_token"] == 0.5**3
    assert scale["backbone.attn_stages.0.meta_tokens.embedders.0.fc.weight"] == 0.5**3
    assert scale["backbone.attn_stages.0.norm.weight"] == 0.5**2
    assert scale["backbone.attn_stages.1.blocks.0.attn.qkv.weight"] == 0.5**1
    assert scale["backbone.aggregate.norm.weight"] == 1.0


def _names(model, group) -> list[str]:
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_timm_weights_file_loads_into_the_backbone(ds, tmp_path):
    torch.manual_seed(3)
    ref = timm.create_model("test_vit", pretrained=False, img_size=32)  # with its classifier, as a hub file has
    sd = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    save_file(sd, tmp_path / "test_vit.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "test_vit.pth")
    for name in ("test_vit.safetensors", "test_vit.pth"):
        cfg = ds.config(*TIMM_TINY, "MODEL.PRETRAINED", str(tmp_path / name))
        model = build(cfg, prepare_data(data_spec(cfg)))
        ours = model.state_dict()
        for k, v in sd.items():
            if not k.startswith("head."):
                assert torch.equal(ours[f"backbone.model.{k}"], v), k
        report = model.pretrained_report
        assert report.source == "timm" and "head.weight" in dict(report.skipped)
        assert report.loaded["blocks"] == report.totals["blocks"]


def test_timm_model_exports_and_predicts_through_a_bundle(ds, tmp_path):
    weights = tmp_path / "pre.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, img_size=32).state_dict(), weights)
    cfg = ds.config(*TIMM_TINY, *ALL_HEAD_TYPES, "MODEL.FREEZE_BACKBONE", "true", "MODEL.PRETRAINED", str(weights))
    data = prepare_data(data_spec(cfg))
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    data.save(run)
    model = build(cfg, data).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "export" / "final.safetensors")
    weights.unlink()  # serving never needs the pretrained file
    bundle = export_bundle(run, tmp_path / "bundle", assume_encodings=True)  # the tiny labels have no column_names
    predictor = Predictor.from_bundle(bundle, device="cpu")
    image, meta = batch(data)
    with torch.no_grad():
        expected, got = model(image, meta), predictor.model(image, meta)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    assert set(load_file(bundle / "weights.safetensors")) == set(model.state_dict())


# ------------------------------------------------------------------------------------------------------ EMA
def _ema_cfg(ds, *opts):
    return ds.config(*TIMM_TINY, "TRAIN.EMA", "{ENABLED: true, DECAY: 0.9, WARMUP: false}", *opts)


def test_ema_update_math_counter_and_resume(ds, tmp_path):
    cfg = _ema_cfg(ds)
    data = prepare_data(data_spec(cfg))
    model = build(cfg, data)
    assert EmaComponent.maybe_create(engine_spec(ds.config(*TIMM_TINY)).ema, model) is None
    ema = EmaComponent.maybe_create(engine_spec(cfg).ema, model)
    key = "head.heads.taxa_L10.fc.weight"
    p0 = model.state_dict()[key].clone()
    assert ema.update(model, step=1) == 0.0  # the first update copies the model
    torch.testing.assert_close(ema.module.state_dict()[key], p0, rtol=0, atol=0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ema.update(model, step=2) == pytest.approx(0.9)
    torch.testing.assert_close(ema.module.state_dict()[key], 0.9 * p0 + 0.1 * (p0 + 1.0))
    assert (ema.updates, ema.step) == (2, 2)
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training

    path = ema.save(tmp_path / "ema.safetensors")
    resumed = EmaComponent.maybe_create(engine_spec(cfg).ema, build(cfg, data))
    resumed.load(path)
    assert (resumed.updates, resumed.step) == (2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    ema.update(model, step=3)
    resumed.update(model, step=3)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, resumed.module.state_dict()[k]), k
    # The file doubles as export weights: the bare model's names.
    assert set(load_file(path)) == set(model.state_dict())


def test_ema_warmup_follows_timm_schedule(ds):
    cfg = ds.config(*TIMM_TINY, "TRAIN.EMA", "{ENABLED: true, DECAY: 0.999, WARMUP: true}")
    ema = EmaComponent.maybe_create(engine_spec(cfg).ema, build(cfg, prepare_data(data_spec(cfg))))
    assert ema.decay_at(1) == 0.0
    assert ema.decay_at(11) == pytest.approx(1 - (1 + 10) ** (-2 / 3))
    assert ema.decay_at(10**7) == 0.999


def test_ema_load_rejects_other_files(ds, tmp_path):
    cfg = _ema_cfg(ds)
    ema = EmaComponent.maybe_create(engine_spec(cfg).ema, build(cfg, prepare_data(data_spec(cfg))))
    save_file({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="not an EMA file"):
        ema.load(tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="no EMA weights"):
        ema.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- linnaeus check
def test_check_reports_what_the_pretrained_file_gives(ds, tmp_path, capsys):
    import json

    from linnaeus.cli import main

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit", pretrained=False, img_size=32).state_dict(), weights)
    opts = ["--opts", *TIMM_TINY, "MODEL.PRETRAINED", str(weights)]
    assert main(["check", "--cfg", str(ds.config_path), "--no-images", *opts]) == 0
    out = capsys.readouterr().out
    assert f"pretrained (timm, {weights}): stem 2/2, blocks " in out
    assert "skipped head.weight: no counterpart" in out
    assert main(["check", "--cfg", str(ds.config_path), "--no-images", "--json", *opts]) == 0
    section = json.loads(capsys.readouterr().out)["pretrained"]
    assert section["groups"]["heads"] == {"loaded": 0, "total": 6}
    assert section["groups"]["blocks"]["loaded"] == section["groups"]["blocks"]["total"] > 0

    useless = tmp_path / "useless.safetensors"
    save_file({"something.else": torch.zeros(2)}, useless)
    rc = main(
        ["check", "--cfg", str(ds.config_path), "--no-images", "--opts", *TIMM_TINY, "MODEL.PRETRAINED", str(useless)]
    )
    err = capsys.readouterr().err
    assert rc != 0 and "loads nothing into this model" in err and len(err.strip().splitlines()) == 1


def test_frozen_vit_example_config_is_the_dinov3_recipe():
    from linnaeus.config import repo_root
    from linnaeus.models import build_backbone

    cfg = load_config(repo_root() / "configs/experiments/frozen_vit_example.yaml")
    assert cfg.MODEL.TYPE == "timm" and timm.is_model(cfg.MODEL.TIMM.NAME) and "dinov3" in cfg.MODEL.TIMM.NAME
    assert cfg.MODEL.FREEZE_BACKBONE and {h.TYPE for h in cfg.MODEL.CLASSIFICATION.HEADS.values()} == {"LinearHead"}
    with torch.device("meta"):
        backbone = build_backbone(model_spec(cfg), [2, 3, 10])
    assert backbone.num_features == 768 and type(backbone.model).__name__ == "Eva"
    # The weights file is not here: building for training says how to get it, in one line.
    with pytest.raises(ConfigError, match=r"MODEL\.PRETRAINED: .* is not a local file"):
        keys = list(cfg.DATA.TASK_KEYS_H5)
        hierarchy = {(p, c): torch.ones(3, 3) for p, c in zip(keys[1:], keys[:-1], strict=True)}
        build_model(model_spec(cfg), keys, dict.fromkeys(keys, 3), [2, 3, 10], hierarchy)


def test_ema_ranking_and_export_need_ema_weights(ds, tmp_path):
    from linnaeus.inference.bundle import resolve_weights

    # Ranking by the EMA weights without EMA is a rule between keys: the config is refused as it loads.
    with pytest.raises(
        ConfigError, match=r"BEST_METRIC \(from --opts\): 'val_ema/taxa_L10/top1' ranks the EMA weights"
    ):
        ds.config(*TIMM_TINY, "SCHEDULE.CHECKPOINT.BEST_METRIC", "val_ema/taxa_L10/top1")
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, run / "export" / "final.safetensors", metadata={"step": "5"})
    with pytest.raises(ConfigError, match=r"--which ema: .* has no EMA weights"):
        resolve_weights(run, "ema")
    save_file({"w": torch.ones(2)}, run / "export" / "ema.safetensors", metadata={"step": "5", "weights": "ema"})
    sd, info = resolve_weights(run, "ema")
    assert torch.equal(sd["w"], torch.ones(2)) and (info["which"], info["step"]) == ("ema", 5)
