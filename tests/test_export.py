"""Export: a fine-tuning or pretraining run in Hugging Face's formats computes what the run computes.

The runs are gpt2-small-shaped with random weights: the test writes the "Hub" base itself (the download is
replaced by its file), and trains each method for one step, so that the adapter and weights differ from the
base; the exactness of the export is what is under test, not the training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

from llm_scratch import finetune as finetune_module
from llm_scratch import run_record, run_settings
from llm_scratch.classifier import last_token_logits
from llm_scratch.cli import main
from llm_scratch.config import PRESETS
from llm_scratch.data import SpamSplits, load_spam_splits, spam_dataloaders
from llm_scratch.export import export_run
from llm_scratch.finetune import FinetuneSettings, finetune, load_run
from llm_scratch.model import GPTModel
from llm_scratch.pretrained import save_gpt2_safetensors
from llm_scratch.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUICK_TEST_SPLIT = load_spam_splits(quick=True, seed=123).test  # the 100 messages the probabilities are of


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A gpt2-small-shaped GPT-2 with random weights as the Hub serves it: model.safetensors, config.json."""
    folder = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    save_gpt2_safetensors(GPTModel(PRESETS["gpt2-small"]), folder / "model.safetensors", hf_config=True)
    return folder


def gpt2_small_run(method: str, hub: Path, out: Path, monkeypatch) -> Path:
    """A gpt2-small fine-tuning run from the "Hub" base: one epoch of one batch (8 training messages)."""
    monkeypatch.setattr(run_settings, "download_gpt2", lambda name: hub / "model.safetensors")
    monkeypatch.setattr(run_record, "download_gpt2", lambda name: hub / "model.safetensors")
    splits = load_spam_splits(quick=True, seed=123)
    few = SpamSplits(splits.train[:8], splits.validation[:4], splits.test[:4])
    monkeypatch.setattr(finetune_module, "load_spam_splits", lambda **options: few)
    lora = finetune_module.CLASSIFIER_LORA if method in ("lora", "dora") else None
    finetune(FinetuneSettings(method=method, model_name="gpt2-small", quick=False, epochs=1, lr=2e-3,
                              device="cpu", out=out, progress=False, lora_config=lora))
    return out


def our_probabilities(run: Path) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The run's class probabilities on the quick test split, and the token ids and mask that gave them, in
    batches of messages of similar length (less padding to compute than one batch of all 100)."""
    model, record = load_run(run, device="cpu")
    tokenizer = get_tokenizer()
    by_length = sorted(QUICK_TEST_SPLIT, key=lambda row: len(tokenizer.encode_ordinary(row.text)))
    splits = SpamSplits(by_length, by_length[:1], by_length)
    batches = []
    for batch in spam_dataloaders(splits, batch_size=20, max_length=record.max_length).test:
        # right-padded with end-of-text, as Hugging Face's classifier expects
        with torch.no_grad():
            probabilities = last_token_logits(model(batch.input_ids), batch.lengths).softmax(-1)
        mask = torch.arange(batch.input_ids.shape[1]) < batch.lengths[:, None]
        batches.append((probabilities, batch.input_ids, mask.long()))
    return batches


@pytest.mark.parametrize("method", ["lora", "dora", "full", "last-block"])
def test_an_exported_classifier_gives_the_runs_probabilities_in_hugging_face(method, hub, tmp_path,
                                                                             monkeypatch):
    run = gpt2_small_run(method, hub, tmp_path / method, monkeypatch)
    batches = our_probabilities(run)
    out = export_run(run, tmp_path / "exported")
    if method in ("lora", "dora"):
        base = GPT2ForSequenceClassification.from_pretrained(hub, config=out)  # labels and padding from out
        hf = PeftModel.from_pretrained(base, out)
        assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            "openai-community/gpt2"
    else:
        hf = GPT2ForSequenceClassification.from_pretrained(out)
    assert hf.config.id2label == {0: "ham", 1: "spam"} and hf.config.pad_token_id == 50256
    hf.eval()
    with torch.no_grad():
        theirs = torch.cat([hf(input_ids=ids, attention_mask=mask).logits.softmax(-1)
                            for _, ids, mask in batches])  # (100, 2)
    ours = torch.cat([probabilities for probabilities, _, _ in batches])  # (100, 2)
    assert ours.shape == (len(QUICK_TEST_SPLIT), 2)
    difference = (theirs - ours).abs().max().item()
    assert difference < 1e-5, difference
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    assert ours[:, 1].std() > 0  # the run computes something that depends on the message


def test_a_quick_run_exports_with_its_base_and_the_readme_recipe_classifies(quick_runs, tmp_path, messages):
    """The README's lines, run as written on a quick LoRA run's export (its base is in `base/`)."""
    out = tmp_path / "lora-hf"
    assert main(["export", "--run", str(quick_runs["lora"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "base", "config.json", "merges.txt",
        "tokenizer_config.json", "vocab.json"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    recipe = re.search(r"## Use your run with Hugging Face.*?```python\n(.*?)```", readme, re.S).group(1)
    recipe = recipe.replace('"runs/lora-hf"', repr(str(out)))
    recipe = recipe.replace('"openai-community/gpt2"', repr(str(out / "base")))  # a quick run's base
    recipe = recipe.replace('["WINNER! Claim your prize now", "See you at lunch?"]', repr(messages))
    namespace: dict = {}
    exec(recipe, namespace)  # noqa: S102 (the project's own README)
    expected = finetune_module.classify_with_run(quick_runs["lora"], messages)
    hf_labels = [namespace["model"].config.id2label[int(i)] for i in namespace["probabilities"].argmax(-1)]
    assert hf_labels == [label for label, _ in expected]
    hf_top = namespace["probabilities"].max(-1).values.tolist()
    assert hf_top == pytest.approx([p for _, p in expected], abs=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)  # Hugging Face's tokenizer: the same ids as ours
    assert all(tokenizer(text)["input_ids"] == get_tokenizer().encode_ordinary(text) for text in messages)


def test_a_pretraining_run_exports_as_it_is_and_other_folders_are_refused(tmp_path, capsys):
    run = tmp_path / "pretrain"
    assert main(["pretrain", "--quick", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    out = tmp_path / "pretrain-hf"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (run / name).read_bytes()
    GPT2LMHeadModel.from_pretrained(out)  # loads
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--out", str(out)]) == 2  # an export is there already
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "run.json not found" in capsys.readouterr().err
    (run / "model.safetensors").write_bytes(b"damaged")
    assert main(["export", "--run", str(run), "--out", str(out), "--overwrite"]) == 2
    assert "is not the file this run was saved with" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() != b"damaged"  # the old export is whole
