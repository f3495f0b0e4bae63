"""Pretrained starts: stitched ConvNeXt + RoPE-ViT → mFormerV1_sm (timm and original layouts), file reading, the load
report, fine-tuning from a Linnaeus export with a changed taxonomy (head rows by taxon id)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from linnaeus.config import load_config
from linnaeus.config.resolve_model import model_spec
from linnaeus.data.taxonomy import ClassMap
from linnaeus.errors import ConfigError
from linnaeus.models import build_model
from linnaeus.models.pretrained import read_weights
from linnaeus.models.pretrained.report import group_of

ARCHS = Path(__file__).resolve().parents[2] / "configs" / "model" / "archs"
V1_SM = ARCHS / "mFormerV1" / "mFormerV1_sm.yaml"
TASKS = ["taxa_L10", "taxa_L20"]
NUM_CLASSES = {"taxa_L10": 5, "taxa_L20": 3}
VIT_BLOCKS_IN_STAGE3 = 5  # mFormerV1_sm: ROPE_STAGES.DEPTHS[0]


def _random_state(name: str) -> dict[str, torch.Tensor]:
    """A timm model's state dict with every tensor random (so a copied tensor cannot match by accident)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def convnext_sd() -> dict[str, torch.Tensor]:
    return _random_state("convnext_tiny")


@pytest.fixture(scope="module")
def ropevit_sd() -> dict[str, torch.Tensor]:
    return _random_state("vit_small_patch16_rope_mixed_224")


