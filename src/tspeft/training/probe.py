"""The frozen baseline of an encoder classification task (`--method none`): a probe fitted to convergence.

    classifier, fit = fit_frozen_probe(base, tokenizer, task_data, max_length=64)     # a PooledClassifier
    classifier(**batch).logits

    x_n = pool(encoder(tokens_n))          pool: the model's own pooling (sentence-transformers' 1_Pooling config;
                                                  mean over real tokens when the folder has none)
    z_n = (x_n − μ) / σ                    standardised with the training examples' mean and std
    min_{W,b}  mean_n CE(W z_n + b, y_n) + λ ‖W‖²      full-batch L-BFGS (strong Wolfe) to convergence
    λ ∈ L2_GRID: the one with the best accuracy on a held-out fifth of the training examples, refitted on all

      tokens ──► frozen encoder ──► pool ──► Linear (W/σ, b − W μ/σ) ──► logits

A head trained by a few SGD steps on [CLS] is no baseline (it sat at the majority class on the issue's tasks):
whether fine-tuning helps is judged against the best the frozen features can do. The standardisation is folded
into the Linear, so the classifier is the encoder, a pooling and one Linear layer; it is saved as that Linear's
weights plus its pooling (run_folder.py) and evaluated like any other model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from .data import TaskData

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
POOLINGS = ("cls", "max", "mean", "mean_sqrt_len")  # sentence-transformers' order when several are concatenated
VALIDATION_SHARE = 5  # one example in five chooses λ


def model_pooling(model: nn.Module) -> list[str]:
    """The pooling the model was trained with: its folder's sentence-transformers 1_Pooling/config.json, else
    mean over real tokens (the usual sentence-embedding pooling; BERT's [CLS] pooler is untrained in most)."""
    folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or "."))
    config = folder / "1_Pooling" / "config.json"
    if not config.is_file():
        return ["mean"]
    settings = json.loads(config.read_text())
    modes = [mode for mode in POOLINGS if settings.get(f"pooling_mode_{mode}_token" if mode == "cls"
                                                        else f"pooling_mode_{mode}_tokens")]
    if not modes:
        raise ValueError(f"{config}: no pooling mode this probe knows ({', '.join(POOLINGS)}) is switched on")
    return modes


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: list[str]) -> torch.Tensor:
    """(batch, tokens, d) hidden states -> (batch, d · len(modes)), over real tokens (mask 1) only."""
    real = mask.unsqueeze(-1).to(hidden.dtype)
    count = real.sum(1).clamp_min(1.0)
    pooled = {"cls": lambda: hidden[:, 0],
              "max": lambda: hidden.masked_fill(real == 0, torch.finfo(hidden.dtype).min).amax(1),
              "mean": lambda: (hidden * real).sum(1) / count,
              "mean_sqrt_len": lambda: (hidden * real).sum(1) / count.sqrt()}
    return torch.cat([pooled[mode]() for mode in modes], -1)


class PooledClassifier(nn.Module):
    """A frozen encoder, its pooling and a Linear head: forward takes a tokenised batch like a transformers
    sequence classifier and returns `SequenceClassifierOutput` (loss with `labels`)."""

    def __init__(self, model: nn.Module, pooling: list[str], num_labels: int):
        super().__init__()
        self.model, self.pooling = model, list(pooling)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        width = model.config.hidden_size * len(self.pooling)
        self.probe = nn.Linear(width, num_labels)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, **_) -> torch.Tensor:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask, **extra)[0]
        return pool(hidden.float(), mask, self.pooling)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        logits = self.probe(self.encode(input_ids, attention_mask, token_type_ids))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


@dataclass(frozen=True)
class ProbeFit:
    """How the probe was chosen: its L2 weight, the validation accuracy of each candidate, the fit's loss."""

    l2: float
    validation: dict[str, float]
    final_loss: float
    seconds: float

    def to_json(self) -> dict:
        return {"l2": self.l2, "validation": self.validation, "final_loss": self.final_loss, "l2_grid": list(L2_GRID)}


def logistic_regression(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[nn.Linear, float]:
    """Multinomial logistic regression with L2 weight `l2` on W, full-batch L-BFGS to convergence; (head, loss)."""
    with torch.random.fork_rng(devices=[]):  # a fixed start that leaves the caller's random stream alone
        torch.manual_seed(0)
        head = nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-7,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    loss = None
    for _ in range(4):  # L-BFGS restarts: max_iter per call
        loss = optimizer.step(closure)
    return head, float(loss.detach())


def fit_standardised_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[nn.Linear, ProbeFit]:
    """The probe on features `x` (examples × d): λ chosen on the last fifth, refitted on all, standardisation
    folded into the returned Linear (it takes raw pooled features)."""
    if len(x) < VALIDATION_SHARE:
        raise ValueError(f"the frozen probe needs at least {VALIDATION_SHARE} training examples to choose its "
                         f"L2 weight on a held-out fifth; got {len(x)}")
    start = time.perf_counter()
    x, y = x.double(), y.long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    cut = len(z) * (VALIDATION_SHARE - 1) // VALIDATION_SHARE
    scores = {}
    with torch.enable_grad():
        for l2 in L2_GRID:
            head, _ = logistic_regression(z[:cut].float(), y[:cut], classes, l2)
            with torch.no_grad():
                scores[l2] = (head(z[cut:].float()).argmax(-1) == y[cut:]).float().mean().item()
        best = max(scores, key=lambda l2: (scores[l2], l2))  # ties: the stronger regularisation
        head, loss = logistic_regression(z.float(), y, classes, best)
    folded = nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        weight = head.weight.double() / std
        folded.weight.copy_(weight)
        folded.bias.copy_(head.bias.double() - weight @ mean)
    return folded, ProbeFit(best, {str(k): v for k, v in scores.items()}, loss, time.perf_counter() - start)


@torch.no_grad()
def pooled_features(classifier: PooledClassifier, features: list[dict], collate, batch_size: int = 128):
    """(pooled features, labels) of tokenised `features`, the encoder in eval mode."""
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    rows, labels = [], []
    for i in range(0, len(features), batch_size):
        batch = collate(features[i:i + batch_size])
        labels.append(batch.pop("labels"))
        rows.append(classifier.encode(**{k: v.to(device) for k, v in batch.items()}).cpu())
    classifier.train(was_training)
    return torch.cat(rows), torch.cat(labels)


def fit_frozen_probe(base: nn.Module, tokenizer, task_data: TaskData, max_length: int,
                     batch_size: int = 128) -> tuple[PooledClassifier, ProbeFit]:
    """`base` (a transformers sequence classifier) frozen, pooled as it was trained, with a fitted probe."""
    if not task_data.train:
        raise ValueError(f"{task_data.name}: the frozen probe (--method none) needs training examples")
    classifier = PooledClassifier(base, model_pooling(base), task_data.num_labels)
    features = task_data.kind.features(tokenizer, task_data.train, max_length)
    x, y = pooled_features(classifier, features, task_data.kind.collator(tokenizer), batch_size)
    head, fit = fit_standardised_probe(x, y, task_data.num_labels)
    with torch.no_grad():
        classifier.probe.weight.copy_(head.weight)
        classifier.probe.bias.copy_(head.bias)
    return classifier.eval(), fit
