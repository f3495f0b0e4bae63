"""``linnaeus predict --format table``: one readable block per image from a polli-typus result.

Works on the result's JSON form (the same data the JSON lines carry), so both formats always agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _name(candidate: Mapping[str, Any]) -> str:
    if candidate.get("kind") == "null":
        return "(none at this rank)"
    snap = candidate.get("taxonSnapshot") or {}
    return str(snap.get("scientificName") or f"taxon {candidate.get('taxonId')}")


def by_score(candidates: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Taxa highest score first; a rank-null decision (no score of its own) in front, as in the JSON."""
    return sorted(candidates, key=lambda c: (c.get("kind") != "null", -float(c.get("score") or 0.0)))


def format_result(result: Mapping[str, Any]) -> str:
    """A block: the image, the committed chain with each rank's probability, then top-k per rank by score."""
    units = (result.get("inputContext") or {}).get("unitIds") or ["<image>"]
    ranks = result.get("ranks") or []
    lines = [str(units[0])]
    chosen: dict[int, Any] = {}
    chain_score = None
    for outcome in result.get("outcomes") or []:
        match = ((outcome.get("resolvedTo") or {}).get("match")) or {}
        chosen[int(outcome["rankLevel"])] = match.get("taxonId") if match.get("kind") == "taxon" else None
        chain_score = outcome.get("decisionScore", chain_score)
    if chosen:
        steps = []
        for rank in ranks:
            level = int(rank["rankLevel"])
            if level not in chosen:
                continue
            hit = next((c for c in rank["candidates"] if c.get("taxonId") == chosen[level]), None)
            if chosen[level] is None or hit is None:
                steps.append(f"{rank['rankName']} -")
            else:
                steps.append(f"{rank['rankName']} {_name(hit)} ({float(hit['score']):.3f})")
        head = f"  chain (p={float(chain_score):.3f}): " if chain_score is not None else "  chain: "
        lines.append(head + " > ".join(steps))
    width = max((len(str(r.get("rankName"))) for r in ranks), default=4)
    for rank in ranks:
        cands = ", ".join(f"{_name(c)} {float(c.get('score') or 0.0):.3f}" for c in by_score(rank["candidates"]))
        lines.append(f"  {rank['rankName']!s:<{width}}  {cands}")
    return "\n".join(lines)
