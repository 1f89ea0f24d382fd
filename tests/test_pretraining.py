"""Pretraining: the shipped text and its windows, the next-token loss against F.cross_entropy, decoding
(greedy, temperature, top-k, seeded sampling), a quick pretraining run through the CLI (offline) and the
model it saves, read back by our loader and by Hugging Face's GPT2LMHeadModel."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel

from llm_scratch import GPTConfig, GPTModel, generate, get_tokenizer
from llm_scratch.cli import main
from llm_scratch.data import NextTokenDataset, load_text, split_tokens, text_dataloaders
from llm_scratch.generate import next_token
from llm_scratch.language_model import evaluate_language_model, next_token_loss, train_language_model
from llm_scratch.pretrain import QUICK_CONTEXT_LENGTH, PretrainSettings, build_model, pretrain
from llm_scratch.pretrained import load_gpt2
from llm_scratch.run_record import read_record

# The shipped story, as the note on its provenance describes it.
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
VERDICT_CHARS, VERDICT_TOKENS = 20_479, 5_145


def tiny_model(seed: int = 123) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny")).eval()


# ---- The text and its windows ----

def test_the_shipped_text_is_the_verdict():
    text = load_text()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == VERDICT_SHA256
    assert len(text) == VERDICT_CHARS
    assert len(get_tokenizer().encode_ordinary(text)) == VERDICT_TOKENS


@pytest.mark.parametrize(("context_length", "stride", "n_train", "n_val"), [
    (256, 256, 18, 2),  # full mode: 4,630 training tokens hold 18 windows of 256 + 1
    (64, 64, 72, 8),  # quick mode
    (256, 128, 35, 3),  # overlapping windows
])
def test_windows_and_the_split_by_position(context_length, stride, n_train, n_val):
    ids = get_tokenizer().encode_ordinary(load_text())
    train_ids, val_ids = split_tokens(ids)
    assert (len(train_ids), len(val_ids)) == (4_630, 515)  # int(0.9 * 5,145) and the rest
    assert train_ids + val_ids == ids

    loaders = text_dataloaders(load_text(), context_length, stride, batch_size=2)
    train, validation = loaders.train.dataset, loaders.validation.dataset
    assert (len(train), len(validation)) == (n_train, n_val)
    # Each part's windows are cut from that part alone: no validation token is ever a training input
    # or target, and the last target of the last window is still inside its part.
    assert train.token_ids.tolist() == train_ids and validation.token_ids.tolist() == val_ids
    for dataset, part in ((train, train_ids), (validation, val_ids)):
        assert dataset.starts == list(range(0, len(part) - context_length, stride))
        assert dataset.starts[-1] + context_length + 1 <= len(part) < dataset.starts[-1] + stride + \
            context_length + 1  # the last window that fits: one more stride would not
        for index in (0, len(dataset) - 1):
            inputs, targets = dataset[index]
            start = dataset.starts[index]
            assert inputs.tolist() == part[start : start + context_length]
            assert targets.tolist() == part[start + 1 : start + context_length + 1]  # shifted by one

    inputs, targets = next(iter(loaders.train))
    assert inputs.shape == targets.shape == (2, context_length)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_the_training_order_depends_on_the_seed_only():
    def first_epoch(seed):
        return [inputs[:, 0].tolist() for inputs, _ in text_dataloaders(load_text(), 64, seed=seed).train]

    assert first_epoch(1) == first_epoch(1) != first_epoch(2)


def test_texts_too_short_or_missing_are_explained(tmp_path):
    with pytest.raises(ValueError, match="make no window of context_length 600"):
        text_dataloaders(load_text(), context_length=600)  # the validation part holds 515 tokens
    with pytest.raises(ValueError, match="context_length and stride must be >= 1"):
        NextTokenDataset(list(range(10)), context_length=4, stride=0)
    with pytest.raises(FileNotFoundError, match="no text file at"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_text(tmp_path / "latin1.txt")


# ---- The loss ----

def test_loss_by_hand_equals_cross_entropy_and_perplexity_is_its_exp():
    model = tiny_model()
    loader = text_dataloaders(load_text(), 64, batch_size=4).validation
    inputs, targets = next(iter(loader))
    with torch.no_grad():
        logits = model(inputs)  # (batch, n_tokens, vocab_size)
    # In float64, so that only the formula can differ (in float32 two summation orders of 256 numbers near
    # 10.8 may already differ by 1e-6, the last digit float32 keeps).
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    by_hand = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean()  # each target's log-probability
    in_float64 = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten())
    assert abs(by_hand.item() - in_float64.item()) < 1e-6
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    with torch.no_grad():
        package = next_token_loss(model, (inputs, targets))
    assert abs(package.item() - reference.item()) < 1e-6
    assert abs(by_hand.item() - reference.item()) < 1e-5  # float32 against float64

    measured = evaluate_language_model(model, loader)  # every validation token: 8 windows of 64
    everything = torch.cat([model(x).flatten(0, 1) for x, _ in loader]).detach()
    all_targets = torch.cat([y.flatten() for _, y in loader])
    expected = F.cross_entropy(everything, all_targets).item()
    assert abs(measured["loss"] - expected) < 1e-5
    assert measured["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_untrained_loss_is_near_ln_of_the_vocabulary():
    """Random logits near 0 spread the probability almost evenly: loss about ln(50,257) = 10.82."""
    model = build_model("tiny", QUICK_CONTEXT_LENGTH, seed=123).eval()
    measured = evaluate_language_model(model, text_dataloaders(load_text(), QUICK_CONTEXT_LENGTH).validation)
    assert abs(measured["loss"] - math.log(50_257)) < 0.5
    assert abs(math.log(measured["perplexity"]) - measured["loss"]) < 1e-9


# ---- The training loop ----

@pytest.mark.parametrize("progress", [False, True])
def test_the_package_loop_gives_the_losses_of_a_plain_loop(progress):
    """`train` reads the batches in the order a plain `for batch in loader` does (progress bar or not), and
    seeds and steps as notebook 02's hand-written loop: the same seed gives the same losses."""
    text = "The cat sat on the mat. " * 60  # 378 training tokens: 23 windows of 16, 12 batches

    def fresh():
        return build_model("tiny", 16, seed=5), text_dataloaders(text, 16, batch_size=2, seed=5)

    model, loaders = fresh()
    torch.manual_seed(5)
    model.train()  # dropout on: its random masks must come in the same order too
    named = dict(model.named_parameters())  # as train(): no weight decay on biases and norms
    exempt = [p for name, p in named.items() if name.endswith(("bias", "scale", "shift"))]
    decayed = [p for name, p in named.items() if not name.endswith(("bias", "scale", "shift"))]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": 0.1},
                                   {"params": exempt, "weight_decay": 0.0}], lr=3e-3, fused=True)
    by_hand = []
    for batch in loaders.train:
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss(model, batch)
        loss.backward()
        optimizer.step()
        by_hand.append(loss.item())

    model, loaders = fresh()
    # No loss check within the epoch: iterating a loader draws a seed from torch's global generator, so
    # with dropout the steps after a check would differ from a loop that makes none.
    history = train_language_model(model, loaders.train, loaders.validation, epochs=1, lr=3e-3,
                                   weight_decay=0.1, eval_every=100, seed=5, device="cpu", progress=progress)
    assert len(history.step_loss) == len(by_hand) == 12
    assert max(abs(a - b) for a, b in zip(history.step_loss, by_hand, strict=True)) < 1e-6


