"""Evaluation against plain prediction on the same images: what ``linnaeus evaluate`` costs beyond the forward pass.

``predict`` is the predict command's loop (``commands.inference.predict_items``: read, decode, forward, one typus
result per image written as a JSON line) over the test file's images. ``evaluate`` is evaluate's loop over the same
images (``inference.eval_data.score``: the validation loader and the same forward) plus every figure of one metadata
mode (``inference.evaluation.figures``: per-rank accuracy, calibration, selective prediction, mistake severity, the
policy's commitments, novel taxa). Writing report.html and its plots is a fixed cost per call, not per image, and is
left out. The two alternate, each timed per image over the whole set. Target: evaluate keeps >= 0.9x predict's
throughput, so the metrics cost nothing noticeable.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import Comparison, Target, interleave, median, run_cli, set_threads, write_bench_dataset


def _fake_run(cfg, run: Path) -> None:
    """What training leaves behind, without the training: config, data artefacts, export/final.safetensors."""
    from safetensors.torch import save_file

    from linnaeus.config import save_config
    from linnaeus.config.resolve_data import data_spec
    from linnaeus.config.resolve_model import model_spec
    from linnaeus.data.prepare import prepare_data
    from linnaeus.models import build_model

    data = prepare_data(data_spec(cfg))
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    data.save(run)
    torch.manual_seed(0)
    hierarchy = {k: torch.as_tensor(v) for k, v in data.hierarchy_matrices().items()}
    model = build_model(model_spec(cfg), data.task_keys, data.num_classes, data.meta_dims, hierarchy).eval()
    (run / "export").mkdir()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(run / "export" / "final.safetensors"), metadata={"model": cfg.MODEL.NAME, "step": "1"})


def run(quick: bool) -> list[Comparison]:
    from linnaeus.commands.inference import predict_items
    from linnaeus.inference import eval_data, evaluation
    from linnaeus.inference.predictor import Predictor

    set_threads(1)
    batch = 32
    with tempfile.TemporaryDirectory() as tmp:
        ds = write_bench_dataset(Path(tmp) / "data", 96 if quick else 480, size=None)
        cfg = ds.config(DATA__IMG_SIZE=64, MODEL__IMG_SIZE=64, TRAIN__MAX_STEPS=1)
        _fake_run(cfg, Path(tmp) / "run")
        predictor = Predictor.from_run(Path(tmp) / "run", which="final", device="cpu")
        evalset = eval_data.from_labels(predictor.bundle, ds.labels, ds.images)
        paths = [Path(p) for p in evalset.table.paths]
        h = predictor.hierarchy
        names = {k: [None] * len(predictor.bundle.class_maps[k]) for k in h.keys}
        policy = predictor.policy(None)  # the bundle's default (repair: nothing fitted here)

        def predict() -> float:
            start = time.perf_counter()
            items = ((p, None) for p in paths)
            predict_items(predictor, items, len(paths), io.StringIO(), batch_size=batch, progress=False)
            return (time.perf_counter() - start) / len(paths)

        def evaluate() -> float:
            start = time.perf_counter()
            lp = eval_data.score(predictor, evalset, batch_size=batch, progress=False)
            evaluation.figures(
                lp, evalset.table.targets, evalset.taxa, evalset.novel, h, names, predictor.temperatures, policy, None
            )
            return (time.perf_counter() - start) / len(paths)

        samples = interleave({"predict": predict, "evaluate": evaluate}, reps=2 if quick else 5)
    ratio = median(samples["predict"]) / median(samples["evaluate"])
    return [
        Comparison(
            name="evaluate vs predict, same images and model (per image)",
            unit="s/img",
            samples=samples,
            ratios={"evaluate throughput / predict throughput": ratio},
            targets=[Target("evaluate / predict throughput", ratio, 0.9)],
            facts={"images": len(paths), "img_size": 64, "batch": batch, "policy": policy.kind, "threads": 1},
        )
    ]


if __name__ == "__main__":
    raise SystemExit(run_cli(run, __doc__))
