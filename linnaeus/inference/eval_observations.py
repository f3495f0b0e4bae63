"""``linnaeus evaluate`` per observation, beside the per-image figures, when the set has ``observation_ids``.

Every observation gets one answer, the one ``linnaeus predict --observations`` gives it: a multi-view model pools
all of its photos' features before its heads (``MODEL.VIEW_POOLING``); an image model averages its photos'
log-probabilities after its heads. An observation's labels and metadata are its first row's, as training takes
them. Observations whose rows disagree on a label have no single truth: they are left out of these figures and
counted (``linnaeus check`` names them).

Scoring decodes every photo once: a multi-view model's loop walks the rows observation after observation, keeps
each photo's features and pools an observation as soon as its last photo is in, so the per-image answers (each
photo with its own row's metadata) come from the same pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from linnaeus.data.observations import observation_codes, observation_stats
from linnaeus.inference.eval_data import EvalSet, image_batches, score
from linnaeus.inference.observations import mean_of_log_probs, views_combined
from linnaeus.inference.typus_output import observation_context
from linnaeus.models.view_pooling import pack_views


@dataclass(frozen=True)
class Observations:
    """The set's rows grouped into observations (indices are positions in the set)."""

    ids: np.ndarray  # (M,) observation ids, in order of first appearance
    owner: np.ndarray  # (N,) each row's observation, 0..M-1
    first: np.ndarray  # (M,) each observation's first row: its labels and metadata
    agree: np.ndarray  # (M,) bool: its rows agree on every rank's label

    def __len__(self) -> int:
        return len(self.first)

    @cached_property
    def members(self) -> list[np.ndarray]:
        """Each observation's rows, ascending (grouped once: one sort, not a scan per observation)."""
        order = np.argsort(self.owner, kind="stable")
        return np.split(order, np.cumsum(np.bincount(self.owner, minlength=len(self)))[:-1])

    def rows_of(self, j: int) -> np.ndarray:
        return self.members[j]


def observations_of(evalset: EvalSet) -> Observations | None:
    """The set's observations, or None when its labels file has no ``observation_ids``."""
    if evalset.observation_ids is None or not len(evalset):
        return None
    owner = observation_codes(evalset.observation_ids)
    _, first = np.unique(owner, return_index=True)  # codes are dense in order of first appearance
    differs = np.zeros(len(first), bool)
    for taxa in evalset.taxa.values():
        np.logical_or.at(differs, owner, taxa != taxa[first][owner])
    return Observations(np.asarray(evalset.observation_ids)[first], owner, first, ~differs)


def score_observations(
    predictor: Any,
    evalset: EvalSet,
    obs: Observations,
    *,
    batch_size: int = 64,
    workers: int = 0,
    masked: bool = False,
    progress: bool = True,
    desc: str = "evaluate",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Uncalibrated log-probabilities per task key: (per row in the set's order, per observation)."""
    args = {"batch_size": batch_size, "workers": workers, "masked": masked, "progress": progress, "desc": desc}
    if not views_combined(predictor)[0]:
        rows = score(predictor, evalset, **args)
        per_obs = mean_of_log_probs(
            {k: torch.from_numpy(v) for k, v in rows.items()}, torch.from_numpy(obs.owner), len(obs)
        )
        return rows, {k: v.numpy() for k, v in per_obs.items()}
    return _pooled_scores(predictor, evalset, obs, **args)


def _pooled_scores(
    predictor: Any, evalset: EvalSet, obs: Observations, *, masked: bool, **loader: Any
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    order = np.argsort(obs.owner, kind="stable")  # observation after observation, photos in row order
    owner = obs.owner[order]
    t = evalset.table
    table = t.take(order)
    # The observation's metadata (its first row's) goes with every photo into the pooled answer, as in training.
    shared_meta = torch.from_numpy(t.meta[obs.first[owner]]).float()
    if masked:
        shared_meta.zero_()
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in predictor.task_keys}
    pooled: dict[str, list[torch.Tensor]] = {k: [] for k in predictor.task_keys}
    pending: list[torch.Tensor] = []  # features of photos whose observation is not complete yet
    pending_from = 0  # position (in ``order``) of the first pending photo
    at = 0
    for images, meta in image_batches(predictor, table, masked=masked, **loader):
        n = len(images)
        shared = shared_meta[at : at + n]
        features = predictor.features(images, shared)
        own = features
        differs = (meta != shared).any(dim=1) if meta.shape[1] else torch.zeros(n, dtype=torch.bool)
        if differs.any():  # a photo whose row's metadata differs from its observation's: its own answer, alone
            own = features.clone()
            own[differs.to(own.device)] = predictor.features(images[differs], meta[differs])
        for k, v in predictor.raw_log_probs_of_features(own).items():
            rows[k].append(v)
        pending.append(features)
        at += n
        # Observations whose photos are all in: everything before the last photo's observation (all at the end).
        done_to = at if at == len(order) else int(np.searchsorted(owner, owner[at - 1]))
        if done_to > pending_from:
            flat = torch.cat(pending)
            cut = done_to - pending_from
            counts = torch.from_numpy(np.bincount(owner[pending_from:done_to] - owner[pending_from]))
            bags, mask = pack_views(flat[:cut], counts)
            for k, v in predictor.raw_log_probs_of_features(bags, mask).items():
                pooled[k].append(v)
            pending, pending_from = [flat[cut:]], done_to
    per_row = {}
    for k, parts in rows.items():
        out = torch.empty_like(torch.cat(parts))
        out[torch.from_numpy(order)] = torch.cat(parts)
        per_row[k] = out.numpy()
    return per_row, {k: torch.cat(v).numpy() for k, v in pooled.items()}


def observation_summary(predictor: Any, obs: Observations) -> dict[str, Any]:
    """How many observations and photos, how they were combined (typus's ``aggregation`` fields) and how many were
    left out for disagreeing labels."""
    pooled, mode, temperature = views_combined(predictor)
    stats = observation_stats(obs.owner)
    aggregation = observation_context([], pooled, mode, temperature).aggregation
    return {
        "observations": int(obs.agree.sum()),
        "left_out_disagreeing_labels": int((~obs.agree).sum()),
        "photos_per_observation": {"min": stats.views_min, "median": stats.views_median, "max": stats.views_max},
        "aggregation": aggregation.model_dump(mode="json", exclude_none=True),
    }
