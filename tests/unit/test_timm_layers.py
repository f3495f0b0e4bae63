"""timm's DropPath / LayerNorm2d / Mlp compute exactly what the hand-written layers they replaced computed, with the
same parameter names; and our Rope2d (kept) rotates patch tokens exactly as timm's mixed RoPE does.

The old implementations are kept below, verbatim, as the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, Mlp
from timm.layers.pos_embed_sincos import apply_rot_embed_cat, get_mixed_freqs, get_mixed_grid
from torch import nn

from linnaeus.models.position import Rope2d


# ------------------------------------------------------------------------------ reference: the replaced layers
class OldDropPath(nn.Module):
    """Per-sample stochastic depth: drop the residual branch with probability ``p``, rescale survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class OldLayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map (ConvNeXt's channels-first norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class OldMlp(nn.Module):
    """Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def _same_parameters(old: nn.Module, new: nn.Module) -> None:
    """Same names and shapes; then ``new`` gets ``old``'s random values through a strict state-dict load."""
    old_sd = old.state_dict()
    assert {k: v.shape for k, v in old_sd.items()} == {k: v.shape for k, v in new.state_dict().items()}
    with torch.no_grad():
        for p in old.parameters():
            p.copy_(torch.randn_like(p))
    new.load_state_dict(old.state_dict(), strict=True)


# --------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("shape", [(8, 5, 6), (8, 4, 3, 3)])
def test_drop_path_equals_the_old_one_in_training_and_eval(p: float, shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape)
    old, new = OldDropPath(p), DropPath(p)
    for training in (True, False):
        old.train(training)
        new.train(training)
        torch.manual_seed(1)
        want = old(x)
        torch.manual_seed(1)  # the same draws: one Bernoulli per sample, survivors scaled by 1 / (1 - p)
        assert torch.equal(new(x), want)
    if p > 0:
        assert not torch.equal(want, old.train()(x))  # training really drops something here


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_2d_equals_the_old_one(eps: float, channels_last: bool) -> None:
    torch.manual_seed(0)
    old, new = OldLayerNorm2d(12, eps=eps), LayerNorm2d(12, eps=eps)
    _same_parameters(old, new)
    assert new.eps == eps
    x = torch.randn(3, 12, 5, 7) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    assert torch.equal(new(x), old(x))


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_mlp_equals_the_old_one(drop: float) -> None:
    torch.manual_seed(0)
    old, new = OldMlp(16, 40, drop=drop), Mlp(16, 40, act_layer=nn.GELU, drop=drop)
    _same_parameters(old, new)
    x = torch.randn(4, 9, 16)
    for training in (False, True):
        old.train(training)
        new.train(training)
        torch.manual_seed(2)
        want = old(x)
        torch.manual_seed(2)  # dropout draws in the same order: after fc1's activation, then after fc2
        assert torch.equal(new(x), want)


def test_rope2d_rotates_patches_as_timm_mixed_rope_and_leaves_extra_tokens_alone() -> None:
    # Why Rope2d stays ours although the numbers agree: timm's RotaryEmbeddingMixed owns one (2, depth, heads, d/2)
    # `freqs` for all blocks (weights here keep a (2, heads, d/2) `attn.position.freqs` per block), rotates every
    # token it is given (the caller cuts off CLS and metadata tokens), and has no fixed-axial mode.
    torch.manual_seed(0)
    heads, head_dim, grid, extra = 3, 8, (3, 4), 4
    rope = Rope2d(heads, head_dim, theta=100.0, mixed=True)
    q = torch.randn(2, heads, extra + grid[0] * grid[1], head_dim)
    ours, _, _ = rope(q, q, grid, extra)
    t_x, t_y = get_mixed_grid(list(grid), grid_indexing="xy")
    embed = get_mixed_freqs(rope.freqs.detach(), t_x, t_y)
    theirs = torch.cat((q[:, :, :extra], apply_rot_embed_cat(q[:, :, extra:], embed)), dim=2)
    assert torch.equal(ours, theirs)
