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
    outcomes = result.get("outcomes") or []
    if any(o.get("decision") == "abstain" and _policy_abstains(result) for o in outcomes):
        lines.append("  answer: " + _answer(ranks, outcomes))
        outcomes = []
    for outcome in outcomes:
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


def _policy_abstains(result: Mapping[str, Any]) -> bool:
    """A selective policy (threshold / climb / cost) rather than hierarchy repair's unmapped-rank abstentions."""
    kinds = [p.get("kind") for p in (result.get("provenance") or {}).get("decisionPolicies") or []]
    return bool(kinds) and kinds[-1] != "hierarchy_repair"


def _answer(ranks: list[Mapping[str, Any]], outcomes: list[Mapping[str, Any]]) -> str:
    """ "genus Curvidigitus (0.97); species: abstained, best guess Digitus octo 0.41": the committed ranks coarse →
    fine, the deepest first, then each abstained rank with its best guess."""
    by_level = {int(o["rankLevel"]): o for o in outcomes}
    committed, abstained = [], []
    for rank in ranks:
        o = by_level.get(int(rank["rankLevel"]))
        if o is None:
            continue
        cands = by_score(rank["candidates"])
        if o.get("decision") == "commit":
            tid = ((o.get("resolvedTo") or {}).get("match") or {}).get("taxonId")
            hit = next((c for c in cands if c.get("taxonId") == tid), None)
            confidence = o.get("decisionScoreSemantics") == "policy_confidence" and o.get("decisionScore") is not None
            score = float(o["decisionScore"]) if confidence else None
            if hit is not None and score is None:
                score = float(hit.get("score") or 0.0)
            shown = f"{rank['rankName']} {_name(hit) if hit else f'taxon {tid}'}"
            committed.append(shown + (f" ({score:.2f})" if score is not None else ""))
        else:
            best = next((c for c in cands if c.get("kind") != "null"), None)
            guess = f", best guess {_name(best)} {float(best.get('score') or 0.0):.2f}" if best else ""
            abstained.append(f"{rank['rankName']}: abstained{guess}")
    head = committed[-1] if committed else "no rank committed"
    return "; ".join([head, *abstained])
