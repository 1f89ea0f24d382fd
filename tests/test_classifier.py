from __future__ import annotations

import pytest
import torch

from llm_scratch import GPTConfig, GPTModel, text_to_ids
from llm_scratch.classifier import (
    accuracy,
    add_classification_head,
    classify,
    evaluate_classifier,
    format_accuracy,
    last_token_logits,
    train_classifier,
    wilson_interval,
)
from llm_scratch.data import SpamDataset, collate_spam, load_sample, load_spam_splits, spam_dataloaders
from llm_scratch.finetune import prepare_for_method
from llm_scratch.lora import LoRAConfig
from llm_scratch.training import History


def tiny_classifier(seed: int = 123) -> GPTModel:
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset("tiny"))
    return add_classification_head(model, num_classes=2, seed=seed).eval()


def test_head_swap_shape_and_seed():
    a, b = tiny_classifier(), tiny_classifier()
    assert a.out_head.weight.shape == (2, 64) and a.out_head.bias is None  # as Hugging Face's `score`
    assert torch.equal(a.out_head.weight, b.out_head.weight)
    assert a.out_head.weight is not a.tok_emb.weight  # the tie with the embedding is gone
    assert a(torch.tensor([[1, 2, 3]])).shape == (1, 3, 2)


def test_logits_do_not_depend_on_padding():
    model = tiny_classifier()
    dataset = SpamDataset(load_sample()[:6], context_length=model.cfg.context_length)
    items = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        for ids, label in items:
            own = collate_spam([(ids, label)])  # padded to its own length: no padding at all
            long = collate_spam([(ids, label)], pad_to=100)  # 100 - len(ids) padding tokens after it
            assert long.input_ids.shape == (1, 100)
            a = last_token_logits(model(own.input_ids), own.lengths)
            b = last_token_logits(model(long.input_ids), long.lengths)
            assert (a - b).abs().max().item() < 1e-5
        # A dynamically padded batch gives each message the logits it gets on its own.
        batch = collate_spam(items)
        together = last_token_logits(model(batch.input_ids), batch.lengths)
        alone = torch.cat([last_token_logits(model(ids[None]), torch.tensor([len(ids)])) for ids, _ in items])
        assert (together - alone).abs().max().item() < 1e-5


def test_last_token_is_not_a_padding_token():
    logits = torch.arange(2 * 5 * 2, dtype=torch.float).view(2, 5, 2)  # (batch, n_tokens, classes)
    picked = last_token_logits(logits, torch.tensor([2, 5]))
    assert torch.equal(picked, torch.stack([logits[0, 1], logits[1, 4]]))


def test_classify_returns_a_label_and_its_probability():
    model = tiny_classifier()
    text = "Are we still meeting at noon?"
    label, prob = classify(text, model)
    with torch.no_grad():
        probs = torch.softmax(model(text_to_ids(text))[0, -1], dim=-1)  # (2,): the last token's classes
    assert label == ("ham", "spam")[int(probs.argmax())]
    assert prob == pytest.approx(float(probs.max()), abs=1e-6)
    with pytest.raises(ValueError, match="empty text"):
        classify("", model)


def _quick_loaders(seed: int = 123):
    splits = load_spam_splits(quick=True, seed=seed, write_csv=False)
    return spam_dataloaders(splits, batch_size=8, context_length=256, seed=seed)


def test_loss_goes_down_and_training_accuracy_reaches_90_percent():
    model = tiny_classifier()
    prepare_for_method(model, "full")
    loaders = _quick_loaders()
    accuracy_before = evaluate_classifier(model, loaders.train)["accuracy"]
    history = train_classifier(model, loaders.train, loaders.validation, epochs=6, lr=2e-3, eval_every=10,
                               progress=False)
    loss_before, loss_after = history.step_loss[0], sum(history.step_loss[-5:]) / 5
    accuracy_after = evaluate_classifier(model, loaders.train)["accuracy"]
    print(f"loss {loss_before:.3f} -> {loss_after:.3f}, training accuracy {accuracy_before:.1%} -> "
          f"{accuracy_after:.1%}")
    assert loss_after < 0.5 * loss_before
    assert accuracy_after >= 0.9
    assert len(history.epoch_metrics["validation_accuracy"]) == 6 and history.eval_val_loss
    assert history.step_seen[-1] == 6 * len(loaders.train.dataset) and history.unit == "examples"
    assert history.wall_time_s > 0 and history.peak_memory_mb > 0


SMALL_LORA = LoRAConfig(rank=4, alpha=8, modules_to_save=("out_head",))


def _two_epochs(method: str) -> History:
    model = tiny_classifier()
    prepare_for_method(model, method, SMALL_LORA)
    loaders = _quick_loaders()
    return train_classifier(model, loaders.train, loaders.validation, epochs=2, lr=1e-3, progress=False)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_same_seed_gives_the_same_losses(method):
    assert _two_epochs(method).step_loss == _two_epochs(method).step_loss


def test_methods_train_what_they_say():
    counts = {}
    for method in ("full", "last-block", "lora"):
        model = tiny_classifier()
        trained = prepare_for_method(model, method, SMALL_LORA)
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if method == "last-block":
            assert all(n.startswith(("blocks.1.", "final_norm.", "out_head.")) for n in trained)
    d = 64
    block = 12 * d**2 + 13 * d
    assert counts["full"] == 50257 * d + 256 * d + 2 * block + 2 * d + 2 * d
    assert counts["last-block"] == block + 2 * d + 2 * d
    # rank 4 beside q, k, v, out_proj (64 -> 64) and fc1, fc2 (64 <-> 256) in both blocks, plus the head
    assert counts["lora"] == 2 * (4 * 4 * (d + d) + 2 * 4 * (d + 4 * d)) + 2 * d
    with pytest.raises(ValueError, match="unknown method 'adapter'"):
        prepare_for_method(tiny_classifier(), "adapter")


def test_lora_start_depends_on_the_seed_only():
    starts = []
    for noise, seed in [(1, 7), (2, 7), (1, 8)]:
        model = tiny_classifier()
        torch.manual_seed(noise)  # whatever random numbers were drawn before must not matter
        prepare_for_method(model, "lora", SMALL_LORA, seed=seed)
        starts.append(model.blocks[0].att.W_query.lora.A.detach().clone())
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_accuracy_counts_correct_predictions():
    model = tiny_classifier()
    loaders = _quick_loaders()
    correct = seen = 0
    with torch.no_grad():
        for batch in loaders.validation:
            predicted = last_token_logits(model(batch.input_ids), batch.lengths).argmax(dim=-1)
            correct += int((predicted == batch.labels).sum())
            seen += len(batch.labels)
    assert accuracy(model, loaders.validation) == correct / seen


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score, no continuity
    # correction): worked by hand there, independently of this code.
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_the_published_examples(successes, total, low, high):
    interval = wilson_interval(successes, total)
    assert interval == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edges_and_errors():
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(0, 20)[0] == 0.0
    narrow, wide = wilson_interval(288, 300, confidence=0.5), wilson_interval(288, 300, confidence=0.99)
    assert wide[0] < narrow[0] < 0.96 < narrow[1] < wide[1]
    for bad in [(3, 2), (-1, 5), (0, 0)]:
        with pytest.raises(ValueError, match="successes <= total"):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=95)


def test_format_accuracy_prints_one_decimal_and_the_interval():
    assert format_accuracy(288 / 300, 300) == "96.0% (95% CI 93.1-97.7%)"
    with pytest.raises(ValueError, match="not a share of 300"):
        format_accuracy(0.9612, 300)