# ---- Decoding ----

def test_top_k_never_yields_a_token_outside_the_k_highest():
    torch.manual_seed(0)
    logits = torch.randn(4, 1_000)  # (batch, vocab_size)
    k = 5
    allowed = torch.topk(logits, k, dim=-1).indices  # (batch, k)
    generator = torch.Generator().manual_seed(1)
    drawn = torch.cat([next_token(logits, 2.0, k, generator) for _ in range(500)], dim=1)  # (batch, 500)
    for row in range(4):
        assert set(drawn[row].tolist()) == set(allowed[row].tolist())  # all k drawn, nothing else

    # The same through `generate`: at every step the chosen token is among the k highest of that step.
    model = tiny_model()
    prompt = torch.tensor([[40, 367, 2885, 1464]])  # (1, 4)
    out = generate(model, prompt, max_new_tokens=12, context_size=64, temperature=1.5, top_k=3, seed=5)
    with torch.no_grad():
        logits = model(out[:, :-1])[0, prompt.shape[1] - 1 :]  # (12, vocab_size): the logits of each step
    chosen = out[0, prompt.shape[1] :]  # (12,)
    assert (torch.topk(logits, 3, dim=-1).indices == chosen[:, None]).any(dim=-1).all()


def test_temperature_zero_is_greedy_and_deterministic():
    model = tiny_model()
    prompt = torch.tensor([[40, 367, 2885, 1464]])
    first = generate(model, prompt, max_new_tokens=10, context_size=64)
    assert torch.equal(first, generate(model, prompt, max_new_tokens=10, context_size=64, seed=99))
    ids = prompt
    with torch.no_grad():
        for _ in range(10):  # greedy by hand: the most likely next token, again and again
            ids = torch.cat([ids, model(ids)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(first, ids)


def test_seeded_sampling_is_reproducible_and_equals_the_hand_loop():
    model = tiny_model()
    prompt = torch.tensor([[40, 367, 2885, 1464]])
    settings = {"max_new_tokens": 15, "context_size": 64, "temperature": 1.0, "top_k": 50}
    first = generate(model, prompt, seed=7, **settings)
    assert torch.equal(first, generate(model, prompt, seed=7, **settings))
    assert not torch.equal(first, generate(model, prompt, seed=8, **settings))

    generator = torch.Generator().manual_seed(7)
    ids = prompt
    with torch.no_grad():
        for _ in range(15):
            logits = model(ids)[:, -1]  # (1, vocab_size)
            kth = torch.topk(logits, 50).values[:, -1:]  # the 50th highest score
            logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits / 1.0, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    assert torch.equal(first, ids)


# ---- Pretraining end to end ----

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """`python -m llm_scratch pretrain --quick` in a fresh process, offline; returns its run folder."""
    work = tmp_path_factory.mktemp("pretrain")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("LLM_SCRATCH_QUICK", None)  # --quick alone must be enough
    result = subprocess.run([sys.executable, "-m", "llm_scratch", "pretrain", "--quick", "--out", "run",
                             "--no-progress"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert "epoch 1 sample: 'I had always thought" in result.stdout
    return work / "run"


def test_the_pretrain_command_runs_offline_and_writes_its_files(quick_run):
    for name in ("model.safetensors", "config.json", "metrics.json", "loss.png", "samples.txt"):
        assert (quick_run / name).is_file(), name
    metrics = json.loads((quick_run / "metrics.json").read_text())
    history = metrics["history"]
    assert metrics["quick"] and metrics["model_name"] == "tiny" and metrics["data"] == "the-verdict.txt"
    assert history["unit"] == "tokens"
    # 10 epochs of 36 steps, each 2 windows of 64 target tokens.
    assert metrics["settings"]["epochs"] == 10 and len(history["step_loss"]) == 360
    assert history["step_seen"][-1] == metrics["tokens_seen"] == 360 * 2 * 64
    assert len(metrics["samples"]) == 10
    assert all(sample.startswith("I had always thought") for sample in metrics["samples"])
    assert (quick_run / "samples.txt").read_text().count("I had always thought") == 10
    assert metrics["validation_perplexity"] == pytest.approx(math.exp(metrics["validation_loss"]))


def test_quick_pretraining_halves_the_training_loss(quick_run):
    metrics = json.loads((quick_run / "metrics.json").read_text())
    first = metrics["history"]["step_loss"][0]
    assert abs(first - math.log(50_257)) < 0.5  # it starts as a uniform guess
    assert metrics["train_loss"] <= 0.5 * first, (first, metrics["train_loss"])
    assert metrics["validation_loss"] < first - 3  # what it learned (word frequencies) holds on unseen text


def test_the_saved_model_loads_with_our_loader_and_with_hugging_face(quick_run):
    ours = load_gpt2(weights_path=quick_run / "model.safetensors")
    hf = GPT2LMHeadModel.from_pretrained(quick_run).eval()
    inputs, _ = next(iter(text_dataloaders(load_text(), 64, batch_size=4).validation))
    with torch.no_grad():
        difference = (ours(inputs) - hf(inputs).logits).abs().max().item()
    assert difference < 1e-5, difference
    # The saved weights are the trained ones: the loss recorded at the end of training, measured again.
    metrics = json.loads((quick_run / "metrics.json").read_text())
    measured = evaluate_language_model(ours, text_dataloaders(load_text(), 64).validation)["loss"]
    assert abs(measured - metrics["validation_loss"]) < 1e-5


def test_a_given_text_is_honoured_and_wrong_settings_are_refused(tmp_path):
    text_file = tmp_path / "story.txt"
    text_file.write_text("The cat sat on the mat. " * 60, encoding="utf-8")  # 421 tokens
    metrics = pretrain(PretrainSettings(data_path=text_file, context_length=16, epochs=1, batch_size=4,
                                        out=tmp_path / "run", progress=False, device="cpu"))
    assert metrics["data"] == str(text_file) and metrics["settings"]["context_length"] == 16
    assert metrics["tokens_seen"] == 23 * 16  # int(0.9 * 421) = 378 tokens: windows at 0, 16, ..., 352

    with pytest.raises(ValueError, match="quick mode trains the 'tiny' preset"):
        pretrain(PretrainSettings(quick=True, model_name="gpt2-small", out=tmp_path / "no"))
    with pytest.raises(ValueError, match="longer than the tiny model's 256 positions"):
        pretrain(PretrainSettings(context_length=512, out=tmp_path / "no"))
    assert not (tmp_path / "no").exists()  # refused before anything was written


# ---- The run folder: staged, recorded, refused when it would mix runs ----

def test_pretrain_refuses_a_folder_holding_a_run_and_replaces_it_only_when_told(snapshot, quick_runs,
                                                                              tmp_path, capsys):
    run = tmp_path / "pretrain"
    quick = ["pretrain", "--quick", "--epochs", "1", "--no-progress", "--out", str(run)]
    assert main(quick) == 0
    before = snapshot(tmp_path)
    assert main([*quick, "--seed", "2"]) == 2  # a run is there: refused, byte for byte unchanged
    assert "already holds a run; pass --overwrite" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert main([*quick, "--seed", "2", "--overwrite"]) == 0  # replaced, whole
    assert read_record(run, "pretrain").settings["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain"]  # no staging folder or lock left

    finetuned = shutil.copytree(quick_runs["lora"], tmp_path / "lora")
    before = snapshot(tmp_path)
    assert main(["pretrain", "--quick", "--out", str(finetuned), "--overwrite", "--no-progress"]) == 2
    assert "holds a finetune run, and pretrain writes runs of its own kind" in capsys.readouterr().err
    assert main(["finetune", "--quick", "--out", str(run), "--overwrite", "--no-progress"]) == 2
    assert "holds a pretrain run, and finetune writes runs of its own kind" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
