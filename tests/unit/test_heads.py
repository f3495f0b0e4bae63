"""Hierarchical heads: top-down order, refinement semantics, routing modes, and the errors a bad hierarchy raises."""

from __future__ import annotations

import math

import pytest
import torch

from linnaeus.errors import ConfigError, DataError
from linnaeus.models import HierarchicalClassifier, coarse_to_fine
from linnaeus.specs.model import HeadSpec

# family (2) → genus (3) → species (6); genus g has species 2g, 2g+1; family 0 has genera 0, 1, family 1 has genus 2.
SPECIES_PARENT = [0, 0, 1, 1, 2, 2]
GENUS_PARENT = [0, 0, 1]


def one_hot_matrix(parents: list[int], k_parent: int) -> torch.Tensor:
    h = torch.zeros(k_parent, len(parents))
    h[parents, torch.arange(len(parents))] = 1.0
    return h


HIERARCHY = {
    ("taxa_L20", "taxa_L10"): one_hot_matrix(SPECIES_PARENT, 3),
    ("taxa_L30", "taxa_L20"): one_hot_matrix(GENUS_PARENT, 2),
}
# The user's order: species first. Refinement must still run family → genus → species.
TASKS = ["taxa_L10", "taxa_L20", "taxa_L30"]
NUM_CLASSES = {"taxa_L10": 6, "taxa_L20": 3, "taxa_L30": 2}


def make(types: dict[str, str], dim: int = 4, **head_kw) -> HierarchicalClassifier:
    cfgs = {k: HeadSpec(type=types.get(k, "LinearHead"), **head_kw) for k in TASKS}
    torch.manual_seed(0)
    return HierarchicalClassifier(dim, TASKS, NUM_CLASSES, cfgs, HIERARCHY)


def test_rank_order_is_coarse_to_fine_and_output_keeps_user_order():
    assert coarse_to_fine(["taxa_L10", "taxa_L40", "taxa_L20"]) == ["taxa_L40", "taxa_L20", "taxa_L10"]
    clf = make({"taxa_L10": "HierarchicalSoftmaxHead", "taxa_L20": "HierarchicalSoftmaxHead"})
    assert clf.order == ["taxa_L30", "taxa_L20", "taxa_L10"]
    assert clf.parent_of == {"taxa_L10": "taxa_L20", "taxa_L20": "taxa_L30"}
    out = clf(torch.randn(5, 4))
    assert list(out) == TASKS and out["taxa_L10"].shape == (5, 6)


def _force_parent(clf: HierarchicalClassifier, key: str, winner: int, margin: float = 60.0) -> None:
    """Make ``key``'s base logits independent of the input and strongly favour class ``winner``."""
    fc = clf.heads[key].fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.fill_(0.0)
        fc.bias[winner] = margin


def test_hsm_rules_out_children_of_improbable_parent_and_keeps_sibling_softmax():
    clf = make({"taxa_L10": "HierarchicalSoftmaxHead"}).eval()
    _force_parent(clf, "taxa_L20", winner=1)  # genus 1 certain → species 2, 3 possible
    feature = torch.randn(8, 4)
    with torch.no_grad():
        probs = clf(feature)["taxa_L10"].softmax(-1)
        base = clf.heads["taxa_L10"](feature)
    assert probs[:, [0, 1, 4, 5]].max() < 1e-8
    torch.testing.assert_close(probs[:, [2, 3]].sum(-1), torch.ones(8))
    torch.testing.assert_close(probs[:, [2, 3]], base[:, [2, 3]].softmax(-1), atol=1e-6, rtol=1e-5)


def test_refinement_chains_from_the_coarsest_rank():
    clf = make({"taxa_L10": "HierarchicalSoftmaxHead", "taxa_L20": "HierarchicalSoftmaxHead"}).eval()
    _force_parent(clf, "taxa_L30", winner=1)  # family 1 certain → only genus 2 → only species 4, 5
    with torch.no_grad():
        out = clf(torch.randn(8, 4))
    assert out["taxa_L20"].softmax(-1)[:, 2].min() > 1 - 1e-6
    assert out["taxa_L10"].softmax(-1)[:, [4, 5]].sum(-1).min() > 1 - 1e-6


