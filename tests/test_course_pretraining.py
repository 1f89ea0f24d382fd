"""The loops notebook 02 writes out by hand (the learning-rate schedule, gradient clipping, an epoch of the
full training loop) against the package, on more cases than the notebook runs.

The functions are taken from the notebook itself, so what is tested is what students read."""

from __future__ import annotations

import pytest
import torch
from test_course import notebook_functions

from llm_scratch.data import text_dataloaders
from llm_scratch.language_model import train_language_model
from llm_scratch.optimizer import lr_factor
from llm_scratch.pretrain import build_model

HAND = notebook_functions("02_pretraining.ipynb", "adamw_by_hand", "lr_by_hand", "clip_by_hand",
                          "train_epoch_by_hand")
TEXT = "The cat sat on the mat. The dog sat on the log. " * 30  # 16-token windows: 6 steps an epoch


@pytest.mark.parametrize(("total", "warmup", "min_ratio"),
                         [(20, 5, 0.1), (9, 0, 0.0), (40, 1, 0.5), (7, 3, 1.0)])
def test_hand_schedule_is_the_packages(total, warmup, min_ratio):
    by_hand = [HAND.lr_by_hand(step, total, 3e-3, warmup, min_ratio) for step in range(total)]
    package = [3e-3 * lr_factor(step, total, warmup, "cosine", min_ratio) for step in range(total)]
    assert by_hand == package  # the same arithmetic in the same order: equal to the last bit


@pytest.mark.parametrize("max_norm", [0.05, 1e3])  # clipped, and left alone
def test_hand_clipping_is_clip_grad_norm(max_norm):
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(7, 5), (5,), (3, 2, 4)]]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    copies = [torch.nn.Parameter(torch.zeros(p.shape)) for p in params]
    for copy, param in zip(copies, params, strict=True):
        copy.grad = param.grad.clone()
    norm = HAND.clip_by_hand(params, max_norm)
    reference = torch.nn.utils.clip_grad_norm_(copies, max_norm)
    assert norm == reference.item()
    for param, copy in zip(params, copies, strict=True):
        assert torch.equal(param.grad, copy.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])).item()
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-5)


@pytest.mark.parametrize(("schedule", "warmup", "max_norm", "seed"),
                         [("cosine", 4, 0.5, 1), ("constant", 0, None, 2)])
def test_hand_epochs_take_train_language_models_steps(schedule, warmup, max_norm, seed):
    """Two epochs of the notebook's loop against the package's, without dropout (the package measures the
    loss after each epoch, which draws from dropout's random generator)."""
    epochs, lr, weight_decay = 2, 3e-3, 0.1
    model = build_model("tiny", 16, seed, drop_rate=0.0)
    loaders = text_dataloaders(TEXT, 16, batch_size=4, seed=seed)
    total = epochs * len(loaders.train)
    rates = [lr * lr_factor(step, total, warmup, schedule) for step in range(total)]
    torch.manual_seed(seed)
    optimizer = HAND.adamw_by_hand(model, lr, weight_decay)
    losses, norms = [], []
    for _ in range(epochs):
        epoch_losses, epoch_norms = HAND.train_epoch_by_hand(model, optimizer, loaders.train,
                                                             rates[len(losses):], max_norm)
        losses += epoch_losses
        norms += epoch_norms
    assert (max(norms) > max_norm) if max_norm is not None else norms == []  # clipping acted, or was off

    model = build_model("tiny", 16, seed, drop_rate=0.0)
    loaders = text_dataloaders(TEXT, 16, batch_size=4, seed=seed)
    history = train_language_model(model, loaders.train, loaders.validation, epochs=epochs, lr=lr,
                                   weight_decay=weight_decay, seed=seed, device="cpu", progress=False,
                                   warmup_steps=warmup, lr_schedule=schedule, max_grad_norm=max_norm)
    assert history.step_lr == rates
    assert len(losses) == total
    assert max(abs(a - b) for a, b in zip(losses, history.step_loss, strict=True)) < 1e-6
