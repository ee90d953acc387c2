#!/usr/bin/env python3
"""Derive the two small demo datasets committed under ``patchctl/demo/data/``.

Run once, by hand, on a machine with the Debian packages ``wordnet-base`` and
``fortunes`` installed::

    python scripts/make_data.py            # writes patchctl/demo/data/
    python scripts/make_data.py --check    # rebuild in memory, compare with the files

Nothing at run time needs those packages: only the files written here.

Task ``wordnet`` (A): the gloss of a WordNet 3.0 noun synset -> its lexicographer
file (animal, artifact, food, location, person, plant).
Task ``fortunes`` (B): a fortune-cookie text -> the fortune file it came from
(computers, food, law, politics, science, sports).

Output is a pure function of the source files and the seed: every choice is made
with ``random.Random`` seeded from (seed, task, class), on inputs in file order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

SEED = 20240601
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_LICENSE = Path("/usr/share/doc/wordnet-base/copyright")
FORTUNES_LICENSE = Path("/usr/share/doc/fortunes/copyright")
OUT_DIR = Path(__file__).resolve().parent.parent / "patchctl" / "demo" / "data"

SPLITS = ("train", "validation", "test")

# Lexicographer file numbers, checked against lexnames(5WN) of WordNet 3.0:
# 05 noun.animal, 06 noun.artifact, 13 noun.food, 15 noun.location,
# 18 noun.person, 20 noun.plant.
WORDNET_CLASSES: list[tuple[str, str, str]] = [
    # (label name, lex_filenum, class prompt)
    ("animal", "05", "a kind of animal"),
    ("artifact", "06", "a man-made object"),
    ("food", "13", "a kind of food or drink"),
    ("location", "15", "a place or location"),
    ("person", "18", "a kind of person"),
    ("plant", "20", "a kind of plant"),
]
WORDNET_PER_CLASS = {"train": 300, "validation": 100, "test": 150}
GLOSS_MAX_CHARS = 300

# Control task (general ability, no training data): WordNet verb glosses ->
# 29 verb.body, 32 verb.communication, 34 verb.consumption, 37 verb.emotion,
# 38 verb.motion, 39 verb.perception. Used as the base's control suite: a merge
# of the two task patches should not lose what the base could already do.
VERB_CLASSES: list[tuple[str, str, str]] = [
    ("body", "29", "something done with the body"),
    ("communication", "32", "saying or telling something"),
    ("consumption", "34", "eating or drinking"),
    ("emotion", "37", "feeling an emotion"),
    ("motion", "38", "moving from place to place"),
    ("perception", "39", "seeing, hearing or sensing"),
]
VERB_PER_CLASS = {"train": 0, "validation": 20, "test": 50}

FORTUNE_CLASSES: list[tuple[str, str]] = [
    # (label name == fortune file, class prompt)
    ("computers", "a joke about computers"),
    ("food", "a saying about food"),
    ("law", "a saying about law and lawyers"),
    ("politics", "a joke about politics"),
    ("science", "a saying about science"),
    ("sports", "a joke about sports"),
]
FORTUNE_PER_CLASS = {"train": 90, "validation": 12, "test": 45}
FORTUNE_MAX_CHARS = 400

_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline: "X\bX", "_\bX"


class DataError(RuntimeError):
    """A source file is missing or yields too few examples."""


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, at a word boundary."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip() + "..."


def read_wordnet(wordnet_dir: Path = WORDNET_DIR, pos: str = "noun") -> dict[str, list[str]]:
    """Glosses of ``pos`` synsets (noun, verb), grouped by lex_filenum, in file order."""
    path = wordnet_dir / f"data.{pos}"
    if not path.is_file():
        raise DataError(f"{path} not found (install the Debian package wordnet-base)")
    by_lex: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # license header
                continue
            head, sep, gloss = line.partition("|")
            if not sep:
                continue
            fields = head.split()
            # synset_offset lex_filenum ss_type ...
            text = " ".join(gloss.split())
            if text:
                by_lex.setdefault(fields[1], []).append(_truncate(text, GLOSS_MAX_CHARS))
    return by_lex


def read_fortunes(topic: str, fortunes_dir: Path = FORTUNES_DIR) -> list[str]:
    """The fortunes of one file, cleaned, in file order."""
    path = fortunes_dir / topic
    if not path.is_file():
        raise DataError(f"{path} not found (install the Debian package fortunes)")
    raw = path.read_text(encoding="utf-8")
    out = []
    for item in re.split(r"^%[ \t]*$", raw, flags=re.M):
        item = _OVERSTRIKE.sub("", item)
        text = " ".join(item.split())
        if text:
            out.append(_truncate(text, FORTUNE_MAX_CHARS))
    return out


def _drop_ambiguous(pools: dict[str, list[str]]) -> dict[str, list[str]]:
    """Deduplicate within each class; drop texts found in more than one class."""
    owners: dict[str, set[str]] = {}
    for name, texts in pools.items():
        for t in texts:
            owners.setdefault(t, set()).add(name)
    out = {}
    for name, texts in pools.items():
        seen: set[str] = set()
        kept = []
        for t in texts:
            if t not in seen and len(owners[t]) == 1:
                seen.add(t)
                kept.append(t)
        out[name] = kept
    return out


def _split(
    task: str,
    label_names: list[str],
    pools: dict[str, list[str]],
    per_class: dict[str, int],
    seed: int,
) -> dict[str, list[dict]]:
    """Stratified, disjoint, shuffled splits as lists of {"text", "label"}."""
    need = sum(per_class.values())
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for label, name in enumerate(label_names):
        pool = pools[name]
        if len(pool) < need:
            raise DataError(
                f"task {task}: class {name!r} has {len(pool)} usable texts, needs {need}"
            )
        rng = random.Random(f"{seed}/{task}/{name}")
        chosen = rng.sample(pool, need)
        start = 0
        for s in SPLITS:
            n = per_class[s]
            splits[s].extend({"text": t, "label": label} for t in chosen[start : start + n])
            start += n
    for s in SPLITS:
        random.Random(f"{seed}/{task}/shuffle/{s}").shuffle(splits[s])
    return splits


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def build(
    seed: int = SEED,
    wordnet_dir: Path = WORDNET_DIR,
    fortunes_dir: Path = FORTUNES_DIR,
) -> dict[str, str]:
    """Build every data file in memory: ``{file name: text content}``.

    Deterministic: the same sources and seed give byte-identical output.
    Raises ``DataError`` if a source is missing or a class has too few texts.
    """
    files: dict[str, str] = {}
    meta: dict[str, dict] = {}

    # Task A: WordNet noun glosses -> lexicographer file.
    by_lex = read_wordnet(wordnet_dir)
    wn_names = [n for n, _, _ in WORDNET_CLASSES]
    wn_pools = _drop_ambiguous({n: by_lex.get(lex, []) for n, lex, _ in WORDNET_CLASSES})
    wn_splits = _split("wordnet", wn_names, wn_pools, WORDNET_PER_CLASS, seed)

    # Task B: fortunes -> fortune file.
    fo_names = [n for n, _ in FORTUNE_CLASSES]
    fo_pools = _drop_ambiguous({n: read_fortunes(n, fortunes_dir) for n in fo_names})
    fo_splits = _split("fortunes", fo_names, fo_pools, FORTUNE_PER_CLASS, seed)

    # Control: WordNet verb glosses -> lexicographer file (no train split).
    by_lex_v = read_wordnet(wordnet_dir, "verb")
    vb_names = [n for n, _, _ in VERB_CLASSES]
    vb_pools = _drop_ambiguous({n: by_lex_v.get(lex, []) for n, lex, _ in VERB_CLASSES})
    vb_splits = _split("verbs", vb_names, vb_pools, VERB_PER_CLASS, seed)

    specs = [
        (
            "wordnet",
            "WordNet 3.0 noun gloss -> lexicographer file (noun.<label>)",
            wn_names,
            [p for _, _, p in WORDNET_CLASSES],
            wn_splits,
            WORDNET_PER_CLASS,
        ),
        (
            "fortunes",
            "fortune(6) text -> fortune file it comes from",
            fo_names,
            [p for _, p in FORTUNE_CLASSES],
            fo_splits,
            FORTUNE_PER_CLASS,
        ),
        (
            "verbs",
            "WordNet 3.0 verb gloss -> lexicographer file (verb.<label>); control task, no train split",
            vb_names,
            [p for _, _, p in VERB_CLASSES],
            vb_splits,
            VERB_PER_CLASS,
        ),
    ]
    for name, description, label_names, prompts, splits, per_class in specs:
        # Disjointness across splits is guaranteed by construction; assert it anyway.
        seen: set[str] = set()
        for s in SPLITS:
            texts = {r["text"] for r in splits[s]}
            if len(texts) != len(splits[s]) or texts & seen:
                raise DataError(f"task {name}: split {s} overlaps or has duplicates")
            seen |= texts
        file_names = {s: f"{name}_{s}.jsonl" for s in SPLITS}
        for s in SPLITS:
            files[file_names[s]] = _jsonl(splits[s])
        meta[name] = {
            "name": name,
            "description": description,
            "label_names": label_names,
            "prompts": prompts,
            "files": file_names,
            "counts": {s: len(splits[s]) for s in SPLITS},
            "per_class": dict(per_class),
            "sha256": {
                s: hashlib.sha256(files[file_names[s]].encode()).hexdigest() for s in SPLITS
            },
        }
    files["tasks.json"] = (
        json.dumps(
            {"made_by": "scripts/make_data.py", "seed": seed, "tasks": meta},
            indent=2,
            ensure_ascii=False,
        )
        + "\n"
    )
    return files


def licenses(
    wordnet_license: Path = WORDNET_LICENSE, fortunes_license: Path = FORTUNES_LICENSE
) -> str:
    """LICENSES.md: where the data came from and the upstream notices, verbatim."""
    for p in (wordnet_license, fortunes_license):
        if not p.is_file():
            raise DataError(f"{p} not found")
    return (
        "# Data licenses\n\n"
        "The files in this folder were made by `scripts/make_data.py` (seed "
        f"{SEED}) from the Debian packages `wordnet-base` (WordNet 3.0, "
        "`/usr/share/wordnet/data.noun`) and `fortunes` "
        "(`/usr/share/games/fortunes/{computers,food,law,politics,science,sports}`). "
        "They hold small subsets: WordNet noun glosses labelled with their "
        "lexicographer file, and fortune texts labelled with their fortune file.\n\n"
        "## WordNet 3.0\n\n"
        f"Verbatim from `{wordnet_license}`:\n\n"
        "```text\n" + wordnet_license.read_text(encoding="utf-8").rstrip() + "\n```\n\n"
        "## fortunes (fortune-mod)\n\n"
        "The fortune files are distributed under the BSD license below. "
        f"Verbatim from `{fortunes_license}`:\n\n"
        "```text\n" + fortunes_license.read_text(encoding="utf-8").rstrip() + "\n```\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out")
    args = ap.parse_args(argv)
    try:
        files = build()
        files["LICENSES.md"] = licenses()
    except DataError as e:
        print(f"make_data: {e}", file=sys.stderr)
        return 1
    if args.check:
        bad = [
            n
            for n, text in files.items()
            if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text
        ]
        for n in bad:
            print(f"differs: {args.out / n}", file=sys.stderr)
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for n, text in sorted(files.items()):
        (args.out / n).write_text(text, encoding="utf-8")
        print(f"wrote {args.out / n} ({len(text.encode()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
