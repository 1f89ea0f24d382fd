"""The SMS Spam Collection: parse, check, download into the cache, balance, split, and the split CSV files.

The real data set (UCI Machine Learning Repository, data set 228; Almeida and Gomez Hidalgo, 2011; CC BY 4.0)
is downloaded once into a cache folder. In quick mode a class-balanced random subset of it (500 messages,
credited in `sms_spam_sample_NOTICE.txt`) that ships inside the package takes its place and goes through the
very same parser, balancing and split.

Where the data comes from, first match wins: a local path (`data_path=`; the CLI's `--data-path PATH`) to
the `SMSSpamCollection` file or the UCI zip that holds it; the cache folder `data_dir` (default:
`default_sms_dir()`); a download from `urls=`, else $LLM_SCRATCH_SMS_URLS (comma-separated), else
`DEFAULT_URLS`.
"""

from __future__ import annotations

import csv
import http.client
import random
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from llm_scratch import config
from llm_scratch.files import atomic_path

LABELS = ("ham", "spam")  # index = class id: ham is 0, spam is 1
LABEL_IDS = {name: index for index, name in enumerate(LABELS)}

UCI_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
DEFAULT_URLS: tuple[str, ...] = (
    UCI_URL,
    # The older address of the same zip at UCI, still answered by some of its servers.
    "https://archive.ics.uci.edu/ml/machine-learning-databases/00228/smsspamcollection.zip",
)
SMS_FILE_NAME = "SMSSpamCollection"  # the data file inside the UCI zip, and its name in the cache
EXPECTED_COUNTS = (5574, 747)  # (messages, spam) in the SMS Spam Collection v.1
SPLIT_NAMES = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.7, 0.1)  # train and validation; the test set gets the rest (0.2)
SAMPLE_RESOURCE = "sms_spam_sample.tsv"  # quick mode's real subset, package data of `llm_scratch.data`

_USER_AGENT = "llm-scratch (SMS Spam Collection download for teaching notebooks)"
_CHUNK_BYTES = 1 << 16


class SpamRow(NamedTuple):
    """One message: its text and its class id (0 = ham, 1 = spam)."""

    text: str
    label: int


class SpamSplits(NamedTuple):
    """The three splits of a balanced data set, as lists of `SpamRow`."""

    train: list[SpamRow]
    validation: list[SpamRow]
    test: list[SpamRow]


# ---- Parsing and checking the raw file ----

def parse_sms_spam(text: str, source: str = "<text>") -> list[SpamRow]:
    """Rows from the raw `label<TAB>message` format of the SMS Spam Collection (no header, no quoting).

    Quotes are ordinary characters here: some messages hold `"`, which a csv reader would treat as quoting.
    """
    rows: list[SpamRow] = []
    # Split on "\n" only: str.splitlines() would also split on characters such as U+2028 inside a message.
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")  # the same file saved with Windows line endings
        if not line.strip():
            continue  # blank lines (such as the end of the file) hold no message
        label, tab, message = line.partition("\t")
        if not tab:
            raise ValueError(f"{source}, line {line_number}: expected `ham` or `spam`, a TAB, then the "
                             f"message, but the line has no TAB: {line[:60]!r}. Fix or delete that line.")
        if label not in LABEL_IDS:
            raise ValueError(f"{source}, line {line_number}: the label must be one of {LABELS}, got "
                             f"{label[:30]!r}. Fix or delete that line.")
        if not message.strip():
            raise ValueError(f"{source}, line {line_number}: the message after the TAB is empty. "
                             "Fix or delete that line.")
        rows.append(SpamRow(message, LABEL_IDS[label]))
    if not rows:
        raise ValueError(f"{source} holds no messages; expected lines of `ham` or `spam`, a TAB, the message")
    return rows


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")  # "-sig" drops a byte-order mark that some editors add
    except UnicodeDecodeError as error:
        line_number = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{source}, line {line_number}: not valid UTF-8 ({error.reason}). Save the file as "
                         "UTF-8 or download it again.") from None


def _sms_file_from_zip(path: Path, name: str | None = None) -> str:
    """The decoded text of the `SMSSpamCollection` member of a zip; a clear error if it is not one.

    `name` is what error messages call the zip (default: its path), e.g. the URL it came from.
    """
    name = name or str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = [member for member in archive.namelist() if Path(member).name == SMS_FILE_NAME]
            if not members:
                raise ValueError(f"{name} is a zip file but holds no {SMS_FILE_NAME!r} (it holds "
                                 f"{archive.namelist()[:5]}); is it the SMS Spam Collection zip from UCI?")
            data = archive.read(members[0])  # checks the member's CRC-32 as it reads
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
        raise ValueError(f"{name} is not a readable zip file ({error}); it is "
                         "truncated or corrupt. Download it again.") from None
    return _decode(data, f"{name}:{SMS_FILE_NAME}")


