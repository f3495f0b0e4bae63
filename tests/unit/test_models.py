"""mFormerV1 / mFormerV0: shapes, metadata tokens, RoPE, attention scale, sizes, checkpointing, compile, learning."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linnaeus.config import load_config
from linnaeus.config.resolve_model import loss_spec, model_spec
from linnaeus.errors import ConfigError
from linnaeus.losses import build_task_loss
from linnaeus.models import build_model, model_size, param_groups
from linnaeus.models.attention import Attention
from linnaeus.models.position import RelativePositionBias, Rope2d, rotate_pairs

ARCHS = Path(__file__).resolve().parents[2] / "configs" / "model" / "archs"
ARCH_FILES = sorted(ARCHS.glob("*/*.yaml"))
TASKS = ["taxa_L10", "taxa_L20"]
NUM_CLASSES = {"taxa_L10": 7, "taxa_L20": 3}


def tiny_opts(path: Path, head_dim: int = 8, extra: list[str] | None = None) -> list[str]:
    """Shrink an arch to depth 1 and head size ``head_dim`` while keeping its head counts."""
    cfg = load_config(path)
    if cfg.MODEL.TYPE == "mFormerV1":
        heads = cfg.MODEL.ROPE_STAGES.NUM_HEADS
        dims = [h * head_dim for h in heads]
        opts = [
            "MODEL.CONVNEXT_STAGES.DEPTHS", "[1, 1, 1, 1]",
            "MODEL.CONVNEXT_STAGES.DIMS", f"[16, 24, {dims[0]}, {dims[1]}]",
            "MODEL.ROPE_STAGES.DEPTHS", "[1, 1]",
            "MODEL.ROPE_STAGES.DIMS", str(dims),
        ]  # fmt: skip
    else:
        heads = cfg.MODEL.ATTENTION_STAGES.NUM_HEADS
        dims = [h * head_dim for h in heads]
        opts = [
            "MODEL.CONV_STAGES.STEM_DIMS", "[8, 16]",
            "MODEL.CONV_STAGES.OUT_CHANNELS", "[16, 24]",
            "MODEL.CONV_STAGES.DEPTHS", "[1, 2]",
            "MODEL.ATTENTION_STAGES.DEPTHS", "[1, 1]",
            "MODEL.ATTENTION_STAGES.DIMS", str(dims),
            "MODEL.IMG_SIZE", "64", "DATA.IMG_SIZE", "64",
        ]  # fmt: skip
    return opts + (extra or [])


def tiny_model(path: Path, meta_dims: list[int], extra: list[str] | None = None, **kw):
    cfg = load_config(path, tiny_opts(path, extra=extra))
    return build_model(model_spec(cfg), TASKS, NUM_CLASSES, meta_dims, **kw)


V1_SM = ARCHS / "mFormerV1" / "mFormerV1_sm.yaml"
V0_SM = ARCHS / "mFormerV0" / "mFormerV0_sm.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are tiny: on a shared 2-core machine, intra-op threads mostly wait on each other.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_arch_yaml_is_found():
    names = {p.stem for p in ARCH_FILES}
    assert names == {f"mFormerV1_{s}" for s in ("sm", "md", "lg", "xl")} | {
        f"mFormerV0_{s}" for s in ("sm", "md", "lg")
    }


@pytest.mark.parametrize("path", ARCH_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("meta_dims", [[], [2, 3, 10]], ids=["no_meta", "meta"])
def test_shapes_every_arch(path, meta_dims):
    torch.manual_seed(0)
    model = tiny_model(path, meta_dims).eval()
    for h, w in ((64, 64), (96, 128)):
        meta = torch.randn(2, sum(meta_dims)) if meta_dims else None
        with torch.no_grad():
            out = model(torch.randn(2, 3, h, w), meta)
        assert list(out) == TASKS
        assert {k: tuple(v.shape) for k, v in out.items()} == {"taxa_L10": (2, 7), "taxa_L20": (2, 3)}
        assert all(torch.isfinite(v).all() for v in out.values())


def test_real_sm_forward_at_64px():
    torch.manual_seed(0)
    cfg = load_config(V1_SM)
    model = build_model(model_spec(cfg), TASKS, NUM_CLASSES, [2, 3, 10]).eval()
    assert 30.0e6 < sum(p.numel() for p in model.backbone.parameters()) < 31.5e6
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 15))
    assert out["taxa_L10"].shape == (2, 7) and torch.isfinite(out["taxa_L10"]).all()


def test_zeroed_metadata_component_takes_learned_missing_path():
    torch.manual_seed(0)
    model = tiny_model(V1_SM, [2, 3]).eval()
    image, meta = torch.randn(2, 3, 64, 64), torch.randn(2, 5)
    masked = meta.clone()
    masked[:, 2:5] = 0
    with torch.no_grad():
        present, missing = model(image, meta)["taxa_L10"], model(image, masked)["taxa_L10"]
        all_missing, none = model(image, torch.zeros(2, 5))["taxa_L10"], model(image, None)["taxa_L10"]
    assert (present - missing).abs().max() > 1e-4
    # meta=None means "every component missing": the same learned tokens as all-zero slices.
    torch.testing.assert_close(all_missing, none)


def test_no_metadata_model_has_no_meta_tokens_and_rejects_meta():
    model = tiny_model(V1_SM, [])
    assert all(stage.num_extra == 1 and stage.meta_tokens is None for stage in model.backbone.attn_stages)
    with pytest.raises(ConfigError, match="meta"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 5))


def test_bad_meta_width_and_image_size_are_one_line_errors():
    model = tiny_model(V1_SM, [2, 3])
    with pytest.raises(ConfigError, match=r"expected \(1, 5\)"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 4))
    with pytest.raises(ConfigError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64), torch.randn(1, 5))


def _rotated_dot(rope: Rope2d, q: torch.Tensor, k: torch.Tensor, pos_q, pos_k, grid=(8, 8), extra=1):
    cos, sin = rope.cos_sin(grid[0], grid[1], extra)
    n_q = extra + pos_q[1] * grid[1] + pos_q[0]
    n_k = extra + pos_k[1] * grid[1] + pos_k[0]
    rq = rotate_pairs(q, cos[:, n_q], sin[:, n_q])
    rk = rotate_pairs(k, cos[:, n_k], sin[:, n_k])
    return (rq * rk).sum(-1), rq, rk


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "axial"])
def test_rope_is_a_rotation_with_relative_dot_products(mixed):
    torch.manual_seed(0)
    rope = Rope2d(num_heads=3, head_dim=8, theta=100.0, mixed=mixed)
    q, k = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    rope.freqs.data = rope.freqs.data.double()
    dot, rq, rk = _rotated_dot(rope, q, k, (1, 2), (4, 0))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))
    assert (rq - q).abs().max() > 1e-3  # a non-zero position really rotates
    shifted, _, _ = _rotated_dot(rope, q, k, (3, 5), (6, 3))  # both moved by (+2, +3)
    torch.testing.assert_close(dot, shifted)
    other, _, _ = _rotated_dot(rope, q, k, (1, 2), (5, 0))  # a different offset gives a different score
    assert (dot - other).abs().max() > 1e-4


def test_rope_leaves_extra_tokens_unrotated():
    rope = Rope2d(num_heads=2, head_dim=8)
    cos, sin = rope.cos_sin(3, 4, num_extra=4)
    assert cos.shape == (2, 16, 4)
    assert torch.equal(cos[:, :4], torch.ones(2, 4, 4)) and torch.equal(sin[:, :4], torch.zeros(2, 4, 4))


def test_rope_mixed_frequencies_are_learnable_and_not_decayed():
    model = tiny_model(V1_SM, [2])
    freq_names = [n for n, _ in model.named_parameters() if n.endswith(".freqs")]
    assert len(freq_names) == 2  # one per attention block (depth 1 + 1)
    groups = param_groups(model, weight_decay=0.05, head_lr_multiplier=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(by_name) == sum(1 for _ in model.parameters())  # every parameter exactly once
    for name, group in by_name.items():
        no_decay = name.endswith(("cls_token", ".freqs", ".bias")) or ".norm" in name or "gamma" in name
        if no_decay:
            assert group["weight_decay"] == 0.0, name
        assert group["lr_scale"] == (10.0 if name.startswith("head.") else 1.0), name
    assert by_name["backbone.attn_stages.0.blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["head.heads.taxa_L10.fc.weight"]["weight_decay"] == 0.05


def test_attention_uses_one_scale_and_matches_explicit_softmax():
    torch.manual_seed(0)
    dim, heads, grid, extra = 16, 2, (2, 3), 2
    attn = Attention(dim, heads, Rope2d(heads, dim // heads)).eval()
    x = torch.randn(3, extra + 6, dim)
    b, n, _ = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    q, k, _ = attn.position(q, k, grid, extra)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads)).softmax(-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(b, n, dim))
    torch.testing.assert_close(attn(x, grid, extra), expected, atol=1e-5, rtol=1e-5)


def test_relative_bias_resizes_and_gives_extra_tokens_one_value():
    torch.manual_seed(0)
    rel = RelativePositionBias(num_heads=2, grid=(4, 4))
    bias = rel.bias(4, 4, num_extra=3)
    assert bias.shape == (2, 19, 19)
    assert torch.equal(bias[:, :3, :], rel.extra.view(2, 1, 1).expand(2, 3, 19))
    assert torch.equal(bias[:, 3:, :3], rel.extra.view(2, 1, 1).expand(2, 16, 3))
    # Same offset → same bias: patches (0,0)->(1,1) and (2,2)->(3,3) (row-major, width 4).
    assert torch.equal(bias[:, 3 + 0, 3 + 5], bias[:, 3 + 10, 3 + 15])
    assert rel.bias(2, 3, num_extra=1).shape == (2, 7, 7)


def test_drop_path_ramp_and_init():
    cfg = load_config(V1_SM, tiny_opts(V1_SM))
    model = build_model(model_spec(cfg), TASKS, NUM_CLASSES, [2])
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert len(rates) == 4 and rates[0] == 0.0 and rates[-1] == pytest.approx(cfg.MODEL.DROP_PATH_RATE)
    assert rates == sorted(rates)
    gammas = [m.gamma for m in model.modules() if type(m).__name__ == "ConvNeXtBlock"]
    assert all(torch.all(g == 1e-6) for g in gammas)
    qkv = model.backbone.attn_stages[0].blocks[0].attn.qkv
    assert torch.all(qkv.bias == 0) and qkv.weight.abs().max() <= 2.0


def test_arch_config_errors_are_one_line():
    # build_model re-checks what it relies on, for callers that build a ModelSpec without load_config.
    spec = model_spec(load_config(V1_SM, tiny_opts(V1_SM)))
    rope = spec.rope_stages
    bad_dims = dataclasses.replace(spec, rope_stages=dataclasses.replace(rope, dims=(40, 48)))
    with pytest.raises(ConfigError, match=r"MODEL\.ROPE_STAGES\.DIMS: expected DIMS\[0\] =="):
        build_model(bad_dims, TASKS, NUM_CLASSES, [])
    bad_heads = dataclasses.replace(spec, rope_stages=dataclasses.replace(rope, num_heads=(16, 12)))
    with pytest.raises(ConfigError, match="head size divisible by 2"):
        build_model(bad_heads, TASKS, NUM_CLASSES, [])
    with pytest.raises(ConfigError, match=r"DATA\.TASK_KEYS_H5.*taxa_L20"):
        build_model(spec, TASKS, {"taxa_L10": 3}, [])
    heads = ["MODEL.CLASSIFICATION.HEADS", "{taxa_L10: {NUM_CLASSES: 5}, taxa_L20: {}}"]
    cfg = load_config(V1_SM, tiny_opts(V1_SM) + heads + ["DATA.TASK_KEYS_H5", "[taxa_L10, taxa_L20]"])
    with pytest.raises(ConfigError, match=r"HEADS\.taxa_L10\.NUM_CLASSES: 5 disagrees with the 7") as info:
        build_model(model_spec(cfg), TASKS, NUM_CLASSES, [])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"HEADS: no head for task 'taxa_L30'"):
        build_model(model_spec(cfg), [*TASKS, "taxa_L30"], {**NUM_CLASSES, "taxa_L30": 2}, [])


@pytest.mark.parametrize("path", [V1_SM, V0_SM], ids=["v1", "v0"])
def test_gradient_checkpointing_gives_identical_gradients(path):
    torch.manual_seed(0)
    model = tiny_model(path, [2], extra=["MODEL.DROP_PATH_RATE", "0.0", "MODEL.DROP_RATE", "0.0"])
    image, meta = torch.randn(2, 3, 64, 64), torch.randn(2, 2)

    def grads(enable: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        sum(v.square().sum() for v in model(image, meta).values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    if path == V0_SM:
        model.eval()  # BatchNorm statistics would otherwise move between the two passes
    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gradient_checkpointing_from_config():
    model = tiny_model(V1_SM, [], extra=["MODEL.GRADIENT_CHECKPOINTING", "true"])
    assert model.backbone.grad_checkpointing and all(s.grad_checkpointing for s in model.backbone.attn_stages)


@pytest.mark.parametrize("path", [V1_SM, V0_SM], ids=["v1", "v0"])
def test_compiles_without_graph_breaks(path):
    # fullgraph tracing through dynamo + AOT autograd; the C++ (inductor) backend is covered by the next test.
    torch.manual_seed(0)
    model = tiny_model(path, [2, 3]).eval()
    image, meta = torch.randn(2, 3, 64, 64), torch.randn(2, 5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got, ref = compiled(image, meta), model(image, meta)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key])


@pytest.mark.skipif(
    os.environ.get("LINNAEUS_TEST_INDUCTOR") != "1",
    reason="inductor's C++ codegen takes 30-60 s on 2 CPU cores; set LINNAEUS_TEST_INDUCTOR=1 to run",
)
def test_compiles_with_inductor():
    torch.manual_seed(0)
    model = tiny_model(V1_SM, [2, 3]).eval()
    image, meta = torch.randn(2, 3, 64, 64), torch.randn(2, 5)
    start = time.perf_counter()
    with torch.no_grad():
        got, ref = torch.compile(model, fullgraph=True)(image, meta), model(image, meta)
    print(f"inductor compile + first forward: {time.perf_counter() - start:.1f}s")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-4, rtol=1e-4)


def test_model_size_matches_reference_sm():
    cfg = model_spec(load_config(V1_SM))
    at224, at384 = model_size(cfg, [2, 3, 10], 224), model_size(cfg, [2, 3, 10], 384)
    assert at224["params"] == pytest.approx(30.7e6, rel=0.05)
    assert at224["gmacs"] == pytest.approx(4.3, rel=0.05)
    assert at384["gmacs"] == pytest.approx(13.4, rel=0.05)
    assert model_size(cfg, [], 224)["params"] == pytest.approx(26.2e6, rel=0.01)


def test_tiny_model_overfits_fixed_batch():
    torch.manual_seed(0)
    path = V1_SM
    cfg = load_config(
        path, tiny_opts(path, extra=["MODEL.DROP_PATH_RATE", "0.0", "MODEL.IMG_SIZE", "32", "DATA.IMG_SIZE", "32"])
    )
    tasks, classes = ["taxa_L10"], {"taxa_L10": 4}
    model = build_model(model_spec(cfg), tasks, classes, [2])
    loss_fn = build_task_loss(loss_spec(cfg), tasks, classes, None, None)
    gen = torch.Generator().manual_seed(1)
    images, meta = torch.randn(16, 3, 32, 32, generator=gen), torch.randn(16, 2, generator=gen)
    labels = torch.arange(16) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    start = time.perf_counter()
    steps = 0
    while steps < 300:
        steps += 1
        loss, _ = loss_fn(model(images, meta), {"taxa_L10": labels})
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()
    with torch.no_grad():
        acc = (model(images, meta)["taxa_L10"].argmax(-1) == labels).float().mean().item()
    assert acc == 1.0, f"accuracy {acc} after {steps} steps, loss {loss.item():.3f}"
    assert loss.item() < 0.1
    assert time.perf_counter() - start < 60


def test_heads_dict_order_follows_task_keys_and_loss_grad_reaches_backbone():
    model = tiny_model(V1_SM, [2])
    out = model(torch.randn(2, 3, 64, 64), torch.randn(2, 2))
    F.cross_entropy(out["taxa_L20"], torch.tensor([0, 1])).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    assert model.head.heads["taxa_L10"].fc.weight.grad is None  # a LinearHead for L10 is independent of L20's loss


@pytest.mark.parametrize("path", [V1_SM, V0_SM], ids=["v1", "v0"])
@pytest.mark.parametrize("only_last", [False, True], ids=["both_cls", "last_cls"])
def test_every_parameter_gets_a_gradient(path, only_last):
    # DDP without find_unused_parameters hangs or errors if any parameter is left out of the graph.
    hierarchy = {("taxa_L20", "taxa_L10"): torch.eye(3).repeat_interleave(torch.tensor([3, 2, 2]), dim=1)}
    heads = "{taxa_L10: {TYPE: ConditionalClassifier}, taxa_L20: {TYPE: LinearHead}}"
    extra = ["MODEL.ONLY_LAST_CLS", str(only_last), "MODEL.CLASSIFICATION.HEADS", heads]
    extra += ["DATA.TASK_KEYS_H5", "[taxa_L10, taxa_L20]"]
    model = tiny_model(path, [2, 3], extra=extra, hierarchy=hierarchy)
    assert hasattr(model.backbone.aggregate, "proj1") != only_last
    sum(v.sum() for v in model(torch.randn(2, 3, 64, 64), torch.randn(2, 5)).values()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
