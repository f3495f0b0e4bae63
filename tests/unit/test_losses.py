"""Losses: smoothing matrices, null masking, soft targets, class weights, task weights, GradNorm direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from linnaeus.config import default_config
from linnaeus.config.defaults import ClassWeightingConfig, Config, HeadConfig, HeadLossConfig
from linnaeus.config.resolve_model import loss_spec
from linnaeus.errors import ConfigError, DataError
from linnaeus.losses import GradNorm, build_task_loss, class_weights, taxonomy_smoothing_matrix
from linnaeus.specs.model import ClassWeightingSpec, HeadSpec

INF = np.inf
# Species 0-3: (0, 1) share genus A, (2, 3) share genus B, A and B share a family; species 4 is in another tree.
DIST = np.array(
    [
        [0, 2, 4, 4, INF],
        [2, 0, 4, 4, INF],
        [4, 4, 0, 2, INF],
        [4, 4, 2, 0, INF],
        [INF, INF, INF, INF, 0],
    ]
)


def config(heads: dict[str, HeadConfig] | None = None, **loss) -> Config:
    cfg = default_config()
    cfg.MODEL.CLASSIFICATION.HEADS = heads or {}
    for name, value in loss.items():
        setattr(cfg.LOSS, name, value)
    return cfg


def cw_spec(**keys) -> ClassWeightingSpec:
    """The ``ClassWeightingSpec`` of ``LOSS.CLASS_WEIGHTING`` with these keys (the rest at their defaults)."""
    return loss_spec(config(CLASS_WEIGHTING=ClassWeightingConfig(**keys))).class_weighting


def head(loss_type: str = "CrossEntropyLoss", weight: float = 1.0, **params) -> HeadConfig:
    return HeadConfig(LOSS=HeadLossConfig(TYPE=loss_type, PARAMS=params, WEIGHT=weight))


def test_smoothing_matrix_rows_relatives_and_alpha_zero():
    s = taxonomy_smoothing_matrix(DIST, alpha=0.2, beta=1.0)
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(s), 0.8)
    assert s[0, 1] > s[0, 2] > 0 and s[0, 4] == 0  # sibling > cousin > unrelated
    np.testing.assert_allclose(s[0, 1] / s[0, 2], np.exp(2.0))  # ∝ exp(−β·d)
    np.testing.assert_allclose(s[4], [0.05, 0.05, 0.05, 0.05, 0.8])  # no relatives: uniform over the others
    np.testing.assert_allclose(taxonomy_smoothing_matrix(DIST, alpha=0.0, beta=1.0), np.eye(5))
    sharper = taxonomy_smoothing_matrix(DIST, alpha=0.2, beta=3.0)
    assert sharper[0, 1] > s[0, 1]  # larger β concentrates on close relatives


def test_taxonomy_smoothing_alpha_zero_equals_cross_entropy():
    cfg = config({"taxa_L10": head("TaxonomyAwareLabelSmoothing", alpha=0.0, beta=1.0)})
    loss = build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 5}, {"taxa_L10": DIST}, None)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    total, per = loss({"taxa_L10": logits}, {"taxa_L10": y})
    torch.testing.assert_close(total, F.cross_entropy(logits, y))
    torch.testing.assert_close(per["taxa_L10"], total.detach())


def test_taxonomy_smoothing_uses_matrix_rows():
    cfg = config({"taxa_L10": head("TaxonomyAwareLabelSmoothing", alpha=0.3, beta=0.5)})
    loss = build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 5}, {"taxa_L10": DIST}, None)
    logits, y = torch.randn(3, 5), torch.tensor([0, 2, 4])
    s = torch.as_tensor(taxonomy_smoothing_matrix(DIST, 0.3, 0.5), dtype=torch.float32)
    expected = -(s[y] * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(loss({"taxa_L10": logits}, {"taxa_L10": y})[0], expected)


def test_label_smoothing_matches_torch_convention():
    cfg = config({"taxa_L10": head(label_smoothing=0.1)})
    loss = build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 5}, None, None)
    logits, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(
        loss({"taxa_L10": logits}, {"taxa_L10": y})[0], F.cross_entropy(logits, y, label_smoothing=0.1)
    )


def test_taxonomy_smoothing_without_distances_names_head():
    cfg = config({"taxa_L20": head("TaxonomyAwareLabelSmoothing")})
    with pytest.raises(ConfigError, match=r"MODEL\.CLASSIFICATION\.HEADS\.taxa_L20\.LOSS\.TYPE: .*DATA\.TAXONOMY_PATH"):
        build_task_loss(loss_spec(cfg), ["taxa_L20"], {"taxa_L20": 5}, None, None)
    with pytest.raises(DataError, match=r"shape \(5, 5\); expected \(4, 4\)"):
        build_task_loss(loss_spec(cfg), ["taxa_L20"], {"taxa_L20": 4}, {"taxa_L20": DIST}, None)


def test_bad_loss_params_are_one_line_config_errors():
    cfg = config({"taxa_L10": head(smoothing=0.1)})
    with pytest.raises(ConfigError, match=r"HEADS\.taxa_L10\.LOSS\.PARAMS\.smoothing: unknown parameter"):
        build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 5}, None, None)
    cfg = config({"taxa_L10": head("TaxonomyAwareLabelSmoothing", alpha=1.5)})
    with pytest.raises(ConfigError, match=r"PARAMS\.alpha: expected a number in \[0\.0, 1\.0\], got 1\.5"):
        build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 5}, {"taxa_L10": DIST}, None)


def test_null_samples_get_exactly_zero_gradient_and_mean_over_valid():
    loss = build_task_loss(loss_spec(config()), ["taxa_L10", "taxa_L20"], {"taxa_L10": 5, "taxa_L20": 3}, None, None)
    logits = {"taxa_L10": torch.randn(4, 5, requires_grad=True), "taxa_L20": torch.randn(4, 3, requires_grad=True)}
    targets = {"taxa_L10": torch.tensor([1, -1, 3, -1]), "taxa_L20": torch.tensor([-1, -1, -1, -1])}
    total, per = loss(logits, targets)
    total.backward()
    g10, g20 = logits["taxa_L10"].grad, logits["taxa_L20"].grad
    assert torch.equal(g10[[1, 3]], torch.zeros(2, 5)) and g10[[0, 2]].abs().sum() > 0
    assert torch.equal(g20, torch.zeros(4, 3))  # a rank with no labels: loss 0, no NaN, no gradient
    expected = F.cross_entropy(logits["taxa_L10"][[0, 2]], torch.tensor([1, 3]))
    torch.testing.assert_close(per["taxa_L10"], expected.detach())
    assert per["taxa_L20"].item() == 0.0 and torch.isfinite(total)


def test_kept_null_samples_train_toward_uniform():
    loss = build_task_loss(loss_spec(config()), ["taxa_L10"], {"taxa_L10": 4}, None, None)
    logits = torch.randn(3, 4)
    target = {"taxa_L10": torch.tensor([2, -1, -1])}
    total, _ = loss({"taxa_L10": logits}, target, null_keep_prob=1.0)
    uniform = torch.full((4,), 0.25)
    expected = (
        F.cross_entropy(logits[:1], torch.tensor([2]), reduction="sum") - (uniform * logits[1:].log_softmax(-1)).sum()
    ) / 3
    torch.testing.assert_close(total, expected)
    # With a probability, draws come from the given generator: same seed, same result.
    a, _ = loss({"taxa_L10": logits}, target, null_keep_prob=0.5, generator=torch.Generator().manual_seed(3))
    b, _ = loss({"taxa_L10": logits}, target, null_keep_prob=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_soft_targets_for_mixed_samples():
    loss = build_task_loss(loss_spec(config()), ["taxa_L10"], {"taxa_L10": 4}, None, None)
    logits = torch.randn(3, 4, requires_grad=True)
    soft = torch.tensor([[0.7, 0.3, 0, 0], [0, 0, 1.0, 0], [0.5, 0.5, 0, 0]])
    valid = torch.tensor([True, True, False])
    total, _ = loss({"taxa_L10": logits}, {"taxa_L10": soft}, {"taxa_L10": valid})
    lp = logits.log_softmax(-1)
    expected = (-(0.7 * lp[0, 0] + 0.3 * lp[0, 1]) - lp[1, 2]) / 2
    torch.testing.assert_close(total, expected)
    total.backward()
    assert torch.equal(logits.grad[2], torch.zeros(4))


def test_class_weights_applied_exactly_once():
    cw = ClassWeightingConfig(TYPE="capping", CAP=20.0)
    counts = np.array([80, 15, 5])
    cfg = config(CLASS_WEIGHTING=cw)
    loss = build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 3}, None, {"taxa_L10": counts})
    w = torch.as_tensor(class_weights(counts, loss_spec(cfg).class_weighting), dtype=torch.float32)
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, -1])
    total, _ = loss({"taxa_L10": logits}, {"taxa_L10": y})
    ce = F.cross_entropy(logits[:4], y[:4], reduction="none")
    torch.testing.assert_close(total, (w[y[:4]] * ce).sum() / 4)  # once: w, not w²
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    total_soft, _ = loss({"taxa_L10": logits[:1]}, {"taxa_L10": soft}, {"taxa_L10": torch.tensor([True])})
    expected = (0.5 * w[0] + 0.5 * w[1]) * -(soft * logits[:1].log_softmax(-1)).sum()
    torch.testing.assert_close(total_soft, expected)
    loss.eval()  # validation losses are unweighted
    torch.testing.assert_close(loss({"taxa_L10": logits}, {"taxa_L10": y})[0], ce.mean())


@pytest.mark.parametrize("kind", ["smoothing", "capping", "logarithmic"])
def test_class_weight_formulas_favour_rare_classes_and_keep_scale(kind):
    counts = np.array([1000, 100, 10, 0])
    w = class_weights(counts, cw_spec(TYPE=kind))
    assert w[0] < w[1] < w[2]
    assert (counts * w).sum() / counts.sum() == pytest.approx(1.0)
    assert class_weights(counts, cw_spec(TYPE="none")) is None
    capped = class_weights(np.array([1000, 1]), cw_spec(TYPE="capping", CAP=10.0))
    assert capped[1] / capped[0] == pytest.approx(10.0 / (1001 / 1000))  # min(N/n, CAP) per class


def test_class_weighting_without_counts_is_config_error():
    cfg = config(CLASS_WEIGHTING=ClassWeightingConfig(TYPE="smoothing"))
    with pytest.raises(
        ConfigError, match=r"LOSS\.CLASS_WEIGHTING\.TYPE: 'smoothing' needs training class counts for 'taxa_L10'"
    ):
        build_task_loss(loss_spec(cfg), ["taxa_L10"], {"taxa_L10": 3}, None, None)


def test_static_rank_weights():
    cfg = config({"taxa_L10": head(weight=0.5), "taxa_L20": head(weight=2.0)})
    loss = build_task_loss(loss_spec(cfg), ["taxa_L10", "taxa_L20"], {"taxa_L10": 4, "taxa_L20": 2}, None, None)
    logits = {"taxa_L10": torch.randn(3, 4), "taxa_L20": torch.randn(3, 2)}
    targets = {"taxa_L10": torch.tensor([0, 1, 2]), "taxa_L20": torch.tensor([0, 1, 1])}
    total, per = loss(logits, targets)
    torch.testing.assert_close(total, 0.5 * per["taxa_L10"] + 2.0 * per["taxa_L20"])
    assert not per["taxa_L10"].requires_grad


def _two_task_setup(scale_a: float, scale_b: float, loss_a: float, loss_b: float):
    """Shared parameter θ; task losses L = scale·θ·x (so ‖∇L‖ ∝ scale) shifted to the wanted values."""
    theta = torch.nn.Parameter(torch.ones(3))
    x = torch.tensor([1.0, 2.0, 2.0])
    base = (theta * x).sum()
    losses = {"a": scale_a * base - scale_a * 5 + loss_a, "b": scale_b * base - scale_b * 5 + loss_b}
    return theta, losses


def test_gradnorm_lowers_weight_of_task_with_larger_gradient():
    gn = GradNorm(["a", "b"], alpha=1.5, lr=0.1)
    theta, losses = _two_task_setup(10.0, 1.0, 1.0, 1.0)
    weights = gn.update(losses, [theta])
    assert weights["a"] < 1.0 < weights["b"]
    assert sum(weights.values()) == pytest.approx(2.0)
    assert theta.grad is None  # never touches .grad


def test_gradnorm_raises_weight_of_slower_task():
    gn = GradNorm(["a", "b"], alpha=1.5, lr=0.1)
    theta, losses = _two_task_setup(1.0, 1.0, 1.0, 1.0)
    gn.update(losses, [theta])  # records L(0); equal gradients and ratios: weights stay put
    torch.testing.assert_close(gn.weights, torch.ones(2))
    theta, losses = _two_task_setup(1.0, 1.0, 0.9, 0.3)  # "a" has trained less (higher L/L0)
    weights = gn.update(losses, [theta])
    assert weights["a"] > 1.0 > weights["b"]


def test_gradnorm_keeps_existing_gradients_and_state_round_trips():
    gn = GradNorm(["a", "b"], alpha=1.0, lr=0.05, init_weights=[1.0, 3.0])
    torch.testing.assert_close(gn.weights, torch.tensor([0.5, 1.5]))
    theta, losses = _two_task_setup(2.0, 1.0, 1.0, 1.0)
    theta.grad = torch.full((3,), 7.0)
    gn.update(losses, [theta])
    assert torch.equal(theta.grad, torch.full((3,), 7.0))
    clone = GradNorm(["a", "b"], alpha=1.0, lr=0.05)
    clone.load_state_dict(gn.state_dict())
    assert torch.equal(clone.weights, gn.weights) and torch.equal(clone.initial_losses, gn.initial_losses)
    assert gn.due(0) and not GradNorm(["a"], 1.0, 0.1, update_interval=10, warmup_steps=20).due(10)


def test_task_loss_uses_gradnorm_weights():
    from linnaeus.config.defaults import GradNormConfig

    cfg = config({"taxa_L10": head(weight=1.0), "taxa_L20": head(weight=3.0)}, GRADNORM=GradNormConfig(ENABLED=True))
    loss = build_task_loss(loss_spec(cfg), ["taxa_L10", "taxa_L20"], {"taxa_L10": 4, "taxa_L20": 2}, None, None)
    assert loss.gradnorm is not None
    torch.testing.assert_close(loss.task_weights, torch.tensor([0.5, 1.5]))
    loss.gradnorm.weights.copy_(torch.tensor([1.2, 0.8]))
    logits = {"taxa_L10": torch.randn(3, 4), "taxa_L20": torch.randn(3, 2)}
    targets = {"taxa_L10": torch.tensor([0, 1, 2]), "taxa_L20": torch.tensor([0, 1, 1])}
    total, per = loss(logits, targets)
    torch.testing.assert_close(total, 1.2 * per["taxa_L10"] + 0.8 * per["taxa_L20"])


# ------------------------------------------------------------------------------------------- step normalisation
# 8 samples. Species: the first 4 (one micro-batch) have 1 label, the last 4 have 4. Genus: the first 4 have none.
SPECIES_Y = torch.tensor([2, -1, -1, -1, 0, 1, 3, 4])
GENUS_Y = torch.tensor([-1, -1, -1, -1, 0, -1, 2, 1])
STEP_KEYS = ["taxa_L10", "taxa_L20"]


def _step_setup(null_keep_prob: float):
    """A real backbone + heads + TaskLoss (class weighting on, training mode), and the step's inclusion masks."""
    from linnaeus.models import HierarchicalClassifier

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU())
    hierarchy = {("taxa_L20", "taxa_L10"): torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1.0]])}
    heads = {"taxa_L10": HeadSpec(type="HierarchicalSoftmaxHead"), "taxa_L20": HeadSpec()}
    clf = HierarchicalClassifier(16, STEP_KEYS, {"taxa_L10": 5, "taxa_L20": 3}, heads, hierarchy)
    model = torch.nn.Sequential(backbone, clf)
    cfg = config(CLASS_WEIGHTING=ClassWeightingConfig(TYPE="capping", CAP=20.0))
    counts = {"taxa_L10": np.array([30, 10, 5, 5, 1]), "taxa_L20": np.array([40, 10, 1])}
    loss = build_task_loss(loss_spec(cfg), STEP_KEYS, {"taxa_L10": 5, "taxa_L20": 3}, None, counts).train()
    x = torch.randn(8, 6)
    targets = {"taxa_L10": SPECIES_Y, "taxa_L20": GENUS_Y}
    included = loss.inclusion(targets, None, null_keep_prob, torch.Generator().manual_seed(5))
    return model, loss, x, targets, included


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _step_gradient(model, loss, x, targets, included, processes: int, micro_batches: int, denominators=True):
    """The optimizer step's gradient as accelerate + DDP produce it: per process, each micro-batch's loss / k is
    backpropagated and accumulated; the processes' gradients are then averaged. The denominators come from the
    included counts summed over every micro-batch of every process (what the loop all-reduces once per step)."""
    from linnaeus.losses import included_counts, step_denominators

    slices = torch.arange(8).chunk(processes * micro_batches)
    total = sum(included_counts({k: v[s] for k, v in included.items()}, STEP_KEYS) for s in slices)
    den = step_denominators(total, STEP_KEYS, micro_batches, processes) if denominators else None
    per_process = []
    for p in range(processes):
        model.zero_grad(set_to_none=True)
        for s in slices[p * micro_batches : (p + 1) * micro_batches]:
            sub = {k: v[s] for k, v in targets.items()}
            inc = {k: v[s] for k, v in included.items()}
            losses = loss.task_losses(model(x[s]), sub, included=inc, denominators=den)
            assert all(torch.isfinite(v) for v in losses.values())
            (loss.combine(losses) / micro_batches).backward()
        per_process.append(_grads(model))
    return [torch.stack(g).mean(dim=0) for g in zip(*per_process, strict=True)]


