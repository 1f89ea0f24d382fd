"""The data package: the SMS Spam Collection (parser, counts, balance and split, download, cache folder,
CSV files) and its batching (dataset, collate, length buckets, loaders)."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import io
import random
import socket
import threading
import time
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import llm_scratch.data
from llm_scratch import config
from llm_scratch.data import batching, instruction, sms_spam, text
from llm_scratch.tokenizer import EOS_ID, get_tokenizer

# The whole collection where the package caches it once downloaded ($LLM_SCRATCH_DATA); skipped without it.
REAL_FILE = sms_spam.default_sms_dir() / sms_spam.SMS_FILE_NAME
needs_real_file = pytest.mark.skipif(not REAL_FILE.is_file(),
                                     reason=f"the real data set is not at {REAL_FILE}")

SAMPLE_COUNTS = (500, 250)  # the shipped subset of the real collection: 250 ham + 250 spam


# --------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------

def test_parser_keeps_quotes_and_whitespace_and_handles_line_endings():
    text = ('ham\tHe said "see you at 5" and left\r\n'
            'spam\t"FREE" prize, call now\n'
            '\n'
            'ham\t  spaces kept  \n'
            'ham\tone\u2028line with a line separator inside\n')
    rows = sms_spam.parse_sms_spam(text)
    assert rows == [
        sms_spam.SpamRow('He said "see you at 5" and left', 0),
        sms_spam.SpamRow('"FREE" prize, call now', 1),
        sms_spam.SpamRow("  spaces kept  ", 0),
        sms_spam.SpamRow("one\u2028line with a line separator inside", 0),
    ]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [("ham no tab here", "no TAB"), ("junk\tsome text", "label must be one of"), ("spam\t   ", "empty")],
)
def test_parser_bad_line_names_its_line_number(bad_line: str, message: str):
    text = f"ham\tfirst\nspam\tsecond\n{bad_line}\nham\tfourth\n"
    with pytest.raises(ValueError, match=rf"my\.tsv, line 3: .*{message}"):
        sms_spam.parse_sms_spam(text, "my.tsv")


def test_read_reports_invalid_utf8_with_line_number(tmp_path: Path):
    path = tmp_path / "SMSSpamCollection"
    path.write_bytes(b"ham\tfine\nspam\tbroken \xff byte\n")
    with pytest.raises(ValueError, match=r"line 2: not valid UTF-8"):
        sms_spam.read_sms_spam(path)


def test_read_missing_file_says_what_to_pass(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="SMSSpamCollection file or the UCI zip"):
        sms_spam.read_sms_spam(tmp_path / "nope.zip")


def test_sample_counts_and_format():
    rows = sms_spam.load_sample()
    assert (len(rows), sum(row.label for row in rows)) == SAMPLE_COUNTS
    assert len({row.text for row in rows}) == len(rows)  # no duplicates that could leak across splits
    assert sum('"' in row.text for row in rows) >= 3
    assert sms_spam.LABELS == ("ham", "spam") and sms_spam.LABEL_IDS == {"ham": 0, "spam": 1}


def test_the_subset_ships_with_its_credit():
    notice = resources.files("llm_scratch.data").joinpath("sms_spam_sample_NOTICE.txt").read_text("utf-8")
    for credit in ("SMS Spam Collection", "Almeida", "Gómez Hidalgo", "CC BY 4.0", "make_sms_subset.py"):
        assert credit in notice, credit


@needs_real_file
def test_the_shipped_subset_is_the_scripts_output_from_the_real_file():
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_sms_subset.py"
    spec = importlib.util.spec_from_file_location("make_sms_subset", script)
    make_sms_subset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sms_subset)
    real = sms_spam.read_sms_spam(REAL_FILE)
    subset = make_sms_subset.sms_subset(real)
    assert _sample_bytes() == make_sms_subset.to_tsv(subset).encode("utf-8")
    assert set(subset) <= set(real)  # real messages, labels unchanged
    assert make_sms_subset.sms_subset(real, seed=1) != subset  # the seed picks the messages


def test_check_counts():
    rows = sms_spam.load_sample()
    sms_spam.check_counts(rows, SAMPLE_COUNTS, "sample")
    sms_spam.check_counts(rows, None, "sample")
    with pytest.raises(ValueError, match=r"holds 500 messages \(250 spam\).*5,574 \(747 spam\)"):
        sms_spam.check_counts(rows, sms_spam.EXPECTED_COUNTS, "sample")


# --------------------------------------------------------------------------------------------------------
# Balance, split, CSV files
# --------------------------------------------------------------------------------------------------------

def test_sample_balance_and_split_sizes(tmp_path: Path):
    splits = sms_spam.load_spam_splits(tmp_path, quick=True, seed=123, write_csv=True)
    # 250 spam + 250 ham, already balanced = 500 -> int(350.0) / int(50.0) / the remaining 100
    assert [len(part) for part in splits] == [350, 50, 100]
    everything = [row for part in splits for row in part]
    assert sum(row.label for row in everything) == 250
    assert len({row.text for row in everything}) == 500  # no message in two splits
    assert set(everything) <= set(sms_spam.load_sample())
    # Quick mode writes its CSVs into a subfolder, never over the real data set's splits.
    written = sorted(p.name for p in (tmp_path / "quick").iterdir())
    assert written == ["test.csv", "train.csv", "validation.csv"]
    assert not (tmp_path / "train.csv").exists()
    assert sms_spam.read_split_csv(tmp_path / "quick" / "test.csv") == splits.test


def test_quick_mode_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLM_SCRATCH_QUICK", "1")
    splits = sms_spam.load_spam_splits(tmp_path, write_csv=False)
    assert [len(part) for part in splits] == [350, 50, 100]
    assert not any(tmp_path.iterdir())


def test_splits_write_no_file_by_default(tmp_path: Path):
    data_path = tmp_path / "SMSSpamCollection"
    data_path.write_bytes(_sample_bytes())
    cache = tmp_path / "cache"
    from_file = sms_spam.load_spam_splits(cache, data_path=data_path, expected_counts=SAMPLE_COUNTS)
    from_sample = sms_spam.load_spam_splits(cache, quick=True)
    assert from_file == from_sample  # the same rows through the same balance and split
    assert not cache.exists()  # neither the CSVs nor the folder for them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SMSSpamCollection"]


def test_write_csv_writes_three_splits_that_read_back_equal(tmp_path: Path):
    data_path = tmp_path / "source" / "SMSSpamCollection"
    data_path.parent.mkdir()
    data_path.write_bytes(_sample_bytes())
    cache = tmp_path / "cache"
    splits = sms_spam.load_spam_splits(cache, data_path=data_path, expected_counts=SAMPLE_COUNTS,
                                       write_csv=True)
    assert sorted(p.name for p in cache.iterdir()) == ["test.csv", "train.csv", "validation.csv"]
    assert sms_spam.SpamSplits(*(sms_spam.read_split_csv(cache / f"{name}.csv")
                                 for name in sms_spam.SPLIT_NAMES)) == splits
    # write_splits stays available for splits made by hand, and returns the paths it wrote.
    paths = sms_spam.write_splits(splits, tmp_path / "again")
    assert list(paths) == list(sms_spam.SPLIT_NAMES)
    assert [sms_spam.read_split_csv(path) for path in paths.values()] == list(splits)
    with pytest.raises(FileNotFoundError, match=r"write_csv=True"):
        sms_spam.read_split_csv(tmp_path / "nowhere.csv")


def test_the_cache_folder_is_sms_spam_inside_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path / "cache"))
    assert config.data_dir() == tmp_path / "cache"
    assert sms_spam.default_sms_dir() == tmp_path / "cache" / "sms_spam"
    splits = sms_spam.load_spam_splits(quick=True, write_csv=True)  # no data_dir: the default one
    assert sms_spam.read_split_csv(tmp_path / "cache" / "sms_spam" / "quick" / "train.csv") == splits.train
    monkeypatch.delenv("LLM_SCRATCH_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sms_spam.default_sms_dir() == tmp_path / "home" / ".cache" / "llm-scratch" / "sms_spam"


def test_the_package_re_exports_both_modules():
    from llm_scratch.data import LABELS, SpamDataset, load_spam_splits, spam_dataloaders

    assert (LABELS, SpamDataset) == (sms_spam.LABELS, batching.SpamDataset)
    assert (load_spam_splits, spam_dataloaders) == (sms_spam.load_spam_splits, batching.spam_dataloaders)
    exported = llm_scratch.data.__all__
    for name in exported:  # each name is the very object of one of the data modules
        assert any(getattr(module, name, None) is getattr(llm_scratch.data, name)
                   for module in (sms_spam, batching, text, instruction)), name
    # Every public function and class of each module is exported.
    for module in (sms_spam, batching, text, instruction):
        defined = [name for name, value in vars(module).items() if not name.startswith("_")
                   and callable(value) and getattr(value, "__module__", None) == module.__name__]
        assert defined and set(defined) <= set(exported), set(defined) - set(exported)


def test_split_is_deterministic_for_a_seed_and_differs_for_another():
    rows = sms_spam.load_sample()
    first = sms_spam.split(sms_spam.balance(rows, seed=123), seed=123)
    again = sms_spam.split(sms_spam.balance(rows, seed=123), seed=123)
    other = sms_spam.split(sms_spam.balance(rows, seed=7), seed=7)
    assert first == again
    assert first.train != other.train
    assert [len(part) for part in other] == [350, 50, 100]


def test_balance_needs_both_classes():
    with pytest.raises(ValueError, match="0 spam"):
        sms_spam.balance([sms_spam.SpamRow("hello", 0), sms_spam.SpamRow("hi", 0)])


def test_csv_round_trip_with_quotes_and_commas(tmp_path: Path):
    rows = [sms_spam.SpamRow('He said "hi", then left', 0), sms_spam.SpamRow("WIN, WIN; £100 \"now\"", 1)]
    path = sms_spam.write_split_csv(rows, tmp_path / "train.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == "text,label"
    assert sms_spam.read_split_csv(path) == rows
    assert [p.name for p in tmp_path.iterdir()] == ["train.csv"]  # no temporary file left behind


def test_csv_reader_rejects_a_bad_label(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nhello,0\nworld,2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv, line 3"):
        sms_spam.read_split_csv(path)


@needs_real_file
def test_real_file_counts_balance_and_split(tmp_path: Path):
    rows = sms_spam.read_sms_spam(REAL_FILE)
    assert len(rows) == 5574
    assert sum(row.label for row in rows) == 747
    # Quotes are kept: the parser sees every `"` of the file (a csv reader with quoting would merge lines).
    assert sum(row.text.count('"') for row in rows) == REAL_FILE.read_text(encoding="utf-8").count('"')
    balanced = sms_spam.balance(rows, seed=123)
    assert len(balanced) == 1494 and sum(row.label for row in balanced) == 747

    splits = sms_spam.load_spam_splits(tmp_path, data_path=REAL_FILE, seed=123, write_csv=True)
    assert [len(part) for part in splits] == [1045, 149, 300]
    assert sms_spam.load_spam_splits(tmp_path / "again", data_path=REAL_FILE, seed=123) == splits
    assert sms_spam.load_spam_splits(tmp_path / "other", data_path=REAL_FILE, seed=124).train != splits.train
    for name, part in zip(sms_spam.SPLIT_NAMES, splits, strict=True):
        assert sms_spam.read_split_csv(tmp_path / f"{name}.csv") == part

    # The UCI zip works as a source too.
    zip_path = tmp_path / "sms+spam+collection.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(REAL_FILE, "SMSSpamCollection")
        archive.writestr("readme", "not the data")
    assert sms_spam.read_sms_spam(zip_path) == rows


# --------------------------------------------------------------------------------------------------------
# Download from a real HTTP server on 127.0.0.1
# --------------------------------------------------------------------------------------------------------

def _zip_bytes(data: bytes, member: str = "SMSSpamCollection") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("readme", "SMS spam test zip")
        archive.writestr(member, data)
    return buffer.getvalue()


def _sample_bytes() -> bytes:
    return (Path(sms_spam.__file__).parent / "sms_spam_sample.tsv").read_bytes()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `self.server.routes`: path -> (body, announced length or None, seconds to wait first)."""

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        body, announced, delay = route
        time.sleep(delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body) if announced is None else announced))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def server():
    """A threaded HTTP server on 127.0.0.1; tests fill `server.routes` and build URLs with `server.url`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes = {}
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _dead_url() -> str:
    """A URL on a port where nothing listens: the connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/sms.zip"


