"""Write quick mode's data: a class-balanced random subset of the real SMS Spam Collection, shipped inside
the package as `llm_scratch/data/sms_spam_sample.tsv` (same `label<TAB>message` format, same parser).

    python scripts/make_sms_subset.py path/to/SMSSpamCollection     # or the UCI zip

The SMS Spam Collection (Almeida and Gomez Hidalgo, 2011; UCI Machine Learning Repository, data set 228) is
licensed CC BY 4.0, which allows sharing a part of it with credit: the credit ships beside the subset, in
`llm_scratch/data/sms_spam_sample_NOTICE.txt`. The same file, count and seed always give the same subset;
`tests/test_data.py` checks that the shipped file is this script's output when the real file is at hand.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from llm_scratch.data.sms_spam import LABELS, SAMPLE_RESOURCE, SpamRow, read_sms_spam

PER_CLASS = 250  # messages of each class: 500 in all, split 350 / 50 / 100 by quick mode
SEED = 2011  # the collection's year; any fixed number would do
SUBSET_PATH = Path(__file__).resolve().parents[1] / "llm_scratch" / "data" / SAMPLE_RESOURCE


def sms_subset(rows: list[SpamRow], per_class: int = PER_CLASS, seed: int = SEED) -> list[SpamRow]:
    """`per_class` distinct messages of each class, drawn at random with `seed`, in the file's order.

    Repeated texts (the collection holds some messages many times) are kept once, so that no message can
    land in two splits.
    """
    first_of_each: dict[str, SpamRow] = {}
    for row in rows:
        first_of_each.setdefault(row.text, row)  # a repeated text keeps its first row
    distinct = list(first_of_each.values())  # in the file's order
    rng = random.Random(seed)
    chosen: set[int] = set()
    for label in range(len(LABELS)):
        indices = [i for i, row in enumerate(distinct) if row.label == label]
        if len(indices) < per_class:
            raise ValueError(f"only {len(indices)} distinct {LABELS[label]} messages, {per_class} asked for")
        chosen.update(rng.sample(indices, per_class))
    return [distinct[i] for i in sorted(chosen)]


def to_tsv(rows: list[SpamRow]) -> str:
    """The rows in the collection's own format: `label<TAB>message`, one per line."""
    return "".join(f"{LABELS[row.label]}\t{row.text}\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_path", type=Path, help="the SMSSpamCollection file or the UCI zip")
    parser.add_argument("--out", type=Path, default=SUBSET_PATH, help=f"default {SUBSET_PATH}")
    args = parser.parse_args()
    subset = sms_subset(read_sms_spam(args.data_path))
    args.out.write_text(to_tsv(subset), encoding="utf-8", newline="")
    print(f"wrote {len(subset)} messages ({sum(row.label for row in subset)} spam) to {args.out}")


if __name__ == "__main__":
    main()