def test_refinement_equals_formula():
    clf = make({"taxa_L20": "HierarchicalSoftmaxHead"}).eval()
    feature = torch.randn(3, 4)
    with torch.no_grad():
        got = clf(feature)["taxa_L20"]
        family = clf.heads["taxa_L30"](feature).softmax(-1)
        expected = clf.heads["taxa_L20"](feature) + torch.log(family @ HIERARCHY[("taxa_L30", "taxa_L20")] + 1e-10)
    torch.testing.assert_close(got, expected)


def test_conditional_hard_routing_in_eval_soft_in_training():
    clf = make({"taxa_L10": "ConditionalClassifier"}, routing="hard")
    with torch.no_grad():
        clf.heads["taxa_L20"].fc.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
        clf.heads["taxa_L20"].fc.weight.zero_()
    feature = torch.randn(4, 4)
    clf.eval()
    with torch.no_grad():
        hard = clf(feature)["taxa_L10"].softmax(-1)
    assert hard[:, [0, 1, 4, 5]].max() < 1e-8  # argmax genus 1 wins outright despite a small margin
    clf.train()
    with torch.no_grad():
        soft = clf(feature)["taxa_L10"].softmax(-1)
    assert soft[:, [0, 1, 4, 5]].min() > 1e-3


def test_conditional_temperature_flattens_routing():
    feature = torch.randn(4, 4)
    masses = []
    for temperature in (0.5, 50.0):
        clf = make({"taxa_L10": "ConditionalClassifier"}, temperature=temperature).eval()
        _force_parent(clf, "taxa_L20", winner=0, margin=5.0)
        with torch.no_grad():
            masses.append(clf(feature)["taxa_L10"].softmax(-1)[:, 2:].sum(-1).mean().item())
    assert masses[1] > masses[0] + 0.1  # a hotter router leaves more mass on the other genera's species


def test_gumbel_routing_is_random_in_training_only():
    clf = make({"taxa_L10": "ConditionalClassifier"}, routing="gumbel")
    feature = torch.randn(4, 4)
    clf.train()
    torch.manual_seed(1)
    a = clf(feature)["taxa_L10"]
    b = clf(feature)["taxa_L10"]
    assert (a - b).abs().max() > 1e-4
    clf.eval()
    torch.testing.assert_close(clf(feature)["taxa_L10"], clf(feature)["taxa_L10"])


def test_child_loss_trains_parent_head_through_refinement():
    clf = make({"taxa_L10": "ConditionalClassifier"})
    out = clf(torch.randn(4, 4))
    torch.nn.functional.cross_entropy(out["taxa_L10"], torch.tensor([0, 2, 4, 5])).backward()
    assert clf.heads["taxa_L20"].fc.weight.grad.abs().sum() > 0
    assert clf.heads["taxa_L30"].fc.weight.grad is None  # L20 is a LinearHead: the chain stops there


def test_orphan_child_gets_the_uniform_share_of_its_missing_parent():
    h = one_hot_matrix(SPECIES_PARENT, 3)
    h[:, 5] = 0  # species 5's genus is unknown
    cfgs = {k: HeadSpec(type="HierarchicalSoftmaxHead" if k == "taxa_L10" else "LinearHead") for k in TASKS}
    clf = HierarchicalClassifier(4, TASKS, NUM_CLASSES, cfgs, {**HIERARCHY, ("taxa_L20", "taxa_L10"): h}).eval()
    feature = torch.randn(2, 4)
    with torch.no_grad():
        out, base = clf(feature)["taxa_L10"], clf.heads["taxa_L10"](feature)
        genus = clf(feature)["taxa_L20"].softmax(dim=-1)
    torch.testing.assert_close(out[:, 5], base[:, 5] - math.log(3))  # log(1/K_genus)
    parent_prob = genus[:, torch.tensor(SPECIES_PARENT[:5])]
    torch.testing.assert_close(out[:, :5], base[:, :5] + torch.log(parent_prob + 1e-10))


