"""`linnaeus calibrate` / `evaluate` and the decision policies on one really trained, over-confident model.

One run is shared by the module: the demo generator's labels.h5 (taxonomy, metadata) with its images redrawn so the
genus is visually obvious (the background colour) and the species is a small, noisy marker. A quarter of the
training file's species labels are swapped for a sibling species, and a tiny model is trained for many epochs on
few images without label smoothing, so it is over-confident at species (still right at genus and family); it is
validated at its last step. Two species are held out of training entirely: they are the "novel" rows of a test
file (their marker colour was never seen, so only their genus is recognisable).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from typus import ClassificationResult

from linnaeus.cli import main
from linnaeus.commands.evaluate import calibrate_bundle
from linnaeus.inference import calibration, eval_data, eval_metrics, policies
from linnaeus.inference.bundle import Bundle, export_bundle
from linnaeus.inference.predictor import Predictor

from launch_utils import ensure_demo, launch, metrics, run_dir, tiny_opts

NOVEL = (420158, 426790)  # Orbis caerulea, Cruciata fusca: one species of each of two genera
STEPS = 300
TINY = {
    "MODEL__CONVNEXT_STAGES": "{DEPTHS: [1, 1, 1, 1], DIMS: [8, 16, 32, 64]}",
    "MODEL__ROPE_STAGES": "{DEPTHS: [1, 1], DIMS: [32, 64], NUM_HEADS: [2, 2]}",
    "MODEL__CLASSIFICATION__HEADS": "{taxa_L10: {TYPE: ConditionalClassifier}, taxa_L20: {TYPE: "
    "ConditionalClassifier}, taxa_L30: {TYPE: LinearHead}}",
    "DATA__VAL_CROP_PCT": 1.0,
}


# Far apart in every channel (no two genera share a bright or a dark channel), so the genus is the obvious part.
GENUS_COLOUR = {311024: (220, 140, 40), 311187: (40, 180, 170), 315402: (200, 200, 200), 315866: (40, 40, 90)}
MARKERS = ((230, 30, 30), (30, 230, 30), (30, 30, 230))  # species slot within its genus
UNSEEN_MARKER = (230, 230, 30)  # the held-out species'


def redraw_images(labels: Path, out: Path, seed: int = 0) -> None:
    """72 px JPEGs: the genus's background colour with noise, and a small species marker (slot colour, jittered,
    random size and place)."""
    with h5py.File(labels, "r") as f:
        ids = f["img_identifiers"].asstr()[()]
        species, genus = f["taxa_L10"][()].astype(np.int64), f["taxa_L20"][()].astype(np.int64)
        family = f["taxa_L30"][()].astype(np.int64)
    slot: dict[int, int] = {}
    for g in GENUS_COLOUR:
        for i, s in enumerate(sorted(set(species[(genus == g) & (species > 0)].tolist()))):
            slot[s] = i
    fallback = {204512: 311024, 208731: 315402}  # genus-less rows: draw a genus of their family
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for i, ident in enumerate(ids):
        g = int(genus[i]) or fallback[int(family[i])]
        img = np.array(GENUS_COLOUR[g], np.float32)[None, None, :] + rng.normal(0, 18, (72, 72, 3))
        s = int(species[i])
        if s:
            colour = UNSEEN_MARKER if s in NOVEL else MARKERS[slot[s]]
            size = int(rng.integers(5, 10))  # 2-4 px after the 32 px resize: species is hard, genus is not
            y, x = rng.integers(0, 72 - size, 2)
            img[y : y + size, x : x + size] = np.array(colour) + rng.normal(0, 45, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / ident, format="JPEG", quality=90)


def subset_labels(src: Path, dst: Path, rows: np.ndarray) -> None:
    """A labels.h5 holding only ``rows`` of ``src`` (every per-row dataset indexed, everything else copied)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        n = f["img_identifiers"].shape[0]
        for name, obj in f.items():
            if isinstance(obj, h5py.Dataset) and obj.shape[:1] == (n,):
                d = g.create_dataset(name, data=obj[()][rows])
                d.attrs.update(dict(obj.attrs))
            else:
                f.copy(obj, g, name)
        g.attrs.update(dict(f.attrs))


