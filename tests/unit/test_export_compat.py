"""Exports made before the layer swap of issue 23 (timm's DropPath / Mlp / LayerNorm2d) still load and predict the same.

The fixtures under ``tests/fixtures/pre_issue23`` were written by ``make.py`` there with the code from before that
change: two tiny bundles (mFormerV1 with RoPE-Mixed and LayerScale, mFormerV0) and, for each, fixed inputs and the
logits the model gave for them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linnaeus.inference.bundle import Bundle

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pre_issue23"


@pytest.mark.parametrize("arch", ["v1", "v0"])
def test_pre_issue23_export_loads_and_predicts_identically(arch: str) -> None:
    saved = load_file(str(FIXTURES / f"{arch}_predictions.safetensors"))
    model = Bundle.load(FIXTURES / arch).build_model()  # strict: every saved weight has its place, and no new ones
    with torch.no_grad():
        logits = model(saved["image"], saved["meta"])
    expected = {k.removeprefix("logits."): v for k, v in saved.items() if k.startswith("logits.")}
    assert sorted(logits) == sorted(expected)
    for key, want in expected.items():
        # Same machine: bit-identical; another CPU's kernels may differ in the last bits only.
        torch.testing.assert_close(logits[key], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(logits[key].argmax(dim=1), want.argmax(dim=1))
