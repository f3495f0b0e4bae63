"""GradNorm task weighting (Chen et al., ICML 2018).

Each update measures G_t = ‖∇_W L_t‖ on shared parameters W for every task's unweighted loss L_t and moves the
weights so that the weighted norms w_t·G_t approach the common target

    target_t = mean_j(w_j G_j) · r̃_t^α,    r̃_t = r_t / mean_j r_j,   r_t = L_t / L_t(0),

i.e. one step of gradient descent on Σ_t |w_t G_t − target_t| (target held constant): tasks whose weighted
gradient is above target lose weight, tasks that train slower (larger r̃) gain. Gradients come from
``torch.autograd.grad(..., retain_graph=True)``, so ``.grad`` and the main backward are never touched. The step
is divided by mean_j G_j so ``lr`` does not depend on the gradients' scale; weights are then kept ≥ ``min_weight``
and renormalised to sum to the number of tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class GradNorm(nn.Module):
    """Learned task weights; ``weights`` follows ``task_keys`` order. State (weights, L(0)) is in ``state_dict``."""

    def __init__(
        self,
        task_keys: Sequence[str],
        alpha: float,
        lr: float,
        *,
        init_weights: Sequence[float] | None = None,
        update_interval: int = 1,
        warmup_steps: int = 0,
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        self.task_keys = list(task_keys)
        self.alpha, self.lr = float(alpha), float(lr)
        self.update_interval, self.warmup_steps, self.min_weight = update_interval, warmup_steps, min_weight
        n = len(self.task_keys)
        w = torch.ones(n) if init_weights is None else torch.as_tensor(list(init_weights), dtype=torch.float32)
        if w.shape != (n,) or bool((w <= 0).any()):
            raise ValueError(f"GradNorm init_weights must be {n} positive numbers, got {list(w.tolist())}")
        self.register_buffer("weights", w * n / w.sum())
        self.register_buffer("initial_losses", torch.full((n,), float("nan")))

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` should run an update (after warmup, every ``update_interval`` steps)."""
        return step >= self.warmup_steps and step % self.update_interval == 0

    def _grad_norm(self, loss: torch.Tensor, shared: list[nn.Parameter]) -> torch.Tensor:
        if not loss.requires_grad:
            return torch.zeros((), device=self.weights.device)
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        if not squares:
            return torch.zeros((), device=self.weights.device)
        return torch.stack(squares).sum().sqrt().to(self.weights.device)

    @torch.no_grad()
    def _step(self, losses: torch.Tensor, norms: torch.Tensor) -> None:
        # A non-finite loss or norm (a step TRAIN.NONFINITE skip drops) must not reach the weights, or they stay NaN
        # for good; decided on device (no host sync), identically on every process (the values are reduced).
        ok = torch.isfinite(losses).all() & torch.isfinite(norms).all()
        losses, norms = torch.nan_to_num(losses), torch.nan_to_num(norms)
        unset = torch.isnan(self.initial_losses) | (self.initial_losses <= 0)
        self.initial_losses.copy_(torch.where(unset & ok, losses, self.initial_losses))
        known = self.initial_losses > 0
        ratio = torch.where(known, losses / self.initial_losses.clamp_min(1e-12), torch.ones_like(losses))
        rel = ratio / ratio.mean().clamp_min(1e-12)
        weighted = self.weights * norms
        target = weighted.mean() * rel.pow(self.alpha)
        grad_w = torch.sign(weighted - target) * norms / norms.mean().clamp_min(1e-12)
        w = (self.weights - self.lr * grad_w).clamp_min(self.min_weight)
        self.weights.copy_(torch.where(ok, w * len(w) / w.sum(), self.weights))

    def update(
        self,
        task_losses: dict[str, torch.Tensor],
        shared_params: list[nn.Parameter],
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One weight update from unweighted per-task losses that still have their graph; returns the new weights.

        ``reduce`` (e.g. a cross-process mean) is applied to the stacked losses and gradient norms, so every
        process computes the same weights.

        Pass the very losses the backward uses (``TaskLoss.task_losses`` with the step's ``denominators``), so
        GradNorm measures the normalisation the optimizer applies. With D_t = N_t / (k·W) (N_t: included samples
        of rank t in the whole step, k micro-batches, W processes), one micro-batch's L_t = k·W · Σ_micro ℓ / N_t,
        and its cross-process mean is Σ_{this micro-batch, all processes} ℓ / (N_t / k): the step's per-rank mean
        loss estimated from one accumulation slice, and ∇L_t that slice's estimate of the step's per-rank gradient.
        A process or micro-batch with few labels at a rank therefore weighs in proportionally, as in the
        optimizer's gradient, instead of as much as a fully labelled one (which per-micro-batch means would do);
        one with none gives L_t = 0 and G_t = 0, which leaves L_t(0) unset and moves no weight for that rank.
        """
        self.update_weights(task_losses, shared_params, reduce)
        return {k: float(w) for k, w in zip(self.task_keys, self.weights.tolist(), strict=True)}

    def update_weights(
        self,
        task_losses: dict[str, torch.Tensor],
        shared_params: list[nn.Parameter],
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """``update`` without reading the weights back: the training step's call (no host sync)."""
        shared = [p for p in shared_params if p.requires_grad]
        norms = torch.stack([self._grad_norm(task_losses[k], shared) for k in self.task_keys])
        losses = torch.stack([task_losses[k].detach().float().to(self.weights.device) for k in self.task_keys])
        if reduce is not None:
            norms, losses = reduce(norms), reduce(losses)
        self._step(losses, norms)