def read_sms_spam(path: str | Path) -> list[SpamRow]:
    """Rows from a local `SMSSpamCollection` file or from the UCI zip that holds it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / SMS_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the {SMS_FILE_NAME} file or the UCI zip "
                                f"({UCI_URL})")
    if zipfile.is_zipfile(path):
        return parse_sms_spam(_sms_file_from_zip(path), f"{path}:{SMS_FILE_NAME}")
    return parse_sms_spam(_decode(path.read_bytes(), str(path)), str(path))


def check_counts(rows: Sequence[SpamRow], expected_counts: tuple[int, int] | None, source: str) -> None:
    """Raise if `rows` does not hold the expected (messages, spam) counts; None skips the check."""
    if expected_counts is None:
        return
    n_spam = sum(row.label for row in rows)
    if (len(rows), n_spam) != tuple(expected_counts):
        raise ValueError(f"{source} holds {len(rows):,} messages ({n_spam:,} spam), but the SMS Spam "
                         f"Collection has {expected_counts[0]:,} ({expected_counts[1]:,} spam). The file is "
                         "incomplete or a different data set; delete it and download it again.")


def load_sample() -> list[SpamRow]:
    """The real messages that ship with the package (quick mode, tests, no network): 250 ham, 250 spam."""
    resource = resources.files("llm_scratch.data").joinpath(SAMPLE_RESOURCE)
    name = f"llm_scratch/data/{SAMPLE_RESOURCE}"  # what error messages call it
    return parse_sms_spam(_decode(resource.read_bytes(), name), name)


# ---- Download into the cache ----

def default_sms_dir() -> Path:
    """The data set's cache folder: `sms_spam/` inside `config.data_dir()` (the cache of all downloads)."""
    return config.data_dir() / "sms_spam"


def download_urls(urls: Sequence[str] | None = None) -> list[str]:
    """The URLs to try, in order: `urls` if given, else $LLM_SCRATCH_SMS_URLS, else `DEFAULT_URLS`."""
    if urls is None:
        urls = config.sms_urls_from_env() or DEFAULT_URLS
    urls = list(urls)
    if not urls:
        raise ValueError(f"no download URL given; pass at least one or unset {config.SMS_URLS_ENV}")
    return urls


def _fetch(url: str, destination: Path, timeout: float, progress: bool) -> None:
    """Stream `url` into the file `destination`; raise if fewer bytes arrive than the server announced."""
    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(destination, "wb") as file:
        announced = response.headers.get("Content-Length")
        total = int(announced) if announced and announced.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=SMS_FILE_NAME,
                  disable=not progress, leave=False) as bar:
            while chunk := response.read(_CHUNK_BYTES):
                file.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise OSError(f"the download stopped after {received:,} of {total:,} bytes")


def _describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        hint = ""
        if "CERTIFICATE" in str(reason).upper() or "SSL" in type(reason).__name__.upper():
            hint = " (a proxy that inspects HTTPS? download the zip in a browser and pass its path)"
        return f"{type(reason).__name__}: {reason}{hint}"
    return f"{type(error).__name__}: {error}"


