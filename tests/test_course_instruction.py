"""What notebook 09 writes by hand against the package, on more cases than the notebook runs: the Alpaca
prompt, the split, the collate function (padding, the one end-of-text kept, -100, prompt masking,
max_length), the masked next-token loss and ROUGE-L by its longest common subsequence.

The functions are taken from the notebook itself, so what is tested is what students read."""

from __future__ import annotations

import pytest
import torch
from test_course import notebook_functions

from llm_scratch import GPTConfig, GPTModel
from llm_scratch.data.instruction import (
    IGNORE_INDEX,
    InstructionDataset,
    InstructionEntry,
    InstructionExample,
    collate_instructions,
    format_alpaca,
    load_instructions,
    split_instructions,
)
from llm_scratch.language_model import next_token_loss
from llm_scratch.scores import lcs_length, rouge_l, rouge_words
from llm_scratch.tokenizer import EOS_ID

HAND = notebook_functions("09_instruction_finetuning.ipynb", "alpaca_by_hand", "split_by_hand",
                          "collate_by_hand", "masked_loss_by_hand", "words_by_hand", "lcs_by_hand",
                          "rouge_l_by_hand")
E, X = EOS_ID, IGNORE_INDEX
# Three examples of 5, 3 and 7 tokens whose responses start at 3, 2 and 4; and the batches the rules give.
MADE = [([11, 12, 13, 14, 15], 3), ([21, 22, 23], 2), ([31, 32, 33, 34, 35, 36, 37], 4)]
MADE_INPUTS = [[11, 12, 13, 14, 15, E, E], [21, 22, 23, E, E, E, E], [31, 32, 33, 34, 35, 36, 37]]
MADE_TARGETS = {False: [[12, 13, 14, 15, E, X, X], [22, 23, E, X, X, X, X], [32, 33, 34, 35, 36, 37, E]],
                True: [[X, X, 14, 15, E, X, X], [X, 23, E, X, X, X, X], [X, X, X, 35, 36, 37, E]]}


def package_collate(examples, mask_prompt=False, max_length=None):
    batch = [InstructionExample(torch.tensor(ids), start) for ids, start in examples]
    return collate_instructions(batch, mask_prompt=mask_prompt, max_length=max_length)


@pytest.mark.parametrize("mask_prompt", [False, True])
@pytest.mark.parametrize("max_length", [None, 6, 4])
def test_hand_collate_gives_the_batch_the_rules_say_and_the_packages(mask_prompt, max_length):
    inputs, targets = HAND.collate_by_hand(MADE, mask_prompt, max_length)
    assert inputs.tolist() == [row[:max_length] for row in MADE_INPUTS]
    assert targets.tolist() == [row[:max_length] for row in MADE_TARGETS[mask_prompt]]
    package = package_collate(MADE, mask_prompt, max_length)
    assert torch.equal(inputs, package.inputs) and torch.equal(targets, package.targets)


def test_hand_collate_of_one_example_and_a_response_starting_at_the_first_token():
    for examples in ([([5, 6], 1)], [([7], 0), ([8, 9, 10], 0)], [([1, 2, 3, 4], 4), ([5, 6], 2)]):
        for mask_prompt in (False, True):
            inputs, targets = HAND.collate_by_hand(examples, mask_prompt)
            package = package_collate(examples, mask_prompt)
            assert torch.equal(inputs, package.inputs) and torch.equal(targets, package.targets)
            kept = [sum(t != X for t in row) for row in targets.tolist()]
            rows = zip(targets.tolist(), examples, strict=True)
            assert all(row[len(ids) - 1] == E for row, (ids, _) in rows)  # each keeps its end-of-text
            # unmasked, one target per token
            if not mask_prompt:
                assert kept == [len(ids) for ids, _ in examples]


@pytest.mark.parametrize(("mask_prompt", "max_length"), [(False, None), (True, None), (True, 64)])
def test_hand_collate_is_the_packages_on_the_shipped_data(mask_prompt, max_length):
    dataset = InstructionDataset(load_instructions()[:60])
    for start in range(0, 60, 7):  # batches of 7, the last one short
        examples = [dataset[i] for i in range(start, min(start + 7, 60))]
        inputs, targets = HAND.collate_by_hand(examples, mask_prompt, max_length)
        package = collate_instructions(examples, mask_prompt=mask_prompt, max_length=max_length)
        assert torch.equal(inputs, package.inputs) and torch.equal(targets, package.targets)


def test_hand_prompt_and_split_are_the_packages():
    entries = [InstructionEntry(f"do {i}", "" if i % 3 else f"on {i}", f"done {i}") for i in range(37)]
    for entry in entries[:6]:
        assert HAND.alpaca_by_hand(*entry) == format_alpaca(*entry)
        assert HAND.alpaca_by_hand(entry.instruction, entry.input) == format_alpaca(entry.instruction,
                                                                                    entry.input)
    for n, seed in ((37, 1), (10, 123), (1100, 7)):
        data = entries[:n] if n <= 37 else load_instructions()
        by_hand = HAND.split_by_hand(data, seed)
        assert [list(part) for part in split_instructions(data, seed)] == list(by_hand)


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_hand_masked_loss_is_next_token_loss(mask_prompt):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny")).eval()
    dataset = InstructionDataset(load_instructions()[:12])
    for start in (0, 4, 8):
        batch = collate_instructions([dataset[i] for i in range(start, start + 4)], mask_prompt=mask_prompt)
        with torch.no_grad():
            by_hand = HAND.masked_loss_by_hand(model(batch.inputs), batch.targets)
            package = next_token_loss(model, batch)
        assert torch.allclose(by_hand, package, rtol=1e-6, atol=1e-6)
    # Sharp logits on hand-made targets: the loss of the kept positions only, exactly.
    logits = torch.full((1, 3, 5), -30.0)
    logits[0, 0, 2] = logits[0, 2, 4] = 30.0  # right at positions 0 and 2; position 1 is ignored
    targets = torch.tensor([[2, X, 4]])
    assert HAND.masked_loss_by_hand(logits, targets).item() == pytest.approx(0.0, abs=1e-6)
    targets = torch.tensor([[2, X, 1]])  # position 2 now wrong by 60: the mean over two kept targets
    assert HAND.masked_loss_by_hand(logits, targets).item() == pytest.approx(30.0, rel=1e-4)


PAIRS = [("The cat sat on the mat.", "A cat was sitting on a mat"), ("", "anything"), ("something", ""),
         ("Same words, same order!", "same WORDS same order"), ("a b c d e f", "f e d c b a"),
         ("Café au lait, 2 sugars.", "cafe au lait 2 sugars"), ("one two", "three four"),
         ("x y x y x y", "y x y x"), ("It's 5 o'clock", "its 5 oclock")]


@pytest.mark.parametrize(("reference", "response"), PAIRS)
def test_hand_rouge_l_is_the_packages(reference, response):
    words = HAND.words_by_hand(reference), HAND.words_by_hand(response)
    assert list(words) == [rouge_words(reference), rouge_words(response)]
    assert HAND.lcs_by_hand(*words) == lcs_length(*words)
    assert HAND.rouge_l_by_hand(reference, response) == tuple(rouge_l(reference, response))


def test_hand_lcs_on_random_word_lists():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        a, b = (torch.randint(0, 4, (int(torch.randint(0, 12, (1,), generator=generator)),),
                              generator=generator).tolist() for _ in range(2))
        assert HAND.lcs_by_hand(a, b) == lcs_length(a, b) == HAND.lcs_by_hand(b, a)
