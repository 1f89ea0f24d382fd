"""A frozen, deterministic start of the model computed once: the same training as running it at every step."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import llm_scratch.finetune as finetune_module
from llm_scratch.classifier import (
    add_classification_head,
    evaluate_classifier,
    last_token_logits,
    train_classifier,
)
from llm_scratch.config import GPTConfig
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import FinetuneSettings, classify_with_run, finetune, load_run
from llm_scratch.frozen_prefix import (
    AfterPrefix,
    FrozenPrefix,
    cached_loader,
    frozen_prefix_blocks,
    prefix_states,
    skip_frozen_prefix,
)
from llm_scratch.methods import prepare_for_method
from llm_scratch.model import GPTModel

# The key bias gets no gradient in exact arithmetic: adding one vector to every key adds the same number to
# all of a query's attention scores, which the softmax cancels. Its computed gradient is rounding noise, which
# AdamW's normalised steps turn into moves of about the learning rate that change no output. So two runs that
# differ only in rounding agree on every trained tensor but this one.
NO_GRADIENT = ".att.W_key.bias"
# Two trainings that differ only in float rounding (the cache's, or fixed against dynamic padding on the
# ordinary path) drift apart as the steps go by: with quick mode's learning rate (2e-3) their losses can
# differ by 1e-3 within two epochs. At 1e-3 they stay within 1e-5, so a difference over 1e-4 is a real one.
LR = 1e-3


def classifier(method: str = "last-block", seed: int = 7, **overrides) -> GPTModel:
    """A tiny classifier with random weights, set up for `method`."""
    torch.manual_seed(seed)
    model = add_classification_head(GPTModel(GPTConfig.from_preset("tiny", **overrides)), seed=seed)
    prepare_for_method(model, method)
    return model


@pytest.fixture(scope="module")
def splits():
    return load_spam_splits(quick=True, write_csv=False)


def test_the_cached_blocks_are_the_leading_frozen_ones_without_dropout():
    four = {"n_layers": 4}
    assert frozen_prefix_blocks(classifier(**four)) == 3  # last-block: embeddings + the first 3 of 4 blocks
    assert frozen_prefix_blocks(classifier()) == 1  # the tiny preset's first of 2 blocks
    assert frozen_prefix_blocks(classifier(drop_rate=0.1, **four)) == 0  # dropout: a new output every step
    assert frozen_prefix_blocks(classifier("full", **four)) == 0
    assert frozen_prefix_blocks(classifier("lora", **four)) == 0  # LoRA matrices train in block 0
    for trained, expected in [("blocks.1.", 1), ("blocks.0.", 0), ("pos_emb.", 0), ("tok_emb.", 0)]:
        model = classifier(**four)
        for name, param in model.named_parameters():
            param.requires_grad |= name.startswith(trained)
        assert frozen_prefix_blocks(model) == expected, trained
    model = classifier(**four)
    model.blocks[3].requires_grad_(False)  # only the final norm and the head train: every block is cached
    assert frozen_prefix_blocks(model) == 4


def test_nothing_cached_gives_back_the_model_and_loaders_themselves(splits):
    model = classifier(drop_rate=0.1)
    loaders = spam_dataloaders(splits, context_length=256)
    assert skip_frozen_prefix(model, loaders) == FrozenPrefix(model, loaders, 0, 0.0, 0.0)


def test_cached_loaders_make_the_ordinary_batches_of_the_prefix_outputs(splits):
    model = classifier()
    for bucket in (False, True):
        ordinary = spam_dataloaders(splits, context_length=256, bucket=bucket)
        prefix = skip_frozen_prefix(model, spam_dataloaders(splits, context_length=256, bucket=bucket))
        assert prefix.n_blocks == 1 and isinstance(prefix.model, AfterPrefix)
        lengths = [n for loader in ordinary[:3] for n in loader.dataset.lengths]  # after truncation
        assert prefix.megabytes == sum(lengths) * 64 * 4 / 2**20  # fp32, unpadded, emb_dim 64
        for epoch in range(2):
            for name in ("train", "validation", "test"):
                pairs = list(zip(getattr(ordinary, name), getattr(prefix.loaders, name), strict=True))
                for tokens, cached in pairs:
                    assert torch.equal(tokens.lengths, cached.lengths)
                    assert torch.equal(tokens.labels, cached.labels)
                    expected = model.run_blocks(model.embed(tokens.input_ids), stop_block=1)  # (batch, n, 64)
                    real = torch.arange(cached.hidden.shape[1]) < cached.lengths[:, None]  # (batch, n_tokens)
                    assert (cached.hidden[~real] == 0).all()  # zero padding after each message
                    assert torch.allclose(cached.hidden[real], expected[real], atol=1e-5), (bucket, epoch)
    # The prefix gives identical outputs twice: nothing in it is random, nothing in it changes.
    model.train()
    first, second = (prefix_states(model, ordinary.train.dataset, 1) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def assert_same_trained_tensors(ordinary: torch.nn.Module, cached: torch.nn.Module) -> None:
    compared = 0
    for (name, a), b in zip(ordinary.named_parameters(), cached.parameters(), strict=True):
        if not a.requires_grad:
            assert torch.equal(a, b), f"{name} is frozen and must not move"
        elif not name.endswith(NO_GRADIENT):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
            compared += 1
    assert compared == 16 + 2 + 1 - 1  # the last block's 16 tensors, final norm, head; less the key bias


@pytest.mark.parametrize("bucket", [False, True], ids=["dynamic padding", "bucketed"])
def test_cached_training_gives_the_ordinary_losses_metrics_and_weights(splits, bucket):
    model = classifier()
    ordinary_model, cached_model = copy.deepcopy(model), copy.deepcopy(model)
    ordinary = spam_dataloaders(splits, context_length=256, bucket=bucket)
    prefix = skip_frozen_prefix(cached_model, spam_dataloaders(splits, context_length=256, bucket=bucket))
    settings = dict(epochs=2, lr=LR, eval_every=5, seed=3, device="cpu", progress=False)
    expected = train_classifier(ordinary_model, ordinary.train, ordinary.validation, **settings)
    got = train_classifier(prefix.model, prefix.loaders.train, prefix.loaders.validation, **settings)

    steps = 2 * -(-len(splits.train) // 8)  # two epochs of batches of 8
    assert len(expected.step_loss) == len(got.step_loss) == steps
    assert got.step_seen == expected.step_seen and got.eval_seen == expected.eval_seen
    for key in ("step_loss", "eval_train_loss", "eval_val_loss"):
        differences = [abs(a - b) for a, b in zip(getattr(expected, key), getattr(got, key), strict=True)]
        assert max(differences) < 1e-4, key
    assert expected.step_loss[-1] < expected.step_loss[0]  # it trained
    assert got.epoch_metrics.keys() == expected.epoch_metrics.keys()
    for name, values in expected.epoch_metrics.items():
        if name.endswith("accuracy"):
            assert got.epoch_metrics[name] == values, name
        else:
            assert got.epoch_metrics[name] == pytest.approx(values, abs=1e-4), name

    assert_same_trained_tensors(ordinary_model, cached_model)
    for tokens, cached in zip(ordinary.test, prefix.loaders.test, strict=True):
        with torch.no_grad():
            a = last_token_logits(ordinary_model(tokens.input_ids), tokens.lengths)  # (batch, 2)
            b = last_token_logits(cached_model(tokens.input_ids), tokens.lengths)  # the trained model itself
            c = last_token_logits(prefix.model(cached.hidden), cached.lengths)  # its part after the prefix
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
        torch.testing.assert_close(c, b, rtol=0, atol=1e-5)
    cached_accuracy = evaluate_classifier(prefix.model, prefix.loaders.test)["accuracy"]
    assert cached_accuracy == evaluate_classifier(ordinary_model, ordinary.test)["accuracy"]


def test_a_loader_with_worker_processes_is_refused(splits):
    loader = spam_dataloaders(splits, context_length=256).validation
    with pytest.raises(ValueError, match="num_workers=0"):
        cached_loader(DataLoader(loader.dataset, 8, num_workers=1), [])


def test_finetune_last_block_caches_the_prefix_and_writes_the_same_run(tmp_path, monkeypatch, messages):
    used = []

    def spy(model, loaders, progress=False):
        used.append(skip_frozen_prefix(model, loaders, progress))
        return used[-1]

    def ordinary(model, loaders, progress=False):  # the path without a cache
        return FrozenPrefix(model, loaders, 0, 0.0, 0.0)

    results = {}
    for name, path in (("cached", spy), ("ordinary", ordinary)):
        monkeypatch.setattr(finetune_module, "skip_frozen_prefix", path)
        settings = FinetuneSettings(quick=True, method="last-block", epochs=2, lr=LR, eval_every=5, seed=1,
                                    device="cpu", progress=False, out=tmp_path / name)
        results[name] = finetune(settings)
    assert [prefix.n_blocks for prefix in used] == [1]  # tiny: embeddings + block 0 of 2, computed once
    cached, ordinary_run = tmp_path / "cached", tmp_path / "ordinary"

    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in ordinary_run.iterdir())
    run, expected_run = (json.loads((folder / "run.json").read_text()) for folder in (cached, ordinary_run))
    # The same tensor names and shapes; the bytes differ (the trained values in rounding, and safetensors may
    # write the metadata's keys in either order), so the recorded SHA-256s differ too.
    for record in (run["files"]["weights.safetensors"], run["base"]):
        expected_record = expected_run["base"] if record is run["base"] else expected_run["files"][
            "weights.safetensors"]
        assert record.pop("size") == expected_record.pop("size")
        assert record.pop("sha256") != ""
        del expected_record["sha256"]
    assert run == expected_run
    metrics, expected = results["cached"], results["ordinary"]
    assert metrics.keys() == expected.keys()
    for split in ("train", "validation", "test"):
        assert metrics[f"{split}_accuracy"] == expected[f"{split}_accuracy"], split
    steps = zip(metrics["history"]["step_loss"], expected["history"]["step_loss"], strict=True)
    assert max(abs(a - b) for a, b in steps) < 1e-4
    saved = load_file(cached / "weights.safetensors")
    assert saved.keys() == load_file(ordinary_run / "weights.safetensors").keys()

    model, _ = load_run(cached)
    reference, _ = load_run(ordinary_run)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())  # loaded as saved
    assert_same_trained_tensors(reference, model)
    answers = classify_with_run(cached, messages)
    expected_answers = classify_with_run(ordinary_run, messages)
    assert [label for label, _ in answers] == [label for label, _ in expected_answers]
    assert [p for _, p in answers] == pytest.approx([p for _, p in expected_answers], abs=1e-4)