download = functools.partial(sms_spam.download_sms_spam, timeout=5.0, retry_delay=0.0, progress=False,
                             expected_counts=SAMPLE_COUNTS)


def test_download_success_then_cached(server, tmp_path: Path):
    server.routes["/sms.zip"] = (_zip_bytes(_sample_bytes()), None, 0.0)
    cache = tmp_path / "cache"
    path = download(cache, [server.url("/sms.zip")])
    assert path == cache / "SMSSpamCollection"
    assert path.read_bytes() == _sample_bytes()
    assert [p.name for p in cache.iterdir()] == ["SMSSpamCollection"]  # the zip and temporaries are gone
    # Once cached, no network is needed.
    assert download(cache, [_dead_url()]) == path


def test_download_uses_the_mirror_when_the_first_url_is_down(server, tmp_path: Path):
    server.routes["/mirror.zip"] = (_zip_bytes(_sample_bytes()), None, 0.0)
    path = download(tmp_path, [_dead_url(), server.url("/missing.zip"), server.url("/mirror.zip")])
    assert sms_spam.read_sms_spam(path) == sms_spam.load_sample()


def test_download_urls_from_the_environment(server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server.routes["/env.zip"] = (_zip_bytes(_sample_bytes()), None, 0.0)
    dead = _dead_url()
    monkeypatch.setenv(config.SMS_URLS_ENV, f" {dead} , {server.url('/env.zip')} ,")
    assert sms_spam.download_urls() == [dead, server.url("/env.zip")]
    assert sms_spam.download_urls(["http://example.invalid/a.zip"]) == ["http://example.invalid/a.zip"]
    monkeypatch.setenv(config.SMS_URLS_ENV, server.url("/env.zip"))
    splits = sms_spam.load_spam_splits(tmp_path, quick=False, expected_counts=SAMPLE_COUNTS, write_csv=True)
    assert [len(part) for part in splits] == [350, 50, 100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SMSSpamCollection", "test.csv", "train.csv",
                                                          "validation.csv"]
    monkeypatch.delenv(config.SMS_URLS_ENV)
    assert sms_spam.download_urls()[0] == sms_spam.UCI_URL


def _corrupt(data: bytes) -> bytes:
    """The zip with bytes in the middle of the compressed data flipped: its CRC check must fail."""
    middle = len(data) // 3
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


@pytest.mark.parametrize(
    ("body", "announced", "expected"),
    [
        pytest.param("corrupt", None, "not a readable zip file|not a zip", id="corrupt"),
        pytest.param("truncated", None, "not a zip file", id="truncated"),
        pytest.param("cut", "full", "IncompleteRead|stopped after", id="connection-cut"),
        pytest.param("no-member", None, "holds no 'SMSSpamCollection'", id="wrong-zip"),
        pytest.param("bad-counts", None, "holds 3 messages", id="wrong-counts"),
        pytest.param("not-zip", None, "not a zip file", id="html-page"),
    ],
)
def test_download_failure_is_clear_and_leaves_the_cache_empty(server, tmp_path: Path, body: str,
                                                              announced: str | None, expected: str):
    good = _zip_bytes(_sample_bytes())
    bodies = {
        "corrupt": _corrupt(good),
        "truncated": good[: len(good) // 2],
        "cut": good[: len(good) // 2],
        "no-member": _zip_bytes(_sample_bytes(), member="other.txt"),
        "bad-counts": _zip_bytes(b"ham\ta\nham\tb\nspam\tc\n"),
        "not-zip": b"<html>Service unavailable</html>",
    }
    server.routes["/sms.zip"] = (bodies[body], len(good) if announced == "full" else None, 0.0)
    cache = tmp_path / "cache"
    url = server.url("/sms.zip")
    with pytest.raises(RuntimeError) as info:
        download(cache, [url])
    message = str(info.value)
    assert f"{url} (try 1)" in message and f"{url} (try 2)" in message  # one retry
    assert any(part in message for part in expected.split("|")), message
    assert "LLM_SCRATCH_SMS_URLS" in message and "LLM_SCRATCH_QUICK=1" in message
    assert "`--data-path PATH`" in message and "`data_path=PATH`" in message
    assert list(cache.iterdir()) == []  # no half file, no temporary file


def test_download_times_out_and_names_every_url(server, tmp_path: Path):
    server.routes["/slow.zip"] = (_zip_bytes(_sample_bytes()), None, 2.0)
    dead = _dead_url()
    with pytest.raises(RuntimeError) as info:
        sms_spam.download_sms_spam(tmp_path, [server.url("/slow.zip"), dead], timeout=0.3, retry_delay=0.0,
                               progress=False, expected_counts=SAMPLE_COUNTS)
    message = str(info.value)
    assert "timed out" in message  # gave up on the slow server (2 s) after its 0.3 s timeout
    assert message.count(server.url("/slow.zip")) == 2 and message.count(dead) == 2
    assert list(tmp_path.iterdir()) == []


@needs_real_file
def test_download_checks_the_real_counts(server, tmp_path: Path):
    server.routes["/uci.zip"] = (_zip_bytes(REAL_FILE.read_bytes()), None, 0.0)
    path = sms_spam.download_sms_spam(tmp_path, [server.url("/uci.zip")], retry_delay=0.0, progress=True)
    assert path.read_bytes() == REAL_FILE.read_bytes()


# --------------------------------------------------------------------------------------------------------
# Dataset and collate
# --------------------------------------------------------------------------------------------------------

ROWS = [("Hi", 0), ("Are we still on for lunch tomorrow at noon?", 0), ("WIN a FREE prize! Call now", 1)]


def test_dataset_encodes_and_keeps_lengths():
    tokenizer = get_tokenizer()
    encoded = [tokenizer.encode_ordinary(text) for text, _ in ROWS]
    dataset = batching.SpamDataset(ROWS)
    assert len(dataset) == 3
    assert dataset.max_length == max(len(ids) for ids in encoded) == 10
    assert dataset.lengths == [len(ids) for ids in encoded] == [1, 10, 7]
    ids, label = dataset[2]
    assert ids.dtype == torch.long and ids.tolist() == encoded[2] and label == 1


def test_dataset_truncates_to_max_length_and_context_length():
    dataset = batching.SpamDataset(ROWS, max_length=5)
    assert dataset.lengths == [1, 5, 5]
    assert dataset[1][0].tolist() == get_tokenizer().encode_ordinary(ROWS[1][0])[:5]
    assert batching.SpamDataset(ROWS, context_length=4).max_length == 4  # never over the model's context
    with pytest.raises(ValueError, match="context_length"):
        batching.SpamDataset(ROWS, max_length=20, context_length=16)
    with pytest.raises(ValueError, match="at least one message"):
        batching.SpamDataset([])


def test_dataset_reads_endoftext_in_a_message_as_text():
    dataset = batching.SpamDataset([("free <|endoftext|> prize", 1)])
    assert EOS_ID not in dataset[0][0].tolist()


def test_collate_pads_to_the_longest_message_of_the_batch():
    dataset = batching.SpamDataset(ROWS)
    batch = batching.collate_spam([dataset[0], dataset[2]])
    assert batch.input_ids.shape == (2, 7)  # the longer of 1 and 7 tokens, not the data set's 10
    assert batch.lengths.tolist() == [1, 7] and batch.labels.tolist() == [0, 1]
    assert batch.input_ids[0, 1:].tolist() == [EOS_ID] * 6
    assert batch.input_ids[0, 0].item() == dataset[0][0].item()
    assert batch.input_ids[1].tolist() == dataset[2][0].tolist()
    # The last real token sits at lengths - 1.
    last = batch.input_ids[torch.arange(2), batch.lengths - 1]
    assert last.tolist() == [dataset[0][0][-1].item(), dataset[2][0][-1].item()]


def test_collate_fixed_length_padding_in_a_dataloader():
    dataset = batching.SpamDataset(ROWS)
    loader = DataLoader(dataset, batch_size=2, shuffle=False,
                        collate_fn=functools.partial(batching.collate_spam, pad_to=16))
    batches = list(loader)
    assert [tuple(b.input_ids.shape) for b in batches] == [(2, 16), (1, 16)]
    assert batches[0].lengths.tolist() == [1, 10]
    assert (batches[1].input_ids[0, 7:] == EOS_ID).all() and (batches[1].input_ids[0, :7] != EOS_ID).all()
    assert batches[0].input_ids.dtype == batches[0].lengths.dtype == batches[0].labels.dtype == torch.long
    with pytest.raises(ValueError, match="pad_to=4 is shorter"):
        batching.collate_spam([dataset[1]], pad_to=4)


# ------------------------------------------------------------------------------------------------------
# Length-bucketed batches
# ------------------------------------------------------------------------------------------------------

def _bucket_epochs(lengths, seed, epochs=2, batch_size=8):
    sampler = batching.LengthBucketSampler(lengths, batch_size=batch_size, seed=seed, pool_batches=4)
    return sampler, [list(sampler) for _ in range(epochs)]


def test_bucketing_covers_every_example_once_per_epoch():
    lengths = [random.Random(i).randint(3, 90) for i in range(203)]
    sampler, epochs = _bucket_epochs(lengths, seed=123)
    for batches in epochs:
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(203))
        assert len(batches) == len(sampler) == 26  # 6 pools of 32 (4 batches each), then 11 -> 2 batches
        assert all(1 <= len(b) <= 8 for b in batches)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_bucketing_is_deterministic_and_cuts_padding():
    lengths = [random.Random(i).randint(3, 90) for i in range(400)]
    _, first = _bucket_epochs(lengths, seed=5)
    _, again = _bucket_epochs(lengths, seed=5)
    _, other = _bucket_epochs(lengths, seed=6)
    assert first == again and first != other

    def padded_tokens(batches):  # tokens a dynamically padded epoch computes on
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = [list(range(400))[i : i + 8] for i in range(0, 400, 8)]
    random.Random(0).shuffle(shuffled)
    assert padded_tokens(first[0]) < 0.75 * padded_tokens(shuffled)


def test_bucketed_loaders_yield_every_training_message():
    splits = sms_spam.load_spam_splits(quick=True, write_csv=False)
    loaders = batching.spam_dataloaders(splits, batch_size=8, context_length=256, bucket=True, seed=1)
    seen = sorted(int(n) for batch in loaders.train for n in batch.lengths)
    assert seen == sorted(loaders.train.dataset.lengths)
    assert len(loaders.train) == 44  # 350 messages in batches of 8
