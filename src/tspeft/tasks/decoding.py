"""Greedy decoding with the KV cache (transformers' `generate`), the gates' kept share per generated token, and
the evaluation of a generation task (exact match, response loss, perplexity, kept fraction).

    prompt ids ──► generate(do_sample=False, use_cache=True) ──► new ids ──► text ──► extract ──► normalise
                                                                                           ══ normalised reference
                        │ each step: one forward of the newest position(s); every gate decides S for them
                        └► KeptShare (a logits processor): share of gated modules with S = 1 at the position
                           whose logits chose the token, per batch row

The share for a generated token is read at the forward that produced its logits (the previous token's
position, or the prompt's last position for the first token). With a TSPeftModel the gates count every
real token that `generate` processes (prompt and generated), so `kept_fraction()` afterwards is the kept
fraction during generation; pad positions of left-padded batches are not counted.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from .generation import IGNORE_INDEX, AnswerExtractor, prompt_ids, reference_text, training_features


def _gates(model) -> dict:
    return getattr(model, "gates", None) or {}


class KeptShare(LogitsProcessor):
    """Records, at every decoding step, the share of gated modules that applied their update at the newest
    position of each batch row (`shares[step][row]`). Turns the gates' mask recording on while it lives."""

    def __init__(self, gates: dict):
        self.gates = list(gates.values())
        self.shares: list[list[float]] = []

    def __enter__(self) -> "KeptShare":
        for gate in self.gates:
            gate.record_keep_mask = True
        return self

    def __exit__(self, *exc) -> None:
        for gate in self.gates:
            gate.record_keep_mask, gate.last_keep_mask = False, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masks = [g.last_keep_mask for g in self.gates if g.last_keep_mask is not None and g.last_keep_mask.dim() == 2]
        if masks:
            newest = torch.stack([m[:, -1] for m in masks]).float()  # modules × rows
            self.shares.append(newest.mean(0).tolist())
        return scores


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
    return pad


def _stop_ids(tokenizer, model) -> list[int]:
    """eos of the tokenizer and of the model's generation config (chat models often stop on an end-of-turn id)."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                    device: torch.device | None = None,
                    streamer: BaseStreamer | None = None, kept: KeptShare | None = None) -> list[list[int]]:
    """Greedy continuations (new ids only, cut after the first stop id) of left-padded prompts, with the KV cache."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    device = device or next(model.parameters()).device
    pad = _pad_id(tokenizer)
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    stops = _stop_ids(tokenizer, model)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad, eos_token_id=stops or None,
                            streamer=streamer, logits_processor=LogitsProcessorList([kept] if kept else []),
                            temperature=None, top_p=None, top_k=None)
    continuations = []
    for row in output[:, width:].tolist():
        cut = next((i for i, token in enumerate(row) if token in stops), None)
        continuations.append(row if cut is None else row[:cut])
    return continuations


@torch.no_grad()
def response_loss(model, tokenizer, examples: list[dict], max_length: int, batch_size: int,
                  device: torch.device) -> float:
    """Mean cross-entropy per response token (teacher forcing; prompt and padding masked)."""
    features = training_features(tokenizer, examples, max_length)
    pad = _pad_id(tokenizer)
    total, count = 0.0, 0
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        width = max(len(f["input_ids"]) for f in chunk)

        def fill(key, value):
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in chunk], device=device)

        labels = fill("labels", IGNORE_INDEX)
        logits = model(input_ids=fill("input_ids", pad), attention_mask=fill("attention_mask", 0)).logits
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(losses)
        count += int((targets != IGNORE_INDEX).sum())
    return total / max(count, 1)


def evaluate_generation(model, tokenizer, examples: list[dict], *, max_length: int, max_new_tokens: int,
                        batch_size: int, device: torch.device, answer_pattern: str | None = None,
                        n_shown: int = 20) -> dict[str, Any]:
    """accuracy (exact match), eval_loss / perplexity of the responses, kept_fraction during generation (gated
    models), and the first `n_shown` predictions."""
    if not examples:
        raise ValueError("no examples to evaluate")
    extractor = AnswerExtractor(answer_pattern)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        loss = response_loss(model, tokenizer, examples, max_length, batch_size, device)
        if hasattr(model, "reset_stats"):
            model.reset_stats()
        prompts = [prompt_ids(tokenizer, ex) for ex in examples]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad little
        texts: list[str] = [""] * len(prompts)
        for begin in range(0, len(order), batch_size):
            chunk = order[begin:begin + batch_size]
            generated = greedy_generate(model, tokenizer, [prompts[i] for i in chunk], max_new_tokens, device)
            for i, ids in zip(chunk, generated):
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
        kept = model.kept_fraction() if _gates(model) else None
    finally:
        model.train(was_training)
    correct = [extractor.matches(text, reference_text(ex)) for text, ex in zip(texts, examples)]
    shown = [{"prompt": _tail(ex), "reference": reference_text(ex), "prediction": text, "correct": ok}
             for ex, text, ok in list(zip(examples, texts, correct))[:n_shown]]
    return {"accuracy": sum(correct) / len(examples), "eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "kept_fraction": kept, "per_module": model.kept_fractions() if _gates(model) else None,
            "eval_seconds": round(time.perf_counter() - start, 3), "predictions": shown}


def _tail(example: dict, chars: int = 200) -> str:
    if "prompt" in example:
        return example["prompt"][-chars:]
    turns = example["messages"]
    return turns[-2]["content"][-chars:] if len(turns) > 1 else ""


class TokenPrinter(BaseStreamer):
    """Streams the generated text to `write` as it is decoded; with `kept`, one line per token: share, token."""

    def __init__(self, tokenizer, write: Callable[[str], None], kept: KeptShare | None = None,
                 skip_prompt: bool = True):
        self.tokenizer, self.write, self.kept = tokenizer, write, kept
        self._skip, self._ids, self._printed = skip_prompt, [], 0

    def put(self, value: torch.Tensor) -> None:
        if self._skip:  # the first call carries the prompt
            self._skip = False
            return
        token = int(value.reshape(-1)[0])
        self._ids.append(token)
        if self.kept is not None:
            share = self.kept.shares[-1][0] if self.kept.shares else float("nan")
            self.write(f"{share:6.3f}  {self.tokenizer.decode([token])!r}\n")
            return
        text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.write(text[self._printed:])
            self._printed = len(text)

    def end(self) -> None:
        if self.kept is None:  # per-token lines end with their own newline
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            self.write(text[self._printed:] + "\n")
