"""The loops the notebooks write out by hand (greedy generation and a KV-cache step in 01, the data pipeline
and the training loop in 05) against the package, on more cases than the notebooks run.

The functions are taken from the notebooks themselves, so what is tested is what students read."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager
from torch.utils.data import DataLoader

from llm_scratch import GPTConfig, GPTModel, generate
from llm_scratch.classifier import add_classification_head, train_classifier
from llm_scratch.data import (
    SpamDataset,
    balance,
    collate_spam,
    load_sample,
    load_spam_splits,
    read_sms_spam,
    spam_dataloaders,
    split,
)
from llm_scratch.finetune import prepare_for_method
from llm_scratch.lora import LoRAConfig
from llm_scratch.tokenizer import get_tokenizer

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REAL_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms_spam" / "SMSSpamCollection"


def notebook_functions(name: str, *functions: str) -> SimpleNamespace:
    """The functions a notebook defines, with the notebook's imports, ready to call."""
    trees = [ast.parse(TransformerManager().transform_cell(cell.source))
             for cell in nbformat.read(NOTEBOOKS / name, as_version=4).cells if cell.cell_type == "code"]
    body = [node for tree in trees for node in tree.body]
    imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
    defined = {node.name: node for node in body if isinstance(node, ast.FunctionDef)}
    missing = [function for function in functions if function not in defined]
    assert not missing, f"{name} no longer defines {missing}"
    namespace: dict = {}
    module = ast.Module(body=imports + [defined[function] for function in functions], type_ignores=[])
    exec(compile(module, name, "exec"), namespace)  # noqa: S102 (the project's own notebook)
    return SimpleNamespace(**{function: namespace[function] for function in functions})


GPT = notebook_functions("01_gpt_from_scratch.ipynb", "generate_greedy_by_hand", "forward_with_cache_by_hand",
                         "empty_cache")
SPAM = notebook_functions("05_spam_classification.ipynb", "balance_by_hand", "split_by_hand",
                          "batches_by_hand", "train_steps_by_hand")


