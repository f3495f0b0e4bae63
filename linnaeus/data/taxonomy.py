"""Ranks, class maps and the taxonomy tree (from taxonomy.json, or inferred from labels.h5).

Decisions:

- Node ids are the integer taxon ids of ``taxa_LXX`` (JSON may spell them as numeric strings); 0 is null and never
  a node. Ranks are polli-typus ``RankLevel`` values; a task key ``taxa_LXX`` has rank ``RankLevel(XX)``.
- Every edge goes from a coarser rank to a strictly finer one. That rules out cycles, and allows skip-level links
  (a species directly under a family when its genus is unknown).
- Inferred trees: for each row and each configured rank, the candidate parent is the nearest coarser configured
  rank that is labelled on that row. A child's parent is its candidate at the finest rank seen. Two different
  candidates at that rank is a *conflict*; conflicts are reported with ids and row counts and never resolved by
  picking one: building the tree fails (DataError) and the user fixes labels.h5 or supplies ``DATA.TAXONOMY_PATH``.
  A silently chosen parent would make hierarchical heads, taxonomy-aware smoothing and decoding wrong.
- Labels are checked against the tree (given or inferred): a row whose coarser label is not the ancestor of its
  finer label at that rank is an inconsistency, reported with the row and ids, and fails preparation.
- Class maps: per task key, the sorted distinct non-null taxon ids of the rows in use → 0..K-1.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from typus import RANK_CANON, RankLevel, Taxon

from linnaeus.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------------- ranks
_NAME_TO_RANK: dict[str, RankLevel] = {name.lower(): level for level, name in RANK_CANON.items()}
_NAME_TO_RANK.update({"sp": RankLevel.L10, "gen": RankLevel.L20, "fam": RankLevel.L30})
# RankLevel encodes half levels ×10 (335 = 33.5, 345 = 34.5); ordering must use the real level.
_HALF_LEVELS = {335: 33.5, 345: 34.5}


def rank_order(level: int) -> float:
    """A number that sorts ranks fine → coarse (larger = coarser)."""
    return _HALF_LEVELS.get(int(level), float(level))


def rank_name(level: int) -> str:
    return RANK_CANON.get(RankLevel(level), f"L{int(level)}")


def parse_rank(value: Any) -> RankLevel:
    """A rank given by name ('species', 'Genus'), by level (10, '10', 'L10') -> RankLevel; ValueError if unknown."""
    if isinstance(value, bool):
        raise ValueError(f"unknown rank {value!r}")
    if isinstance(value, int):
        return RankLevel(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _NAME_TO_RANK:
            return _NAME_TO_RANK[text]
        digits = text[1:] if text.startswith("l") else text
        if digits.isdigit():
            return RankLevel(int(digits))
    raise ValueError(f"unknown rank {value!r}")


def rank_of_key(key: str) -> RankLevel:
    """``taxa_L10`` -> RankLevel.L10 (ConfigError when the level is not a polli-typus RankLevel)."""
    digits = key.removeprefix("taxa_L")
    try:
        return RankLevel(int(digits))
    except ValueError:
        valid = ", ".join(f"taxa_L{int(r):02d}" for r in sorted(RankLevel, key=rank_order))
        raise ConfigError(f"DATA.TASK_KEYS_H5: '{key}' is not a polli-typus rank level (valid: {valid})") from None


def keys_coarse_to_fine(keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=lambda k: -rank_order(rank_of_key(k)))


# ------------------------------------------------------------------------------------------------ class maps
@dataclass
class ClassMap:
    """One rank's classes: index i <-> taxon_ids[i] (sorted ascending) <-> names[i]."""

    key: str
    rank: RankLevel
    taxon_ids: np.ndarray  # (K,) int64, sorted, no 0
    names: list[str | None] = field(default_factory=list)

    @classmethod
    def from_ids(cls, key: str, ids: Iterable[np.ndarray], tree: TaxonomyTree | None = None) -> ClassMap:
        arrays = [np.asarray(a, dtype=np.int64) for a in ids]
        uniq = np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, np.int64)
        uniq = uniq[uniq != 0]
        names = [tree.name_of(int(t)) if tree is not None else None for t in uniq]
        return cls(key, rank_of_key(key), uniq, names)

    def __len__(self) -> int:
        return len(self.taxon_ids)

    def index(self, ids: np.ndarray | Iterable[int]) -> np.ndarray:
        """Taxon ids -> class indices (int64); -1 for null (0) and for ids this map does not hold."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.taxon_ids):
            return np.full(ids.shape, -1, np.int64)
        pos = np.clip(np.searchsorted(self.taxon_ids, ids), 0, len(self.taxon_ids) - 1)
        found = (self.taxon_ids[pos] == ids) & (ids != 0)
        return np.where(found, pos, -1).astype(np.int64)

    def to_json(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "taxon_id": int(t), "name": n, "rank_level": int(self.rank), "rank": rank_name(self.rank)}
            for i, (t, n) in enumerate(zip(self.taxon_ids, self.names or [None] * len(self), strict=True))
        ]


# ------------------------------------------------------------------------------------------------------ tree
@dataclass(frozen=True)
class TaxonNode:
    id: int
    rank: RankLevel
    name: str | None = None


@dataclass
class Conflict:
    """A taxon seen under more than one parent (inferred trees), or one id used at two ranks."""

    key: str
    taxon_id: int
    candidates: list[tuple[str, int, int]]  # (key, parent id, rows)
    kind: str = "parents"

    def line(self, where: str) -> str:
        cands = ", ".join(f"{k} id {p} ({n} rows)" for k, p, n in self.candidates)
        if self.kind == "rank":
            return f"{where}: taxon id {self.taxon_id} is used at several ranks: {cands}"
        return f"{where}: {self.key} id {self.taxon_id} has {len(self.candidates)} different parents: {cands}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "taxon_id": self.taxon_id,
            "candidates": [{"key": k, "taxon_id": p, "rows": n} for k, p, n in self.candidates],
        }


@dataclass
class Inconsistency:
    """Rows whose labels disagree with the tree (one record per kind and rank pair; first row named)."""

    kind: str  # "unknown_id", "rank", "ancestor"
    key: str
    row: int
    rows: int
    message: str

    def line(self, where: str) -> str:
        more = f" ({self.rows} rows like this)" if self.rows > 1 else ""
        return f"{where} row {self.row}: {self.message}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "row": self.row, "rows": self.rows, "message": self.message}


POLLI_CLASS_MAP = "class_to_idx.json"


def _polli_tree_to_doc(doc: dict[str, Any], path: Path) -> dict[str, Any]:
    """A Polli Linnaeus ``TaxonomyTree.save()`` file (class indices per task key) as our nodes/edges document.

    Its indices become taxon ids through the same run's ``class_to_idx.json`` ({task: {taxon_id | "null": idx}}),
    which must lie beside it (both are in that run's ``assets/``). Each task's parent is the next task key.
    """
    where = f"taxonomy file {path} (Polli Linnaeus TaxonomyTree format)"
    map_path = path.with_name(POLLI_CLASS_MAP)
    if not map_path.is_file():
        raise DataError(f"{where}: holds class indices only; put the same run's {POLLI_CLASS_MAP} beside it")
    try:
        class_to_idx = json.loads(map_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{map_path}: not valid JSON ({exc})") from None
    task_keys = doc.get("task_keys")
    raw = doc.get("hierarchy_map_raw")
    if not isinstance(task_keys, list) or not isinstance(raw, dict) or not isinstance(class_to_idx, dict):
        raise DataError(f"{where}: expected 'task_keys' and 'hierarchy_map_raw', and a {{task: {{id: idx}}}} map")
    ids: dict[str, dict[int, int]] = {}
    for task in task_keys:
        entries = class_to_idx.get(task)
        if not isinstance(entries, dict):
            raise DataError(f"{map_path}: no class map for task '{task}'")
        ids[task] = {int(i): int(t) for t, i in entries.items() if t != "null" and int(t) != 0}
    nodes: dict[int, dict[str, int]] = {}
    for task in task_keys:
        for t in sorted(ids[task].values()):
            nodes.setdefault(t, {"id": t, "rank": int(rank_of_key(task))})
    edges = []
    for child_task, parent_task in itertools.pairwise(task_keys):
        for child_idx, parent_idx in (raw.get(child_task) or {}).items():
            child = ids[child_task].get(int(child_idx))
            parent = ids[parent_task].get(int(parent_idx))
            if child is not None and parent is not None:
                edges.append({"source": parent, "target": child})
    return {"nodes": list(nodes.values()), "edges": edges}


class TaxonomyTree:
    """Taxa (id, rank, name) and parent → child edges. Built with :meth:`from_json` or :meth:`infer`."""

    def __init__(self, nodes: dict[int, TaxonNode], parent: dict[int, int], source: str = "") -> None:
        self.nodes = nodes
        self.parent = parent
        self.source = source
        self.children: dict[int, list[int]] = defaultdict(list)
        for child, par in sorted(parent.items()):
            self.children[par].append(child)

    # -------------------------------------------------------------------------------------------- queries
    def __contains__(self, taxon_id: int) -> bool:
        return int(taxon_id) in self.nodes

    def __len__(self) -> int:
        return len(self.nodes)

    def name_of(self, taxon_id: int) -> str | None:
        node = self.nodes.get(int(taxon_id))
        return node.name if node else None

    def rank_of(self, taxon_id: int) -> RankLevel | None:
        node = self.nodes.get(int(taxon_id))
        return node.rank if node else None

    def parent_of(self, taxon_id: int) -> int | None:
        return self.parent.get(int(taxon_id))

    def ancestors(self, taxon_id: int, include_self: bool = False) -> list[int]:
        """Nearest first, up to the root."""
        out = [int(taxon_id)] if include_self else []
        cur = self.parent.get(int(taxon_id))
        while cur is not None:
            out.append(cur)
            cur = self.parent.get(cur)
        return out

    def descendants(self, taxon_id: int, include_self: bool = False) -> list[int]:
        """Breadth first."""
        out = [int(taxon_id)] if include_self else []
        frontier = list(self.children.get(int(taxon_id), []))
        while frontier:
            out.extend(frontier)
            frontier = [c for t in frontier for c in self.children.get(t, [])]
        return out

    def ancestor_at(self, taxon_id: int, rank: int) -> int | None:
        """The taxon's ancestor (or itself) at exactly ``rank``; None when the chain has no taxon at that rank."""
        for t in self.ancestors(taxon_id, include_self=True):
            node = self.nodes.get(t)
            if node is not None and node.rank == rank:
                return t
        return None

    def lca(self, a: int, b: int) -> int | None:
        seen = set(self.ancestors(a, include_self=True))
        for t in self.ancestors(b, include_self=True):
            if t in seen:
                return t
        return None

    def distance(self, a: int, b: int) -> float:
        """Number of edges between two taxa through their lowest common ancestor; inf when unrelated."""
        pa, pb = self.ancestors(a, include_self=True), self.ancestors(b, include_self=True)
        depth_in_a = {t: i for i, t in enumerate(pa)}
        for j, t in enumerate(pb):
            if t in depth_in_a:
                return float(depth_in_a[t] + j)
        return float("inf")

    def taxon(self, taxon_id: int) -> Taxon:
        """The polli-typus ``Taxon`` (ancestry root → self, as typus defines it); KeyError for an unknown id."""
        node = self.nodes[int(taxon_id)]
        return Taxon(
            taxon_id=node.id,
            scientific_name=node.name or str(node.id),
            rank_level=node.rank,
            parent_id=self.parent.get(node.id),
            ancestry=list(reversed(self.ancestors(node.id, include_self=True))),
        )

    # ------------------------------------------------------------------------------------- class-index views
    def distance_matrix(self, taxon_ids: np.ndarray) -> np.ndarray:
        """(K, K) float32 edge distances between the given taxa (inf when they share no ancestor).

        Vectorised over depth: with each taxon's root-to-self path padded to a common length, the LCA depth of
        (a, b) is the deepest level where both paths hold the same taxon.
        """
        ids = [int(t) for t in np.asarray(taxon_ids).tolist()]
        paths = [list(reversed(self.ancestors(t, include_self=True))) for t in ids]
        k = len(ids)
        depth = np.array([len(p) - 1 for p in paths], np.float32)
        if not k:
            return np.zeros((0, 0), np.float32)
        width = max(len(p) for p in paths)
        table = np.full((k, width), -1, np.int64)
        for i, p in enumerate(paths):
            table[i, : len(p)] = p
        # int16 LCA depths and in-place arithmetic: for 10^4 classes this peaks near 0.7 GB (int16 + float32 + bool).
        lca_depth = np.full((k, k), -1, np.int16)
        for d in range(width):
            col = table[:, d]
            same = col[:, None] == col[None, :]
            same &= (col >= 0)[:, None]
            lca_depth[same] = d
        dist = np.add.outer(depth, depth)
        unrelated = lca_depth < 0
        np.subtract(dist, lca_depth, out=dist)  # twice rather than `2 * lca_depth`: no (K, K) temporary
        np.subtract(dist, lca_depth, out=dist)
        dist[unrelated] = np.inf
        np.fill_diagonal(dist, 0.0)
        return dist

    def hierarchy_matrix(self, parent_map: ClassMap, child_map: ClassMap) -> np.ndarray:
        """(K_parent, K_child) float32 0/1: 1 where the parent class is the child class's ancestor at its rank."""
        h = np.zeros((len(parent_map), len(child_map)), np.float32)
        anc = np.array(
            [self.ancestor_at(int(c), parent_map.rank) or 0 for c in child_map.taxon_ids.tolist()], dtype=np.int64
        )
        p_idx = parent_map.index(anc)
        has = p_idx >= 0
        h[p_idx[has], np.flatnonzero(has)] = 1.0
        return h

    # ------------------------------------------------------------------------------------------- (de)serialise
    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [
                {"id": n.id, "rank": rank_name(n.rank), "name": n.name}
                for n in sorted(self.nodes.values(), key=lambda n: (-rank_order(n.rank), n.id))
            ],
            "edges": [{"source": p, "target": c} for c, p in sorted(self.parent.items(), key=lambda e: (e[1], e[0]))],
        }

    @classmethod
    def from_json(cls, path: str | Path) -> TaxonomyTree:
        path = Path(path)
        where = f"taxonomy file {path}"
        if not path.is_file():
            raise DataError(f"{where} does not exist (DATA.TAXONOMY_PATH)")
        try:
            doc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        except RecursionError:
            raise DataError(
                f'{where}: nested too deeply to parse; expected {{"nodes": [...], "edges": [...]}}'
            ) from None
        if isinstance(doc, dict) and "__taxonomy_tree_version__" in doc:
            return cls.from_dict(_polli_tree_to_doc(doc, path), where, source=str(path))
        if (
            not isinstance(doc, dict)
            or not isinstance(doc.get("nodes"), list)
            or not isinstance(doc.get("edges"), list)
        ):
            raise DataError(f'{where}: expected {{"nodes": [...], "edges": [...]}}')
        return cls.from_dict(doc, where, source=str(path))

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "taxonomy", source: str = "") -> TaxonomyTree:
        nodes: dict[int, TaxonNode] = {}
        for i, raw in enumerate(doc.get("nodes", [])):
            if not isinstance(raw, dict) or "id" not in raw or "rank" not in raw:
                raise DataError(f"{where}: nodes[{i}] must be an object with 'id' and 'rank', got {raw!r}")
            tid = _taxon_id(raw["id"], f"{where}: nodes[{i}].id")
            try:
                rank = parse_rank(raw["rank"])
            except ValueError:
                raise DataError(
                    f"{where}: nodes[{i}] (id {tid}) has rank {raw['rank']!r}; expected a polli-typus rank name"
                    " such as 'species', 'genus', 'family', 'subfamily', 'order' or a level like 10"
                ) from None
            if tid in nodes:
                raise DataError(f"{where}: node id {tid} appears more than once (nodes[{i}])")
            name = raw.get("name")
            nodes[tid] = TaxonNode(tid, rank, None if name is None else str(name))
        parent: dict[int, int] = {}
        for i, raw in enumerate(doc.get("edges", [])):
            if not isinstance(raw, dict) or "source" not in raw or "target" not in raw:
                raise DataError(f"{where}: edges[{i}] must be an object with 'source' and 'target', got {raw!r}")
            src = _taxon_id(raw["source"], f"{where}: edges[{i}].source")
            dst = _taxon_id(raw["target"], f"{where}: edges[{i}].target")
            for t in (src, dst):
                if t not in nodes:
                    raise DataError(f"{where}: edges[{i}] refers to taxon {t}, which is not in nodes")
            if dst in parent and parent[dst] != src:
                raise DataError(f"{where}: taxon {dst} has two parents ({parent[dst]} and {src}, edges[{i}])")
            if rank_order(nodes[src].rank) <= rank_order(nodes[dst].rank):
                raise DataError(
                    f"{where}: edges[{i}] {src} ({rank_name(nodes[src].rank)}) -> {dst} ({rank_name(nodes[dst].rank)}):"
                    " a parent must be of a coarser rank than its child"
                )
            parent[dst] = src
        return cls(nodes, parent, source=source)

    def save(self, path: Path) -> None:
        from linnaeus.utils.io import atomic_write_json

        atomic_write_json(Path(path), self.to_json())

    # ------------------------------------------------------------------------------------------------ infer
    @classmethod
    def infer(cls, taxa: dict[str, np.ndarray], where: str = "labels.h5") -> tuple[TaxonomyTree, list[Conflict]]:
        """Build the tree from label co-occurrence; returns the conflicts instead of resolving them.

        ``taxa`` maps task keys to (N,) taxon ids of the rows in use. With conflicts, the returned tree keeps
        no parent for a conflicted taxon; callers must not train with it (``prepare_data`` refuses to).
        """
        fine_to_coarse = list(reversed(keys_coarse_to_fine(taxa)))
        nodes: dict[int, TaxonNode] = {}
        conflicts: list[Conflict] = []
        seen_at: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for key in fine_to_coarse:
            ids, counts = np.unique(taxa[key], return_counts=True)
            for t, n in zip(ids.tolist(), counts.tolist(), strict=True):
                if t:
                    seen_at[t].append((key, n))
                    nodes.setdefault(t, TaxonNode(t, rank_of_key(key), None))
        for t, uses in seen_at.items():
            if len(uses) > 1:
                conflicts.append(Conflict(uses[0][0], t, [(k, t, n) for k, n in uses], kind="rank"))
        parent: dict[int, int] = {}
        for i, key in enumerate(fine_to_coarse[:-1]):
            child = np.asarray(taxa[key], np.int64)
            par = np.zeros_like(child)
            level = np.full(child.shape, -1, np.int64)
            for j in range(i + 1, len(fine_to_coarse)):
                v = np.asarray(taxa[fine_to_coarse[j]], np.int64)
                fill = (par == 0) & (v != 0)
                par[fill] = v[fill]
                level[fill] = j
            m = (child != 0) & (par != 0)
            if not m.any():
                continue
            by_child: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
            for c, lv, p, n in _pair_counts(child[m], level[m], par[m]):
                by_child[c].append((lv, p, n))
            for c, cands in by_child.items():
                finest = min(lv for lv, _, _ in cands)
                at = [(p, n) for lv, p, n in cands if lv == finest]
                if len(at) > 1:
                    pkey = fine_to_coarse[finest]
                    conflicts.append(
                        Conflict(key, c, [(pkey, p, n) for p, n in sorted(at, key=lambda x: (-x[1], x[0]))])
                    )
                else:
                    parent[c] = at[0][0]
        return cls(nodes, parent, source=f"inferred from {where}"), conflicts


