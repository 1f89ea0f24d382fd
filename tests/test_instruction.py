"""Instruction fine-tuning: the shipped data, the prompt layout, the split, the collate's padding and -100
targets, the masked loss against a hand computation, a short training run, and greedy responses."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from llm_scratch.config import GPTConfig
from llm_scratch.data.instruction import (
    IGNORE_INDEX,
    InstructionBatch,
    InstructionDataset,
    InstructionEntry,
    InstructionExample,
    InstructionSplits,
    collate_instructions,
    format_alpaca,
    instruction_dataloaders,
    load_instruction_splits,
    load_instructions,
    split_instructions,
)
from llm_scratch.language_model import (
    count_tokens,
    evaluate_language_model,
    next_token_loss,
    train_language_model,
)
from llm_scratch.model import GPTModel
from llm_scratch.responses import generate_response_ids, generate_responses, respond
from llm_scratch.tokenizer import EOS_ID, get_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction" / "instruction-data.json"
SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
ENTRIES = load_instructions()


def tiny_model(seed: int = 123) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("tiny")).eval()


# ---- The data and its layout ----

def test_the_shipped_file_is_the_credited_one_and_loads_whole():
    from importlib import resources

    shipped = resources.files("llm_scratch.data").joinpath("instruction-data.json").read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == SHA256 and len(shipped) == 203_524
    if SHARED.is_file():
        assert shipped == SHARED.read_bytes()
    raw = json.loads(shipped)
    assert len(ENTRIES) == 1100 and sum(bool(entry.input) for entry in ENTRIES) == 325
    assert ENTRIES[0] == InstructionEntry(raw[0]["instruction"], raw[0]["input"], raw[0]["output"])
    assert [tuple(entry) for entry in ENTRIES] == [(e["instruction"], e["input"], e["output"]) for e in raw]
    notice = resources.files("llm_scratch.data").joinpath("instruction-data_NOTICE.txt").read_text()
    assert SHA256 in notice and "Apache License 2.0" in notice and "28c65cd" in notice


def test_the_prompt_layout_is_the_alpaca_one_of_the_reference_course():
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    assert format_alpaca("Name a color.") == (
        f"{preamble}\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert format_alpaca("Add them.", "2 and 3", "5") == (
        f"{preamble}\n\n### Instruction:\nAdd them.\n\n### Input:\n2 and 3\n\n### Response:\n5")


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x"}', "must hold a non-empty JSON list of entries, got a JSON dict"),
    ("[]", "must hold a non-empty JSON list of entries, got an empty list"),
    ('[{"instruction": "a", "input": "", "output": "b"}, "text"]', "entry 1 is a str"),
    ('[{"instruction": "a", "output": "b"}]', "entry 0 has no key 'input'"),
    ('[{"instruction": "a", "input": 3, "output": "b"}]', "entry 0, key 'input': expected a string, got int"),
    ('[{"instruction": "a", "input": "", "output": "  "}]', "entry 0, key 'output' is empty"),
    ('[{"instruction": "a", "input": "", "output": "b"},', "is not UTF-8 JSON"),
])
def test_a_malformed_file_is_refused_naming_the_file_entry_and_key(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as caught:
        load_instructions(path)
    assert str(path) in str(caught.value)


def test_a_missing_file_is_refused():
    with pytest.raises(FileNotFoundError, match="no instruction file at"):
        load_instructions("/nonexistent/instructions.json")


def test_the_split_is_85_5_10_fixed_by_its_seed_and_quick_mode_takes_its_first_entries():
    splits = load_instruction_splits()
    assert [len(part) for part in splits] == [935, 55, 110]
    assert sorted(map(tuple, sum(splits, []))) == sorted(map(tuple, ENTRIES))  # each entry exactly once
    assert splits == load_instruction_splits()  # the same seed, the same split
    assert splits.train[:5] != split_instructions(ENTRIES, seed=1).train[:5]
    assert splits.train[:3] != ENTRIES[:3]  # shuffled, not the file's order
    quick = load_instruction_splits(quick=True)
    assert quick == InstructionSplits(splits.train, splits.validation[:10], splits.test[:20])
    assert [len(part) for part in split_instructions(ENTRIES[:10])] == [8, 1, 1]
    with pytest.raises(ValueError, match="give at least 10 entries"):
        split_instructions(ENTRIES[:9])


def test_the_dataset_joins_prompt_and_response_ids_and_knows_where_the_response_starts():
    tokenizer = get_tokenizer()
    dataset = InstructionDataset(ENTRIES)
    for index in (0, 1, 1099):
        entry, (ids, start) = ENTRIES[index], dataset[index]
        prompt = tokenizer.encode_ordinary(format_alpaca(entry.instruction, entry.input))
        assert ids[:start].tolist() == prompt and tokenizer.decode(ids[start:].tolist()) == entry.output
    # Encoding the prompt and the response apart gives the tokens of the whole text, for every entry here.
    whole = [tokenizer.encode_ordinary(format_alpaca(*entry)) for entry in ENTRIES]
    assert whole == dataset.token_ids
    assert (min(dataset.lengths), max(dataset.lengths)) == (40, 91)  # every example fits the tiny context


# ---- The collate ----

def example(ids: list[int], response_start: int) -> InstructionExample:
    return InstructionExample(torch.tensor(ids), response_start)


E, X = EOS_ID, IGNORE_INDEX
BATCH = [example([11, 12, 13, 14, 15], 3), example([21, 22, 23], 2)]  # prompts [11, 12, 13] and [21, 22]


def test_collate_pads_keeps_one_end_of_text_target_and_ignores_the_rest():
    inputs, targets = collate_instructions(BATCH)
    assert inputs.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, E, E]]
    assert targets.tolist() == [[12, 13, 14, 15, E], [22, 23, E, X, X]]


def test_collate_masks_the_prompt_but_not_the_position_that_predicts_the_response():
    batch = collate_instructions(BATCH, mask_prompt=True)
    assert isinstance(batch, InstructionBatch)
    assert batch.inputs.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, E, E]]
    # Row 0: positions 0 and 1 predict prompt tokens 12 and 13; position 2 (token 13) predicts 14, the
    # response's first token. Row 1: position 0 predicts 22 (prompt); position 1 predicts 23 (response).
    assert batch.targets.tolist() == [[X, X, 14, 15, E], [X, 23, E, X, X]]


def test_collate_truncates_to_max_length_after_masking():
    inputs, targets = collate_instructions(BATCH, max_length=3)
    assert inputs.tolist() == [[11, 12, 13], [21, 22, 23]]
    assert targets.tolist() == [[12, 13, 14], [22, 23, E]]
    inputs, targets = collate_instructions(BATCH, mask_prompt=True, max_length=3)
    assert targets.tolist() == [[X, X, 14], [X, 23, E]]


def test_collate_refuses_an_example_whose_targets_all_vanish():
    with pytest.raises(ValueError, match="example 0 of the batch keeps no target that counts: its prompt "
                                         "has 3 tokens and max_length is 2"):
        collate_instructions(BATCH, mask_prompt=True, max_length=2)
    with pytest.raises(ValueError, match="empty batch"):
        collate_instructions([])


def test_loaders_give_instruction_batches_shuffled_by_their_seed():
    splits = load_instruction_splits(quick=True)
    loaders = instruction_dataloaders(splits, batch_size=8, mask_prompt=True, context_length=256)
    assert [len(loader.dataset) for loader in loaders] == [935, 10, 20]
    first = next(iter(loaders.train))
    again = next(iter(instruction_dataloaders(splits, batch_size=8, mask_prompt=True,
                                              context_length=256).train))
    assert isinstance(first, InstructionBatch) and torch.equal(first.inputs, again.inputs)
    assert first.inputs.shape == first.targets.shape and first.inputs.shape[0] == 8
    bucketed = instruction_dataloaders(splits, batch_size=8, bucket=True, context_length=256)
    assert sum(len(batch.inputs) for batch in bucketed.train) == 935
    with pytest.raises(ValueError, match="max_length must be between 1 and the model's context_length"):
        instruction_dataloaders(splits, max_length=300, context_length=256)


# ---- The masked loss ----

def test_the_masked_loss_is_the_mean_over_counted_targets_and_evaluate_weighs_tokens():
    model = tiny_model()
    dataset = InstructionDataset(ENTRIES[:5])
    collate = lambda items: collate_instructions(items, mask_prompt=True)  # noqa: E731
    batches = [collate([dataset[i] for i in rows]) for rows in ([0, 1, 2], [3], [4])]
    with torch.no_grad():
        per_batch = []
        for inputs, targets in batches:
            log_probs = torch.log_softmax(model(inputs).double(), dim=-1)  # (batch, n_tokens, vocab_size)
            counted = targets != IGNORE_INDEX  # (batch, n_tokens)
            picked = log_probs[counted].gather(-1, targets[counted].unsqueeze(-1))  # (n_counted, 1)
            per_batch.append((-picked.sum().item(), int(counted.sum())))
        for batch, (total, count) in zip(batches, per_batch, strict=True):
            assert count_tokens(batch) == count
            assert abs(next_token_loss(model, batch).item() - total / count) < 1e-5
        # The loss per counted token over all batches, not the mean of the three batch means.
        expected = sum(total for total, _ in per_batch) / sum(count for _, count in per_batch)
        mean_of_means = sum(total / count for total, count in per_batch) / len(per_batch)
        assert abs(expected - mean_of_means) > 1e-3  # the two differ here, so the test tells them apart
        measured = evaluate_language_model(model, batches)  # any iterable of batches
    assert abs(measured["loss"] - expected) < 1e-5
    assert measured["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # Unmasked, the prompt counts too: more tokens, another loss.
    unmasked = collate_instructions([dataset[i] for i in range(3)])
    assert count_tokens(unmasked) > count_tokens(batches[0])


def test_a_few_steps_of_the_generic_loop_halve_the_response_loss():
    """4 training examples of the quick subset, batches of 2, 3 epochs: 6 steps take the masked loss from
    about 10.8 (ln of the vocabulary) to about 4.1 (0.38 to 0.39 of the start for seeds 1 to 5 and 123)."""
    quick = load_instruction_splits(quick=True)
    few = InstructionSplits(quick.train[:4], quick.validation[:2], quick.test[:2])
    loaders = instruction_dataloaders(few, batch_size=2, mask_prompt=True, context_length=256)
    model = tiny_model()
    start = evaluate_language_model(model, loaders.train)["loss"]
    history = train_language_model(model, loaders.train, loaders.validation, epochs=3, lr=2e-2,
                                   eval_every=100, progress=False, device="cpu", seed=123)
    end = history.epoch_metrics["train_loss"][-1]  # measured on the 4 training examples after training
    assert abs(start - math.log(50_257)) < 0.5 and end < 0.5 * start
    counted = sum(count_tokens(batch) for batch in loaders.train)
    assert len(history.step_loss) == 6 and history.step_seen[-1] == 3 * counted  # response tokens only


# ---- Responses ----

def greedy_by_hand(model: GPTModel, ids: list[int], n: int) -> list[int]:
    """n greedy tokens without a cache or a stop: the whole sequence again at every step."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_responses_are_the_greedy_tokens_and_say_whether_they_ended():
    model, tokenizer = tiny_model(), get_tokenizer()
    entries = ENTRIES[:2]
    responses = generate_responses(model, entries, max_new_tokens=5, progress=False)
    for entry, result in zip(entries, responses, strict=True):
        prompt = tokenizer.encode_ordinary(format_alpaca(entry.instruction, entry.input))
        expected = greedy_by_hand(model, prompt, 5)[len(prompt) :]
        assert EOS_ID not in expected  # a random model: no end-of-text within 5 tokens here
        assert result.response == tokenizer.decode(expected) and not result.ended_with_eos
        assert (result.instruction, result.input, result.reference) == tuple(entry)
    assert respond(model, entries[1].instruction, entries[1].input, max_new_tokens=5) == responses[1].response


def test_a_model_that_chooses_end_of_text_gives_an_empty_response_that_ended():
    model = tiny_model()
    with torch.no_grad():  # every position's output is the unit vector e0; only end-of-text's logit is large
        model.final_norm.scale.zero_()
        model.final_norm.shift.zero_()
        model.final_norm.shift[0] = 1.0
        model.out_head.weight[EOS_ID, 0] = 100.0
    assert generate_response_ids(model, [1, 2, 3], max_new_tokens=1) == ([], True)
    (result,) = generate_responses(model, ENTRIES[:1], progress=False)
    assert result.response == "" and result.ended_with_eos
    with pytest.raises(ValueError, match="the instruction is empty"):
        respond(model, "  ")
