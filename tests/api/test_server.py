"""The OpenAI-compatible server, end to end: a real server process driven by the official client."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import openai
import pytest

from engine.allocator import find_allocator

from .conftest import MAX_MODEL_LEN, MODEL_NAME, ServerProcess, metric, scrape

PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]


def test_models_health_version(client: openai.OpenAI, http: httpx.Client) -> None:
    model, *aliases = client.models.list().data
    assert model.id == MODEL_NAME
    assert all(alias.id.startswith(f"{MODEL_NAME}@") for alias in aliases)  # elastic levels, if any
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


@pytest.mark.skipif(find_allocator() is None, reason="neither tcmalloc nor jemalloc is installed")
def test_the_server_runs_on_the_installed_allocator(server: ServerProcess) -> None:
    maps = open(f"/proc/{server.process.pid}/maps").read()  # the PID Popen started: exec kept it
    assert find_allocator().name in maps
    assert "Memory allocator: " + ("jemalloc" if "jemalloc" in find_allocator().name else "tcmalloc") in server.log()



def test_the_server_freezes_its_start_up_heap_and_collects_what_requests_leave(server: ServerProcess,
                                                                               client: openai.OpenAI) -> None:
    """The start-up heap (model, tokenizer, routes) is frozen, so a full collection no longer
    walks it; the frozen count comes from the server's own gc.get_freeze_count()."""
    client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4)
    frozen = re.search(r"Froze (\d+) start-up objects", server.log())
    assert frozen is not None, server.log()
    assert int(frozen.group(1)) > 100_000


def test_freezing_moves_every_live_object_out_of_collections() -> None:
    import gc

    from engine.api.server import freeze_startup_heap

    garbage = [[i] for i in range(1000)]  # live, tracked
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() >= 1000
        assert all(not any(item is obj for obj in gc.get_objects()) for item in garbage[:3])
        cycle: list = []
        cycle.append(cycle)  # made after the freeze: still collected
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()  # this test process builds and frees many engines: leave the heap as it was


def test_completion(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    [choice] = completion.choices
    assert choice.finish_reason == "length" and choice.text
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    [choice] = chat.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert chat.usage.completion_tokens <= 8


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}]
    # Twice, so that this request and the streamed one both start from the same prefix-cache hit:
    # a hit leaves a few rows to compute, and in bf16 a few rows run another kernel (the quantized
    # linear) than a whole prompt does, which can flip a greedy near-tie.
    for _ in range(2):
        full = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=8,
                                              temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_samples_and_seed(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, n=3,
                                               temperature=1.0, seed=seed)
        assert sorted(c.index for c in completion.choices) == [0, 1, 2]
        assert completion.usage.completion_tokens == sum(8 for _ in completion.choices)
        return [c.text for c in sorted(completion.choices, key=lambda c: c.index)]

    first = sample(1234)
    assert sample(1234) == first
    assert len(set(first)) > 1  # the n samples differ from each other


def test_multiple_prompts_and_token_ids(client: openai.OpenAI, http: httpx.Client) -> None:
    token_ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": token_ids}).json()["prompt"] == PROMPT
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=token_ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model=MODEL_NAME, prompt=[token_ids, token_ids], max_tokens=5, temperature=0,
                                      n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert {c.text for c in batch.choices} == {by_text.choices[0].text}
    assert batch.usage.prompt_tokens == 2 * len(token_ids)
    strings = client.completions.create(model=MODEL_NAME, prompt=["Hi", "Bye"], max_tokens=3, temperature=0)
    assert len(strings.choices) == 2


def test_stop_string(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    stop = full.strip().split()[1]  # a word the greedy text contains past its start
    stopped = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[:full.index(stop)]


def test_echo(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert completion.choices[0].text.startswith(PROMPT)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == completion.choices[0].text
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset[1] == len(logprobs.tokens[0])
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert top[token] == pytest.approx(max(top.values()))  # greedy picks the most likely


def test_chat_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for entry in content:
        assert entry.logprob <= 0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
    if chat.choices[0].finish_reason == "length":
        assert "".join(e.token for e in content) == chat.choices[0].message.content


def test_streams_with_n_and_logprobs(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=6, n=2, seed=3,
                                                 stream=True, logprobs=True, top_logprobs=1))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        text = "".join(choice.delta.content or "" for choice in mine)
        tokens = "".join(e.token for choice in mine if choice.logprobs for e in choice.logprobs.content)
        assert mine[-1].finish_reason in ("stop", "length")
        if mine[-1].finish_reason == "length":  # an end-of-sequence token has a logprob but no text
            assert text == tokens
    completion_chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                                       logprobs=1, stream=True))
    offsets = [o for c in completion_chunks for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in completion_chunks for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 6 and offsets == [sum(len(t) for t in tokens[:i]) for i in range(6)]
    echoed = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in echoed).startswith(PROMPT)