@pytest.mark.parametrize("null_keep_prob", [0.0, 0.5])
@pytest.mark.parametrize(("processes", "micro_batches"), [(1, 2), (2, 1), (2, 2)])
def test_step_gradient_is_the_mean_over_all_included_samples(null_keep_prob, processes, micro_batches):
    model, loss, x, targets, included = _step_setup(null_keep_prob)
    model.zero_grad(set_to_none=True)
    loss.combine(loss.task_losses(model(x), targets, included=included)).backward()  # one batch of 8
    reference = _grads(model)
    split = _step_gradient(model, loss, x, targets, included, processes, micro_batches)
    for a, b in zip(split, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # The per-micro-batch mean (the old normalisation) is far off with these partial labels.
    old = _step_gradient(model, loss, x, targets, included, processes, micro_batches, denominators=False)
    rel = (
        torch.cat([(a - b).flatten() for a, b in zip(old, reference, strict=True)]).norm()
        / torch.cat([b.flatten() for b in reference]).norm()
    )
    assert rel > 0.1


def test_micro_batch_without_labels_at_a_rank_contributes_exactly_zero():
    from linnaeus.losses import step_denominators

    model, loss, x, targets, included = _step_setup(0.0)
    first = {k: v[:4] for k, v in targets.items()}
    inc = {k: v[:4] for k, v in included.items()}
    assert not bool(inc["taxa_L20"].any())
    den = step_denominators(torch.tensor([5.0, 3.0]), STEP_KEYS, 2, 1)
    logits = {k: v.detach().requires_grad_() for k, v in model(x[:4]).items()}
    losses = loss.task_losses(logits, first, included=inc, denominators=den)
    assert losses["taxa_L20"].item() == 0.0
    losses["taxa_L20"].backward()
    assert torch.equal(logits["taxa_L20"].grad, torch.zeros(4, 3))
    # A rank with no label in the whole step: count 0 is clamped, the loss is 0, not NaN.
    den = step_denominators(torch.tensor([5.0, 0.0]), STEP_KEYS, 2, 2)
    assert float(den["taxa_L20"]) > 0
    assert loss.task_losses(logits, first, included=inc, denominators=den)["taxa_L20"].item() == 0.0


def test_inclusion_draws_once_and_task_losses_reuses_it():
    loss = build_task_loss(loss_spec(config()), STEP_KEYS, {"taxa_L10": 5, "taxa_L20": 3}, None, None)
    targets = {"taxa_L10": SPECIES_Y, "taxa_L20": GENUS_Y}
    logits = {"taxa_L10": torch.randn(8, 5), "taxa_L20": torch.randn(8, 3)}
    inc = loss.inclusion(targets, None, 0.5, torch.Generator().manual_seed(1))
    assert all(bool((inc[k] | (targets[k] < 0)).all()) and bool(inc[k][targets[k] >= 0].all()) for k in STEP_KEYS)
    # Same generator state, same draw: task_losses without `included` draws exactly what inclusion drew.
    drawn = loss.task_losses(logits, targets, None, 0.5, torch.Generator().manual_seed(1))
    reused = loss.task_losses(logits, targets, included=inc)
    for k in STEP_KEYS:
        torch.testing.assert_close(drawn[k], reused[k])
    gen = torch.Generator().manual_seed(1)
    before = gen.get_state()
    loss.task_losses(logits, targets, None, 0.5, gen, included=inc)
    assert torch.equal(gen.get_state(), before)  # no new draw when the mask is given
    assert loss.inclusion(targets, None, 1.0)["taxa_L20"].all()
    assert torch.equal(loss.inclusion(targets)["taxa_L20"], GENUS_Y >= 0)


def test_cross_process_mean_of_step_normalised_losses_is_the_step_loss():
    """What GradNorm's cross-process mean (its ``reduce``) sees with the step's denominators: the whole step's
    per-rank loss (per-process means would weigh a process with 1 label like one with 4)."""
    from linnaeus.losses import included_counts, step_denominators

    _, loss, _, targets, included = _step_setup(0.0)
    logits = {"taxa_L10": torch.randn(8, 5), "taxa_L20": torch.randn(8, 3)}
    full = loss.task_losses(logits, targets, included=included)
    den = step_denominators(included_counts(included, STEP_KEYS), STEP_KEYS, 1, 2)
    halves = [
        loss.task_losses(
            {k: v[s] for k, v in logits.items()},
            {k: v[s] for k, v in targets.items()},
            included={k: v[s] for k, v in included.items()},
            denominators=den,
        )
        for s in (slice(0, 4), slice(4, 8))
    ]
    for k in STEP_KEYS:
        torch.testing.assert_close((halves[0][k] + halves[1][k]) / 2, full[k])


def test_gradnorm_leaves_weights_alone_on_a_non_finite_step():
    gn = GradNorm(["a", "b"], alpha=1.5, lr=0.1)
    theta, losses = _two_task_setup(10.0, 1.0, 1.0, 1.0)
    before = gn.update(losses, [theta])
    theta, losses = _two_task_setup(10.0, 1.0, float("nan"), 1.0)  # a step TRAIN.NONFINITE skip would drop
    assert gn.update(losses, [theta]) == before
    assert torch.isfinite(gn.initial_losses).all()
    theta, losses = _two_task_setup(10.0, 1.0, 1.0, 1.0)  # the next good step still moves them
    assert gn.update(losses, [theta]) != before
