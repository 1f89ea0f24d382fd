"""An optional judge: a larger model, served by Ollama (or a server that speaks its API), scores each response
from 0 to 100 against the reference response, as the reference course does with Llama 3.

Nothing here needs the network unless you call it. Start the server with `ollama serve`, fetch the model once
with `ollama pull llama3`, then `judge_responses(responses)`. Each call sends one chat message to
`POST {url}/api/chat` with streaming off, so the server answers one JSON object whose `message.content` is the
judge's reply; the reply must be an integer from 0 to 100 and nothing else, or it is refused.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

from tqdm.auto import tqdm

DEFAULT_URL = "http://localhost:11434"  # where `ollama serve` listens
DEFAULT_MODEL = "llama3"  # the judge of the reference course: Llama 3 8B Instruct
DEFAULT_TIMEOUT_S = 120.0  # a first call also loads the model into memory
SCORE = re.compile(r"(0|[1-9][0-9]?|100)")  # 0 to 100, no sign, no leading zero, nothing else


class Judged(Protocol):
    """What the judge reads of a response (a `llm_scratch.responses.Response` has it)."""

    instruction: str
    input: str
    reference: str
    response: str


def judge_prompt(instruction: str, input_text: str, reference: str, response: str) -> str:
    """The message the judge gets: the task, the correct response, the response to score, and the scale."""
    task = f"Instruction: {instruction}"
    if input_text:
        task += f"\nInput: {input_text}"
    return (f"Grade a response to the task below.\n\n{task}\n\nCorrect response: {reference}\n\n"
            f"Response to grade: {response}\n\n"
            "On a scale from 0 to 100, how well does the response to grade complete the task, where 100 "
            "means as well as the correct response and 0 means not at all? Answer with the integer only.")


def parse_score(reply: str) -> int:
    """The integer of a reply that is exactly an integer from 0 to 100 (spaces around it allowed)."""
    text = reply.strip()
    if not SCORE.fullmatch(text):
        raise ValueError(f"expected an integer from 0 to 100 and nothing else, got {reply!r:.200}")
    return int(text)


def ollama_chat(message: str, model: str = DEFAULT_MODEL, url: str = DEFAULT_URL, seed: int = 123,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """The reply of `model` to one user `message`: greedy (temperature 0), `seed`, a 2,048-token context.

    Raises a one-line RuntimeError when no server answers at `url`, when it times out, or when it answers an
    HTTP error (Ollama answers 404 for a model it has not pulled) or something other than a chat reply.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the judge's url must start with http:// or https://, got {url!r}")
    body = {"model": model, "messages": [{"role": "user", "content": message}], "stream": False,
            "options": {"seed": seed, "temperature": 0, "num_ctx": 2048}}
    endpoint = url.rstrip("/") + "/api/chat"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as err:  # the server answered, with an error status
        detail = _error_message(err.read())
        hint = f"; if the model is missing, run `ollama pull {model}`" if err.code == 404 else ""
        raise RuntimeError(f"the judge server at {endpoint} answered HTTP {err.code}: "
                           f"{detail}{hint}") from None
    except OSError as err:  # no answer: URLError wraps a refused connection, a read may time out bare
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise RuntimeError(f"the judge server at {endpoint} did not answer within {timeout_s} s; "
                               "a larger timeout_s gives it time to load the model") from None
        raise RuntimeError(f"no judge server answers at {endpoint} ({reason}); start one with `ollama serve` "
                           f"and `ollama pull {model}`, or pass its url") from None
    return _reply_content(raw, endpoint)


def _error_message(raw: bytes) -> str:
    """Ollama's error text from an error body {"error": "..."}, or the body itself."""
    try:
        return str(json.loads(raw)["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", errors="replace")[:200] or "(empty body)"


def _reply_content(raw: bytes, endpoint: str) -> str:
    """`message.content` of a chat reply {"message": {"role": "assistant", "content": ...}, "done": true}."""
    try:
        content = json.loads(raw)["message"]["content"]
    except (ValueError, KeyError, TypeError):
        content = None
    if not isinstance(content, str):
        raise RuntimeError(f"the judge server at {endpoint} answered something other than a chat reply "
                           f"(no message.content): {raw[:200]!r}")
    return content


def check_judge(model: str = DEFAULT_MODEL, url: str = DEFAULT_URL,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise the judge's one-line error now, before a long training, if no judge answers at `url` with a
    score (the server is down, `model` is not pulled, or it does not answer with an integer)."""
    reply = ollama_chat("Reply with the number 100 and nothing else.", model, url, timeout_s=timeout_s)
    try:
        parse_score(reply)
    except ValueError as err:
        raise RuntimeError(f"the judge {model} at {url} does not answer with a score: {err}") from None


def judge_responses(responses: Sequence[Judged], model: str = DEFAULT_MODEL, url: str = DEFAULT_URL,
                    seed: int = 123, timeout_s: float = DEFAULT_TIMEOUT_S,
                    progress: bool = True) -> list[int]:
    """The judge's score, 0 to 100, of each response in order. A reply that is not such an integer stops the
    judging with a ValueError naming the response (a score guessed from it could be wrong)."""
    scores = []
    for index, item in enumerate(tqdm(responses, desc="judging", disable=not progress)):
        prompt = judge_prompt(item.instruction, item.input, item.reference, item.response)
        reply = ollama_chat(prompt, model, url, seed, timeout_s)
        try:
            scores.append(parse_score(reply))
        except ValueError as err:
            raise ValueError(f"the judge's reply about response {index} ({item.instruction!r:.60}) is not a "
                             f"score: {err}") from None
    return scores
