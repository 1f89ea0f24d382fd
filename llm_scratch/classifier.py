"""Turn GPT-2 into a classifier: a small head on the last real token, its loss, accuracy and `classify`."""

from __future__ import annotations

import math
from statistics import NormalDist

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from llm_scratch.model import GPTModel, eval_mode
from llm_scratch.tokenizer import get_tokenizer
from llm_scratch.training import History, train


def add_classification_head(model: GPTModel, num_classes: int = 2, seed: int = 123) -> GPTModel:
    """Replace the vocabulary head (emb_dim -> 50,257) by a new `Linear(emb_dim, num_classes)`, in place.

    The new head is no longer tied to the token embedding and, like Hugging Face's
    `GPT2ForSequenceClassification.score`, has no bias: so a fine-tuned classifier exports to Hugging Face
    exactly. `seed` fixes its random init.
    """
    weight = model.tok_emb.weight
    with torch.random.fork_rng(devices=[]):  # seed the head without touching the caller's random state
        torch.manual_seed(seed)
        head = nn.Linear(model.cfg.emb_dim, num_classes, bias=False)
    model.out_head = head.to(device=weight.device, dtype=weight.dtype)
    return model


def last_token_logits(logits: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The logits at each sequence's last real token: (batch, n_tokens, classes) -> (batch, classes).

    With causal attention the last real token is the only one that has seen the whole message, and padding
    that comes after it cannot change it: so dynamic and fixed padding give the same prediction.
    """
    last = (lengths - 1).to(logits.device)  # (batch,)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def batch_logits(model: nn.Module, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits (batch, classes) of a padded batch: token ids (batch, n_tokens), or whatever else `model`
    reads (a frozen prefix's hidden states, see `llm_scratch.frozen_prefix`)."""
    device = next(model.parameters()).device
    return last_token_logits(model(inputs.to(device)), lengths)


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    """Cross-entropy of a `SpamBatch` (input_ids, lengths, labels), or of a `PrefixBatch` (hidden states,
    lengths, labels)."""
    inputs, lengths, labels = batch  # inputs: token ids, or hidden states
    logits = batch_logits(model, inputs, lengths)
    return F.cross_entropy(logits, labels.to(logits.device))


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, max_batches: int | None = None) -> dict[str, float]:
    """{"loss": mean loss, "accuracy": share correct} over `loader` (or its first `max_batches` batches)."""
    total_loss, correct, seen = 0.0, 0, 0
    with eval_mode(model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            inputs, lengths, labels = batch  # inputs: token ids, or hidden states (see classification_loss)
            logits = batch_logits(model, inputs, lengths)  # (batch, classes)
            labels = labels.to(logits.device)  # (batch,)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            seen += len(labels)
    if seen == 0:
        raise ValueError("cannot evaluate on an empty data loader")
    return {"loss": total_loss / seen, "accuracy": correct / seen}


def accuracy(model: nn.Module, loader, max_batches: int | None = None) -> float:
    """Share of correctly classified messages in `loader` (or its first `max_batches` batches)."""
    return evaluate_classifier(model, loader, max_batches)["accuracy"]


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of a share `successes / total`, e.g. a test accuracy.

    With 300 test messages one message is 0.33 points, and the 95% interval around 96% spans 4.6 points
    (93.1-97.7%): the interval says how far a second test set of the same size could plausibly land.
    """
    if not 0 <= successes <= total or total < 1:
        raise ValueError(f"need 0 <= successes <= total and total >= 1, got {successes} of {total}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)  # 1.96 for 95%
    share = successes / total
    centre = (share + z**2 / (2 * total)) / (1 + z**2 / total)
    half_width = z / (1 + z**2 / total) * math.sqrt(share * (1 - share) / total + z**2 / (4 * total**2))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def format_accuracy(accuracy: float, total: int) -> str:
    """An accuracy measured on `total` examples, to 0.1% with its 95% Wilson interval, for printing:
    "96.0% (95% CI 93.1-97.7%)"."""
    correct = round(accuracy * total)
    if abs(accuracy * total - correct) > 1e-6:
        raise ValueError(f"accuracy {accuracy} is not a share of {total} examples; pass the number of "
                         "examples the accuracy was measured on")
    low, high = wilson_interval(correct, total)
    return f"{accuracy:.1%} (95% CI {100 * low:.1f}-{100 * high:.1f}%)"


def train_classifier(model: nn.Module, train_loader, val_loader, **settings) -> History:
    """The generic `training.train` with the classification loss, accuracy as a metric, messages as unit.

    `settings` are `train`'s: epochs, lr, weight_decay, eval_every, eval_batches, seed, device, progress,
    param_groups, precision.
    """
    return train(model, train_loader, val_loader, classification_loss, evaluate_fn=evaluate_classifier,
                 count_fn=lambda batch: len(batch.labels), unit="examples", **settings)


@torch.no_grad()
def classify(
    text: str,
    model: nn.Module,
    tokenizer: tiktoken.Encoding | None = None,
    labels: tuple[str, ...] = ("ham", "spam"),
    max_length: int | None = None,
) -> tuple[str, float]:
    """Classify one text: the predicted label and the model's probability for it."""
    tokenizer = tokenizer or get_tokenizer()
    context_length = model.cfg.context_length
    max_length = min(max_length or context_length, context_length)
    ids = tokenizer.encode_ordinary(text)[:max_length]  # as SpamDataset: "<|endoftext|>" is plain text
    if not ids:
        raise ValueError("cannot classify an empty text")
    input_ids = torch.tensor([ids])  # (1, n_tokens)
    with eval_mode(model):
        probs = torch.softmax(batch_logits(model, input_ids, torch.tensor([len(ids)])), dim=-1)[0]
    if len(probs) != len(labels):
        raise ValueError(f"the model has {len(probs)} classes but {len(labels)} labels were given: {labels}")
    best = int(probs.argmax())
    return labels[best], float(probs[best])
