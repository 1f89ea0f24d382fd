"""The generic training loop's options: warm-up, cosine decay and gradient clipping against a loop written
out by hand; a checkpoint that resumes with the losses of an unbroken run; one weight-decay rule."""

from __future__ import annotations

import math

import pytest
import torch

from llm_scratch.classifier import add_classification_head
from llm_scratch.config import GPTConfig
from llm_scratch.data import text_dataloaders
from llm_scratch.language_model import next_token_loss, train_language_model
from llm_scratch.lora import LoRAConfig
from llm_scratch.loraplus import loraplus_param_groups
from llm_scratch.methods import prepare_for_method
from llm_scratch.model import GPTModel
from llm_scratch.optimizer import lr_factor, no_weight_decay, weight_decay_groups
from llm_scratch.pretrain import build_model
from llm_scratch.training import train

TEXT = "The cat sat on the mat. The dog sat on the log. " * 30  # 16-token windows, about 8 steps an epoch


def fresh(seed: int = 5, drop_rate: float = 0.1):
    """A tiny GPT (with dropout, the random generators matter) and its loaders."""
    return build_model("tiny", 16, seed, drop_rate), text_dataloaders(TEXT, 16, batch_size=4, seed=5)


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine():
    factors = [lr_factor(step, 10, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1) for step in range(10)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert factors[3] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)  # the peak, then the floor
    assert all(a > b for a, b in zip(factors[3:], factors[4:], strict=False))  # falls all the way
    middle = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6))  # step 6: halfway along the cosine
    assert factors[6] == pytest.approx(middle)
    assert [lr_factor(step, 10, 2) for step in range(4)] == [0.5, 1.0, 1.0, 1.0]  # constant after warm-up


def test_warmup_cosine_and_clipping_by_hand_give_the_package_losses():
    """A plain loop with the schedule and clipping written out takes the package's steps to within 1e-6.

    Without dropout: the package's loop measures the loss after each epoch, and iterating those loaders
    draws from the random generator that dropout uses, which a plain loop without measurements does not."""
    epochs, lr, warmup, max_norm = 2, 3e-3, 4, 0.5
    model, loaders = fresh(drop_rate=0.0)
    total = epochs * len(loaders.train)
    torch.manual_seed(5)
    model.train()
    named = dict(model.named_parameters())
    exempt = [p for name, p in named.items() if name.endswith(("bias", "scale", "shift"))]
    decayed = [p for name, p in named.items() if not name.endswith(("bias", "scale", "shift"))]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1},
                                   {"params": exempt, "weight_decay": 0.0}], lr=lr, fused=True)
    by_hand, rates, clipped = [], [], 0
    for _ in range(epochs):
        for batch in loaders.train:
            step = len(by_hand)
            if step < warmup:
                rate = lr * (step + 1) / warmup
            else:
                progress = (step - warmup) / (total - 1 - warmup)
                rate = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
            for group in optimizer.param_groups:
                group["lr"] = rate
            optimizer.zero_grad(set_to_none=True)
            loss = next_token_loss(model, batch)
            loss.backward()
            grads = [p.grad for p in named.values() if p.grad is not None]
            # The norm of all gradients as one vector: the norm of the vector of each tensor's norm.
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if norm > max_norm:  # scale every gradient by the same factor: the direction stays
                clipped += 1
                for grad in grads:
                    grad.mul_(max_norm / (norm + 1e-6))
            optimizer.step()
            by_hand.append(loss.item())
            rates.append(rate)
    assert clipped > 0  # the test exercises clipping

    model, loaders = fresh(drop_rate=0.0)
    history = train_language_model(model, loaders.train, loaders.validation, epochs=epochs, lr=lr,
                                   weight_decay=0.1, eval_every=1000, seed=5, device="cpu", progress=False,
                                   warmup_steps=warmup, lr_schedule="cosine", max_grad_norm=max_norm)
    assert history.step_lr == pytest.approx(rates, rel=1e-12)
    assert len(history.step_loss) == len(by_hand) == total
    assert max(abs(a - b) for a, b in zip(history.step_loss, by_hand, strict=True)) < 1e-6


