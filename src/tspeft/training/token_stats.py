"""Which tokens does the gate keep? Kept fraction per layer by token kind, by position, and by vocabulary item.

Measured by `train()` on the eval set of a ts-* run (token_stats.json); the report (`tspeft.analysis`) reads it.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Iterable

import torch

from ..core.model import TSPeftModel

STOP_WORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now
of off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with you your yours yourself yourselves""".split())
KINDS = ("special", "punctuation", "stop word", "content")
POSITION_BUCKETS = ((0, 1), (1, 4), (4, 16), (16, 64), (64, 10**9))
_INT = re.compile(r"\d+")


def layer_index(name: str) -> int:
    """First integer in the module name, or -1 when there is none."""
    m = _INT.search(str(name))
    return int(m.group()) if m else -1


def token_kind(token: str, special_tokens: set[str]) -> str:
    if token in special_tokens:
        return "special"
    word = token.lstrip("Ġ▁#").lower()  # BPE/SentencePiece/WordPiece word-start and continuation marks
    if word and all(ch in string.punctuation for ch in word):
        return "punctuation"
    return "stop word" if word in STOP_WORDS else "content"


def _bucket(position: int) -> str:
    for low, high in POSITION_BUCKETS:
        if low <= position < high:
            return f"{low}" if high == low + 1 else f"{low}-{high - 1}" if high < 10**9 else f"{low}+"
    raise AssertionError(position)


@torch.no_grad()
def token_statistics(model: TSPeftModel, tokenizer, batches: Iterable[dict], top: int = 15) -> dict:
    """Kept fractions per layer (mean over that layer's modules) grouped by token kind, position and token."""
    special = set(tokenizer.all_special_tokens)
    by_kind = defaultdict(lambda: [0.0, 0])
    by_position = defaultdict(lambda: [0.0, 0])
    by_token = defaultdict(lambda: [0.0, 0])
    for gate in model.gates.values():
        gate.record_keep_mask = True
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            model(**inputs)
            ids, real = inputs["input_ids"].cpu(), inputs["attention_mask"].cpu().bool()
            per_layer = defaultdict(list)
            for name, gate in model.gates.items():
                if gate.last_keep_mask is not None and gate.last_keep_mask.shape == ids.shape:
                    per_layer[layer_index(name)].append(gate.last_keep_mask.float())
            layer_kept = {layer: torch.stack(masks).mean(0) for layer, masks in per_layer.items()}
            for row in range(ids.shape[0]):
                positions = real[row].nonzero().flatten().tolist()
                tokens = tokenizer.convert_ids_to_tokens(ids[row, positions].tolist())
                for offset, (position, token) in enumerate(zip(positions, tokens)):
                    kind, bucket = token_kind(token, special), _bucket(offset)
                    for layer, kept in layer_kept.items():
                        value = float(kept[row, position])
                        for table, key in ((by_kind, (layer, kind)), (by_position, (layer, bucket))):
                            table[key][0] += value
                            table[key][1] += 1
                    overall = sum(float(k[row, position]) for k in layer_kept.values()) / max(len(layer_kept), 1)
                    by_token[token][0] += overall
                    by_token[token][1] += 1
    finally:
        for gate in model.gates.values():
            gate.record_keep_mask, gate.last_keep_mask = False, None

    def table(stats):
        out = defaultdict(dict)
        for (layer, key), (kept, count) in sorted(stats.items()):
            out[str(layer)][key] = {"kept_fraction": kept / count, "tokens": count}
        return dict(out)

    frequent = {t: kept / n for t, (kept, n) in by_token.items() if n >= 3}
    ranked = sorted(frequent, key=lambda t: (-frequent[t], t))
    return {
        "by_kind": table(by_kind),
        "by_position": table(by_position),
        "most_kept_tokens": [[t, frequent[t], by_token[t][1]] for t in ranked[:top]],
        "least_kept_tokens": [[t, frequent[t], by_token[t][1]] for t in ranked[::-1][:top]],
        "note": "kept fraction = share of a layer's gated modules that applied their update to the token; "
                "tokens listed only if seen at least 3 times",
    }
