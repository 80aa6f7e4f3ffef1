"""The offline text readers: real WordNet and fortune data, balanced seeded splits, labels checked at the source."""

from __future__ import annotations

import gzip
import re
from collections import Counter
from pathlib import Path

import pytest

from vpeft.data.text import (
    FORTUNE_TOPICS,
    LEXNAMES,
    SUPERSENSES,
    fortune_topics,
    wordnet_lemmas,
    wordnet_supersenses,
)
from vpeft.errors import DataError

from ..conftest import require_system_data

SMALL = {"train": 20, "val": 5, "test": 10}


@pytest.fixture(scope="module")
def wordnet() -> Path:
    return require_system_data("wordnet-base")


@pytest.fixture(scope="module")
def fortunes() -> Path:
    return require_system_data("fortunes")


def check_balanced_disjoint(splits, per_class, classes):
    assert {s: len(v) for s, v in splits.items()} == {s: n * classes for s, n in per_class.items()}
    for split, items in splits.items():
        assert set(Counter(e.label for e in items).values()) == {per_class[split]}
    texts = [e.text for items in splits.values() for e in items]
    assert len(set(texts)) == len(texts)


def test_supersenses_are_balanced_disjoint_and_seeded(wordnet):
    splits = wordnet_supersenses(seed=0, per_class=SMALL)
    check_balanced_disjoint(splits, SMALL, len(SUPERSENSES))
    assert splits == wordnet_supersenses(seed=0, per_class=SMALL)
    assert splits["test"] != wordnet_supersenses(seed=1, per_class=SMALL)["test"]


def test_supersense_labels_match_the_synset_lines_and_the_lexnames_page(wordnet):
    """Each definition's label is the lexicographer file of the synset line holding it, named as WordNet's man page
    lexnames(5WN) names that file number (read here independently of the reader's table)."""
    page = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if page.exists():
        table = dict(re.findall(r"^(\d\d)\t(\S+)", gzip.open(page, "rt").read(), flags=re.M))
        assert [table[f"{i:02d}"] for i in range(len(LEXNAMES))] == LEXNAMES
    lines = (wordnet / "data.noun").read_text(errors="replace").splitlines()
    for example in wordnet_supersenses(seed=3, per_class=SMALL)["val"]:
        holders = [ln for ln in lines if f"| {example.text}" in ln]
        assert holders, example.text
        assert SUPERSENSES[example.label] in {LEXNAMES[int(ln.split()[1])] for ln in holders}


def test_fortune_topics_come_from_their_own_file_only(fortunes):
    splits = fortune_topics(seed=0, per_class=SMALL)
    check_balanced_disjoint(splits, SMALL, len(FORTUNE_TOPICS))
    raw = {t: " ".join((fortunes / t).read_text(errors="replace").split()) for t in FORTUNE_TOPICS}
    for example in splits["test"]:
        first_words = " ".join(example.text.split()[:6])
        assert first_words in raw[FORTUNE_TOPICS[example.label]]
        assert "%" not in example.text.split() and "\x08" not in example.text


def test_lemmas_hold_known_irregular_pairs(wordnet):
    splits = wordnet_lemmas(seed=0)
    assert {s: len(v) for s, v in splits.items()} == {"train": 2500, "val": 500, "test": 1500}
    everything = {e.text: e.answers for items in wordnet_lemmas(seed=0, sizes={"train": 5000, "val": 17,
                  "test": 800}).values() for e in items}  # fmt: skip
    assert everything["geese"] == ("goose",) and everything["ran"] == ("run",) and everything["mice"] == ("mouse",)
    assert set(everything["better"]) >= {"good", "well"}  # a form with two bases accepts both
    forms = [e.text for items in splits.values() for e in items]
    assert len(set(forms)) == len(forms) and all("_" not in f for f in forms)


def test_too_large_splits_and_missing_files_are_named(tmp_path, wordnet):
    with pytest.raises(DataError, match="fewer than"):
        wordnet_lemmas(sizes={"train": 6000, "val": 1, "test": 1})
    with pytest.raises(DataError, match="data.noun"):
        wordnet_supersenses(root=tmp_path)
    with pytest.raises(ValueError, match="positive integer"):
        fortune_topics(per_class={"train": 0, "val": 1, "test": 1})