def _pair_counts(child: np.ndarray, level: np.ndarray, parent: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Distinct (child, parent level, parent, rows). Ids that fit 32 bits are packed into one uint64 key, which
    np.unique sorts several times faster than rows of a 2-D array (the level follows from the parent id)."""
    if child.max() < 2**32 and parent.max() < 2**32:
        key = (child.astype(np.uint64) << np.uint64(32)) | parent.astype(np.uint64)
        uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
        c = (uniq >> np.uint64(32)).astype(np.int64)
        p = (uniq & np.uint64(0xFFFFFFFF)).astype(np.int64)
        return list(zip(c.tolist(), level[first].tolist(), p.tolist(), counts.tolist(), strict=True))
    triples, counts = np.unique(np.stack([child, level, parent], 1), axis=0, return_counts=True)
    return [(c, lv, p, n) for (c, lv, p), n in zip(triples.tolist(), counts.tolist(), strict=True)]


def _taxon_id(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: expected an integer taxon id, got {value!r}")
    if isinstance(value, int):
        tid = value
    elif isinstance(value, str) and value.strip().isdigit():
        tid = int(value.strip())
    else:
        raise DataError(f"{where}: expected an integer taxon id (as used in taxa_LXX), got {value!r}")
    if tid <= 0:
        raise DataError(f"{where}: taxon id {tid} must be positive (0 means null in taxa_LXX)")
    return tid


# ------------------------------------------------------------------------------------------ label checking
def label_inconsistencies(
    tree: TaxonomyTree, taxa: dict[str, np.ndarray], rows: np.ndarray | None = None, tree_name: str = "the taxonomy"
) -> list[Inconsistency]:
    """Rows of ``taxa`` (positions mapped to file rows by ``rows``) that disagree with ``tree``."""
    keys = keys_coarse_to_fine(taxa)
    n = len(next(iter(taxa.values()))) if taxa else 0
    file_rows = np.arange(n) if rows is None else np.asarray(rows)
    out: list[Inconsistency] = []
    usable: dict[str, np.ndarray] = {}  # per key: mask of positions whose id is in the tree at the right rank
    for key in keys:
        ids = np.asarray(taxa[key], np.int64)
        rank = rank_of_key(key)
        uniq = np.unique(ids[ids != 0])
        unknown = np.array([t for t in uniq.tolist() if t not in tree.nodes], np.int64)
        wrong = np.array([t for t in uniq.tolist() if t in tree.nodes and tree.nodes[t].rank != rank], np.int64)
        for kind, bad_ids in (("unknown_id", unknown), ("rank", wrong)):
            if not len(bad_ids):
                continue
            hit = np.isin(ids, bad_ids)
            first = int(np.flatnonzero(hit)[0])
            t = int(ids[first])
            msg = (
                f"{key} id {t} is not a taxon of {tree_name}"
                if kind == "unknown_id"
                else f"{key} id {t} is a {rank_name(tree.nodes[t].rank)} in {tree_name}, expected {rank_name(rank)}"
            )
            out.append(Inconsistency(kind, key, int(file_rows[first]), int(hit.sum()), msg))
        usable[key] = (ids != 0) & ~np.isin(ids, np.concatenate([unknown, wrong]))
    for i, fine in enumerate(keys):
        for coarse in keys[:i]:
            fine_ids = np.asarray(taxa[fine], np.int64)
            coarse_ids = np.asarray(taxa[coarse], np.int64)
            m = usable[fine] & usable[coarse]
            if not m.any():
                continue
            uniq = np.unique(fine_ids[m])
            anc = np.array([tree.ancestor_at(t, rank_of_key(coarse)) or 0 for t in uniq.tolist()], np.int64)
            expected = anc[np.searchsorted(uniq, fine_ids[m])]
            bad = expected != coarse_ids[m]
            if not bad.any():
                continue
            pos = np.flatnonzero(m)[bad]
            first = int(pos[0])
            exp = int(expected[bad][0])
            exp_text = (
                f"its {coarse} ancestor is {exp}" if exp else f"it has no {rank_name(rank_of_key(coarse))} ancestor"
            )
            msg = (
                f"{coarse} id {int(coarse_ids[first])} is not an ancestor of {fine} id {int(fine_ids[first])}"
                f" in {tree_name} ({exp_text})"
            )
            out.append(Inconsistency("ancestor", f"{coarse}/{fine}", int(file_rows[first]), len(pos), msg))
    return out
