"""Scores of generated responses against reference responses that need no network: ROUGE-L F1, exact match,
and how many responses ended on their own (with end-of-text) within the length limit.

ROUGE-L compares the two texts word by word through their longest common subsequence (LCS): the words
both contain in the same order, not necessarily side by side. Its precision is the share of the response's
words in the LCS, its recall the share of the reference's, and F1 their harmonic mean. Words are found as the
`rouge-score` package finds them by default (no stemming): lowercase, then every run of characters other than
a-z and 0-9 (accented letters included) becomes a space, then split on spaces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

NOT_A_WORD = re.compile(r"[^a-z0-9]+")


def rouge_words(text: str) -> list[str]:
    """The words ROUGE compares: "Hello, World!" -> ["hello", "world"]; "café" -> ["caf"]."""
    return NOT_A_WORD.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of `a` and `b`, by dynamic programming, one row at a time.

    `row[j]` is the LCS length of the words of `a` seen so far and the first j words of `b`.
    """
    row = [0] * (len(b) + 1)
    for word_a in a:
        previous = row  # the row of one word of `a` fewer
        row = [0]
        for j, word_b in enumerate(b, start=1):
            if word_a == word_b:  # both end on the same word: extend the LCS without either word
                row.append(previous[j - 1] + 1)
            else:  # drop the last word of `a` or of `b`, whichever leaves the longer LCS
                row.append(max(previous[j], row[j - 1]))
    return row[-1]


class RougeL(NamedTuple):
    precision: float
    recall: float
    f1: float


def rouge_l(reference: str, response: str) -> RougeL:
    """ROUGE-L of `response` against `reference`. If either has no word, all three are 0 (even when both
    are empty: nothing matched), as in `rouge-score`."""
    reference_words, response_words = rouge_words(reference), rouge_words(response)
    if not reference_words or not response_words:
        return RougeL(0.0, 0.0, 0.0)
    common = lcs_length(reference_words, response_words)
    if common == 0:
        return RougeL(0.0, 0.0, 0.0)
    precision, recall = common / len(response_words), common / len(reference_words)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall))


def exact_match(reference: str, response: str) -> bool:
    """Whether the two texts are equal once whitespace at their start and end is stripped (case counts)."""
    return reference.strip() == response.strip()


class ScoreSummary(NamedTuple):
    """Scores of `n` responses: the mean ROUGE-L F1, and counts (for shares and their intervals)."""

    n: int
    rouge_l_f1: float  # mean over the n responses
    exact_matches: int  # responses equal to their reference (`exact_match`)
    ended_with_eos: int | None  # responses that ended with end-of-text within the limit; None if not given

    @property
    def exact_match_share(self) -> float:
        return self.exact_matches / self.n


def summarize_scores(references: Sequence[str], responses: Sequence[str],
                     ended_with_eos: Sequence[bool] | None = None) -> ScoreSummary:
    """Score each response against the reference at the same index; `ended_with_eos` gives, for each, whether
    its generation stopped with end-of-text before reaching the length limit."""
    if len(references) != len(responses) or not references:
        raise ValueError(f"need as many references as responses, at least one; got {len(references)} "
                         f"references and {len(responses)} responses")
    if ended_with_eos is not None and len(ended_with_eos) != len(responses):
        raise ValueError(f"ended_with_eos has {len(ended_with_eos)} values for {len(responses)} responses")
    pairs = list(zip(references, responses, strict=True))
    f1 = sum(rouge_l(reference, response).f1 for reference, response in pairs) / len(pairs)
    matches = sum(exact_match(reference, response) for reference, response in pairs)
    ended = None if ended_with_eos is None else sum(bool(flag) for flag in ended_with_eos)
    return ScoreSummary(n=len(pairs), rouge_l_f1=f1, exact_matches=matches, ended_with_eos=ended)