def convnext_original_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm convnext keys renamed the way facebookresearch/ConvNeXt names them (convnext_tiny_22k_1k_384.pth)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.(\d)\.", r"downsample_layers.0.\1.", k)
        k = re.sub(r"^stages\.(\d)\.downsample\.(\d)\.", r"downsample_layers.\1.\2.", k)
        k = re.sub(r"^stages\.(\d)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace(".conv_dw.", ".dwconv.").replace(".mlp.fc1.", ".pwconv1.").replace(".mlp.fc2.", ".pwconv2.")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        out[k] = v
    return out


def ropevit_original_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm RoPE-ViT keys the way naver-ai/rope-vit saves them (rope_mixed_deit_small_patch16_LS.pth)."""
    out = {k: v for k, v in sd.items() if k != "rope.freqs"}
    f = sd["rope.freqs"]  # (2, depth, heads, d/2) → (2, depth, heads·d/2)
    out["freqs"] = f.reshape(f.shape[0], f.shape[1], -1).clone()
    out["freqs_t_x"] = torch.arange(196.0) % 14
    out["freqs_t_y"] = torch.div(torch.arange(196.0), 14, rounding_mode="floor")
    return out


def stitched_model(tmp_path: Path, convnext: dict, ropevit: dict, suffix: str = ".safetensors", extra=()):
    cn, rv = tmp_path / f"convnext{suffix}", tmp_path / f"ropevit{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in convnext.items()}, cn)
        save_file({k: v.contiguous() for k, v in ropevit.items()}, rv)
    else:
        torch.save({"model": convnext}, cn)
        torch.save({"model": ropevit}, rv)
    opts = [
        "MODEL.PRETRAINED_SOURCE", "stitched_convnext_ropevit",
        "MODEL.PRETRAINED_CONVNEXT", str(cn), "MODEL.PRETRAINED_ROPEVIT", str(rv),
        "MODEL.ROPE_STAGES.LAYER_SCALE_INIT_VALUE", "1.0e-5", *extra,
    ]  # fmt: skip
    cfg = load_config(V1_SM, opts)
    return build_model(model_spec(cfg), TASKS, NUM_CLASSES, [2, 3])


def expected_pairs(convnext: dict, ropevit: dict) -> dict[str, torch.Tensor]:
    """Our name → the timm tensor that must land there, written out independently of the loader's rules."""
    exp = {}
    for k, v in convnext.items():
        if k.startswith("stem."):
            exp[f"backbone.{k}"] = v
        elif m := re.match(r"stages\.([123])\.downsample\.([01])\.(\w+)$", k):
            exp[f"backbone.downsamples.{int(m[1]) - 1}.{['norm', 'conv'][int(m[2])]}.{m[3]}"] = v
        elif m := re.match(r"stages\.([01])\.blocks\.(\d+)\.(.+)$", k):
            rest = m[3].replace("conv_dw", "dwconv").replace("mlp.fc1", "pwconv1").replace("mlp.fc2", "pwconv2")
            exp[f"backbone.conv_stages.{m[1]}.{m[2]}.{rest}"] = v
    for k, v in ropevit.items():
        if (m := re.match(r"blocks\.(\d+)\.(.+)$", k)) and int(m[1]) < VIT_BLOCKS_IN_STAGE3:
            exp[f"backbone.attn_stages.0.blocks.{m[1]}.{m[2]}"] = v
    for b in range(VIT_BLOCKS_IN_STAGE3):
        exp[f"backbone.attn_stages.0.blocks.{b}.attn.position.freqs"] = ropevit["rope.freqs"][:, b]
    exp["backbone.attn_stages.0.cls_token"] = ropevit["cls_token"]
    exp["backbone.attn_stages.0.norm.weight"] = ropevit["norm.weight"]
    exp["backbone.attn_stages.0.norm.bias"] = ropevit["norm.bias"]
    return exp


def _assert_all_bit_equal(model, exp: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    wrong = [k for k, v in exp.items() if k not in sd or not torch.equal(sd[k], v)]
    assert not wrong, f"{len(wrong)} tensors not transferred bit-exactly, e.g. {wrong[:5]}"


def test_stitched_timm_layout_transfers_every_counterpart_bit_exactly(tmp_path, convnext_sd, ropevit_sd):
    model = stitched_model(tmp_path, convnext_sd, ropevit_sd)
    exp = expected_pairs(convnext_sd, ropevit_sd)
    # Every ConvNeXt tensor of the stem, stages 0-1 and the three downsamplers, every tensor of ViT blocks 0-4.
    n_convnext = sum(1 for k in convnext_sd if k.startswith(("stem.", "stages.0.", "stages.1.")) or ".downsample." in k)
    n_vit_blocks = sum(1 for k in ropevit_sd if re.match(r"blocks\.[0-4]\.", k))
    assert n_convnext == 4 + 3 * 4 + 6 * 9 and n_vit_blocks == 5 * 14
    assert len(exp) == n_convnext + n_vit_blocks + 5 + 3
    _assert_all_bit_equal(model, exp)

    report = model.pretrained_report
    assert report.num_loaded == len(exp)
    skipped = dict(report.skipped)
    assert "no counterpart" in skipped["blocks.5.attn.qkv.weight"]
    assert "no counterpart" in skipped["patch_embed.proj.weight"]
    assert "attention stage" in skipped["stages.2.blocks.0.conv_dw.weight"]
    assert "rope.freqs[:, 7]" in skipped
    assert report.loaded["norms"] > 0 and report.loaded["tokens"] == 5 + 1  # 5 freqs + CLS
    assert report.loaded["heads"] == 0 and report.totals["heads"] == 4
    text = "\n".join(report.lines())
    assert "stem 4/4, stages 48/48, blocks 50/70" in text and "skipped head.fc.weight: no counterpart" in text


def test_stitched_original_layout_pth_loads_the_same(tmp_path, convnext_sd, ropevit_sd):
    model = stitched_model(
        tmp_path, convnext_original_layout(convnext_sd), ropevit_original_layout(ropevit_sd), suffix=".pth"
    )
    _assert_all_bit_equal(model, expected_pairs(convnext_sd, ropevit_sd))
    skipped = dict(model.pretrained_report.skipped)
    assert "recomputed" in skipped["freqs_t_x"]


def test_stitched_blocks_compute_what_timm_computes(tmp_path, convnext_sd, ropevit_sd):
    """RoPE conversion check: block 0 in mFormerV1 gives timm's block-0 output on the same tokens."""
    model = stitched_model(tmp_path, convnext_sd, ropevit_sd).eval()
    vit = timm.create_model("vit_small_patch16_rope_mixed_224", pretrained=False).eval()
    vit.load_state_dict({k: v * 0.05 if k.endswith("weight") and v.ndim > 1 else v for k, v in ropevit_sd.items()})
    model.load_state_dict(
        {
            f"backbone.attn_stages.0.blocks.0.{k[9:]}": v
            for k, v in vit.state_dict().items()
            if k.startswith("blocks.0.")
        }
        | {"backbone.attn_stages.0.blocks.0.attn.position.freqs": vit.state_dict()["rope.freqs"][:, 0]},
        strict=False,
    )
    grid = (4, 6)
    x = torch.randn(2, 1 + grid[0] * grid[1], 384)
    rope = vit.rope.get_embed(shape=list(grid))[0]
    with torch.no_grad():
        theirs = vit.blocks[0](x, rope=rope)
        ours = model.backbone.attn_stages[0].blocks[0](x, grid, 1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_stitched_without_layer_scale_reports_the_gammas(tmp_path, convnext_sd, ropevit_sd):
    cn, rv = tmp_path / "c.safetensors", tmp_path / "r.safetensors"
    save_file(convnext_sd, cn)
    save_file(ropevit_sd, rv)
    cfg = load_config(V1_SM, ["MODEL.PRETRAINED_CONVNEXT", str(cn), "MODEL.PRETRAINED_ROPEVIT", str(rv)])
    report = build_model(model_spec(cfg), TASKS, NUM_CLASSES, []).pretrained_report
    assert "blocks.0.gamma_1" in dict(report.skipped)
    assert any("LAYER_SCALE_INIT_VALUE" in n for n in report.notes)


def test_missing_file_and_hub_name_are_one_line_errors(tmp_path):
    cfg = load_config(V1_SM, ["MODEL.PRETRAINED_CONVNEXT", "convnext_tiny.fb_in22k_ft_in1k_384"])
    with pytest.raises(ConfigError, match=r"MODEL.PRETRAINED_CONVNEXT: .* not a local file.*huggingface-cli download"):
        build_model(model_spec(cfg), TASKS, NUM_CLASSES, [])
    cfg = load_config(V1_SM, ["MODEL.PRETRAINED", "timm/vit_small_patch16_rope_mixed_224.naver_in1k"])
    with pytest.raises(ConfigError, match="huggingface-cli download timm/vit_small_patch16_rope_mixed_224"):
        build_model(model_spec(cfg), TASKS, NUM_CLASSES, [])


def test_pickles_are_refused_and_empty_loads_are_errors(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "cfg": object.__new__(ClassMap)}, bad)
    with pytest.raises(ConfigError, match="weights_only"):
        read_weights(str(bad), "MODEL.PRETRAINED")
    nothing = tmp_path / "nothing.safetensors"
    save_file({"unrelated.weight": torch.zeros(3)}, nothing)
    cfg = load_config(V1_SM, ["MODEL.PRETRAINED_ROPEVIT", str(nothing)])
    with pytest.raises(ConfigError, match="not a ViT state dict"):
        build_model(model_spec(cfg), TASKS, NUM_CLASSES, [])
    cfg = load_config(V1_SM, ["MODEL.PRETRAINED", str(nothing)])
    with pytest.raises(ConfigError, match="loads nothing into this model"):
        build_model(model_spec(cfg), TASKS, NUM_CLASSES, [])


def test_report_groups():
    assert group_of("head.heads.taxa_L10.fc.weight") == "heads"
    assert group_of("backbone.attn_stages.0.meta_tokens.embedders.0.fc.weight") == "meta"
    assert group_of("backbone.attn_stages.1.cls_token") == "tokens"
    assert group_of("backbone.conv_stages.0.1.norm.weight") == "norms"
    assert group_of("backbone.downsamples.0.conv.weight") == "stages"
    assert group_of("backbone.attn_stages.0.blocks.3.attn.qkv.weight") == "blocks"
    assert group_of("backbone.model.patch_embed.proj.weight") == "stem"


# ---------------------------------------------------------------------------------------- from a Linnaeus export
def _class_maps(ids: dict[str, list[int]]) -> dict[str, ClassMap]:
    return {k: ClassMap(k, int(k[6:]), np.asarray(sorted(v), np.int64)) for k, v in ids.items()}


def _write_class_maps(path: Path, maps: dict[str, ClassMap]) -> None:
    import json

    doc = {
        k: {"rank": int(m.rank), "classes": [{"index": i, "taxon_id": int(t)} for i, t in enumerate(m.taxon_ids)]}
        for k, m in maps.items()
    }
    path.write_text(json.dumps(doc))


def test_fine_tune_from_export_remaps_heads_by_taxon_id(tmp_path):
    tiny = [
        "MODEL.CONVNEXT_STAGES.DEPTHS", "[1, 1, 1, 1]", "MODEL.CONVNEXT_STAGES.DIMS", "[16, 24, 48, 96]",
        "MODEL.ROPE_STAGES.DEPTHS", "[1, 1]", "MODEL.ROPE_STAGES.DIMS", "[48, 96]",
    ]  # fmt: skip
    old_maps = _class_maps({"taxa_L10": [101, 102, 103, 104, 105], "taxa_L20": [11, 12, 13]})
    cfg = load_config(V1_SM, tiny)
    torch.manual_seed(1)
    old = build_model(model_spec(cfg), TASKS, NUM_CLASSES, [2, 3])
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    save_file(old.state_dict(), run / "export" / "final.safetensors")
    _write_class_maps(run / "class_maps.json", old_maps)

    # The new dataset adds species 106 and 107 and drops 103 (genus ranks unchanged).
    new_maps = _class_maps({"taxa_L10": [101, 102, 104, 105, 106, 107], "taxa_L20": [11, 12, 13]})
    new_cfg = load_config(V1_SM, [*tiny, "MODEL.PRETRAINED", str(run / "export" / "final.safetensors")])
    torch.manual_seed(2)
    new = build_model(model_spec(new_cfg), TASKS, {"taxa_L10": 6, "taxa_L20": 3}, [2, 3], class_maps=new_maps)
    o, n = old.state_dict(), new.state_dict()
    for k in o:
        if not k.startswith("head."):
            assert torch.equal(o[k], n[k]), k
    w_old, w_new = o["head.heads.taxa_L10.fc.weight"], n["head.heads.taxa_L10.fc.weight"]
    for new_row, old_row in [(0, 0), (1, 1), (2, 3), (3, 4)]:  # 101, 102, 104, 105
        assert torch.equal(w_new[new_row], w_old[old_row])
        assert torch.equal(n["head.heads.taxa_L10.fc.bias"][new_row], o["head.heads.taxa_L10.fc.bias"][old_row])
    assert not any(torch.equal(w_new[r], w_old[i]) for r in (4, 5) for i in range(5))  # new taxa start fresh
    assert torch.equal(n["head.heads.taxa_L20.fc.weight"], o["head.heads.taxa_L20.fc.weight"])
    notes = new.pretrained_report.notes
    assert "taxa_L10: 4 taxa keep their head rows, 2 new taxa start fresh, 1 dropped (taxon ids [103])" in notes
    assert new.pretrained_report.loaded["heads"] == 4

    # Without the new run's class maps the heads are skipped with the reason, the backbone still loads.
    plain = build_model(model_spec(new_cfg), TASKS, {"taxa_L10": 6, "taxa_L20": 3}, [2, 3])
    assert "class maps were not given" in dict(plain.pretrained_report.skipped)["head.heads.taxa_L10.fc.weight"]


# ------------------------------------------------------------------------------------------------- MetaFormer
V0_SM = ARCHS / "mFormerV0" / "mFormerV0_sm.yaml"
V0_TINY = [
    "MODEL.CONV_STAGES.STEM_DIMS", "[8, 16]", "MODEL.CONV_STAGES.OUT_CHANNELS", "[16, 24]",
    "MODEL.CONV_STAGES.DEPTHS", "[1, 2]", "MODEL.ATTENTION_STAGES.DEPTHS", "[2, 1]",
    "MODEL.ATTENTION_STAGES.DIMS", "[64, 64]", "MODEL.IMG_SIZE", "64", "DATA.IMG_SIZE", "64",
]  # fmt: skip


def metaformer_layout(sd: dict[str, torch.Tensor], table_side: dict[int, int]) -> dict[str, torch.Tensor]:
    """Our V0 state dict renamed the way dqshuai/MetaFormer names it, bias tables in its (rows, heads) form."""
    mb = {"expand.0": "_expand_conv", "expand.1": "_bn0", "dw.0": "_depthwise_conv", "dw.1": "_bn1",
          "se.reduce": "_se_reduce", "se.expand": "_se_expand", "project.0": "_project_conv", "project.1": "_bn2"}  # fmt: skip
    meta = {"fc": "0", "norm": "2", "res.fc1": "3.w1", "res.norm1": "3.norm_fn1", "res.fc2": "3.w2",
            "res.norm2": "3.norm_fn2"}  # fmt: skip
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("backbone.")
        if k.startswith("head.") or k.endswith("position.extra"):
            continue
        if m := re.match(r"stem\.7\.(.+)", k):
            k = f"bn1.{m[1]}"
        elif m := re.match(r"stem\.(\d)\.(.+)", k):
            k = f"stage_0.{m[1]}.{m[2]}"
        elif m := re.match(r"conv_stages\.(\d)\.(\d+)\.(\w+\.\w+)\.(.+)", k):
            k = f"stage_{int(m[1]) + 1}.{m[2]}.{mb[m[3]]}.{m[4]}"
        elif m := re.match(r"patch_embeds\.(\d)\.(.+)", k):
            k = f"stage_{int(m[1]) + 3}.0.patch_embed.{m[2]}"
        elif m := re.match(r"attn_stages\.(\d)\.blocks\.(\d+)\.attn\.position\.table", k):
            heads = v.shape[0]
            side = table_side[int(m[1])]
            v = torch.randn(side * side + 1, heads)
            k = f"stage_{int(m[1]) + 3}.{m[2]}.attn.relative_position_bias_table"
        elif m := re.match(r"attn_stages\.(\d)\.blocks\.(.+)", k):
            k = f"stage_{int(m[1]) + 3}.{m[2]}"
        elif m := re.match(r"attn_stages\.(\d)\.meta_tokens\.embedders\.(\d)\.(.+)\.(weight|bias)", k):
            k = f"meta_{int(m[2]) + 1}_head_{int(m[1]) + 1}.{meta[m[3]]}.{m[4]}"
        elif m := re.match(r"attn_stages\.(\d)\.(cls_token|norm)(.*)", k):
            k = f"{m[2]}_{int(m[1]) + 1}{m[3]}"
        else:
            k = {"aggregate.proj1.0.weight": "cl_1_fc.0.fc1.weight", "aggregate.proj1.0.bias": "cl_1_fc.0.fc1.bias",
                 "aggregate.proj1.2.weight": "cl_1_fc.0.fc2.weight", "aggregate.proj1.2.bias": "cl_1_fc.0.fc2.bias",
                 "aggregate.proj1.3.weight": "cl_1_fc.1.weight", "aggregate.proj1.3.bias": "cl_1_fc.1.bias",
                 "aggregate.mix.weight": "aggregate.weight", "aggregate.mix.bias": "aggregate.bias",
                 "aggregate.norm.weight": "norm.weight", "aggregate.norm.bias": "norm.bias"}[k]  # fmt: skip
        out[k] = torch.randn_like(v) if v.is_floating_point() and "bias_table" not in k else v
    out["stage_3.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    out["head.weight"] = torch.randn(1000, 64)
    return out


def test_metaformer_checkpoint_loads_into_v0_with_bias_tables_converted(tmp_path):
    cfg = load_config(V0_SM, V0_TINY)
    model = build_model(model_spec(cfg), TASKS, NUM_CLASSES, [2, 3])
    # Stage 3 runs on a 4×4 grid here; the checkpoint's stage-3 tables are for 6×6 (resized), stage 4's for 2×2.
    orig = metaformer_layout(model.state_dict(), {0: 11, 1: 3})
    path = tmp_path / "metafg_0.pth"
    torch.save({"model": orig}, path)
    loaded = build_model(model_spec(load_config(V0_SM, [*V0_TINY, "MODEL.PRETRAINED", str(path),
                                                        "MODEL.PRETRAINED_SOURCE", "metaformer"])),
                         TASKS, NUM_CLASSES, [2, 3])  # fmt: skip
    sd = loaded.state_dict()
    report = loaded.pretrained_report
    backbone_tensors = [k for k in sd if k.startswith("backbone.")]
    assert report.num_loaded == len(backbone_tensors)  # every backbone tensor has a counterpart
    assert torch.equal(sd["backbone.stem.7.running_var"], orig["bn1.running_var"])
    assert torch.equal(sd["backbone.conv_stages.1.1.se.reduce.weight"], orig["stage_2.1._se_reduce.weight"])
    assert torch.equal(
        sd["backbone.attn_stages.0.meta_tokens.embedders.1.res.fc2.weight"], orig["meta_2_head_1.3.w2.weight"]
    )
    assert torch.equal(sd["backbone.aggregate.mix.weight"], orig["aggregate.weight"])
    # Stage 4: same grid, so the table is the original's patch rows and extra pairs read row 0, as in MetaFormer.
    table = orig["stage_4.0.attn.relative_position_bias_table"]
    position = loaded.backbone.attn_stages[1].blocks[0].attn.position
    bias = position.bias(2, 2, 3)  # (heads, 3 extra + 4 patches, same)
    h = w = 2
    for i in range(4):
        for j in range(4):
            dy, dx = i // w - j // w + h - 1, i % w - j % w + w - 1
            torch.testing.assert_close(bias[:, 3 + i, 3 + j], table[dy * (2 * w - 1) + dx])
    torch.testing.assert_close(bias[:, 0, 5], table[0])
    assert tuple(sd["backbone.attn_stages.0.blocks.0.attn.position.table"].shape) == (8, 7, 7)  # resized 11 → 7
    skipped = dict(report.skipped)
    assert "recomputed" in skipped["stage_3.0.attn.relative_position_index"]
    assert "classifier" in skipped["head.weight"]


def test_source_resolution():
    from linnaeus.models.pretrained import pretrained_source

    def src(*opts):
        return pretrained_source(model_spec(load_config(V1_SM, list(opts))))

    assert src() is None
    assert src("MODEL.PRETRAINED", "x.safetensors") == "linnaeus"
    assert src("MODEL.PRETRAINED", "x.safetensors", "MODEL.TYPE", "timm") == "timm"
    assert src("MODEL.PRETRAINED_ROPEVIT", "r.pth") == "stitched_convnext_ropevit"
    with pytest.raises(ConfigError, match=r"used only with MODEL\.PRETRAINED_SOURCE stitched"):
        src("MODEL.PRETRAINED_CONVNEXT", "c.pth", "MODEL.PRETRAINED_SOURCE", "linnaeus", "MODEL.PRETRAINED", "x")
    with pytest.raises(ConfigError, match=r"MODEL\.PRETRAINED: required with MODEL\.PRETRAINED_SOURCE timm"):
        src("MODEL.PRETRAINED_SOURCE", "timm")