def test_64_concurrent_streams(client: openai.OpenAI) -> None:
    def stream(i: int) -> tuple[str, int]:
        chunks = list(client.completions.create(model=MODEL_NAME, prompt=f"{i} + {i} =", max_tokens=16,
                                                temperature=0.8, seed=i, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(stream, range(64)))
    assert all(num_tokens == 16 for _, num_tokens in results)
    assert all(text for text, _ in results)


def test_usage_counts_prompt_tokens_computed_in_full(http: httpx.Client) -> None:
    """A prompt past the pruning threshold at prompt_keep 0.5 runs half its tokens through every
    layer; vllm_xargs says the same; a short prompt is never pruned, and says so (keep 1.0)."""
    long_prompt = "The grass is green. " * 120
    for extra in ({"elastic": {"prompt_keep": 0.5}}, {"vllm_xargs": {"prompt_keep": 0.5}}):
        usage = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 2, **extra}).json()["usage"]
        assert usage["prompt_tokens_computed_in_full"] == -(-usage["prompt_tokens"] // 2)
        assert usage["prompt_keep"] == 0.5
    usage = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2,
                                               "elastic": {"prompt_keep": 0.5}}).json()["usage"]
    assert usage["prompt_tokens_computed_in_full"] == usage["prompt_tokens"] and usage["prompt_keep"] == 1.0
    assert "engine:pruned_prompt_tokens_total" in http.get("/metrics").text


# ---- bad input: HTTP 400 with an OpenAI error body, and the server unharmed ----

LONG_PROMPT = "hello " * (MAX_MODEL_LEN + 10)
BAD_COMPLETIONS = [
    ({"prompt": 5}, "prompt"),
    ({"prompt": PROMPT, "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "n": 100000}, "n"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": -5}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 10**30}, "max_tokens"),
    ({"prompt": PROMPT, "logprobs": 1000}, "logprobs"),
    ({"prompt": PROMPT, "seed": 2**70}, "seed"),
    ({"prompt": PROMPT, "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": PROMPT, "model": "gpt-4"}, "model"),
    ({"prompt": [999_999_999]}, "prompt"),
    ({"prompt": [-1, 5]}, "prompt"),
    ({"prompt": [[1, 2], "text"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": LONG_PROMPT}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ({"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": PROMPT, "stream_options": "yes"}, "stream_options"),
    ({"prompt": PROMPT, "stream": True, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "slo": {"ttft_ms": -1}}, "slo.ttft_ms"),
    ({"prompt": PROMPT, "slo": {"tpot_ms": 0}}, "slo.tpot_ms"),
    ({"prompt": PROMPT, "slo": "fast"}, "slo"),
    ({"prompt": PROMPT, "elastic": {"prompt_keep": 0}}, "elastic.prompt_keep"),
    ({"prompt": PROMPT, "elastic": {"prompt_keep": 1.5}}, "elastic.prompt_keep"),
    ({"prompt": PROMPT, "elastic": {"prompt_keep": "half"}}, "elastic.prompt_keep"),
    ({"prompt": PROMPT, "vllm_xargs": {"prompt_keep": -0.5}}, "elastic.prompt_keep"),
    ({"prompt": PROMPT, "vllm_xargs": {"prompt_keep": "half"}}, "vllm_xargs.prompt_keep"),
    ({}, "prompt"),
]
BAD_CHATS = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": LONG_PROMPT}]}, "max_tokens"),
]


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS)
def test_bad_completion_request(http: httpx.Client, body: dict, param: str) -> None:
    assert_openai_error(http.post("/v1/completions", json=body), 400, param)


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
def test_bad_chat_request(http: httpx.Client, body: dict, param: str) -> None:
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("content", [b'{"prompt": ', b"[1, 2]", b"\xff\xfe", b"null"])
def test_malformed_json(http: httpx.Client, content: bytes) -> None:
    response = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_unknown_fields_are_ignored(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "frobnicate": True})
    assert response.status_code == 200


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_oversized_body(http: httpx.Client) -> None:
    response = http.post("/v1/completions", content=b"x" * (9 * 1024 * 1024),
                         headers={"content-type": "application/json"})
    assert_openai_error(response, 413)


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=-2)
    assert info.value.body["param"] == "temperature"


def test_healthy_after_bad_input(client: openai.OpenAI, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    assert client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


# ---- cancellation ----

def wait_until_idle(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(base_url)
        if (metric(samples, "engine:num_requests_running") == 0
                and metric(samples, "engine:kv_cache_usage_perc") == 0):
            return samples
        assert time.monotonic() < deadline, f"engine still busy: {samples}"
        time.sleep(0.2)


def test_disconnect_mid_stream_aborts(server: ServerProcess) -> None:
    aborted_before = metric(scrape(server.base_url), "engine:request_success_total", finished_reason="abort")
    body = {"prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http_client:
        with http_client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(6):  # a few chunks (and blank separators) in: the request is running
                next(lines)
            assert metric(scrape(server.base_url), "engine:num_requests_running") == 1
    samples = wait_until_idle(server.base_url)
    assert metric(samples, "engine:request_success_total", finished_reason="abort") == aborted_before + 1


def test_disconnect_non_streaming_aborts(server: ServerProcess) -> None:
    body = {"messages": CHAT, "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=1.5)
    wait_until_idle(server.base_url)


def test_metrics_after_traffic(server: ServerProcess) -> None:
    samples = scrape(server.base_url)
    labels = {"model_name": MODEL_NAME}
    assert metric(samples, "engine:prompt_tokens_total", **labels) > 0
    assert metric(samples, "engine:generation_tokens_total", **labels) > 0
    assert metric(samples, "engine:request_success_total", finished_reason="length", **labels) > 0
    assert metric(samples, "engine:time_to_first_token_seconds_count", **labels) > 0
    assert metric(samples, "engine:inter_token_latency_seconds_count", **labels) > 0
    assert metric(samples, "engine:e2e_request_latency_seconds_count", **labels) > 0
    assert metric(samples, "engine:iteration_tokens_total_count", **labels) > 0
    assert 0 <= metric(samples, "engine:kv_cache_usage_perc", **labels) <= 1
    json.dumps(samples)  # all plain numbers
