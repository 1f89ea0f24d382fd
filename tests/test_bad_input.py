"""Bad input as a careless user gives it: every case ends in a run folder that is right, or in a one-line
refusal that names what is wrong; never in a folder that `classify` trusts and that answers wrongly.

The classes: (1) a run folder holding pieces of two runs, (2) training or loading NaN and infinity,
(3) arguments that must be honoured or refused, (5) command-line manners. Operating-system faults (4) and
kills are in test_faults.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from llm_scratch import finetune as finetune_module
from llm_scratch import run_record
from llm_scratch.adapters import load_lora
from llm_scratch.classifier import add_classification_head, train_classifier
from llm_scratch.cli import build_parser, main
from llm_scratch.config import GPTConfig
from llm_scratch.data import load_spam_splits, spam_dataloaders
from llm_scratch.finetune import classify_with_run, load_run
from llm_scratch.model import GPTModel
from llm_scratch.pretrained import load_gpt2
from llm_scratch.run_folder import fingerprint
from llm_scratch.run_record import record_path
from llm_scratch.run_settings import write_quick_base_model
from llm_scratch.training import train


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `python -m llm_scratch ARGS` in this process: exit code, stdout, stderr."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def record_checksum(run_dir: Path, path: Path) -> None:
    """Write the fingerprint of the run's file `path` (its base or its trained tensors) into run.json, as if
    it were genuine: so that the check under test is the one after the checksums."""
    run = json.loads(record_path(run_dir).read_text())
    (run["base"] if path.name == run["base"]["path"] else run["files"][path.name]).update(fingerprint(path))
    record_path(run_dir).write_text(json.dumps(run))


@pytest.fixture
def good_run(quick_runs, tmp_path) -> Path:
    """A copy of a complete quick LoRA run, inside a folder of its own (tmp_path/runs/lora)."""
    return shutil.copytree(quick_runs["lora"], tmp_path / "runs" / "lora")


# ---- (3) Every argument honoured or refused; a refused run changes nothing ----

BAD_ARGUMENTS = [  # (arguments, what the one-line error must say)
    (["--epochs", "0"], "--epochs must be a whole number >= 1, got 0"),
    (["--epochs", "-3"], "--epochs must be a whole number >= 1"),
    (["--lr", "0"], r"--lr must be a number > 0 \(0 would train nothing\)"),
    (["--lr=-1e-3"], "--lr must be a number > 0"),
    (["--lr", "nan"], "--lr must be a number > 0"),
    (["--lr", "inf"], "--lr must be a number > 0"),
    (["--eval-every", "0"], "--eval-every must be a whole number >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be a whole number >= 1"),
    (["--batch-size", "-8"], "--batch-size must be a whole number >= 1"),
    (["--seed", "-1"], "--seed must be a whole number from 0 to 18,446,744,073,709,551,615"),
    (["--seed", str(2**64)], "--seed must be a whole number from 0 to"),
    (["--seed", "1" + "0" * 40], "--seed must be a whole number from 0 to"),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "--device must be cpu, cuda, cuda:N"),
    (["--device", ""], "--device must be cpu, cuda, cuda:N"),
    (["--model-name", "gpt2-huge"], "unknown --model-name 'gpt2-huge'"),
    (["--model-name", "gpt2-medium"], "quick mode always trains the 'tiny' model, not --model-name gpt2-"),
    (["--weights-path", "model.safetensors"], "--weights-path cannot be used in quick mode"),
    (["--rank", "0"], "LoRA rank must be an integer >= 1"),
    (["--alpha", "0"], "LoRA alpha must be a finite number > 0"),
    (["--alpha", "inf"], "LoRA alpha must be a finite number > 0, got inf"),
    (["--alpha", "nan"], "LoRA alpha must be a finite number > 0"),
]


@pytest.mark.parametrize("arguments, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_refused_in_one_line_and_the_existing_run_is_untouched(snapshot, good_run, capsys,
                                                                                 arguments, message):
    before = snapshot(good_run.parent)
    code, _, err = cli(capsys, "finetune", "--quick", "--out", good_run, "--overwrite", "--no-progress",
                       *arguments)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err), err
    assert snapshot(good_run.parent) == before  # the same files, byte for byte, and no temporary ones


@pytest.mark.parametrize("arguments, message", [
    (["--random-init", "--weights-path", "w.safetensors"], "--weights-path and --random-init contradict"),
    (["--method", "full", "--rank", "4"], "--rank and --alpha .* which method 'full' has none of"),
    (["--method", "last-block", "--alpha", "32"], "which method 'last-block' has none of"),
    (["--method", "full", "--loraplus-lr-ratio", "16"], "use it with method lora, dora or qlora, not 'full'"),
])
def test_options_that_contradict_each_other_are_refused(tmp_path, capsys, arguments, message):
    code, _, err = cli(capsys, "finetune", *arguments, "--out", tmp_path / "run")
    assert code == 2 and re.search(message, err) and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("schedule", ["linear", "Cosine", ""])
def test_a_schedule_the_package_lacks_is_refused_by_the_library_as_by_the_cli(capsys, schedule):
    with pytest.raises(ValueError, match=f"--lr-schedule must be one of constant, cosine, got '{schedule}'"):
        finetune_module.FinetuneSettings(lr_schedule=schedule)
    with pytest.raises(SystemExit):
        main(["finetune", "--lr-schedule", schedule])
    assert f"invalid choice: '{schedule}'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_device_this_machine_lacks_is_refused(tmp_path, capsys):
    code, _, err = cli(capsys, "finetune", "--quick", "--device", "cuda", "--out", tmp_path / "run")
    assert code == 2 and "PyTorch sees no CUDA GPU here; use --device cpu" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["", ".", ".."])
def test_the_current_folder_is_never_a_run_folder(snapshot, tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = cli(capsys, "finetune", "--quick", "--out", out, "--overwrite", "--no-progress")
    assert code == 2 and "is the current folder or one above it" in err
    assert snapshot(tmp_path) == {}


def test_given_arguments_are_honoured(tmp_path):
    settings = finetune_module.FinetuneSettings(quick=True, out=tmp_path / "run", epochs=1, lr=1e-3,
                                                lr_schedule="constant", eval_every=1, batch_size=4, seed=5,
                                                progress=False)
    metrics = finetune_module.finetune(settings)
    history = metrics["history"]
    run = metrics["settings"]
    assert (run["epochs"], run["lr"], run["batch_size"], run["seed"]) == (1, 1e-3, 4, 5)
    assert run["lr_schedule"] == "constant" and set(history["step_lr"]) == {1e-3}  # not quick mode's cosine
    assert len(history["epoch_metrics"]["validation_loss"]) == 1  # one epoch, not the default 8
    assert len(history["eval_seen"]) == len(history["step_loss"])  # an evaluation after every step
    assert max(b - a for a, b in zip([0, *history["step_seen"]], history["step_seen"], strict=False)) == 4


# ---- (1) A run folder never mixes two runs ----

def test_an_adapter_copied_from_another_run_is_refused(good_run, quick_runs, capsys):
    shutil.copy(quick_runs["lora-seed2"] / "adapter.safetensors", good_run / "adapter.safetensors")
    code, out, err = cli(capsys, "classify", "--run", good_run, "hello")
    assert code == 2 and out == ""
    assert f"{good_run / 'adapter.safetensors'} (the trained tensors) is not the file this run" in err


def test_a_base_model_from_another_run_is_refused(good_run, quick_runs, capsys):
    # What a killed or refused re-run used to leave: the old adapter beside a new quick base model.
    shutil.copy(quick_runs["lora-seed2"] / "base_tiny.safetensors", good_run / "base_tiny.safetensors")
    code, _, err = cli(capsys, "classify", "--run", good_run, "hello")
    assert code == 2
    assert f"{good_run / 'base_tiny.safetensors'} (the base model's weights) is not the file" in err


def test_a_local_weights_file_replaced_after_training_is_refused(good_run, tmp_path, messages, capsys):
    # The run's base as a file outside the folder (what --weights-path records): it gives the same
    # predictions while it is the same file, and is refused once it is replaced.
    expected = classify_with_run(good_run, messages)
    weights = tmp_path / "gpt2" / "model.safetensors"
    weights.parent.mkdir()
    shutil.move(good_run / "base_tiny.safetensors", weights)
    run = json.loads(record_path(good_run).read_text())
    run["base"]["path"] = str(weights)
    record_path(good_run).write_text(json.dumps(run))
    assert classify_with_run(good_run, messages) == expected
    write_quick_base_model(weights, seed=99)  # another model in the same file
    code, _, err = cli(capsys, "classify", "--run", good_run, "hello")
    assert code == 2 and f"{weights} (the base model's weights) is not the file this run was saved" in err


def test_hub_weights_that_changed_in_the_cache_are_refused(good_run, tmp_path, messages, monkeypatch):
    cached = tmp_path / "hub" / "model.safetensors"
    cached.parent.mkdir()
    shutil.copy(good_run / "base_tiny.safetensors", cached)
    monkeypatch.setattr(run_record, "download_gpt2", lambda model_name: cached)  # the cache, offline
    run = json.loads(record_path(good_run).read_text())
    expected = classify_with_run(good_run, messages)
    run["base"] |= {"kind": "hub", "path": None}
    record_path(good_run).write_text(json.dumps(run))
    assert classify_with_run(good_run, messages) == expected
    write_quick_base_model(cached, seed=99)
    with pytest.raises(ValueError, match="the base model's weights.* is not the file this run was saved"):
        load_run(good_run)


@pytest.mark.parametrize("damage", ["missing", "unexpected", "wrong shape"])
def test_trained_weights_load_strictly(quick_runs, tmp_path, damage):
    run_dir = shutil.copytree(quick_runs["last-block"], tmp_path / "last-block")
    path = run_dir / "weights.safetensors"
    tensors = load_file(path)
    assert "out_head.weight" in tensors and "blocks.1.att.W_query.weight" in tensors  # the last of 2 blocks
    if damage == "missing":
        del tensors["blocks.1.norm2.scale"]  # used to keep the base value without a word
    elif damage == "unexpected":
        tensors["blocks.0.norm1.scale"] = torch.ones(64)  # a block this method does not train
    else:
        tensors["final_norm.shift"] = torch.zeros(32)
    save_file(tensors, path)
    record_checksum(run_dir, path)  # so that the strict load is what refuses
    with pytest.raises(ValueError, match=f"does not hold exactly the tensors the run trained: .*{damage}"):
        load_run(run_dir)


def test_a_complete_last_block_run_loads_its_trained_tensors(quick_runs, messages):
    model, run = load_run(quick_runs["last-block"])
    saved = load_file(quick_runs["last-block"] / "weights.safetensors")
    state = model.state_dict()
    assert run.method == "last-block" and all(torch.equal(state[k], v) for k, v in saved.items())


# ---- (2) NaN and infinity: training stops, loading refuses ----

def test_training_stops_at_the_first_non_finite_loss_before_using_it():
    model = torch.nn.Linear(3, 1)
    data = DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=2)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(batch[0]).pow(2).mean()
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(RuntimeError, match=r"the training loss is nan at step 3 \(epoch 1\); training "
                                           r"stopped. Likely causes: a learning rate too large"):
        train(model, data, data, loss_fn, epochs=2, eval_every=100, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step was never applied


def test_a_diverging_run_stops_with_the_step_and_saves_nothing(snapshot, good_run, capsys):
    before = snapshot(good_run.parent)
    code, _, err = cli(capsys, "finetune", "--quick", "--lr", "1e10", "--out", good_run, "--overwrite",
                       "--no-progress")
    assert code == 2 and "the training loss is nan at step " in err and "learning rate too large" in err
    assert snapshot(good_run.parent) == before


def test_nan_left_in_the_trained_tensors_is_never_saved(snapshot, good_run, monkeypatch):
    def diverge_at_the_end(model, *args, **kwargs):
        history = train_classifier(model, *args, **kwargs)
        with torch.no_grad():
            model.out_head.weight[0, :2] = float("nan")  # as a last optimizer step gone wrong would
        return history

    monkeypatch.setattr(finetune_module, "train_classifier", diverge_at_the_end)
    before = snapshot(good_run.parent)
    settings = finetune_module.FinetuneSettings(quick=True, out=good_run, overwrite=True, progress=False)
    with pytest.raises(ValueError, match=r"the trained model: tensor 'out_head.weight' holds 2 NaN .* "
                                         r"nothing was saved. Likely causes"):
        finetune_module.finetune(settings)
    assert snapshot(good_run.parent) == before


def tiny_gpt2_file(path: Path, dtype: torch.dtype = torch.float32, poison: str = "") -> Path:
    """A tiny GPT-2 checkpoint in Hugging Face's layout, its tensors cast to `dtype`; `poison`: one NaN in
    that tensor."""
    write_quick_base_model(path, seed=3)
    tensors = {k: v.to(dtype) for k, v in load_file(path).items()}
    if poison:
        tensors[poison].view(-1)[5] = float("nan")
    save_file(tensors, path, metadata={"format": "pt", "n_head": "4"})
    return path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_as_float32_and_train(tmp_path, dtype):
    full = load_gpt2(weights_path=tiny_gpt2_file(tmp_path / "f32.safetensors"))
    half_path = tiny_gpt2_file(tmp_path / "half.safetensors", dtype)
    model = load_gpt2(weights_path=half_path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for (name, ours), original in zip(model.state_dict().items(), full.state_dict().values(), strict=True):
        assert torch.equal(ours, original.to(dtype).float()), name  # exactly the file's values
    assert model.out_head.weight is model.tok_emb.weight
    # Fine-tuning it: the losses stay finite (in half precision on a CPU they became NaN).
    add_classification_head(model, seed=1)
    loaders = spam_dataloaders(load_spam_splits(quick=True, seed=1), batch_size=8, context_length=256)
    history = train_classifier(model, loaders.train, loaders.validation, epochs=1, lr=2e-3, progress=False)
    assert all(torch.isfinite(torch.tensor(history.step_loss)))


def test_a_checkpoint_of_integers_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'wte.weight' holds torch.int8 values, not weights"):
        load_gpt2(weights_path=tiny_gpt2_file(tmp_path / "int.safetensors", torch.int8))


@pytest.mark.parametrize("poison", ["wte.weight", "h.1.attn.c_attn.weight", "ln_f.bias"])
def test_base_weights_with_nan_are_refused_by_name(tmp_path, poison):
    path = tiny_gpt2_file(tmp_path / "nan.safetensors", poison=poison)
    with pytest.raises(ValueError, match=f"nan.safetensors: tensor '{poison}' holds 1 NaN or infinite"):
        load_gpt2(weights_path=path)


def test_a_run_whose_base_holds_nan_is_refused(good_run):
    tiny_gpt2_file(good_run / "base_tiny.safetensors", poison="h.0.mlp.c_fc.weight")
    record_checksum(good_run, good_run / "base_tiny.safetensors")
    with pytest.raises(ValueError, match="tensor 'h.0.mlp.c_fc.weight' holds 1 NaN"):
        load_run(good_run)


def test_an_adapter_holding_nan_is_refused(good_run, capsys):
    path = good_run / "adapter.safetensors"
    tensors = load_file(path)
    tensors["blocks.0.att.W_key.lora.B"][0, 0] = float("nan")  # it used to give confident answers
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError, match=r"tensor 'blocks.0.att.W_key.lora.B' holds 1 NaN"):
        load_lora(GPTModel(GPTConfig.from_preset("tiny")), path)
    record_checksum(good_run, path)
    code, out, err = cli(capsys, "classify", "--run", good_run, "WIN a prize")
    assert code == 2 and out == "" and "tensor 'blocks.0.att.W_key.lora.B' holds 1 NaN" in err


# ---- (5) Command-line manners ----

def test_texts_that_start_with_a_dash_are_classified_after_double_dash(good_run, capsys):
    help_text = build_parser()._subparsers._group_actions[0].choices["classify"].format_help()
    assert "put -- before them" in help_text
    code, out, _ = cli(capsys, "classify", "--run", good_run, "--", "-50% off today only", "--help me")
    assert code == 0
    assert [line.split("  ", 1)[1] for line in out.splitlines()] == ["-50% off today only", "--help me"]
    with pytest.raises(SystemExit) as exit_info:  # without --: argparse's usage error, which shows the --
        main(["classify", "--run", str(good_run), "-50%"])
    assert exit_info.value.code == 2 and "classify [-h] --run RUN [--] texts" in capsys.readouterr().err


def test_a_bad_run_json_is_one_line_naming_the_file_and_the_key(good_run, capsys):
    run = json.loads(record_path(good_run).read_text())
    del run["labels"]
    record_path(good_run).write_text(json.dumps(run))
    code, _, err = cli(capsys, "classify", "--run", good_run, "hello")
    assert code == 2 and err == (f"error: {record_path(good_run)}: the key 'labels' is missing; the file is "
                                 "damaged or was written by another version of llm-scratch: run finetune "
                                 "again\n")
    record_path(good_run).write_text("")  # what a full disk used to leave
    code, _, err = cli(capsys, "classify", "--run", good_run, "hello")
    assert code == 2 and f"{record_path(good_run)} is not valid JSON" in err and err.count("\n") == 1


def test_an_empty_text_is_refused(good_run, capsys):
    code, out, err = cli(capsys, "classify", "--run", good_run, "")
    assert code == 2 and out == "" and err == "error: cannot classify an empty text\n"
