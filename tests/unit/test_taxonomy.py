"""TaxonomyTree from taxonomy.json and inferred from labels: queries, conflicts, consistency, matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TAXA_EDGES, taxonomy_doc, write_tiny_dataset
from typus import RankLevel

from linnaeus.config.resolve_data import data_spec
from linnaeus.data.prepare import prepare_data
from linnaeus.data.taxonomy import (
    ClassMap,
    TaxonomyTree,
    keys_coarse_to_fine,
    label_inconsistencies,
    parse_rank,
    rank_of_key,
)
from linnaeus.errors import ConfigError, DataError


@pytest.fixture
def tree(tiny_dataset):
    return TaxonomyTree.from_json(tiny_dataset.taxonomy_path)


def test_queries(tree):
    assert len(tree) == 12 and tree.name_of(13) == "Bombus terrestris" and tree.rank_of(101) == RankLevel.L20
    assert tree.parent_of(13) == 101 and tree.parent_of(1000) is None
    assert tree.ancestors(13) == [101, 1000] and tree.ancestors(13, include_self=True) == [13, 101, 1000]
    assert sorted(tree.descendants(1000)) == [11, 12, 13, 14, 100, 101]
    assert tree.parent_of(17) == 1001  # skip-level: species directly under its family
    assert tree.ancestor_at(17, RankLevel.L20) is None and tree.ancestor_at(17, RankLevel.L30) == 1001
    assert tree.lca(11, 13) == 1000 and tree.lca(11, 15) is None
    assert tree.distance(11, 12) == 2 and tree.distance(11, 13) == 4 and tree.distance(15, 17) == 3
    assert tree.distance(11, 101) == 3 and tree.distance(11, 11) == 0 and tree.distance(11, 15) == float("inf")
    t = tree.taxon(13)
    assert (t.taxon_id, t.scientific_name, t.rank_level, t.parent_id) == (13, "Bombus terrestris", RankLevel.L10, 101)
    assert t.ancestry == [1000, 101, 13]


def test_ids_as_numeric_strings_and_rank_spellings(tmp_path):
    doc = {
        "nodes": [
            {"id": "7", "rank": "Subfamily", "name": "Bombinae"},
            {"id": "70", "rank": "L20", "name": "Bombus"},
            {"id": 700, "rank": 10, "name": "B. terrestris"},
        ],
        "edges": [{"source": "7", "target": "70"}, {"source": 70, "target": "700"}],
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(doc))
    t = TaxonomyTree.from_json(path)
    assert t.rank_of(7) == RankLevel.L27 and t.ancestors(700) == [70, 7]
    assert parse_rank("kingdom") == RankLevel.L70 and parse_rank("zoosection") == RankLevel.L34
    assert rank_of_key("taxa_L335") == RankLevel.L335
    # half level 33.5 sorts between superfamily (33) and zoosection (34)
    assert keys_coarse_to_fine(["taxa_L10", "taxa_L34", "taxa_L335", "taxa_L33"]) == [
        "taxa_L34",
        "taxa_L335",
        "taxa_L33",
        "taxa_L10",
    ]
    with pytest.raises(ConfigError, match="'taxa_L21' is not a polli-typus rank level"):
        rank_of_key("taxa_L21")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["nodes"].append({"id": 5, "rank": "specie-ish"}), "has rank 'specie-ish'"),
        (lambda d: d["nodes"].append({"id": "sp_5", "rank": "species"}), "expected an integer taxon id"),
        (lambda d: d["edges"].append({"source": 9999, "target": 11}), "refers to taxon 9999, which is not in nodes"),
        (lambda d: d["edges"].append({"source": 101, "target": 11}), "taxon 11 has two parents (100 and 101"),
        (lambda d: d["edges"].append({"source": 11, "target": 1000}), "a parent must be of a coarser rank"),
        (lambda d: d["nodes"].append({"id": 11, "rank": "species"}), "node id 11 appears more than once"),
        (lambda d: d.pop("edges"), 'expected {"nodes": [...], "edges": [...]}'),
    ],
)
def test_taxonomy_json_errors(tmp_path, mutate, expected):
    doc = taxonomy_doc()
    mutate(doc)
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        TaxonomyTree.from_json(path)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_invalid_json(tmp_path):
    path = tmp_path / "taxonomy.json"
    path.write_text("{nodes: [")
    with pytest.raises(DataError, match="not valid JSON"):
        TaxonomyTree.from_json(path)


def test_inferred_tree_matches_json(tiny_dataset):
    inferred, conflicts = TaxonomyTree.infer(tiny_dataset.taxa)
    assert conflicts == []
    assert inferred.parent == {t: s for s, t in TAXA_EDGES}  # incl. the skip link 17 -> 1001
    assert inferred.rank_of(17) == RankLevel.L10 and inferred.name_of(17) is None


def test_infer_with_ids_beyond_32_bits():
    big = 5_000_000_000
    taxa = {"taxa_L10": np.array([big + 1, big + 2, big + 1, 3]), "taxa_L20": np.array([big, big, 7, 8])}
    tree, conflicts = TaxonomyTree.infer(taxa)
    assert tree.parent == {big + 2: big, 3: 8}
    assert conflicts[0].candidates == [("taxa_L20", 7, 1), ("taxa_L20", big, 1)]  # most rows first, then by id


def test_round_trip(tree, tmp_path):
    tree.save(tmp_path / "t.json")
    again = TaxonomyTree.from_json(tmp_path / "t.json")
    assert again.parent == tree.parent and again.nodes == tree.nodes


def test_species_under_two_genera_is_reported_never_resolved(tmp_path):
    ds = write_tiny_dataset(tmp_path / "d", images=False, taxonomy=False)
    taxa = {k: v.copy() for k, v in ds.taxa.items()}
    taxa["taxa_L20"][[0, 1]] = 101  # two Apis mellifera (11) rows now say Bombus; one row still says Apis
    tree, conflicts = TaxonomyTree.infer(taxa, "labels.h5")
    assert len(conflicts) == 1
    c = conflicts[0]
    assert (c.key, c.taxon_id) == ("taxa_L10", 11)
    assert c.candidates == [("taxa_L20", 101, 2), ("taxa_L20", 100, 1)]
    assert c.line("labels.h5") == (
        "labels.h5: taxa_L10 id 11 has 2 different parents: taxa_L20 id 101 (2 rows), taxa_L20 id 100 (1 rows)"
    )
    assert tree.parent_of(11) is None  # no silent pick


def test_conflict_makes_preparation_fail(tmp_path):
    import h5py

    ds = write_tiny_dataset(tmp_path / "d", images=False, taxonomy=False)
    with h5py.File(ds.labels_path, "a") as f:
        f["taxa_L20"][0] = 101
    with pytest.raises(DataError) as err:
        prepare_data(data_spec(ds.config()))
    msg = str(err.value)
    assert "taxa_L10 id 11 has 2 different parents" in msg and "DATA.TAXONOMY_PATH" in msg


def test_id_used_at_two_ranks_is_a_conflict():
    taxa = {"taxa_L10": np.array([5, 6]), "taxa_L20": np.array([5, 7])}
    _, conflicts = TaxonomyTree.infer(taxa)
    assert [c.kind for c in conflicts] == ["rank"]
    assert "taxon id 5 is used at several ranks" in conflicts[0].line("x")


def test_labels_inconsistent_with_taxonomy_json(tree, tiny_dataset):
    taxa = {k: v.copy() for k, v in tiny_dataset.taxa.items()}
    taxa["taxa_L20"][4] = 102  # Apis cerana (12) labelled with genus Eristalis
    taxa["taxa_L10"][9] = 999  # an id the taxonomy does not know
    found = label_inconsistencies(tree, taxa, tree_name="taxonomy.json")
    lines = {i.kind: i for i in found}
    assert (
        lines["unknown_id"].row == 9
        and "taxa_L10 id 999 is not a taxon of taxonomy.json" in lines["unknown_id"].message
    )
    anc = lines["ancestor"]
    assert anc.row == 4 and anc.rows == 1
    assert anc.line("labels.h5") == (
        "labels.h5 row 4: taxa_L20 id 102 is not an ancestor of taxa_L10 id 12 in taxonomy.json"
        " (its taxa_L20 ancestor is 100)"
    )


def test_inconsistent_labels_fail_preparation(tiny_dataset):
    import h5py

    with h5py.File(tiny_dataset.labels_path, "a") as f:
        f["taxa_L30"][6] = 1001  # Bombus terrestris (13) in Syrphidae
    with pytest.raises(DataError) as err:
        prepare_data(data_spec(tiny_dataset.config()))
    msg = str(err.value)
    # Reported against the genus (the first rank pair checked) and counted once more against the species.
    assert f"{tiny_dataset.labels_path} row 6: taxa_L30 id 1001 is not an ancestor of taxa_L20 id 101" in msg
    assert "(its taxa_L30 ancestor is 1000) (+1 more problems;" in msg
    # rank missing in the row (genus 0 for species 17) is fine; the wrong rank for an id is not:
    with h5py.File(tiny_dataset.labels_path, "a") as f:
        f["taxa_L30"][6] = 1000
        f["taxa_L20"][6] = 11
    with pytest.raises(DataError, match="taxa_L20 id 11 is a species in"):
        prepare_data(data_spec(tiny_dataset.config()))


def test_matrices_in_class_index_space(tree, tiny_dataset):
    maps = {k: ClassMap.from_ids(k, [v], tree) for k, v in tiny_dataset.taxa.items()}
    assert maps["taxa_L10"].names[0] == "Apis mellifera"
    h = tree.hierarchy_matrix(maps["taxa_L30"], maps["taxa_L10"])
    assert h.shape == (2, 7) and h.dtype == np.float32
    assert h.tolist() == [[1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1]]  # species 17 reaches its family directly
    hg = tree.hierarchy_matrix(maps["taxa_L20"], maps["taxa_L10"])
    assert hg.sum(axis=0).tolist() == [1, 1, 1, 1, 1, 1, 0]  # 17 has no genus
    d = tree.distance_matrix(maps["taxa_L10"].taxon_ids)
    ids = maps["taxa_L10"].taxon_ids.tolist()
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            assert d[i, j] == tree.distance(a, b)


def test_prepared_hierarchy_keys_are_adjacent_ranks_coarse_to_fine(tiny_dataset):
    data = prepare_data(data_spec(tiny_dataset.config("DATA.TASK_KEYS_H5", "[taxa_L10, taxa_L30, taxa_L20]")))
    assert data.task_keys == ["taxa_L10", "taxa_L30", "taxa_L20"]
    hm = data.hierarchy_matrices()
    assert list(hm) == [("taxa_L30", "taxa_L20"), ("taxa_L20", "taxa_L10")]
    assert hm[("taxa_L30", "taxa_L20")].shape == (2, 3)
    dm = data.distance_matrices()
    assert dm["taxa_L20"].tolist() == [[0, 2, np.inf], [2, 0, np.inf], [np.inf, np.inf, 0]]
