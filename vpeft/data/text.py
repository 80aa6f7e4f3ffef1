"""Real text for offline language-model tasks, from Debian packages, with splits fixed by a seed.

Three readers, each returning ``{"train": [...], "val": [...], "test": [...]}`` of :class:`TextExample`:

``wordnet_supersenses``  WordNet 3.0 definitions (glosses) labelled by their lexicographer file, the 16 largest noun
                         supersenses (``noun.artifact``, ``noun.person``...), balanced: 200 / 50 / 250 per class.
``fortune_topics``       short texts from ``fortune``'s eight largest topical files (people, computers, politics,
                         work, science, men-women, platitudes, art), balanced: 250 / 50 / 150 per class.
``wordnet_lemmas``       an irregular word form and its base form (``geese`` -> ``goose``, ``ran`` -> ``run``) from
                         ``noun.exc``, ``verb.exc`` and ``adj.exc``; a form with several bases accepts each of them.

``read_jsonl`` reads a user's own ``<root>/<split>.jsonl`` files (``{"text", "label"}`` or ``{"prompt", "answer"}``
lines, as a ``transformers`` Trainer or TRL user brings them) into the same examples; ``text_splits`` is the one
entry the text tasks call for either.

Sizes are chosen so that on each test split a 3-point accuracy difference between two models is beyond noise
(WordNet: 4,000 test items, standard error 0.7 points at 70%; fortunes: 1,200, 1.3 points; lemmas: 1,500).
Packages: ``wordnet-base`` (``/usr/share/wordnet``) and ``fortunes`` (``/usr/share/games/fortunes``).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpeft.data.system import SYSTEM_DATA, system_data
from vpeft.errors import ConfigError, DataError, MissingFileError

SPLITS = ("train", "val", "test")

# WordNet 3.0's lexicographer files (lexnames(5WN)) by number; the data files give the number.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()

# The 16 largest noun supersenses of WordNet 3.0 (by synset count, 11,587 down to 1,275): nouns only, so the part of
# speech gives no hint. The classes, in label order.
SUPERSENSES = (
    "noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act", "noun.communication", "noun.state",
    "noun.location", "noun.attribute", "noun.substance", "noun.cognition", "noun.group", "noun.food", "noun.body",
    "noun.object", "noun.quantity",
)  # fmt: skip

# fortune's eight largest files whose name is a topic (definitions, cookie, songs-poems, miscellaneous, zippy and
# knghtbrd are left out: they are a format, a source or a mixture, not a subject).
FORTUNE_TOPICS = ("people", "computers", "politics", "work", "science", "men-women", "platitudes", "art")

_OVERSTRIKE = re.compile(r".\x08")  # fortune files bold or underline with "c\bc" sequences


@dataclass(frozen=True)
class TextExample:
    """One item: ``text`` and its class ``label`` (classification), or ``text`` and its ``answers`` (generation)."""

    text: str
    label: int = -1
    answers: tuple[str, ...] = field(default=())


def _balanced_splits(
    by_class: list[list[str]], per_class: dict[str, int], seed: int, source: str
) -> dict[str, list[TextExample]]:
    """Shuffle each class with ``seed`` and cut it into the splits, so every split is balanced and disjoint."""
    need = sum(per_class.values())
    rs = np.random.RandomState(seed)
    out: dict[str, list[TextExample]] = {split: [] for split in per_class}
    for label, texts in enumerate(by_class):
        if len(texts) < need:
            raise DataError(
                f"{source}: class {label} has {len(texts)} distinct texts, fewer than the {need} its splits need "
                f"({per_class}); lower the split sizes."
            )
        order = rs.permutation(len(texts))
        start = 0
        for split, count in per_class.items():
            out[split] += [TextExample(texts[i], label) for i in order[start : start + count]]
            start += count
    for split in out:  # classes interleaved, in an order the seed fixes
        out[split] = [out[split][i] for i in rs.permutation(len(out[split]))]
    return out


def _check_sizes(per_class: dict[str, int]) -> dict[str, int]:
    if set(per_class) != set(SPLITS) or any(not isinstance(v, int) or v < 1 for v in per_class.values()):
        raise ConfigError(f"split sizes must give a positive integer for each of {SPLITS}, got {per_class}.")
    return {split: per_class[split] for split in SPLITS}


def wordnet_supersenses(
    seed: int = 0, per_class: dict[str, int] | None = None, root: str | Path | None = None
) -> dict[str, list[TextExample]]:
    """WordNet definitions labelled by supersense (the 16 classes of ``SUPERSENSES``).

    A definition is the gloss of a noun synset up to its first example sentence (``; "..."``); synsets sharing one
    definition text keep it once, under the first supersense met, so no text appears in two splits.
    """
    sizes = _check_sizes(per_class or {"train": 200, "val": 50, "test": 250})
    root = Path(root) if root is not None else system_data("wordnet-base")
    path = root / "data.noun"
    if not path.is_file():
        raise DataError(f"{path} does not exist: the WordNet root must hold data.noun (package wordnet-base).")
    return _balanced_splits(_supersense_glosses(str(path)), sizes, seed, str(path))


@functools.lru_cache(maxsize=2)
def _supersense_glosses(path: str) -> list[list[str]]:
    """Definitions per class of ``SUPERSENSES`` (parsing data.noun takes seconds: done once per process)."""
    classes = {name: i for i, name in enumerate(SUPERSENSES)}
    by_class: list[list[str]] = [[] for _ in SUPERSENSES]
    seen: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:  # the licence header
            continue
        fields, gloss = line.split("|", 1)
        label = classes.get(LEXNAMES[int(fields.split()[1])])
        definition = gloss.split('; "', 1)[0].strip().rstrip(";").strip()
        if label is None or not definition or definition in seen:
            continue
        seen.add(definition)
        by_class[label].append(definition)
    return by_class


def _fortunes(path: Path) -> list[str]:
    """The texts of one fortune file, overstrikes removed, attribution lines ("-- Author") dropped, one line each."""
    texts = []
    for chunk in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
        lines = [ln for ln in _OVERSTRIKE.sub("", chunk).splitlines() if not ln.strip().startswith("--")]
        text = " ".join(" ".join(lines).split())
        if text and text != "%":
            texts.append(text)
    return texts


def fortune_topics(
    seed: int = 0, per_class: dict[str, int] | None = None, root: str | Path | None = None
) -> dict[str, list[TextExample]]:
    """Short texts labelled by the fortune file they come from (the 8 classes of ``FORTUNE_TOPICS``).

    A text found in two files is dropped from both: its label would be a coin toss.
    """
    sizes = _check_sizes(per_class or {"train": 250, "val": 50, "test": 150})
    root = Path(root) if root is not None else system_data("fortunes")
    per_file = []
    for topic in FORTUNE_TOPICS:
        path = root / topic
        if not path.is_file():
            raise DataError(f"{path} does not exist: the fortunes root must hold the files {FORTUNE_TOPICS}.")
        per_file.append(list(dict.fromkeys(_fortunes(path))))
    counts: dict[str, int] = {}
    for texts in per_file:
        for text in texts:
            counts[text] = counts.get(text, 0) + 1
    by_class = [[t for t in texts if counts[t] == 1] for texts in per_file]
    return _balanced_splits(by_class, sizes, seed, str(root))


def wordnet_lemmas(
    seed: int = 0, sizes: dict[str, int] | None = None, root: str | Path | None = None
) -> dict[str, list[TextExample]]:
    """Irregular forms (``text``) with their base forms (``answers``), single words only, shuffled by ``seed``.

    Default sizes: 2,500 / 500 / 1,500 of the 5,817 single-word forms (nouns, verbs and adjectives together).
    """
    sizes = _check_sizes(sizes or {"train": 2500, "val": 500, "test": 1500})
    root = Path(root) if root is not None else system_data("wordnet-base")
    bases: dict[str, list[str]] = {}
    for pos in ("noun", "verb", "adj"):
        path = root / f"{pos}.exc"
        if not path.is_file():
            raise DataError(f"{path} does not exist: the WordNet root must hold noun.exc, verb.exc and adj.exc.")
        for line in path.read_text(encoding="utf-8").splitlines():
            form, *base = line.split()
            if "_" in form or not base:
                continue
            known = bases.setdefault(form, [])
            known += [b for b in base if "_" not in b and b not in known]
    items = [TextExample(form, answers=tuple(b)) for form, b in sorted(bases.items()) if b]
    if sum(sizes.values()) > len(items):
        raise DataError(f"{root}: {len(items)} irregular forms, fewer than the {sum(sizes.values())} asked ({sizes}).")
    order = np.random.RandomState(seed).permutation(len(items))
    out, start = {}, 0
    for split, count in sizes.items():
        out[split] = [items[i] for i in order[start : start + count]]
        start += count
    return out


JSONL_FIELDS = {"label": ("text", "label"), "answer": ("prompt", "answer")}


def read_jsonl(
    root: str | Path, splits: tuple[str, ...], target: str, classes: list[str] | None = None
) -> tuple[dict[str, list[TextExample]], list[str]]:
    """``<root>/<split>.jsonl`` for each split: ``{"text", "label"}`` lines (``target="label"``) or ``{"prompt",
    "answer"}`` lines (``target="answer"``; ``answer`` a string or a list of accepted strings).

    Labels are class names (strings or integers); the label set is ``classes`` when given, else the sorted labels of
    the first split (train). Every bad line of every file is named at once (file and line), before any training.
    """
    text_key, target_key = JSONL_FIELDS[target]
    out: dict[str, list[TextExample]] = {}
    rows: dict[str, list[tuple[int, str, object]]] = {}
    problems: list[str] = []
    for split in splits:
        path = Path(root) / f"{split}.jsonl"
        if not path.is_file():
            raise MissingFileError(
                f"{path} does not exist: data.name jsonl reads <data.root>/<split>.jsonl, one JSON object per line "
                f"with keys {text_key!r} and {target_key!r}."
            )
        rows[split] = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}, line {number}: not JSON ({err.msg})")
                continue
            if not isinstance(item, dict) or text_key not in item or target_key not in item:
                problems.append(f"{path}, line {number}: expected an object with keys {text_key!r} and {target_key!r}")
                continue
            text, value = item[text_key], item[target_key]
            if not isinstance(text, str) or not text.strip():
                problems.append(f"{path}, line {number}: {text_key!r} is empty or not a string")
            elif target == "answer":
                answers = [value] if isinstance(value, str) else value
                if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                    problems.append(f"{path}, line {number}: 'answer' must be a string or a list of strings")
                elif any(not a.strip() for a in answers):
                    problems.append(f"{path}, line {number}: empty answer (there is nothing to train or match)")
                else:
                    rows[split].append((number, text, tuple(answers)))
            elif isinstance(value, str | int) and not isinstance(value, bool):
                rows[split].append((number, text, str(value)))
            else:
                problems.append(f"{path}, line {number}: 'label' must be a class name (string or integer)")
        if not rows[split] and not problems:
            problems.append(f"{path}: no examples")
    if target == "label":
        source = "data.options.classes"
        if classes is None:
            first = splits[0]
            numbers_first = lambda c: (0, int(c), "") if c.isdigit() else (1, 0, c)  # noqa: E731  (2 before 10)
            classes = sorted({label for _, _, label in rows[first]}, key=numbers_first)
            source = f"the labels of {Path(root) / f'{first}.jsonl'}"
        index = {str(c): i for i, c in enumerate(classes)}
        for split in splits:
            for number, _, label in rows[split]:
                if label not in index:
                    problems.append(f"{Path(root) / f'{split}.jsonl'}, line {number}: label {label!r} is not in the "
                                    f"label set ({source}: {list(classes)})")  # fmt: skip
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DataError(f"{len(problems)} bad lines in the jsonl data{more}:\n  " + "\n  ".join(problems[:20]))
    for split in splits:
        if target == "label":
            out[split] = [TextExample(text, label=index[label]) for _, text, label in rows[split]]
        else:
            out[split] = [TextExample(text, answers=answers) for _, text, answers in rows[split]]
    return out, [str(c) for c in classes or []]


def text_splits(
    name: str, root: str | Path | None, splits: tuple[str, ...], target: str, **options
) -> tuple[dict[str, list[TextExample]], list[str]]:
    """The examples of ``splits`` (train first) and the class names (empty for generation) of the text data ``name``:
    ``jsonl`` (a user's files under ``root``; option ``classes``) or a reader of ``TEXT_SOURCES`` (its options:
    ``seed``, split sizes)."""
    if name == "jsonl":
        if root is None:
            raise ConfigError("data.name jsonl needs data.root: the folder holding train.jsonl, val.jsonl, test.jsonl.")
        return read_jsonl(root, splits, target, **options)
    reader = TEXT_SOURCES.get(name)
    if reader is None:
        raise ConfigError(f"data.name {name!r} is not text data; use jsonl or one of {sorted(TEXT_SOURCES)}.")
    wanted = "label" if name in CLASS_NAMES else "answer"
    if wanted != target:
        kind = "classification" if wanted == "label" else "prompt -> answer"
        raise ConfigError(f"data.name {name!r} is {kind} data; it does not fit this task (task: "
                          f"{'text_classification' if wanted == 'label' else 'causal_lm'}).")  # fmt: skip
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ConfigError(f"{name} has the splits {SPLITS}; the config asks for {unknown} (data.*_split).")
    if "classes" in options:
        raise ConfigError(f"data.options.classes is for jsonl data; {name} has its own classes.")
    data = reader(root=root, **options)
    return {s: data[s] for s in splits}, list(CLASS_NAMES.get(name, ()))


TEXT_SOURCES = {"wordnet_supersenses": wordnet_supersenses, "fortune_topics": fortune_topics,
                "wordnet_lemmas": wordnet_lemmas}  # fmt: skip
CLASS_NAMES = {"wordnet_supersenses": SUPERSENSES, "fortune_topics": FORTUNE_TOPICS}
SOURCE_OPTIONS = {"jsonl": ("classes",), "wordnet_supersenses": ("seed", "per_class"),
                  "fortune_topics": ("seed", "per_class"), "wordnet_lemmas": ("seed", "sizes")}  # fmt: skip
__all__ = ["CLASS_NAMES", "SOURCE_OPTIONS", "SYSTEM_DATA", "TEXT_SOURCES", "TextExample", "fortune_topics",
           "read_jsonl", "text_splits", "wordnet_lemmas", "wordnet_supersenses"]  # fmt: skip
