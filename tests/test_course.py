"""What the notebooks write by hand against the package, on more cases than the notebooks run: the modules
of 01 (attention, block, GPT), its greedy loop, KV-cache step and byte-pair merges, the checkpoint loader of
03, the LoRA classes of 04, and the data pipeline and the training loop of 05.

The functions and classes are taken from the notebooks themselves, so what is tested is what students read."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import regex
import torch
from IPython.core.inputtransformer2 import TransformerManager
from safetensors import safe_open
from safetensors.torch import save_file
from tiktoken_ext.openai_public import r50k_pat_str
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from llm_scratch import GPTConfig, GPTModel, generate
from llm_scratch.classifier import add_classification_head, train_classifier
from llm_scratch.data import (
    SMS_FILE_NAME,
    SpamDataset,
    balance,
    collate_spam,
    default_sms_dir,
    load_sample,
    load_spam_splits,
    load_text,
    read_sms_spam,
    spam_dataloaders,
    split,
)
from llm_scratch.lora import LinearWithLoRA, LoRAConfig, LoRALayer, lora_layers, replace_linear_with_lora
from llm_scratch.methods import prepare_for_method
from llm_scratch.pretrained import load_gpt2
from llm_scratch.tokenizer import get_tokenizer

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# The whole collection where the package caches it once downloaded ($LLM_SCRATCH_DATA); skipped without it.
REAL_FILE = default_sms_dir() / SMS_FILE_NAME


def notebook_functions(name: str, *functions: str) -> SimpleNamespace:
    """The functions and classes a notebook defines, with the notebook's imports, ready to call.

    They are defined in the order given, so a class used by another comes first."""
    trees = [ast.parse(TransformerManager().transform_cell(cell.source))
             for cell in nbformat.read(NOTEBOOKS / name, as_version=4).cells if cell.cell_type == "code"]
    body = [node for tree in trees for node in tree.body]
    imports = [node for node in body if isinstance(node, (ast.Import, ast.ImportFrom))]
    defined = {node.name: node for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    missing = [function for function in functions if function not in defined]
    assert not missing, f"{name} no longer defines {missing}"
    namespace: dict = {}
    module = ast.Module(body=imports + [defined[function] for function in functions], type_ignores=[])
    exec(compile(module, name, "exec"), namespace)  # noqa: S102 (the project's own notebook)
    return SimpleNamespace(**{function: namespace[function] for function in functions})


GPT = notebook_functions("01_gpt_from_scratch.ipynb", "generate_greedy_by_hand", "forward_with_cache_by_hand",
                         "empty_cache", "MultiHeadAttention", "LayerNorm", "FeedForward", "TransformerBlock",
                         "GPTModel", "bpe_by_hand")
LOADER = notebook_functions("03_loading_pretrained_gpt2.ipynb", "gpt2_state_dict_by_hand")
LORA = notebook_functions("04_lora_from_scratch.ipynb", "LoRALayer", "LinearWithLoRA",
                          "replace_linear_with_lora")
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


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False}, {"n_heads": 1, "n_layers": 3}])
def test_students_modules_load_the_packages_weights_and_give_its_logits(overrides):
    reference = tiny_model(seed=3, **overrides)
    mine = GPT.GPTModel(reference.cfg).eval()
    mine.load_state_dict(reference.state_dict(), strict=True)  # the same names, every one of them
    assert mine.out_head.weight is mine.tok_emb.weight  # still tied after loading
    ids = random_ids(3, 40, seed=2)
    with torch.no_grad():
        assert (mine(ids) - reference(ids)).abs().max().item() < 1e-5
        logits, _ = GPT.forward_with_cache_by_hand(mine, ids, GPT.empty_cache(mine, 3))  # the hand cache too
        assert (logits - reference(ids)).abs().max().item() < 1e-5
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in reference.parameters())


def test_students_attention_is_causal_and_drops_out_only_in_training():
    cfg = GPTConfig.from_preset("tiny", drop_rate=0.5)
    torch.manual_seed(0)
    att = GPT.MultiHeadAttention(cfg)
    x = torch.randn(2, 10, cfg.emb_dim)
    changed = x.clone()
    changed[:, 6:] += 1.0  # change the last four tokens only
    with torch.no_grad():
        att.eval()
        assert torch.equal(att(x)[:, :6], att(changed)[:, :6])  # earlier tokens never see later ones
        assert torch.equal(att(x), att(x))
        att.train()
        assert not torch.equal(att(x), att(x))


def test_students_bpe_gives_tiktokens_ids():
    tokenizer = get_tokenizer()
    ranks = {tokenizer.decode_single_token_bytes(i): i for i in range(tokenizer.n_vocab - 1)}
    pattern = regex.compile(r50k_pat_str)  # GPT-2's own pre-tokenization
    text = load_text()[:3000] + " naïve café 12345 😀 --- \n\n  tabs\tand spaces"
    for word in pattern.findall(text):
        ids, history = GPT.bpe_by_hand(word, ranks)
        assert ids == tokenizer.encode_ordinary(word), word
        assert b"".join(history[-1]) == word.encode("utf-8")


def gpt2_file_variants(tmp_path: Path) -> list[Path]:
    """A tiny random GPT-2 written by Hugging Face (names with a "transformer." prefix), and the same tensors
    in the Hub's layout: no prefix, causal-mask buffers, a stored copy of the tied head."""
    torch.manual_seed(5)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=256))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        tensors = {name.removeprefix("transformer."): f.get_tensor(name) for name in f.keys()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 256, 256).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()
    save_file(tensors, str(tmp_path / "hub.safetensors"), metadata={"format": "pt"})
    return [tmp_path / "hf" / "model.safetensors", tmp_path / "hub.safetensors"]


