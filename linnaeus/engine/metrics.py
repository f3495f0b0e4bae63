"""Validation metrics with exact cross-process reductions.

Each process accumulates sums (never averages) over its own non-padded samples; one all-reduce of the sums gives the
global numbers, so padded repeats are never counted and uneven shards weigh correctly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class ValidationMeter:
    """Per rank: top-1, top-5, cross-entropy loss and coverage; chain and partial-chain accuracy."""

    def __init__(self, task_keys: list[str], device: torch.device) -> None:
        self.task_keys = list(task_keys)
        t = len(self.task_keys)
        # rows: labelled, top1, top5, loss_sum
        self.per_task = torch.zeros(t, 4, dtype=torch.float64, device=device)
        # samples, fully labelled, chain correct, any labelled, partial-chain correct
        self.overall = torch.zeros(5, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], is_pad: torch.Tensor) -> None:
        keep = ~is_pad.bool()
        all_labelled = keep.clone()
        all_right = keep.clone()
        any_labelled = torch.zeros_like(keep)
        labelled_right = keep.clone()
        for i, key in enumerate(self.task_keys):
            z = logits[key].float()
            y = targets[key]
            valid = keep & (y >= 0)
            y_safe = y.clamp(min=0)
            k = min(5, z.shape[1])
            top = z.topk(k, dim=1).indices
            right1 = top[:, 0] == y_safe
            right5 = (top == y_safe[:, None]).any(dim=1)
            loss = F.cross_entropy(z, y_safe, reduction="none")
            self.per_task[i, 0] += valid.sum()
            self.per_task[i, 1] += (right1 & valid).sum()
            self.per_task[i, 2] += (right5 & valid).sum()
            self.per_task[i, 3] += (loss * valid).sum()
            all_labelled &= valid
            all_right &= right1 & valid
            any_labelled |= valid
            # A null rank does not break a partial chain; a labelled wrong rank does.
            labelled_right &= right1 | ~valid
        self.overall[0] += keep.sum()
        self.overall[1] += all_labelled.sum()
        self.overall[2] += all_right.sum()
        self.overall[3] += any_labelled.sum()
        self.overall[4] += (labelled_right & any_labelled).sum()

    def compute(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Global metrics. `reduce_sum` all-reduces a tensor across processes (identity when alone)."""
        per_task, overall = self.per_task, self.overall
        if reduce_sum is not None:
            per_task = reduce_sum(per_task.clone())
            overall = reduce_sum(overall.clone())
        out: dict[str, float] = {}
        n = float(overall[0])
        for i, key in enumerate(self.task_keys):
            labelled = float(per_task[i, 0])
            denom = max(labelled, 1.0)
            out[f"{key}/top1"] = float(per_task[i, 1]) / denom
            out[f"{key}/top5"] = float(per_task[i, 2]) / denom
            out[f"{key}/loss"] = float(per_task[i, 3]) / denom
            out[f"{key}/coverage"] = labelled / max(n, 1.0)
            out[f"{key}/count"] = labelled
        out["chain_accuracy"] = float(overall[2]) / max(float(overall[1]), 1.0)
        out["partial_chain_accuracy"] = float(overall[4]) / max(float(overall[3]), 1.0)
        out["loss"] = sum(out[f"{k}/loss"] for k in self.task_keys)
        out["samples"] = n
        return out


def format_table(phase: str, step: int, metrics: dict[str, float], task_keys: list[str]) -> str:
    """One readable table per evaluation."""
    lines = [
        f"{phase} @ step {step}: {int(metrics['samples'])} samples",
        f"{'rank':<12}{'top1':>8}{'top5':>8}{'loss':>9}{'coverage':>10}",
    ]
    for key in task_keys:
        lines.append(
            f"{key:<12}{metrics[f'{key}/top1']:>8.3f}{metrics[f'{key}/top5']:>8.3f}"
            f"{metrics[f'{key}/loss']:>9.3f}{metrics[f'{key}/coverage']:>10.3f}"
        )
    lines.append(
        f"chain accuracy {metrics['chain_accuracy']:.3f}   partial-chain accuracy {metrics['partial_chain_accuracy']:.3f}"
    )
    return "\n".join(lines)