def tiny_model(seed: int = 123, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny", **overrides)).eval()


def random_ids(batch: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n_tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("batch", "n_prompt", "new", "context_size"), [(1, 5, 12, 256), (3, 6, 10, 8)])
def test_hand_greedy_loop_gives_generates_tokens(batch, n_prompt, new, context_size):
    model, ids = tiny_model(), random_ids(batch, n_prompt)
    with torch.no_grad():
        by_hand = GPT.generate_greedy_by_hand(model, ids, new, context_size)
    package = generate(model, ids, max_new_tokens=new, context_size=context_size)
    assert by_hand.shape == (batch, n_prompt + new) and torch.equal(by_hand, package)


@pytest.mark.parametrize("batch", [1, 2])
def test_hand_kv_cache_steps_give_the_logits_without_a_cache(batch):
    model, ids = tiny_model(seed=7), random_ids(batch, 12, seed=1)
    with torch.no_grad():
        whole = model(ids)  # (batch, 12, vocab): no cache
        logits, cache = GPT.forward_with_cache_by_hand(model, ids[:, :7], GPT.empty_cache(model, batch))
        steps = [logits]
        for i in range(7, 12):  # then one token at a time
            logits, cache = GPT.forward_with_cache_by_hand(model, ids[:, i : i + 1], cache)
            steps.append(logits)
        package_cache = model.new_kv_cache()
        model(ids[:, :11], cache=package_cache)
        package_step = model(ids[:, 11:], cache=package_cache)
    by_hand = torch.cat(steps, dim=1)
    assert cache[0][0].shape == (batch, model.cfg.n_heads, 12, model.cfg.head_dim)
    assert (by_hand - whole).abs().max().item() < 1e-5
    assert (steps[-1] - package_step).abs().max().item() < 1e-5


def _check_batches(by_hand: list, loader: DataLoader) -> None:
    package = list(loader)
    assert len(by_hand) == len(package)
    for (input_ids, lengths, labels), batch in zip(by_hand, package, strict=True):
        assert torch.equal(input_ids, batch.input_ids) and torch.equal(lengths, batch.lengths)
        assert torch.equal(labels, batch.labels)


@pytest.mark.parametrize("seed", [123, 7])
def test_hand_pipeline_gives_the_packages_splits_and_batches(seed):
    rows = load_sample()
    lopsided = rows[:40] + [row for row in rows if row.label == 0]  # more ham than spam: balance must cut
    for data in (rows, lopsided):
        assert SPAM.balance_by_hand(data, seed) == balance(data, seed)
    splits = load_spam_splits(quick=True, seed=seed)
    assert tuple(SPAM.split_by_hand(balance(rows, seed), seed)) == tuple(splits)

    tokenizer = get_tokenizer()
    for batch_size, max_length in [(8, None), (5, 20)]:
        loaders = spam_dataloaders(splits, batch_size=batch_size, context_length=256, max_length=max_length,
                                   seed=seed)
        longest = max(len(tokenizer.encode_ordinary(row.text)) for row in splits.train)
        assert loaders.max_length == (max_length or min(longest, 256))
        for part, loader in [(splits.validation, loaders.validation), (splits.test, loaders.test)]:
            _check_batches(SPAM.batches_by_hand(part, tokenizer, loaders.max_length, batch_size), loader)
        in_order = DataLoader(loaders.train.dataset, batch_size, collate_fn=collate_spam)  # no shuffling
        train_batches = SPAM.batches_by_hand(splits.train, tokenizer, loaders.max_length, batch_size)
        _check_batches(train_batches, in_order)


@pytest.mark.skipif(not REAL_FILE.is_file(), reason=f"the real data set is not at {REAL_FILE}")
def test_hand_balance_and_split_on_the_real_collection():
    rows = read_sms_spam(REAL_FILE)
    balanced = SPAM.balance_by_hand(rows, 123)
    assert balanced == balance(rows, 123)
    assert [len(part) for part in SPAM.split_by_hand(balanced, 123)] == [1045, 149, 300]
    assert tuple(SPAM.split_by_hand(balanced, 123)) == tuple(split(balanced, 123))


@pytest.mark.parametrize(("method", "seed"), [("full", 123), ("last-block", 123), ("lora", 123), ("lora", 5)])
def test_hand_training_steps_give_train_classifiers_losses(method, seed):
    torch.manual_seed(seed)
    model = add_classification_head(GPTModel(GPTConfig.from_preset("tiny")), seed=seed)
    prepare_for_method(model, method, LoRAConfig(rank=4, alpha=8, modules_to_save=("out_head",)), seed=seed)
    rows = load_spam_splits(quick=True, seed=seed).train
    first = SpamDataset(rows[:32], context_length=256)
    in_order = DataLoader(first, 8, collate_fn=collate_spam)  # 4 batches, read in a fixed order by both loops
    validation = DataLoader(SpamDataset(rows[32:40], max_length=first.max_length), 8, collate_fn=collate_spam)

    by_hand = SPAM.train_steps_by_hand(copy.deepcopy(model), in_order, 4, lr=2e-3, weight_decay=0.01,
                                       seed=seed)
    package = train_classifier(copy.deepcopy(model), in_order, validation, epochs=1, lr=2e-3, seed=seed,
                               device="cpu", progress=False).step_loss
    assert len(by_hand) == len(package) == 4
    assert max(abs(a - b) for a, b in zip(by_hand, package, strict=True)) < 1e-6
    assert by_hand[0] != by_hand[-1]  # the steps trained something


def test_the_notebook_loader_of_functions_refuses_a_missing_function():
    with pytest.raises(AssertionError, match="no longer defines"):
        notebook_functions("01_gpt_from_scratch.ipynb", "no_such_function")
