"""``linnaeus evaluate``'s outputs: plots/*.png, a self-contained report.html (plots inlined as base64 PNG) and the
console summary table."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_plots(metrics: dict[str, Any], curves: dict[str, Any], out: Path) -> list[Path]:
    """Reliability diagrams (before / after calibration) and risk-coverage curves, one PNG per rank and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for mode, figs in metrics["metadata"].items():
        for key, entry in figs["per_rank"].items():
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
            for label, cal in entry["calibration"].items():
                if cal is None:
                    continue
                rel = cal["reliability"]
                conf, acc = np.asarray(rel["confidence"], float), np.asarray(rel["accuracy"], float)
                ok = np.isfinite(conf)
                ax.plot(conf[ok], acc[ok], marker="o", label=f"{label} (ECE {cal['ece']:.3f})")
            ax.set(xlabel="confidence", ylabel="accuracy", title=f"{entry['rank']} reliability ({mode})")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
            path = plots / f"reliability_{mode}_{key}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
        fig, ax = plt.subplots(figsize=(4, 4))
        for key, (cov, risk) in curves.get(mode, {}).items():
            ax.plot(
                cov,
                risk,
                label=f"{figs['per_rank'][key]['rank']} (AURC {figs['per_rank'][key]['selective']['aurc']:.3f})",
            )
        ax.set(xlabel="coverage", ylabel="selective risk", title=f"risk-coverage ({mode})")
        ax.legend(fontsize=7)
        path = plots / f"risk_coverage_{mode}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def _figure_lines(figs: dict[str, Any]) -> list[str]:
    lines = [f"{'rank':<10}{'top1':>7}{'top5':>7}{'macro':>7}{'ECE raw':>9}{'ECE cal':>9}{'AURC':>7}"]
    for entry in figs["per_rank"].values():
        cal = entry["calibration"]
        lines.append(
            f"{entry['rank']:<10}{_fmt(entry['top1']):>7}{_fmt(entry['top5']):>7}{_fmt(entry['macro']):>7}"
            f"{_fmt(cal['uncalibrated']['ece']):>9}{_fmt((cal['calibrated'] or {}).get('ece')):>9}"
            f"{_fmt(entry['selective']['aurc']):>7}"
        )
    lines.append(
        f"chain accuracy {_fmt(figs['chain_accuracy'])}   partial-chain {_fmt(figs['partial_chain_accuracy'])}"
    )
    pol = figs.get("policy")
    if pol:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in pol["committed_rank"].items())
        lines.append(
            f"policy {pol['kind']}: committed {shares}; accuracy of committed answers {_fmt(pol['committed_accuracy'])}"
        )
    nov = figs.get("novel")
    if nov:
        lines.append(
            f"novel species: {nov['rows']} rows; committed a species {nov['committed_finest_rank']:.0%}, "
            f"stopped at a correct higher rank {nov['stopped_at_correct_higher_rank']:.0%}"
        )
    return lines


def _observation_heading(obs: dict[str, Any]) -> str:
    agg = obs["aggregation"]
    how = (
        f"views pooled before the heads ({agg['pooling_mode']})"
        if agg["stage"] == "pooled_before_heads"
        else "photos' log-probabilities averaged after the heads"
    )
    photos = obs["photos_per_observation"]
    text = (
        f"  per observation: {obs['observations']} observations of {photos['min']}-{photos['max']} photos "
        f"(median {photos['median']:g}), {how}"
    )
    if obs["left_out_disagreeing_labels"]:
        text += f"; {obs['left_out_disagreeing_labels']} left out (their photos disagree on a label)"
    return text


def summary_table(metrics: dict[str, Any]) -> str:
    lines = []
    for mode, figs in metrics["metadata"].items():
        lines.append(f"evaluate ({mode} metadata): {figs['rows']} rows of {metrics['set']['name']}")
        lines += _figure_lines(figs)
        obs = figs.get("observations")
        if obs:
            lines.append(_observation_heading(obs))
            lines += ["  " + line for line in _figure_lines(obs)]
    return "\n".join(lines)


def write_html(metrics: dict[str, Any], plots: list[Path], out: Path) -> Path:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>linnaeus evaluate</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{margin:4px}</style></head><body>",
        f"<h1>Evaluation of {html.escape(str(metrics['model'].get('name')))}</h1>",
        f"<p>set: {html.escape(str(metrics['set']['name']))} ({metrics['set']['rows']} rows); weights "
        f"{html.escape(str(metrics['model'].get('which')))} @ step {metrics['model'].get('step')}</p>",
        f"<pre>{html.escape(summary_table(metrics))}</pre>",
    ]
    for mode, figs in metrics["metadata"].items():
        sev = figs["mistake_severity"]
        parts.append(f"<h2>Mistakes ({mode} metadata)</h2><p>mean LCA height {_fmt(sev['mean_lca_height'])}, ")
        parts.append(
            f"in true genus {_fmt(sev.get('share_in_true_genus'))}, in true family "
            f"{_fmt(sev.get('share_in_true_family'))}</p><table><tr><th>true</th><th>predicted</th><th>count</th></tr>"
        )
        for p in sev["confused_pairs"]:
            parts.append(
                f"<tr><td>{html.escape(str(p['true']))}</td><td>{html.escape(str(p['predicted']))}</td>"
                f"<td>{p['count']}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f"<img alt='{html.escape(p.stem)}' src='data:image/png;base64,{data}'>")
    parts.append(f"<h2>metrics.json</h2><pre>{html.escape(json.dumps(metrics, indent=1)[:200000])}</pre>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("".join(parts))
    return path
