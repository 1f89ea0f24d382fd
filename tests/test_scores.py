"""Scores of responses: ROUGE-L against Google's `rouge-score`, exact match, the summary; and the judge's
client against a local HTTP server that answers as Ollama does."""

from __future__ import annotations

import http.server
import json
import random
import socket
import threading
import time

import pytest

from llm_scratch.data.instruction import load_instruction_splits
from llm_scratch.judge import judge_prompt, judge_responses, ollama_chat, parse_score
from llm_scratch.responses import Response
from llm_scratch.scores import exact_match, lcs_length, rouge_l, rouge_words, summarize_scores

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score is in the test extra")


# ---- ROUGE-L ----

def perturbations(text: str, rng: random.Random) -> list[str]:
    """The reference changed in the ways a model's response differs from it."""
    words = text.split()
    i = rng.randrange(len(words))
    j = rng.randrange(len(words))
    swapped = list(words)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    return [
        text,
        " ".join(w for k, w in enumerate(words) if k % 3 != 1),  # every third word dropped
        " ".join(swapped),  # two words swapped
        " ".join(words[:i] + ["banana"] + words[i + 1 :]),  # one word replaced
        text.upper(),  # case changed
        text.replace(",", "").replace(".", " !") + "??",  # punctuation changed
        " ".join(reversed(words)),  # the order reversed
        " ".join(words[: len(words) // 2]) + " and then some more words 42",  # half of it, then other words
        "",
        " ... ",  # no word at all
    ]


def test_rouge_l_equals_rouge_scores_f1_on_the_test_split():
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # the package's default: no stemmer
    references = [entry.output for entry in load_instruction_splits().test]
    rng = random.Random(0)
    pairs = [(ref, changed) for ref in references for changed in perturbations(ref, rng)]
    pairs += [("", ""), ("", "word"), ("Café au lait, s'il vous plaît", "cafe au lait s il vous plait")]
    assert len(pairs) == 1103
    for reference, response in pairs:
        expected = scorer.score(reference, response)["rougeL"]
        ours = rouge_l(reference, response)
        assert abs(ours.f1 - expected.fmeasure) < 1e-9, (reference, response)
        assert abs(ours.precision - expected.precision) < 1e-9 and abs(ours.recall - expected.recall) < 1e-9


def test_rouge_l_equals_rouge_scores_f1_on_every_pair_of_test_references():
    """12,100 ordered pairs: mostly unrelated texts, which share a few words in some order."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    references = [entry.output for entry in load_instruction_splits().test]
    ours = [rouge_l(a, b).f1 for a in references for b in references]
    expected = [scorer.score(a, b)["rougeL"].fmeasure for a in references for b in references]
    assert max(abs(x - y) for x, y in zip(ours, expected, strict=True)) < 1e-9
    assert 0.0 < sum(expected) / len(expected) < 0.5  # not only identical or disjoint pairs


def test_rouge_l_by_hand():
    assert rouge_words("Hello, World! It's 9am.") == ["hello", "world", "it", "s", "9am"]
    assert lcs_length("a b c d e".split(), "b x d e".split()) == 3  # b d e
    assert lcs_length([], ["a"]) == 0
    # Reference 4 words, response 5, LCS 3: precision 3/5, recall 3/4, F1 = 2PR / (P + R) = 2/3.
    score = rouge_l("the cat sat down", "the cat quickly sat up")
    assert score.precision == pytest.approx(0.6) and score.recall == pytest.approx(0.75)
    assert score.f1 == pytest.approx(2 / 3)
    assert rouge_l("Same words.", "same WORDS").f1 == 1.0
    assert rouge_l("", "").f1 == 0.0 and rouge_l("a", "b") == (0.0, 0.0, 0.0)


def test_exact_match_strips_whitespace_only_and_the_summary_averages():
    assert exact_match("Paris.", "  Paris.\n") and not exact_match("Paris.", "paris.")
    summary = summarize_scores(["a b", "c d", "e"], ["a b", "c", "x"], [True, False, True])
    assert summary.n == 3 and summary.exact_matches == 1 and summary.ended_with_eos == 2
    assert summary.rouge_l_f1 == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)  # "c" vs "c d": P 1, R 1/2
    assert summary.exact_match_share == pytest.approx(1 / 3)
    assert summarize_scores(["a"], ["a"]).ended_with_eos is None
    with pytest.raises(ValueError, match="as many references as responses"):
        summarize_scores(["a"], ["a", "b"])


# ---- The judge ----

class OllamaLike(http.server.BaseHTTPRequestHandler):
    """Answers POST /api/chat with the next of the server's `replies`: (status, JSON body, delay in s)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers["Content-Length"])
        self.server.requests.append((self.path, json.loads(self.rfile.read(length))))
        status, body, delay = self.server.replies.pop(0)
        time.sleep(delay)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture
def server():
    """A local server on a free port; tests set `server.replies` and read `server.requests`."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OllamaLike)
    httpd.daemon_threads, httpd.block_on_close = True, False
    httpd.requests, httpd.replies = [], []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def chat_reply(content: str) -> tuple[int, dict, float]:
    """Ollama's answer to /api/chat with "stream": false: one JSON object, done."""
    return 200, {"model": "llama3", "created_at": "2024-06-01T00:00:00Z", "done": True, "done_reason": "stop",
                 "message": {"role": "assistant", "content": content}}, 0.0


RESPONSES = [Response("Add the numbers.", "2 and 3", "5", "5", True),
             Response("Name a primary color.", "", "Red.", "Blue is one.", True),
             Response("Say hi.", "", "Hi!", "hello hello", False)]


def test_the_judge_sends_the_prompt_and_fields_and_parses_the_scores(server):
    server.replies = [chat_reply("100"), chat_reply(" 85\n"), chat_reply("0")]
    scores = judge_responses(RESPONSES, model="judge-model", url=server.url + "/", seed=7, progress=False)
    assert scores == [100, 85, 0]
    assert [path for path, _ in server.requests] == ["/api/chat"] * 3
    path, body = server.requests[1]
    assert body == {"model": "judge-model", "stream": False,
                    "options": {"seed": 7, "temperature": 0, "num_ctx": 2048},
                    "messages": [{"role": "user", "content": judge_prompt("Name a primary color.", "", "Red.",
                                                                          "Blue is one.")}]}
    first, second = server.requests[0][1]["messages"][0]["content"], body["messages"][0]["content"]
    assert "Instruction: Add the numbers.\nInput: 2 and 3" in first and "Correct response: 5" in first
    assert "Input:" not in second and "Response to grade: Blue is one." in second
    assert "from 0 to 100" in second and "integer only" in second


def test_a_reply_that_is_not_an_integer_from_0_to_100_is_refused(server):
    server.replies = [chat_reply("90"), chat_reply("Score: 85")]
    with pytest.raises(ValueError, match=r"response 1 \('Name a primary color.'\).*got 'Score: 85'"):
        judge_responses(RESPONSES, url=server.url, progress=False)
    for reply in ("101", "-1", "08", "8.5", "", "85 points", "eighty"):
        with pytest.raises(ValueError, match="expected an integer from 0 to 100"):
            parse_score(reply)


def test_an_http_error_is_relayed_with_the_pull_command(server):
    server.replies = [(404, {"error": "model 'llama3' not found, try pulling it first"}, 0.0)]
    with pytest.raises(RuntimeError) as caught:
        ollama_chat("hi", model="llama3", url=server.url)
    message = str(caught.value)
    assert "answered HTTP 404: model 'llama3' not found" in message and "`ollama pull llama3`" in message
    assert "\n" not in message
    server.replies = [(200, {"unexpected": True}, 0.0)]
    with pytest.raises(RuntimeError, match="something other than a chat reply"):
        ollama_chat("hi", url=server.url)


def test_a_slow_server_times_out_in_one_line(server):
    server.replies = [chat_reply("50")[:2] + (1.0,)]
    with pytest.raises(RuntimeError, match=r"did not answer within 0.2 s") as caught:
        ollama_chat("hi", url=server.url, timeout_s=0.2)
    assert "\n" not in str(caught.value)


def test_an_absent_server_is_one_line_that_says_how_to_start_one():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RuntimeError, match="no judge server answers at .*`ollama serve`") as caught:
        ollama_chat("hi", url=f"http://127.0.0.1:{port}")
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="must start with http"):
        ollama_chat("hi", url="localhost:11434")
