"""What training leaves behind, minus the training: a tiny model with random (sharpened) weights, built from the real
config and data preparation and saved where the trainer saves it, so export, the Predictor and everything downstream
run as real code in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from linnaeus.config import save_config
from linnaeus.config.resolve_data import data_spec
from linnaeus.config.resolve_model import model_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.models import build_model

TINY_MODEL = [
    "MODEL.IMG_SIZE", "32",
    "DATA.IMG_SIZE", "32",
    "DATA.VAL_CROP_PCT", "0.875",
    "MODEL.DROP_PATH_RATE", "0.0",
    "MODEL.CONVNEXT_STAGES", "{DEPTHS: [1, 1, 1, 1], DIMS: [8, 16, 32, 64]}",
    "MODEL.ROPE_STAGES", "{DEPTHS: [1, 1], DIMS: [32, 64], NUM_HEADS: [2, 2]}",
]  # fmt: skip
HEADS = [
    "MODEL.CLASSIFICATION.HEADS",
    "{taxa_L10: {TYPE: ConditionalClassifier}, taxa_L20: {TYPE: ConditionalClassifier}, taxa_L30: {TYPE: LinearHead}}",
]


def fake_run(cfg, run: Path, seed: int = 0, step: int = 7):
    """What training leaves behind, minus the training: config, data artefacts, export/final.safetensors."""
    data = prepare_data(data_spec(cfg))
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    data.save(run)
    torch.manual_seed(seed)
    hierarchy = {k: torch.as_tensor(v) for k, v in data.hierarchy_matrices().items()}
    model = build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy).eval()
    with torch.no_grad():  # sharper than the init's near-uniform outputs, so decoding has real choices to make
        for head in model.head.heads.values():
            head.fc.weight.mul_(300.0)
    (run / "export").mkdir(exist_ok=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(run / "export" / "final.safetensors"), metadata={"model": cfg.MODEL.NAME, "step": str(step)})
    return data, model
