"""LoRA+: parameter groups equal to PEFT's `create_loraplus_optimizer`, the training loop's `param_groups`,
`--loraplus-lr-ratio` from the command line, and `compare` with DoRA and LoRA+."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_lora import N_CLASSES, randomize_lora, tiny_model, token_ids
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from llm_scratch.cli import main
from llm_scratch.compare import compare
from llm_scratch.finetune import FinetuneSettings
from llm_scratch.lora import LoRAConfig, lora_layers, mark_only_lora_trainable, replace_linear_with_lora
from llm_scratch.loraplus import loraplus_param_groups
from llm_scratch.peft_format import hf_modules
from llm_scratch.training import train

LR, RATIO, WEIGHT_DECAY = 1e-3, 16.0, 0.01
# PEFT's names for our tensors, after "base_model.model.<Hugging Face module>."
PEFT_SUFFIX = {"lora.A": "lora_A.default.weight", "lora.B": "lora_B.default.weight",
               "magnitude.m": "lora_magnitude_vector.default.weight"}


def described(optimizer: torch.optim.Optimizer, name_of: dict[int, str]) -> list[tuple]:
    """Each non-empty parameter group as (its tensors' names, learning rate, weight decay)."""
    return sorted((sorted(name_of[id(p)] for p in group["params"]), group["lr"], group["weight_decay"])
                  for group in optimizer.param_groups if group["params"])


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_groups_equal_peft_create_loraplus_optimizer(use_dora: bool):
    """The same layers get LoRA in a Hugging Face GPT-2 classifier (with PEFT) and in ours; every kind of
    trainable tensor is there: A, B, DoRA's m, the head's weight and (a head with a bias) the head's bias."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    torch.manual_seed(0)
    hf = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=50257, num_labels=N_CLASSES, pad_token_id=50256))
    hf.score = nn.Linear(64, N_CLASSES, bias=True)  # ours has a bias: give theirs one too
    targets = {"attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.fc1", "mlp.c_proj": "ff.fc2"}
    hf_lora = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                      use_dora=use_dora, modules_to_save=["score"],
                                                      fan_in_fan_out=True))
    peft_optimizer = create_loraplus_optimizer(hf_lora, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                               loraplus_weight_decay=WEIGHT_DECAY, weight_decay=WEIGHT_DECAY)

    ours = tiny_model(head=True)
    config = LoRAConfig(rank=4, alpha=8, target_modules=tuple(targets.values()), use_dora=use_dora,
                        modules_to_save=("out_head",))
    replace_linear_with_lora(ours, config)
    mark_only_lora_trainable(ours, config)
    groups = loraplus_param_groups(ours, lr=LR, loraplus_lr_ratio=RATIO)
    our_optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=WEIGHT_DECAY)

    hf_module_of = {name: hf_module for hf_module, names in hf_modules(ours).items() for name in names}

    def peft_name(name: str) -> str:
        if name.startswith("out_head."):
            return f"base_model.model.score.modules_to_save.default.{name.rsplit('.', 1)[1]}"
        layer, kind = name.rsplit(".", 2)[0], ".".join(name.rsplit(".", 2)[1:])
        return f"base_model.model.{hf_module_of[layer]}.{PEFT_SUFFIX[kind]}"

    ours_named = {id(p): peft_name(n) for n, p in ours.named_parameters() if p.requires_grad}
    theirs = described(peft_optimizer, {id(p): n for n, p in hf_lora.named_parameters()})
    mine = described(our_optimizer, ours_named)
    for names, lr, decay in mine:
        print(f"lr {lr:g}, weight decay {decay:g}: {len(names)} tensors, e.g. {names[0]}")
    assert mine == theirs
    assert sorted(lr for _, lr, _ in mine) == [LR, LR * RATIO, LR * RATIO]  # A; B with and without decay


def test_the_training_loop_steps_each_group_at_its_rate():
    """One AdamW step moves each entry by about its group's learning rate (the first step is lr * sign(g))."""
    model = tiny_model(head=True)
    config = LoRAConfig(rank=4, alpha=8, modules_to_save=("out_head",))
    replace_linear_with_lora(model, config)
    mark_only_lora_trainable(model, config)
    randomize_lora(model)  # B != 0, so that A gets a gradient at the first step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    data = TensorDataset(token_ids(batch=4), torch.tensor([0, 1, 1, 0]))

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0])[:, -1, :], batch[1])

    groups = loraplus_param_groups(model, lr=LR, loraplus_lr_ratio=RATIO)
    train(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), loss_fn, epochs=1, lr=LR,
          weight_decay=0.0, param_groups=groups, progress=False)  # one batch: one step
    moved = {name: (p.detach() - before[name]).abs().max().item() for name, p in model.named_parameters()}
    for name, step in moved.items():
        kind = name.rsplit(".", 1)[-1]
        if ".lora." in name or name.startswith("out_head."):
            expected = LR * RATIO if kind in ("B", "bias") else LR
            assert step == pytest.approx(expected, rel=1e-3), name
        else:
            assert step == 0, name
    assert "weight_decay" not in groups[0]  # train() gave AdamW copies: the groups are as they were

    with pytest.raises(ValueError, match="param_groups must hold every trainable parameter once"):
        train(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), loss_fn, epochs=1,
              param_groups=groups[:1], progress=False)


def test_loraplus_refuses_what_it_cannot_do():
    with pytest.raises(RuntimeError, match="has none; call replace_linear_with_lora"):
        loraplus_param_groups(tiny_model(head=True), lr=LR, loraplus_lr_ratio=RATIO)
    model = tiny_model(head=True)
    replace_linear_with_lora(model, LoRAConfig(rank=2, alpha=2))
    for ratio in (0, -16, float("inf"), True, "16"):
        with pytest.raises(ValueError, match="loraplus_lr_ratio must be a finite number > 0"):
            loraplus_param_groups(model, lr=LR, loraplus_lr_ratio=ratio)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        loraplus_param_groups(model, lr=0, loraplus_lr_ratio=RATIO)
    assert len(lora_layers(model)) == 12


def test_loraplus_from_the_command_line(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path / "data"))
    run = tmp_path / "loraplus"
    assert main(["finetune", "--loraplus-lr-ratio", "16", "--quick", "--out", str(run), "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "lora" and metrics["settings"]["loraplus_lr_ratio"] == 16.0
    assert json.loads((run / "run.json").read_text())["settings"]["loraplus_lr_ratio"] == 16.0
    losses = metrics["history"]["step_loss"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    capsys.readouterr()
    args = ["finetune", "--method", "full", "--loraplus-lr-ratio", "16", "--quick",
            "--out", str(tmp_path / "f")]
    assert main(args) == 2
    assert "use it with method lora, dora or qlora, not 'full'" in capsys.readouterr().err


def test_compare_with_dora_and_loraplus(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path / "data"))
    settings = FinetuneSettings(quick=True, epochs=1, out=tmp_path / "compare", loraplus_lr_ratio=RATIO,
                                progress=False)
    results = compare(settings, methods=("last-block", "lora", "dora"))
    assert {m: r["settings"]["loraplus_lr_ratio"] for m, r in results.items()} == {
        "last-block": None, "lora": RATIO, "dora": RATIO}  # LoRA+ applies to the LoRA methods only
    assert results["dora"]["trainable_parameters"] - results["lora"]["trainable_parameters"] == 1_152
    table = (tmp_path / "compare" / "comparison.md").read_text()
    assert "| dora |" in table and "B's learning rate is 16 times A's" in table
