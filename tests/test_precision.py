"""Mixed precision: 16-bit forward passes, float32 weights, a clear refusal where a device lacks the type."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llm_scratch import precision as precision_module
from llm_scratch.classifier import add_classification_head, classification_loss, train_classifier
from llm_scratch.cli import main
from llm_scratch.config import GPTConfig
from llm_scratch.data import SpamSplits, load_spam_splits, spam_dataloaders
from llm_scratch.finetune import FinetuneSettings, finetune
from llm_scratch.model import GPTModel
from llm_scratch.precision import autocast, check_precision, device_supports
from llm_scratch.pretrain import PretrainSettings, pretrain
from llm_scratch.training import train


@pytest.fixture(scope="module")
def splits():
    """A part of quick mode's messages: 120 training (15 steps an epoch), 24 validation, 24 test."""
    whole = load_spam_splits(quick=True, seed=1)
    return SpamSplits(whole.train[:120], whole.validation[:24], whole.test[:24])


def quick_loaders(splits):
    """New loaders each time: a training loader's shuffling moves on with every epoch it serves."""
    return spam_dataloaders(splits, batch_size=8, context_length=256, seed=1)


def tiny_classifier() -> GPTModel:
    torch.manual_seed(0)
    return add_classification_head(GPTModel(GPTConfig.from_preset("tiny")), seed=0)


def train_tiny(splits, precision: str = "fp32"):
    """Two epochs of a tiny classifier, every parameter trained: the model and its History."""
    model, loaders = tiny_classifier(), quick_loaders(splits)
    history = train_classifier(model, loaders.train, loaders.validation, epochs=2, lr=2e-3, eval_every=10,
                               seed=1, device="cpu", progress=False, precision=precision)
    return model, history


@pytest.fixture(scope="module")
def fp32_history(splits):
    return train_tiny(splits)[1]


def test_unknown_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16, fp16, got 'fp8'"):
        check_precision("fp8")
    with pytest.raises(ValueError, match="--precision must be one of"):
        FinetuneSettings(precision="float16")


def test_a_device_without_the_type_is_refused_with_advice(monkeypatch):
    monkeypatch.setattr(precision_module, "device_supports", lambda precision, device: False)
    with pytest.raises(RuntimeError, match="--precision fp16 needs fast float16 arithmetic, which this CPU "
                                           "lacks; use --precision bf16 or fp32"):
        check_precision("fp16", "cpu")
    with pytest.raises(RuntimeError, match="bfloat16 arithmetic, which this CPU lacks; use --precision fp16 "
                                           "on a GPU, or fp32"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", "cpu")  # float32 needs nothing


def test_the_command_line_refuses_it_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision_module, "device_supports", lambda precision, device: False)
    out = tmp_path / "r"
    code = main(["finetune", "--quick", "--precision", "bf16", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "--precision bf16 needs fast bfloat16 arithmetic" in err
    assert not out.exists()


def test_autocast_runs_matrix_products_in_16_bits_and_leaves_the_weights_float32():
    model = tiny_classifier()
    ids = torch.randint(0, 50257, (2, 5))
    with autocast("bf16", "cpu"):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with autocast("fp32", "cpu"):
        assert model(ids).dtype == torch.float32
    # Coarser arithmetic, the same function: bf16 keeps about 3 significant digits.
    torch.testing.assert_close(logits.float(), model(ids), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_in_16_bits_lowers_the_loss_and_keeps_float32_weights(splits, fp32_history, monkeypatch,
                                                                       precision):
    # fp16 on a CPU is slow but correct; allowed here to test the loss-scaling path on any machine.
    monkeypatch.setattr(precision_module, "device_supports", lambda p, device: True)
    model, history = train_tiny(splits, precision)
    fp32 = fp32_history
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    first, last = sum(history.step_loss[:5]) / 5, sum(history.step_loss[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    # The same batches in the same order: the first step's loss differs only by rounding.
    assert abs(history.step_loss[0] - fp32.step_loss[0]) < 0.02
    assert len(history.step_loss) == len(fp32.step_loss)


def test_fp16_loss_scaling_skips_a_step_whose_gradients_overflow(splits, monkeypatch):
    """The GradScaler path: an infinite gradient is never applied, and the weights stay finite."""
    monkeypatch.setattr(precision_module, "device_supports", lambda p, device: True)
    model, loaders = tiny_classifier(), quick_loaders(splits)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    # Every step, one gradient is infinite (as when float16 overflows); the scaler must skip the step.
    model.out_head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    train(model, loaders.train, loaders.validation, classification_loss, epochs=1, lr=1e-3, eval_every=1000,
          seed=1, device="cpu", progress=False, precision="fp16")
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        torch.testing.assert_close(p.detach(), before[name], msg=f"{name} changed although every step "
                                                                  "had an infinite gradient")


def test_a_bf16_finetune_run_records_its_precision_and_saves_float32(tmp_path):
    if not device_supports("bf16", torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 arithmetic")
    metrics = finetune(FinetuneSettings(quick=True, epochs=2, precision="bf16", device="cpu",
                                        out=tmp_path / "run", progress=False))
    assert metrics["settings"]["precision"] == "bf16"
    adapter = load_file(tmp_path / "run" / metrics["saved_file"])
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_examples"] == 100


def test_pretraining_takes_the_setting_too(tmp_path):
    if not device_supports("bf16", torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 arithmetic")
    metrics = pretrain(PretrainSettings(quick=True, epochs=1, precision="bf16", device="cpu",
                                        out=tmp_path / "pre", progress=False))
    assert metrics["settings"]["precision"] == "bf16"
    assert metrics["history"]["step_loss"][-1] < metrics["history"]["step_loss"][0]