def test_students_loader_gives_load_gpt2s_model_on_both_layouts(tmp_path: Path):
    for path in gpt2_file_variants(tmp_path):
        state = LOADER.gpt2_state_dict_by_hand(path)
        mine = GPTModel(GPTConfig.from_preset("tiny"))
        mine.load_state_dict(state, strict=True)
        package = load_gpt2("tiny", weights_path=path)
        for name, tensor in package.state_dict().items():
            assert torch.equal(mine.state_dict()[name], tensor), (path.name, name)
        ids = random_ids(2, 20)
        with torch.no_grad():
            assert torch.equal(mine(ids), package(ids))


@pytest.mark.parametrize(("in_dim", "out_dim", "rank", "alpha"),
                         [(768, 768, 8, 16), (64, 256, 4, 1), (5, 3, 7, 2.5)])
def test_students_lora_layer_is_the_packages_bit_for_bit(in_dim, out_dim, rank, alpha):
    torch.manual_seed(0)
    mine = LORA.LoRALayer(in_dim, out_dim, rank, alpha)
    torch.manual_seed(0)
    package = LoRALayer(in_dim, out_dim, rank=rank, alpha=alpha)
    assert torch.equal(mine.A, package.A) and mine.scaling == package.scaling  # same init, same draws
    x = torch.randn(2, 3, in_dim)  # (batch, n_tokens, in_dim)
    with torch.no_grad():
        package.B.normal_()
        mine.load_state_dict(package.state_dict(), strict=True)
        assert torch.equal(mine(x), package(x))
        linear = torch.nn.Linear(in_dim, out_dim)
        wrapped_mine = LORA.LinearWithLoRA(linear, rank, alpha)
        wrapped_package = LinearWithLoRA(linear, rank, alpha)
        wrapped_package.lora.B.normal_()
        wrapped_mine.load_state_dict(wrapped_package.state_dict(), strict=True)
        assert torch.equal(wrapped_mine(x), wrapped_package(x))


def test_students_injection_wraps_what_the_package_wraps():
    base = tiny_model(seed=4)
    mine, package = copy.deepcopy(base), copy.deepcopy(base)
    LORA.replace_linear_with_lora(mine.blocks, 4, 8)
    replace_linear_with_lora(package, LoRAConfig(rank=4, alpha=8))
    assert mine.state_dict().keys() == package.state_dict().keys()
    ids = random_ids(2, 16)
    with torch.no_grad():
        for layer in lora_layers(package).values():
            layer.lora.B.normal_(std=0.02)
        mine.load_state_dict(package.state_dict(), strict=True)
        assert torch.equal(mine(ids), package(ids)) and not torch.equal(mine(ids), base(ids))


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