@pytest.mark.parametrize("head_type", ["HierarchicalSoftmaxHead", "ConditionalClassifier"])
def test_orphan_is_on_its_siblings_scale_under_uninformative_logits(head_type):
    # 200 genera x 5 species, plus one species whose genus is absent (all-zero column): with no prior the orphan got
    # p = 0.167 against 0.00083 for every regular species (fair: 1/1001).
    genera, per_genus = 200, 5
    parents = [g for g in range(genera) for _ in range(per_genus)]
    h = torch.cat([one_hot_matrix(parents, genera), torch.zeros(genera, 1)], dim=1)
    keys = ["taxa_L20", "taxa_L10"]
    cfgs = {"taxa_L20": HeadSpec(), "taxa_L10": HeadSpec(type=head_type)}
    clf = HierarchicalClassifier(4, keys, {"taxa_L20": genera, "taxa_L10": h.shape[1]}, cfgs, {tuple(keys): h})
    for head in clf.heads.values():
        torch.nn.init.zeros_(head.fc.weight)
    with torch.no_grad():
        p = clf.eval()(torch.randn(3, 4))["taxa_L10"].softmax(dim=-1)
    orphan, regular = p[:, -1], p[:, :-1]
    assert torch.allclose(regular, regular[:, :1].expand_as(regular))
    ratio = orphan / regular[:, 0]
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio
    torch.testing.assert_close(orphan, torch.full_like(orphan, 1 / 1001))


def test_missing_hierarchy_names_the_head():
    cfgs = {k: HeadSpec(type="ConditionalClassifier" if k == "taxa_L20" else "LinearHead") for k in TASKS}
    with pytest.raises(
        ConfigError, match=r"HEADS\.taxa_L20\.TYPE: ConditionalClassifier needs the \(taxa_L30, taxa_L20\)"
    ):
        HierarchicalClassifier(4, TASKS, NUM_CLASSES, cfgs, None)
    # The coarsest rank has no parent: a hierarchical head there is simply its linear logits.
    cfgs = {k: HeadSpec(type="HierarchicalSoftmaxHead" if k == "taxa_L30" else "LinearHead") for k in TASKS}
    assert HierarchicalClassifier(4, TASKS, NUM_CLASSES, cfgs, None).parent_of == {}


def test_bad_hierarchy_matrices_are_data_errors():
    cfgs = {k: HeadSpec(type="HierarchicalSoftmaxHead") for k in TASKS}
    wrong_shape = {**HIERARCHY, ("taxa_L20", "taxa_L10"): torch.ones(3, 5)}
    with pytest.raises(DataError, match=r"expected \(K_parent, K_child\) = \(3, 6\)"):
        HierarchicalClassifier(4, TASKS, NUM_CLASSES, cfgs, wrong_shape)
    two_parents = one_hot_matrix(SPECIES_PARENT, 3)
    two_parents[2, 0] = 1
    with pytest.raises(DataError, match="child class 0 has 2 parents"):
        HierarchicalClassifier(4, TASKS, NUM_CLASSES, cfgs, {**HIERARCHY, ("taxa_L20", "taxa_L10"): two_parents})


def test_unknown_head_type_is_config_error():
    cfg = HeadSpec(type="Nope")
    with pytest.raises(ConfigError, match=r"HEADS\.taxa_L10\.TYPE: unknown head type 'Nope'"):
        HierarchicalClassifier(4, ["taxa_L10"], {"taxa_L10": 2}, {"taxa_L10": cfg})


def test_use_bias_false():
    cfgs = {k: HeadSpec(use_bias=False) for k in TASKS}
    clf = HierarchicalClassifier(4, TASKS, NUM_CLASSES, cfgs)
    assert all(head.fc.bias is None for head in clf.heads.values())