def relabel_species(path: Path, rate: float, seed: int = 1) -> None:
    """Give ``rate`` of the rows a sibling species (same genus) as label: training long on these memorises the
    noise, so the model is confidently wrong on about that share of validation rows (over-confident at species,
    still right at genus and family)."""
    with h5py.File(path, "r+") as f:
        species, genus = f["taxa_L10"][()], f["taxa_L20"][()]
        rng = np.random.default_rng(seed)
        out = species.copy()
        for i in np.nonzero((species > 0) & (rng.random(len(species)) < rate))[0]:
            siblings = sorted(set(species[(genus == genus[i]) & (species > 0)].tolist()) - {int(species[i])})
            if siblings:
                out[i] = siblings[int(rng.integers(len(siblings)))]
        f["taxa_L10"][...] = out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    demo = ensure_demo(tmp_path_factory.getbasetemp(), per_species=200)
    redraw_images(demo / "labels.h5", root / "images")
    with h5py.File(demo / "labels.h5", "r") as f:
        species = f["taxa_L10"][()].astype(np.int64)
    novel = np.isin(species, NOVEL)
    subset_labels(demo / "labels.h5", root / "train.h5", np.nonzero(~novel)[0])
    relabel_species(root / "train.h5", 0.25)
    # test file: the held-out species and as many known rows
    known_rows = np.nonzero(~novel)[0][: int(novel.sum())]
    subset_labels(demo / "labels.h5", root / "test.h5", np.sort(np.concatenate([np.nonzero(novel)[0], known_rows])))
    opts = tiny_opts(
        demo,
        root / "out",
        DATA__H5__LABELS_PATH=str(root / "train.h5"),
        DATA__HYBRID__IMAGES_DIR=str(root / "images"),
        DATA__H5__TRAIN_VAL_SPLIT_RATIO=0.06,
        TRAIN__MAX_STEPS=STEPS,
        SCHEDULE__VALIDATION__INTERVAL=f"{{STEPS: {STEPS}}}",
        SCHEDULE__META_MASKING__ENABLED=False,
        LR_SCHEDULER__BASE_LR=3e-3,
        **TINY,
    )
    launch(opts, timeout=900)
    run = run_dir(root / "out")
    bundle = export_bundle(run, root / "bundle", which="final")
    b = Bundle.load(bundle)
    predictor = Predictor(b, "cpu", calibrate=False)
    val = eval_data.from_split(b, "val")
    lp = eval_data.score(predictor, val, batch_size=128, progress=False)
    return {
        "root": root,
        "images": root / "images",
        "run": run,
        "bundle": bundle,
        "val": val,
        "val_lp": lp,
        "h": predictor.hierarchy,
        "reported": metrics(run, "val")[-1],
    }