def download_sms_spam(data_dir: str | Path | None = None, urls: Sequence[str] | None = None, *,
                      timeout: float = 30.0, retries: int = 1, retry_delay: float = 2.0,
                      expected_counts: tuple[int, int] | None = EXPECTED_COUNTS,
                      progress: bool = True) -> Path:
    """Download the UCI zip once and cache its verified `SMSSpamCollection` file in `data_dir`; its path.

    Each URL gets `1 + retries` tries. The zip goes to a temporary file and only a complete zip whose file
    parses with `expected_counts` reaches the cache, so the cache never holds a half or wrong file.
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_sms_dir()
    target = data_dir / SMS_FILE_NAME
    if target.is_file():
        return target
    urls = download_urls(urls)
    data_dir.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in urls:
        for attempt in range(1 + max(0, retries)):
            if attempt:
                time.sleep(retry_delay)
            try:
                _download_and_verify(url, target, timeout, expected_counts, progress)
                return target
            # URLError, HTTPError and timeouts are OSErrors; a connection cut mid-body is an HTTPException.
            except (OSError, http.client.HTTPException, ValueError) as error:
                failures.append(f"  - {url} (try {attempt + 1}): {_describe(error)}")
    tried = "\n".join(failures)
    raise RuntimeError(
        f"could not download the SMS Spam Collection into {data_dir}. Tried:\n{tried}\n"
        "Ways on:\n"
        f"  - download {UCI_URL} yourself (a browser works) and pass its path: the zip or the "
        f"{SMS_FILE_NAME} file inside it (`--data-path PATH` on the command line, `data_path=PATH` in "
        "Python);\n"
        f"  - or set {config.SMS_URLS_ENV} to a comma-separated list of URLs that serve the same zip;\n"
        "  - or run in quick mode (LLM_SCRATCH_QUICK=1 or --quick) with the subset that ships."
    )


def _download_and_verify(url: str, target: Path, timeout: float,
                         expected_counts: tuple[int, int] | None, progress: bool) -> None:
    """One try: download into a temporary zip beside `target`, verify it, then move its file into place."""
    # The temporary folder (and the zip in it) is deleted however this try ends.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as folder:
        zip_path = Path(folder) / "download.zip.part"
        _fetch(url, zip_path, timeout, progress)
        if not zipfile.is_zipfile(zip_path):
            raise ValueError(f"what the server sent ({zip_path.stat().st_size:,} bytes) is not a zip file; "
                             "it may be truncated, corrupt or an error page")
        text = _sms_file_from_zip(zip_path, url)
        rows = parse_sms_spam(text, f"{url}:{SMS_FILE_NAME}")
        check_counts(rows, expected_counts, f"{url}:{SMS_FILE_NAME}")
        with atomic_path(target) as part:  # the cache sees all of the file or none of it
            part.write_text(text, encoding="utf-8", newline="")


# ---- Balance, split, and the CSV files ----

def balance(rows: Sequence[SpamRow], seed: int = 123) -> list[SpamRow]:
    """Undersample ham to the number of spam messages, so that always answering "ham" scores only 50%."""
    ham = [row for row in rows if row.label == LABEL_IDS["ham"]]
    spam = [row for row in rows if row.label == LABEL_IDS["spam"]]
    if not ham or not spam:
        raise ValueError(f"cannot balance: the data holds {len(ham)} ham and {len(spam)} spam messages; "
                         "both classes are needed")
    n = min(len(ham), len(spam))
    rng = random.Random(seed)
    keep_ham = sorted(rng.sample(range(len(ham)), n))  # sorted: keep the file's order before the shuffle
    keep_spam = sorted(rng.sample(range(len(spam)), n))
    return [ham[i] for i in keep_ham] + [spam[i] for i in keep_spam]


def split(rows: Sequence[SpamRow], seed: int = 123,
          fractions: tuple[float, float] = SPLIT_FRACTIONS) -> SpamSplits:
    """Shuffle with `seed`, then cut into train (70%), validation (10%) and test (the remaining 20%)."""
    train_fraction, validation_fraction = fractions
    if not (0 < train_fraction and 0 <= validation_fraction and train_fraction + validation_fraction < 1):
        raise ValueError(f"fractions must be (train, validation) > 0 with a sum below 1, got {fractions}")
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_train = int(train_fraction * len(shuffled))
    n_validation = int(validation_fraction * len(shuffled))
    return SpamSplits(train=shuffled[:n_train],
                      validation=shuffled[n_train:n_train + n_validation],
                      test=shuffled[n_train + n_validation:])


def write_split_csv(rows: Iterable[SpamRow], path: str | Path) -> Path:
    """Write rows as a CSV file with the header `text,label` (quoted where needed), atomically."""
    with atomic_path(path) as part, open(part, "w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        writer.writerows((row.text, row.label) for row in rows)
    return Path(path)


def read_split_csv(path: str | Path) -> list[SpamRow]:
    """Rows from a CSV file written by `write_split_csv` (header `text,label`, labels 0 or 1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; `load_spam_splits(write_csv=True)` or "
                                "`write_splits()` writes the split CSV files")
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header != ["text", "label"]:
            raise ValueError(f"{path}, line 1: expected the header `text,label`, got {header}")
        rows = []
        for record in reader:
            if len(record) != 2 or record[1] not in ("0", "1"):
                raise ValueError(f"{path}, line {reader.line_num}: expected a text and a label 0 or 1, got "
                                 f"{record!r:.80}")
            rows.append(SpamRow(record[0], int(record[1])))
    return rows


def write_splits(splits: SpamSplits, data_dir: str | Path) -> dict[str, Path]:
    """Write `train.csv`, `validation.csv` and `test.csv` into `data_dir`; their paths by split name."""
    return {name: write_split_csv(rows, Path(data_dir) / f"{name}.csv")
            for name, rows in zip(SPLIT_NAMES, splits, strict=True)}


def load_spam_splits(data_dir: str | Path | None = None, data_path: str | Path | None = None,
                     quick: bool | None = None, seed: int = 123, *, urls: Sequence[str] | None = None,
                     expected_counts: tuple[int, int] | None = EXPECTED_COUNTS,
                     write_csv: bool = False) -> SpamSplits:
    """The balanced train/validation/test splits, from `data_path`, else quick mode's sample, else the cache.

    `quick=None` follows LLM_SCRATCH_QUICK. The real data is downloaded into `data_dir` when missing. With
    `write_csv=True` the splits are also written as CSV files to `data_dir` (quick mode: its `quick/` folder).
    """
    quick = config.quick_mode(quick)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_sms_dir()
    if data_path is not None:
        rows = read_sms_spam(data_path)
        check_counts(rows, expected_counts, str(data_path))
    elif quick:
        rows = load_sample()
        data_dir = data_dir / "quick"  # never overwrite the real splits with the sample's
    else:
        path = download_sms_spam(data_dir, urls, expected_counts=expected_counts)
        rows = read_sms_spam(path)
        check_counts(rows, expected_counts, str(path))
    splits = split(balance(rows, seed), seed)
    if write_csv:
        write_splits(splits, data_dir)
    return splits
