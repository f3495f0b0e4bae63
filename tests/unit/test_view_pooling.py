"""Pooling the views of an observation: mask-aware, the identity for one view, LSE between mean and max."""

from __future__ import annotations

import pytest
import torch

from linnaeus.models.view_pooling import POOLING_MODES, ViewPooling, fold_views, unfold_views


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_one_view_is_the_identity(mode: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8)
    out = ViewPooling(mode, 8)(x, torch.ones(4, 1, dtype=torch.bool))
    torch.testing.assert_close(out, x[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_padded_views_count_for_nothing(mode: str) -> None:
    torch.manual_seed(0)
    pool = ViewPooling(mode, 8)
    x = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    garbage = x.clone()
    garbage[~mask] = 1e4  # whatever sits in a padded slot
    torch.testing.assert_close(pool(garbage, mask), pool(x, mask))
    torch.testing.assert_close(pool(x[:1, :2], mask[:1, :2]), pool(x, mask)[:1])


def test_mean_and_lse_values() -> None:
    x = torch.tensor([[[0.0, 2.0], [2.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(ViewPooling("mean", 2)(x, mask), torch.tensor([[1.0, 2.0]]))
    lse = ViewPooling("lse", 2, temperature=2.0)(x, mask)
    expected = (torch.logsumexp(torch.tensor([0.0, 4.0]), 0) - torch.log(torch.tensor(2.0))) / 2
    torch.testing.assert_close(lse, torch.tensor([[float(expected), 2.0]]))
    assert 1.0 < float(lse[0, 0]) < 2.0  # between the mean and the max of the present views


def test_attention_weights_sum_to_one_over_present_views() -> None:
    torch.manual_seed(0)
    pool = ViewPooling("attention", 8)
    x, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    w = pool.weights(x, mask)
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert float(w[0, 2]) == 0.0


def test_fold_and_unfold_views_round_trip() -> None:
    images = torch.arange(2 * 3 * 3 * 2 * 2).reshape(2, 3, 3, 2, 2)
    folded, k = fold_views(images)
    assert folded.shape == (6, 3, 2, 2) and k == 3
    torch.testing.assert_close(folded[4], images[1, 1])
    assert unfold_views(torch.arange(12).reshape(6, 2), 3).shape == (2, 3, 2)


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        ViewPooling("max", 4)


def test_pooled_features_fold_views_and_repeat_metadata() -> None:
    from linnaeus.models.view_pooling import pooled_features

    class Backbone(torch.nn.Module):  # features that show which image and which metadata row each slot saw
        def forward(self, images, meta):
            return torch.cat([images.flatten(1).sum(1, keepdim=True), meta], dim=1)

    torch.manual_seed(0)
    images, meta = torch.randn(2, 3, 3, 4, 4), torch.randn(2, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = pooled_features(Backbone(), images.flatten(0, 1), meta, mask, ViewPooling("mean", 3))
    sums = images.flatten(2).sum(2)
    torch.testing.assert_close(out[:, 0], torch.stack([sums[0, :2].mean(), sums[1, 0]]))
    torch.testing.assert_close(out[:, 1:], meta)
    with pytest.raises(ValueError, match=r"5 images for a \(B, K\) = \(2, 3\) view mask"):
        pooled_features(Backbone(), images.flatten(0, 1)[:5], meta, mask, ViewPooling("mean", 3))