def _halves(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, disjoint split of the validation rows: the first 40 % fit, the rest (>= 1000 rows) is held out."""
    perm = np.random.default_rng(0).permutation(n)
    fit = np.zeros(n, bool)
    fit[perm[: int(0.4 * n)]] = True
    return fit, ~fit


def test_evaluate_split_val_reproduces_the_runs_final_validation(trained, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert (
        main(["evaluate", "--run", str(trained["run"]), "--which", "final", "--split", "val", "--out", str(out)]) == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    figs = m["metadata"]["on"]
    reported = trained["reported"]
    assert reported["step"] == STEPS
    for key in ("taxa_L10", "taxa_L20", "taxa_L30"):
        assert figs["per_rank"][key]["top1"] == pytest.approx(reported[f"{key}/top1"], abs=1e-9), key
        assert figs["per_rank"][key]["top5"] == pytest.approx(reported[f"{key}/top5"], abs=1e-9), key
        assert figs["per_rank"][key]["count"] == reported[f"{key}/count"]
    assert figs["chain_accuracy"] == pytest.approx(reported["chain_accuracy"], abs=1e-9)
    assert figs["partial_chain_accuracy"] == pytest.approx(reported["partial_chain_accuracy"], abs=1e-9)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((out / "plots").glob("*.png"))) >= 4
    assert figs["per_rank"]["taxa_L10"]["frequency"]["thresholds"]["few"] == "< 20"


def test_temperature_is_the_nll_minimum_and_helps_held_out_ece(trained) -> None:
    val, lp = trained["val"], trained["val_lp"]
    fit, held = _halves(len(val))
    for key in ("taxa_L10", "taxa_L20", "taxa_L30"):
        y = val.table.targets[key]
        t = calibration.fit_temperature(lp[key][fit], y[fit])
        grid = np.exp(np.linspace(math.log(0.05), math.log(20), 400))  # 1.5 % apart
        lab = fit & (y >= 0)
        nlls = [
            float(
                torch.nn.functional.cross_entropy(torch.as_tensor(lp[key][lab]).double() / g, torch.as_tensor(y[lab]))
            )
            for g in grid
        ]
        assert t == pytest.approx(grid[int(np.argmin(nlls))], rel=0.02), key
        cal = calibration.scale(torch.as_tensor(lp[key]), t).exp().numpy()
        raw = np.exp(lp[key])
        assert eval_metrics.nll(cal[fit], y[fit]) <= eval_metrics.nll(raw[fit], y[fit])
        if key != "taxa_L10":
            continue
        # species (the hard rank) is where training long on few images makes the model over-confident
        assert t > 1.0, f"{key}: the model should be over-confident (T={t})"
        before = eval_metrics.calibration(raw[held], y[held])["ece"]
        after = eval_metrics.calibration(cal[held], y[held])["ece"]
        assert after < before, (key, before, after)


@pytest.mark.parametrize("kind", ["threshold", "climb"])
def test_policies_reach_the_target_on_held_out_rows(trained, kind: str) -> None:
    val, lp, h = trained["val"], trained["val_lp"], trained["h"]
    fit, held = _halves(len(val))
    assert held.sum() >= 1000
    temps = {k: calibration.fit_temperature(lp[k][fit], val.table.targets[k][fit]) for k in h.keys}
    cal = [calibration.scale(torch.as_tensor(lp[k]), temps[k]) for k in h.keys]
    ys = [val.table.targets[k] for k in h.keys]
    fitter = policies.fit_threshold if kind == "threshold" else policies.fit_climb
    coverage = {}
    for target in (0.5, 0.9, 0.99):
        spec = fitter([c[fit] for c in cal], [y[fit] for y in ys], h, target)
        d = policies.decide(spec, [c[held] for c in cal], h)
        judged, right = policies.answer_correct(d, [y[held] for y in ys])
        # How deep answers go (0: abstained, 1: species), the coverage of a hierarchical answer: the family is right
        # for nearly every row, so the share of rows with *some* answer can stay 1.0 at every target.
        coverage[target] = float(((d.committed_rank + 1) / len(h.keys)).mean())
        if target == 0.9:
            assert right.sum() / judged.sum() >= 0.87, (kind, right.sum() / judged.sum(), coverage[target])
            assert coverage[target] > 0.2
    assert coverage[0.5] >= coverage[0.9] >= coverage[0.99], coverage
    assert coverage[0.5] > coverage[0.99]


def test_calibrate_then_evaluate_a_test_file_with_novel_species(trained, tmp_path: Path) -> None:
    root = trained["root"]
    b = Bundle.load(trained["bundle"])
    fit, _ = _halves(len(trained["val"]))
    doc = calibrate_bundle(b, trained["val"].subset(fit), target_accuracy=0.9, default_policy="climb", device="cpu")
    assert all(r["nll_after"] <= r["nll_before"] for r in doc["per_rank"].values())
    reloaded = Bundle.load(trained["bundle"])  # calibration.json verified against bundle.json's sha256
    assert reloaded.calibration["temperature_by_rank"] == doc["temperature_by_rank"]
    out = tmp_path / "test_eval"
    args = ["evaluate", "--bundle", str(trained["bundle"]), "--labels", str(root / "test.h5")]
    args += ["--images", str(trained["images"]), "--out", str(out), "--save-predictions"]
    assert main([*args, "--metadata", "both"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    with h5py.File(root / "test.h5", "r") as f:
        assert m["set"]["novel_rows"] == int(np.isin(f["taxa_L10"][()], NOVEL).sum()) > 300
    for mode in ("on", "masked"):  # every figure with and without metadata
        assert {t["taxon_id"] for t in m["metadata"][mode]["novel"]["taxa"]} == set(NOVEL)
        assert m["metadata"][mode]["policy"]["kind"] == "climb"
        assert set(m["metadata"][mode]["per_rank"]) == {"taxa_L10", "taxa_L20", "taxa_L30"}
    # (trained without metadata masking, the model is lost without it: the masked figures say so, not asserted)
    nov = m["metadata"]["on"]["novel"]
    assert nov["stopped_at_correct_higher_rank"] > 0.5, nov
    assert nov["committed_finest_rank"] < 0.4, nov
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == m["set"]["rows"]
    for line in lines:
        r = ClassificationResult.model_validate_json(line)
        assert r.provenance.calibration is not None and r.provenance.calibration.method.value == "temperature_scaling"
        assert r.ranks[0].candidates[0].score_semantics.value == "temperature_scaled_rank_probability"
        assert r.provenance.decision_policies[-1].parameters["algorithm"] == "hierarchical_climb"
        assert {o.decision for o in r.outcomes} <= {"commit", "abstain"}


def test_predict_with_every_policy_gives_valid_typus_lines(trained, capsys) -> None:
    b = Bundle.load(trained["bundle"])
    if b.calibration is None:
        calibrate_bundle(b, trained["val"].subset(np.arange(len(trained["val"])) < 300), target_accuracy=0.9)
    images = [str(trained["images"] / f"img_{i:06d}.jpg") for i in range(0, 2400, 300)]
    for policy in ("repair", "threshold", "climb", "cost"):
        capsys.readouterr()
        assert main(["predict", "--bundle", str(trained["bundle"]), "--policy", policy, *images]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(images)
        for line in lines:
            r = ClassificationResult.model_validate_json(line)
            assert len(r.outcomes) == 3
        assert (
            main(["predict", "--bundle", str(trained["bundle"]), "--policy", policy, "--format", "table", *images[:2]])
            == 0
        )
        table = capsys.readouterr().out
        if policy != "repair" and "abstained" in table:
            assert "best guess" in table


def test_user_errors_are_one_line(trained, tmp_path: Path, capsys) -> None:
    image = str(trained["images"] / "img_000000.jpg")
    plain = export_bundle(trained["run"], tmp_path / "plain", which="final")  # never calibrated
    assert main(["evaluate", "--bundle", str(plain), "--split", "val", "--policy", "climb"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --policy climb:") and "linnaeus calibrate" in err[-1]
    assert main(["evaluate", "--bundle", str(plain), "--labels", str(trained["root"] / "test.h5")]) != 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --labels/--images: give both")
    b = Bundle.load(plain)
    calibrate_bundle(b, trained["val"].subset(np.arange(len(trained["val"])) < 200), target_accuracy=0.9)
    doc = json.loads((plain / "calibration.json").read_text())
    doc["temperature_by_rank"]["taxa_L10"] = 1.0
    (plain / "calibration.json").write_text(json.dumps(doc))
    assert main(["predict", "--bundle", str(plain), image]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration_sha256" in err[0]


def test_export_can_calibrate_and_store_the_default_policy(trained, tmp_path: Path, capsys) -> None:
    out = tmp_path / "calibrated"
    args = ["export", "--run", str(trained["run"]), "--out", str(out), "--which", "final", "--calibrate"]
    assert main([*args, "--target-accuracy", "0.9", "--default-policy", "climb"]) == 0
    b = Bundle.load(out)
    assert b.calibration["default_policy"] == "climb" and b.calibration["rows"] == len(trained["val"])
    capsys.readouterr()
    assert main(["predict", "--bundle", str(out), str(trained["images"] / "img_000000.jpg")]) == 0
    r = ClassificationResult.model_validate_json(capsys.readouterr().out.strip())
    assert r.provenance.decision_policies[-1].parameters["algorithm"] == "hierarchical_climb"


CHROMIUM = next(
    (
        shutil.which(n)
        for n in ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")
        if shutil.which(n)
    ),
    None,
)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no headless Chromium on this machine (Debian package: chromium-headless-shell; .ci/run installs it)",
)
def test_report_renders_in_headless_chromium(trained, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--bundle", str(trained["bundle"]), "--split", "val", "--out", str(out)]) == 0
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1200,2400"]
    proc = subprocess.run(
        [CHROMIUM, *flags, (out / "report.html").as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.std() > 5  # text and plots drawn, not a blank page
    # The plots are the only coloured things on the page (text is black on white): a page whose embedded images
    # failed to decode shows none.
    coloured = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum())
    assert coloured > 1000, f"no plot visible ({coloured} coloured pixels)"


def test_training_ends_calibrated_and_export_carries_it(demo: Path, tmp_path: Path, capsys) -> None:
    """TRAIN.CALIBRATE (on by default): the finished run's best weights get their temperatures and fitted policies on
    its own validation split; `linnaeus export` puts them in the bundle and predictions say they are calibrated."""
    launch(tiny_opts(demo, tmp_path / "out", TRAIN__MAX_STEPS=6, TRAIN__CALIBRATE=True))
    run = run_dir(tmp_path / "out")
    doc = json.loads((run / "export" / "calibration.json").read_text())
    assert doc["weights"]["which"] == "best" and set(doc["temperature_by_rank"]) == {"taxa_L10", "taxa_L20", "taxa_L30"}
    assert all(t > 0 for t in doc["temperature_by_rank"].values())
    assert {"threshold", "climb"} <= set(doc["policies"])
    assert "calibrated the best weights" in (run / "logs" / "train.log").read_text()
    bundle = tmp_path / "bundle"
    assert main(["export", "--run", str(run), "--out", str(bundle)]) == 0
    assert Bundle.load(bundle).calibration["temperature_by_rank"] == doc["temperature_by_rank"]
    capsys.readouterr()
    image = next((demo / "images").glob("*.jpg"))
    assert main(["predict", "--bundle", str(bundle), str(image)]) == 0
    r = ClassificationResult.model_validate_json(capsys.readouterr().out.strip())
    assert r.provenance.calibration is not None