def test_training_resumed_from_a_checkpoint_gives_the_losses_of_an_unbroken_run(tmp_path):
    """Three epochs in one go, against a run stopped (Ctrl-C) in its second epoch and resumed from the
    checkpoint of its first in a new model: the weights, AdamW's moments, the schedule, dropout's generator
    and the order of the batches all carry over."""
    options = dict(lr=3e-3, weight_decay=0.1, eval_every=3, seed=5, device="cpu", progress=False,
                   warmup_steps=3, lr_schedule="cosine", max_grad_norm=1.0, epochs=3)
    model, loaders = fresh()
    unbroken = train(model, loaders.train, loaders.validation, next_token_loss, **options)
    steps_per_epoch = len(loaders.train)

    calls = []

    def stopped_in_epoch_two(model, batch):
        calls.append(model.training)
        if calls.count(True) > steps_per_epoch + 2:  # the third training step of epoch 2
            raise KeyboardInterrupt
        return next_token_loss(model, batch)

    checkpoint = tmp_path / "checkpoint.pt"
    model, loaders = fresh()
    with pytest.raises(KeyboardInterrupt):
        train(model, loaders.train, loaders.validation, stopped_in_epoch_two, checkpoint_path=checkpoint,
              **options)
    model, loaders = fresh(seed=99)  # other starting weights: the checkpoint must replace them
    resumed = train(model, loaders.train, loaders.validation, next_token_loss, resume_from=checkpoint,
                    **options)
    assert len(resumed.step_loss) == len(unbroken.step_loss) == 3 * steps_per_epoch
    after = slice(steps_per_epoch, None)  # the steps after the resume
    difference = max(abs(a - b) for a, b in zip(resumed.step_loss[after], unbroken.step_loss[after],
                                                strict=True))
    assert difference < 1e-6, difference
    assert resumed.step_lr == pytest.approx(unbroken.step_lr, rel=1e-12)
    assert resumed.epoch_metrics["validation_loss"] == pytest.approx(
        unbroken.epoch_metrics["validation_loss"], abs=1e-6)


def test_a_checkpoint_of_another_run_or_of_the_last_epoch_is_refused(tmp_path):
    model, loaders = fresh()
    checkpoint = tmp_path / "checkpoint.pt"
    train(model, loaders.train, loaders.validation, next_token_loss, epochs=1, seed=5, device="cpu",
          progress=False, checkpoint_path=checkpoint)
    with pytest.raises(ValueError, match="saved after epoch 1 .* resume with the same loaders and more"):
        train(model, loaders.train, loaders.validation, next_token_loss, epochs=1, seed=5, device="cpu",
              progress=False, resume_from=checkpoint)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        train(model, loaders.train, loaders.validation, next_token_loss, epochs=2, seed=5, device="cpu",
              progress=False, resume_from=tmp_path / "missing.pt")


def tiny_lora_classifier() -> GPTModel:
    model = add_classification_head(GPTModel(GPTConfig.from_preset("tiny")))
    # The norms trained beside the adapter: so that some trained tensors are exempt from weight decay.
    config = LoRAConfig(rank=4, alpha=4, use_dora=True, modules_to_save=("out_head", "final_norm",
                                                                         "blocks.1.norm2"))
    prepare_for_method(model, "dora", config)
    return model


def test_loraplus_and_plain_adamw_exempt_the_same_tensors_from_weight_decay():
    model = tiny_lora_classifier()
    names = {id(p): name for name, p in model.named_parameters()}
    plain = weight_decay_groups(model, 0.01)
    loraplus = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=16)

    def exempt(groups):  # AdamW's default weight decay is what `train` passes: 0.01 here
        return {names[id(p)] for g in groups for p in g["params"] if g.get("weight_decay", 0.01) == 0.0}

    trained = {id(p) for p in model.parameters() if p.requires_grad}
    trained_and_exempt = {names[i] for i in no_weight_decay(model) if i in trained}
    assert exempt(plain) == exempt(loraplus) == trained_and_exempt == {
        "final_norm.scale", "final_norm.shift", "blocks.1.norm2.scale", "blocks.1.norm2.shift"}
    full = add_classification_head(GPTModel(GPTConfig.from_preset("tiny")))
    prepare_for_method(full, "full")
    names = {id(p): name for name, p in full.named_parameters()}
    exempted = exempt(weight_decay_groups(full, 0.01))
    assert exempted == {n for n in names.values() if n.endswith(("bias", "scale", "shift"))}
    assert "blocks.0.att.W_query.bias" in exempted and "final_norm.scale" in exempted
    assert "tok_emb.weight" not in exempted and "out_head.weight" not in exempted
