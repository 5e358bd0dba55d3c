"""Prompt logprobs through the real server and the official client: `echo` with `logprobs` on
/v1/completions (OpenAI's legacy format, `max_tokens: 0` as lm-eval's loglikelihood requests send
it), and vLLM's `prompt_logprobs` field on completions and chat."""

from __future__ import annotations

import math

import httpx
import openai
import pytest

from .conftest import MODEL_NAME
from .test_server import assert_openai_error

PROMPT = "The capital of France is Paris, and the capital of Italy is"


def num_prompt_tokens(http: httpx.Client, prompt: str) -> int:
    return http.post("/tokenize", json={"prompt": prompt}).json()["count"]


def test_echo_with_logprobs_covers_prompt_then_completion(client: openai.OpenAI, http: httpx.Client) -> None:
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                       echo=True)
    [choice], [plain_choice] = echoed.choices, plain.choices
    assert choice.text == PROMPT + plain_choice.text
    num_prompt = num_prompt_tokens(http, PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == num_prompt + 4
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing before it
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens[:num_prompt]) == PROMPT
    assert logprobs.text_offset[:num_prompt] == [len("".join(logprobs.tokens[:i])) for i in range(num_prompt)]
    assert logprobs.text_offset[num_prompt] == len(PROMPT)
    for token, logprob, top in zip(logprobs.tokens[1:num_prompt], logprobs.token_logprobs[1:num_prompt],
                                   logprobs.top_logprobs[1:num_prompt]):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(logprob)  # the top 2, and the prompt token
    # The completion's part is what the request without echo returns.
    assert logprobs.tokens[num_prompt:] == plain_choice.logprobs.tokens
    assert logprobs.token_logprobs[num_prompt:] == pytest.approx(plain_choice.logprobs.token_logprobs, abs=1e-5)


def test_echo_without_generation_scores_the_prompt_like_lm_eval(client: openai.OpenAI, http: httpx.Client) -> None:
    """lm-eval's local-completions loglikelihood: token-id prompts in a batch, echo, logprobs 1,
    max_tokens 0; it sums token_logprobs after the context and checks greediness with top_logprobs."""
    context = http.post("/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    continuations = [http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
                     for text in (" Paris", " a banana")]
    completion = client.completions.create(model=MODEL_NAME, prompt=[context + c for c in continuations],
                                           max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert completion.usage.completion_tokens == 0
    loglikelihoods = []
    for choice, continuation in zip(sorted(completion.choices, key=lambda c: c.index), continuations):
        assert choice.finish_reason == "length"
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(context) + len(continuation)
        assert choice.text == "".join(logprobs.tokens)
        scores = logprobs.token_logprobs[len(context):]
        loglikelihoods.append(sum(scores))
        for token, logprob, top in zip(logprobs.tokens[len(context):], scores, logprobs.top_logprobs[len(context):]):
            assert top[token] == pytest.approx(logprob) and max(top.values()) >= logprob
    assert all(math.isfinite(ll) and ll < 0 for ll in loglikelihoods)
    assert loglikelihoods[0] > loglikelihoods[1], "Paris should be likelier than a banana"


def test_echo_with_logprobs_streams_the_prompt_first(client: openai.OpenAI, http: httpx.Client) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                     echo=True)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0,
                                            logprobs=1, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    token_logprobs = [lp for c in chunks for lp in c.choices[0].logprobs.token_logprobs]
    assert tokens == full.choices[0].logprobs.tokens
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(full.choices[0].logprobs.token_logprobs[1:])
    only_prompt = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, logprobs=1,
                                                 echo=True, stream=True))
    assert "".join(c.choices[0].text for c in only_prompt) == PROMPT
    assert only_prompt[-1].choices[0].finish_reason == "length"
    assert len([t for c in only_prompt for t in c.choices[0].logprobs.tokens]) == num_prompt_tokens(http, PROMPT)


def test_vllm_prompt_logprobs_field(client: openai.OpenAI, http: httpx.Client) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
                                           extra_body={"prompt_logprobs": 2})
    prompt_logprobs = completion.choices[0].model_extra["prompt_logprobs"]
    prompt = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for token_id, entry in zip(prompt[1:], prompt_logprobs[1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        assert set(entry[str(token_id)]) == {"logprob", "rank", "decoded_token"}
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[0] == 1 and ranks[1] in (1, 2)  # bf16 logits can tie for first
    # echo's legacy logprobs are the same numbers
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    expected = [None] + [entry[str(t)]["logprob"] for t, entry in zip(prompt[1:], prompt_logprobs[1:])]
    assert echoed.choices[0].logprobs.token_logprobs == pytest.approx(expected)

    chat = http.post("/v1/chat/completions", json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 2,
        "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in chat["prompt_logprobs"][1:])


BAD = [
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": -2},
     "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": 100},
     "prompt_logprobs"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_prompt_logprobs_requests(http: httpx.Client, path: str, body: dict, param: str) -> None:
    assert_openai_error(http.post(path, json=body), 400, param)
